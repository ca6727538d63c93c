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


def test_quickstart_without_jiwer_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jiwer", None)  # makes `import jiwer` raise ImportError
    with pytest.raises(ImportError, match=r"speechllm_hf\[eval\]"):
        main(["quickstart", "--output_dir", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()  # nothing was trained or written
