"""benchmarks/run.py: the JSON it writes and its table, on the tiniest sizes (no timing is checked)."""

import argparse
import json
import math
import subprocess
import sys

import pytest
from conftest import BENCHMARKS


def test_run_writes_a_finite_ratio_and_its_goal_for_each_benchmark_asked_for(tmp_path):
    names = ["padding_fraction", "native_qwen2audio", "native_granite_speech"]
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--only", *names, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(out.read_text())
    assert list(results) == names
    table = {line.split()[0]: line for line in completed.stdout.splitlines() if line.strip()}
    for name, result in results.items():
        assert isinstance(result["ratio"], float) and math.isfinite(result["ratio"]), name
        assert isinstance(result["goal"], float) and result["higher_is_better"] is False, name
        assert "machine" in result and result["wall_s"] >= 0
        assert f"<= {result['goal']}" in table[name]
    for name in names[1:]:  # each native comparison states the sizes of both models' parts, and what each does
        parameters = results[name]["parameters"]
        assert parameters["ours"]["llm"] == parameters["native"]["llm"] > 0
        assert set(parameters["ours"]) == set(parameters["native"]) == {"encoder", "projector", "llm", "trainable"}
        assert results[name]["work"] and results[name]["audio_tokens"]
    qwen = results["native_qwen2audio"]
    assert qwen["encoder_frames"]["native"] == 1500 > qwen["encoder_frames"]["ours"]  # 30 s of padding vs the clip


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run

    return run


def test_a_benchmark_that_needs_cuda_is_skipped_with_the_reason(runner, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)
    gpu = runner.Benchmark("gpu_only", "padding", "run", requires_cuda=True)
    monkeypatch.setattr(runner, "BENCHMARKS", (gpu,))
    assert runner.main(["--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())["gpu_only"]
    assert result["skipped"] == "CUDA is not available" and result["ratio"] is None
    assert "skipped: CUDA is not available" in capsys.readouterr().out


def test_a_failing_benchmark_is_reported_and_the_others_still_run(runner, monkeypatch, tmp_path, capsys):
    broken = runner.Benchmark("broken", "padding", "run", smoke={"no_such_option": 1})
    monkeypatch.setattr(runner, "BENCHMARKS", (broken, runner.BENCHMARKS[0]))
    assert runner.main(["--smoke", "--json", str(tmp_path / "out.json")]) == 1
    results = json.loads((tmp_path / "out.json").read_text())
    assert "has no option --no_such_option" in results["broken"]["error"]
    assert math.isfinite(results["padding_fraction"]["ratio"])
    assert "error: ValueError" in capsys.readouterr().out


def test_goals_are_judged_in_their_direction_and_a_gpu_goal_measured_on_cpu_says_so(runner):
    assert runner.verdict({"ratio": 0.7, "goal": 1.0, "higher_is_better": False}) == "pass"
    assert runner.verdict({"ratio": 1.2, "goal": 1.0, "higher_is_better": False}) == "MISS"
    measured_on_cpu = {"ratio": 6.0, "goal": 5, "higher_is_better": True, "goal_device": "cuda", "device": "cpu"}
    assert runner.verdict(measured_on_cpu) == "pass (goal set for cuda; measured on cpu)"
    assert runner.verdict({"ratio": 9.0, "goal": None, "higher_is_better": True}) == "reported (no goal)"


def test_long_audio_benchmark_measures_each_length_in_its_windows(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--only", "long_audio_memory"]
    completed = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())["long_audio_memory"]
    assert math.isfinite(result["ratio"]) and result["goal"] == 1.2
    short, long = result["lengths"]
    assert (short["minutes"], long["minutes"]) == (0.25, 0.75)
    assert (short["encoder_windows"], long["encoder_windows"]) == (1, 2)  # 15 s in one window, 45 s in two
    assert long["audio_tokens"] > 2 * short["audio_tokens"]


def test_datasets_streaming_runs_both_sources_on_the_same_clips(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import datasets_streaming

    args = argparse.Namespace(rows=4, steps=2, batch_size=2, repeats=1, threads=None)
    result = datasets_streaming.run(args)
    assert result["goal"] == 0.8 and result["manifest_steps_per_s"] > 0 and result["streaming_steps_per_s"] > 0
    # 2 steps of 2 rows, read from the 4 streamed rows, all of them kept
    assert result["stream_report"]["total"] == result["stream_report"]["kept"] >= 4
