"""Training safety: a diverged run stops before writing a poisoned checkpoint (all three trainers, gradient
accumulation, fp16 skipped steps, two processes); bf16 by default where supported; checkpoints are marked complete
once fully written and resume never picks a half-written one; resuming unpickles nothing beyond transformers'
`weights_only` state files."""

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SCRIPTS, TRAINERS, TRANSFORMERS_5
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

import speechllm_hf.training.arguments as arguments_module
from speechllm_hf.commands.train import parse_arguments, resume_argument
from speechllm_hf.training import (
    SpeechLlmTrainer,
    SpeechLlmTrainingArguments,
)
from speechllm_hf.training.checkpoints import COMPLETE_MARKER, incomplete_reason, last_complete_checkpoint
from speechllm_hf.training.divergence import TrainingDivergedError


def nan_at_micro_batch(trainer_class, poisoned: int):
    """`trainer_class` whose `poisoned`-th training micro-batch (counted from 1) has a NaN loss."""

    class Poisoned(trainer_class):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                self.micro_batches = getattr(self, "micro_batches", 0) + 1
                if self.micro_batches == poisoned:
                    loss = loss * float("nan")
            return loss

    return Poisoned


def checkpoints(output_dir):
    return sorted(p.name for p in Path(output_dir).iterdir() if p.name.startswith("checkpoint-"))


# ---------------------------------------------------------------------------------------------------------------------
# A diverged run stops before its checkpoint is written.


@pytest.mark.parametrize("method", TRAINERS)
def test_a_nan_loss_in_one_accumulated_micro_batch_stops_before_its_checkpoint(method, tmp_path, make_trainer):
    # Step 3 is micro-batches 5 and 6; only the first is NaN. The Trainer alone would log a finite loss for step 3
    # (logging_nan_inf_filter puts the running average in its place) and save NaN weights as checkpoint-3.
    trainer_class = nan_at_micro_batch(TRAINERS[method][0], poisoned=5)
    trainer = make_trainer(tmp_path, method, trainer_class, gradient_accumulation_steps=2)
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith("Training stopped at step 3: the loss was NaN or infinite")
    assert f"the newest complete one is {tmp_path / 'checkpoint-2'}" in message
    assert "--learning_rate (now 0.001)" in message and "check the data of this step" in message
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert incomplete_reason(tmp_path / "checkpoint-2") is None
    projector = load_file(tmp_path / "checkpoint-2" / "projector.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in projector.values())
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]  # step 3 was never logged


def test_weights_made_non_finite_under_a_finite_loss_stop_the_run(tmp_path, make_trainer):
    # A backward pass that overflows (possible in half precision) gives a NaN gradient under a finite loss. Whether
    # it spreads to the other weights depends on the Trainer version (a gradient norm computed without clipping
    # spreads it; transformers 5.25 computes none at max_grad_norm=0): the poisoned weight is named first either way.
    trainer = make_trainer(tmp_path, max_grad_norm=0.0)
    weight = next(iter(trainer.model.projector.parameters()))
    weight.register_hook(lambda grad: grad * float("nan") if trainer.state.global_step == 1 else grad)
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.train()
    message = str(caught.value)
    first = next(name for name, p in trainer.model.named_parameters() if p.requires_grad)
    assert message.startswith(
        f"Training stopped at step 2: trainable weights became NaN or infinite in the update ({first}, "
    )
    assert "gradient clipping (--max_grad_norm 1.0)" in message  # clipping was off
    assert checkpoints(tmp_path) == ["checkpoint-1"]


def test_skipped_fp16_steps_stop_the_run_only_when_they_persist(tmp_path, make_trainer):
    # fp16 needs a GPU; on the CPU the Trainer gets the same torch GradScaler by hand (fp32 gradients, which a loss
    # times 1e36 still overflows once scaled) with its default fused AdamW, which skips inside its own kernel.
    # tests/scripts/gpu_training_safety.py runs the real fp16 case.
    overflowing = {2, 4, 5, 6, 7}  # one skip, a real step, then skips from step 4 on

    class Overflowing(SpeechLlmTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * 1e36 if self.state.global_step + 1 in overflowing else loss

    trainer = make_trainer(tmp_path, trainer_class=Overflowing, max_steps=8, save_strategy="no", max_skipped_steps=3)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(TrainingDivergedError, match=r"^Training stopped at step 6: the last 3 optimizer steps were"):
        trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 / 2**4  # halved at steps 2, 4, 5 and 6


def test_a_nan_loss_on_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # As in test_contrastive: --multi_gpu starts torchrun, and use_cpu=True puts both processes in one gloo group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), str(SCRIPTS / "diverging_ddp.py"), str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # process 0's own loss was finite: it stops because the verdict is reduced
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("Training stopped at step 3: the loss was NaN or infinite (on at least one process)")
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2"]


# ---------------------------------------------------------------------------------------------------------------------
# bf16 by default where supported.


@pytest.fixture
def bf16_capable(monkeypatch):
    """Pretend the accelerator supports bf16, for our default and for transformers' own check of --bf16."""
    monkeypatch.setattr(arguments_module, "native_bf16_gpu", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


@pytest.mark.parametrize("method", TRAINERS)
def test_bf16_is_on_by_default_where_supported(method, tmp_path, bf16_capable, caplog):
    arguments_class = TRAINERS[method][1]
    with caplog.at_level(logging.INFO, logger="speechllm_hf.training.arguments"):
        args = arguments_class(output_dir=str(tmp_path))
    assert args.bf16 and not args.fp16
    assert "bf16 mixed precision is on" in caplog.text


@pytest.mark.parametrize(
    "settings, env",
    [
        ({"bf16": False}, None),  # opted out
        ({"fp16": True}, None),  # fp16 asked for
        ({"use_cpu": True}, None),
        ({}, "fp16"),  # accelerate launch --mixed_precision fp16
    ],
)
def test_bf16_stays_off_when_something_else_was_asked_for(settings, env, tmp_path, bf16_capable, monkeypatch):
    if env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    args = SpeechLlmTrainingArguments(output_dir=str(tmp_path), **settings)
    assert not args.bf16
    assert args.fp16 == settings.get("fp16", False)


def test_bf16_stays_off_without_support(tmp_path, monkeypatch):
    monkeypatch.setattr(arguments_module, "native_bf16_gpu", lambda: False)
    assert not SpeechLlmTrainingArguments(output_dir=str(tmp_path)).bf16


def test_only_a_gpu_with_bf16_in_hardware_counts(monkeypatch):
    # torch emulates bf16 on pre-Ampere GPUs and says so unless asked for hardware support only.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not arguments_module.native_bf16_gpu()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert arguments_module.native_bf16_gpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not arguments_module.native_bf16_gpu()


def test_train_command_bf16_flag_forms(tmp_path, bf16_capable):
    def bf16(*argv):
        return parse_arguments(SpeechLlmTrainingArguments, None, ["--output_dir", str(tmp_path), *argv])[2].bf16

    assert bf16() is True  # decided from the (pretended) hardware
    assert bf16("--bf16") is True
    assert bf16("--bf16", "False") is False
    config = tmp_path / "cfg.yaml"
    config.write_text("bf16: false\n")
    assert parse_arguments(SpeechLlmTrainingArguments, str(config), ["--output_dir", str(tmp_path)])[2].bf16 is False


# ---------------------------------------------------------------------------------------------------------------------
# Complete checkpoints.


def test_every_checkpoint_is_marked_complete_with_its_files(tmp_path, make_trainer):
    make_trainer(tmp_path, max_steps=2).train()
    for name in ("checkpoint-1", "checkpoint-2"):
        folder = tmp_path / name
        recorded = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        on_disk = {p.name for p in folder.iterdir()} - {COMPLETE_MARKER}
        assert set(recorded) == on_disk and {"projector.safetensors", "optimizer.pt", "trainer_state.json"} <= on_disk
        assert incomplete_reason(folder) is None


def test_a_truncated_or_unmarked_checkpoint_is_incomplete(tmp_path, make_trainer):
    make_trainer(tmp_path, max_steps=2).train()
    truncated, unmarked = tmp_path / "checkpoint-2", tmp_path / "checkpoint-1"
    size = (truncated / "optimizer.pt").stat().st_size
    with open(truncated / "optimizer.pt", "r+b") as file:
        file.truncate(10)
    assert incomplete_reason(truncated) == f"optimizer.pt has 10 bytes, {size} when the checkpoint was written"
    (unmarked / COMPLETE_MARKER).unlink()
    assert incomplete_reason(unmarked) == f"it has no {COMPLETE_MARKER}, so its writing did not finish"
    assert last_complete_checkpoint(tmp_path) is None


def test_a_checkpoint_killed_half_way_is_never_resumed(tmp_path, monkeypatch, caplog, make_trainer, local_backbones):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "killed_checkpoint.py"), str(tmp_path), str(local_backbones)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-3000:]
    killed = tmp_path / "checkpoint-4"
    assert {"projector.safetensors", "optimizer.pt"} <= set(os.listdir(killed))  # written before the kill
    assert get_last_checkpoint(str(tmp_path)) == str(killed)  # what transformers alone would resume from
    assert incomplete_reason(tmp_path / "checkpoint-2") is None and incomplete_reason(killed) is not None

    refused = rf"Cannot resume from .*checkpoint-4: it has no {COMPLETE_MARKER}.* beside it is .*checkpoint-2\."
    with pytest.raises(ValueError, match=refused):
        make_trainer(tmp_path, max_steps=6, save_steps=2).train(resume_from_checkpoint=str(killed))

    loaded = []
    load = SpeechLlmTrainer._load_from_checkpoint

    def recording_load(self, path, *args):
        loaded.append(path)
        return load(self, path, *args)

    monkeypatch.setattr(SpeechLlmTrainer, "_load_from_checkpoint", recording_load)
    trainer = make_trainer(tmp_path, max_steps=6, save_steps=2)
    with caplog.at_level(logging.WARNING, logger="speechllm_hf.training.checkpoints"):
        trainer.train(resume_from_checkpoint=resume_argument("last"))
    assert loaded == [str(tmp_path / "checkpoint-2")]
    assert f"Skipping {killed}, an incomplete checkpoint: it has no {COMPLETE_MARKER}" in caplog.text
    assert trainer.state.global_step == 6 and incomplete_reason(killed) is None  # written again, in full


def test_an_interrupted_write_never_costs_the_last_complete_checkpoint(tmp_path, monkeypatch, make_trainer):
    # save_total_limit=1: the Trainer deletes older checkpoints as part of writing a new one; here the write of
    # checkpoint-2 is interrupted after every file but the marker, where the Trainer has already rotated.
    import speechllm_hf.training.trainer as trainer_module

    mark_complete = trainer_module.mark_complete

    def interrupted_at_step_2(folder):
        if str(folder).endswith("checkpoint-2"):
            raise KeyboardInterrupt
        mark_complete(folder)

    monkeypatch.setattr(trainer_module, "mark_complete", interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, save_total_limit=1).train()
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")

    monkeypatch.setattr(trainer_module, "mark_complete", mark_complete)
    make_trainer(tmp_path, save_total_limit=1).train(resume_from_checkpoint=True)
    assert checkpoints(tmp_path) == ["checkpoint-4"]  # rotated once complete


def test_resume_true_without_a_complete_checkpoint_says_so(tmp_path, make_trainer):
    (tmp_path / "checkpoint-3").mkdir()
    expected = rf"holds no complete checkpoint \(checkpoint-N folder with {COMPLETE_MARKER}\)"
    with pytest.raises(ValueError, match=expected):
        make_trainer(tmp_path).train(resume_from_checkpoint=True)


def test_resume_argument_of_the_train_command():
    assert resume_argument("last") is True and resume_argument("True") is True and resume_argument(True) is True
    assert resume_argument(None) is None and resume_argument("false") is None and resume_argument(False) is None
    assert resume_argument("out/checkpoint-10") == "out/checkpoint-10"


def test_resuming_unpickles_only_through_weights_only_torch_load(tmp_path, monkeypatch, make_trainer):
    make_trainer(tmp_path, max_steps=2).train()
    loads = []
    torch_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append((os.path.basename(str(args[0])), kwargs.get("weights_only")))
        return torch_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled with the pickle module while resuming")

    monkeypatch.setattr(torch, "load", recording_load)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    make_trainer(tmp_path, max_steps=3).train(resume_from_checkpoint=True)
    # The Trainer's optimizer, scheduler and RNG state are torch files, read with weights_only=True; the projector is
    # safetensors. transformers 4.57 reads the RNG state with torch's default, weights_only=True from torch 2.6
    # (docs/security.md); the refused pickle functions above show that nothing took the pickle path.
    assert {name for name, _ in loads} == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    torch_default = {} if TRANSFORMERS_5 else {"rng_state.pth": None}
    assert all(weights_only is torch_default.get(name, True) for name, weights_only in loads), loads
