"""The paper pipelines in examples/ cannot run here (GPUs, gated models, MuST-C), but every command they run must
still parse: a renamed flag or sub-command would otherwise only show on a user's cluster.

Each run.sh is sourced by bash with `speechllm-hf` and `accelerate` replaced by functions that record their
arguments (and `python` / `cat` by no-ops); the recorded calls then go through the real argument parsers.
"""

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from speechllm_hf.cli import build_parser

SCRIPTS = sorted((REPO / "examples").glob("*/run.sh"))
FIELD, CALL = "\x1f", "\x1e"
RECORDER = f"""
record() {{ local a; for a in "$@"; do printf '%s{FIELD}' "$a"; done; printf '{CALL}'; }} >> "$CALLS"
speechllm-hf() {{ record speechllm-hf "$@"; }}
accelerate() {{ record accelerate "$@"; }}
python() {{ command cat > /dev/null; }}  # the inline Python steps read a heredoc; they use the public API only
cat() {{ :; }}
source "$SCRIPT"
"""


def recorded_calls(script: Path, tmp_path: Path) -> list[list[str]]:
    calls = tmp_path / "calls"
    env = {**os.environ, "CALLS": str(calls), "SCRIPT": str(script), "WORK": str(tmp_path / "work")}
    env.update(HUB_REPO="me/projector", SUBSET="0.1", LOSS="kl")  # take the optional branches too
    result = subprocess.run(["bash", "-c", RECORDER], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [call.split(FIELD)[:-1] for call in calls.read_text().split(CALL)[:-1]]


def speechllm_arguments(call: list[str]) -> list[str]:
    """The speechllm-hf arguments of a call: direct, or after `accelerate launch ... -m speechllm_hf`."""
    if call[0] == "speechllm-hf":
        return call[1:]
    assert call[:2] == ["accelerate", "launch"], call
    config = call[call.index("--config_file") + 1]
    assert yaml.safe_load((REPO / config).read_text())["distributed_type"], config
    return call[call.index("-m") + 2 :]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.parent.name for s in SCRIPTS])
def test_every_example_command_parses(script, tmp_path):
    from transformers import HfArgumentParser

    from speechllm_hf.commands.train import DataArguments, ModelArguments, methods

    calls = [speechllm_arguments(call) for call in recorded_calls(script, tmp_path)]
    commands = [arguments[0] for arguments in calls]
    assert "train" in commands and "push" in commands, commands
    parser = build_parser()
    for arguments in calls:
        args, extra = parser.parse_known_args(arguments)
        if args.command != "train":
            assert not extra, f"{arguments}: unknown flags {extra}"
            continue
        _, arguments_class = methods()[args.method]
        # argparse level only: TrainingArguments' own checks (bf16 needs a GPU, ...) belong to the user's machine.
        parsed = HfArgumentParser((ModelArguments, DataArguments, arguments_class)).parse_args(extra)
        assert isinstance(parsed, argparse.Namespace) and parsed.train_manifest, arguments


def test_accelerate_configs_and_the_eval_data_config_load(monkeypatch, tmp_path):
    from speechllm_hf.evaluation.data_config import load_data_config

    for config in (REPO / "examples" / "accelerate").glob("*.yaml"):
        assert yaml.safe_load(config.read_text())["distributed_type"], config
    monkeypatch.setenv("DATA_HOME", str(tmp_path))
    data_config = load_data_config(REPO / "examples" / "contrastive_pretraining" / "eval_mustc_squad.yaml")
    assert [(entry.task, entry.datapath.parent) for entry in data_config.entries] == [
        ("ASR", tmp_path),
        ("ST", tmp_path),
        ("SQA", tmp_path),
    ]


def test_plain_trainer_example_trains_saves_reloads_and_runs_the_pipeline(tmp_path):
    """examples/plain_trainer.py: a plain Trainer with the exported collator, LoRA through peft's get_peft_model, a
    PeftModel reload over the AutoModel base with the same logits, and the pipeline on a raw array."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_trainer", REPO / "examples" / "plain_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--output_dir", str(tmp_path), "--max_steps", "4"])
    assert result["reload_max_abs_logit_difference"] == 0.0
    assert isinstance(result["pipeline_answer"], str) and result["pipeline_answer"]
    adapter = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter
