"""The quickstart pipeline end to end, with few steps (the README's main command runs the full recipe)."""

import json
import os
import sys

import pytest

from speechllm_hf.cli import main


def test_quickstart_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "quickstart"
    argv = [
        "quickstart",
        "--output_dir",
        str(out),
        "--text_steps",
        "4",
        "--contrastive_steps",
        "4",
        "--asr_steps",
        "4",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    layers = {"layer_0", "layer_1", "layer_2"}
    assert set(results["retrieval_R@1"]["before"]) == layers and set(results["retrieval_R@1"]["after"]) == layers
    assert {"mean_utterance", "corpus"} == set(results["wer"]["before"])
    assert {"mean_utterance", "corpus"} == set(results["wer"]["after"])
    # The reloaded model came from a projector-only save whose backbones are referenced by folder.
    assert "projector.safetensors" in results["saved_files"] and "model.safetensors" not in results["saved_files"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert os.path.isdir(config["encoder_name_or_path"]) and os.path.isdir(config["text_name_or_path"])
    report = (out / "report.md").read_text()
    assert "R@1" in report and "WER" in report
    for image in ("losses.png", "similarity.png"):
        assert (out / image).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("module, extra", [("jiwer", "eval"), ("matplotlib", "plots")])
@pytest.mark.parametrize("backbones", ["tiny", "real"])
def test_quickstart_without_an_extra_fails_before_training(module, extra, backbones, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise ImportError
    with pytest.raises(ImportError, match=rf"speechllm_hf\[{extra}\]"):
        main(["quickstart", "--backbones", backbones, "--output_dir", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()  # nothing was trained or written


def test_each_set_of_backbones_keeps_its_own_defaults_and_refuses_the_others_flags(tmp_path, monkeypatch):
    """The flags of both configs share one parser: a flag left out takes the chosen backbones' default (the real run
    once trained at the tiny run's learning rates), and a flag of the other set is refused, not ignored."""
    from speechllm_hf.quickstart import real
    from speechllm_hf.quickstart.real import RealQuickstartConfig
    from speechllm_hf.quickstart.tiny import QuickstartConfig

    configs = []
    monkeypatch.setattr(real, "run_real_quickstart", lambda out, config: configs.append(config) or {})
    argv = ["quickstart", "--backbones", "real", "--output_dir", str(tmp_path)]
    assert main([*argv, "--asr_steps", "7"]) == 0
    expected = RealQuickstartConfig(asr_steps=7)
    assert configs == [expected]
    assert expected.contrastive_learning_rate != QuickstartConfig().contrastive_learning_rate
    with pytest.raises(SystemExit, match="--text_steps: not an option of --backbones real"):
        main([*argv, "--text_steps", "5"])
