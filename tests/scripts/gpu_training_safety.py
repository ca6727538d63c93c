"""Training safety on a CUDA GPU, where CI cannot go: bf16 is on by default where the GPU supports it, and trains;
under --fp16 the loss scaler's skipped steps are tolerated while they are few and stop the run when they persist; a
NaN loss stops a bf16 run; checkpoints are marked complete and rotated. Run by hand; prints one JSON line per check
and exits 1 if one fails.

    python tests/scripts/gpu_training_safety.py OUTPUT_DIR
"""

import json
import os
import sys

import datasets
import torch
import transformers
from transformers import TrainerCallback

from speechllm_hf import from_preset
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training import (
    ContinuationTrainingArguments,
    ContrastiveTrainingArguments,
    SpeechLlmTrainer,
    SpeechLlmTrainingArguments,
)
from speechllm_hf.training.checkpoints import checkpoint_folders, incomplete_reason
from speechllm_hf.training.divergence import TrainingDivergedError

output_dir = sys.argv[1]
rows = datasets.Dataset.from_list(load_split("train")[:64])
failures = []


def report(name: str, ok: bool, **details) -> None:
    print(json.dumps({"check": name, "ok": ok, **details}), flush=True)
    if not ok:
        failures.append(name)


class LossTimes(SpeechLlmTrainer):
    """Multiplies the loss of the given steps (1-based) by a factor: 1e30 makes the fp16-scaled gradients overflow
    while the loss stays finite in fp32; NaN makes the loss itself NaN."""

    def __init__(self, *args, factors: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.factors = factors

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * self.factors.get(self.state.global_step + 1, 1.0)


class StepRecord(TrainerCallback):
    """The loss scale after each step, and the steps the scaler skipped (those after which it went down)."""

    def __init__(self, trainer):
        self.trainer, self.skipped, self.scales = trainer, [], []

    def on_step_end(self, args, state, control, **kwargs):
        scaler = self.trainer.accelerator.scaler
        scale = scaler.get_scale() if scaler is not None else None
        if scale is not None and scale < (self.scales[-1] if self.scales else scaler._init_scale):
            self.skipped.append(state.global_step)
        self.scales.append(scale)


def run(name: str, factors: dict | None = None, **overrides):
    torch.manual_seed(0)
    model, processor = from_preset("tiny", projector_type="mlp")
    settings = dict(
        output_dir=os.path.join(output_dir, name),
        max_steps=20,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        seed=0,
    )
    trainer = LossTimes(
        model=model,
        args=SpeechLlmTrainingArguments(**{**settings, **overrides}),
        train_dataset=rows,
        processing_class=processor,
        factors=factors or {},
    )
    record = StepRecord(trainer)
    trainer.add_callback(record)
    try:
        trainer.train()
        error = None
    except TrainingDivergedError as err:
        error = str(err)
    return trainer, record, error


print(
    json.dumps(
        {
            "gpu": torch.cuda.get_device_name(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
    ),
    flush=True,
)

# 1. The decision itself, for every arguments class.
for arguments_class in (SpeechLlmTrainingArguments, ContrastiveTrainingArguments, ContinuationTrainingArguments):
    default = arguments_class(output_dir=output_dir)
    opted_out = arguments_class(output_dir=output_dir, bf16=False)
    fp16 = arguments_class(output_dir=output_dir, fp16=True)
    report(
        f"bf16 default ({arguments_class.__name__})",
        default.bf16 and not opted_out.bf16 and fp16.fp16 and not fp16.bf16,
        default=default.bf16,
        opted_out=opted_out.bf16,
        with_fp16=fp16.bf16,
    )

# 2. bf16 by default trains; checkpoints are marked complete and rotated.
trainer, record, error = run("bf16", save_strategy="steps", save_steps=5, save_total_limit=2)
folders = checkpoint_folders(trainer.args.output_dir)
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
report(
    "bf16 default trains, checkpoints complete",
    error is None
    and trainer.accelerator.mixed_precision == "bf16"
    and [os.path.basename(f) for f in folders] == ["checkpoint-20", "checkpoint-15"]
    and all(incomplete_reason(f) is None for f in folders),
    mixed_precision=trainer.accelerator.mixed_precision,
    losses=losses,
    checkpoints=[os.path.basename(f) for f in folders],
    error=error,
)

# 3. fp16: one overflowing step is skipped and training goes on.
trainer, record, error = run("fp16_one_overflow", factors={5: 1e30}, fp16=True)
report(
    "fp16: one overflow is skipped, the run goes on",
    error is None and 5 in record.skipped and trainer.state.global_step == 20,
    skipped=record.skipped,
    scales=record.scales,
    error=error,
)

# 4. fp16: overflow at every step stops the run once the limit of skipped steps is reached.
always = dict.fromkeys(range(1, 21), 1e30)
trainer, record, error = run("fp16_persistent", factors=always, fp16=True, max_skipped_steps=8)
report(
    "fp16: persistent overflow stops the run",
    error is not None
    and error.startswith("Training stopped at step 8: the last 8 optimizer steps were all skipped")
    and "--bf16 instead of --fp16" in error,
    skipped=record.skipped,
    scales=record.scales,
    error=error,
)

# 5. bf16: a NaN loss stops the run at its step.
trainer, record, error = run("bf16_nan", factors={3: float("nan")}, save_strategy="steps", save_steps=1)
report(
    "bf16: a NaN loss stops the run before its checkpoint",
    error is not None
    and error.startswith("Training stopped at step 3: the loss was NaN or infinite")
    and [os.path.basename(f) for f in checkpoint_folders(trainer.args.output_dir)] == ["checkpoint-2", "checkpoint-1"],
    error=error,
)

sys.exit(1 if failures else 0)
