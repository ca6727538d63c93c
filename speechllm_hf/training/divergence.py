"""Stopping a diverged run before it writes a poisoned checkpoint.

transformers' Trainer keeps training through a NaN or infinite loss: it logs the average of the previous losses in
its place (`logging_nan_inf_filter`) and saves whatever the weights have become. `DivergenceGuard` checks every
optimizer step instead, before the Trainer logs, evaluates or saves it, and stops the run on every process at once.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .checkpoints import last_complete_checkpoint


class TrainingDivergedError(RuntimeError):
    """Training stopped at a step whose loss or weights are not finite, or after too many skipped fp16 steps."""


class DivergenceGuard(TrainerCallback):
    """Stops training at the end of an optimizer step when:

    - the loss of any of its micro-batches was NaN or infinite on any process;
    - a trainable weight (the projector's, a LoRA adapter's) is no longer finite after the update;
    - with fp16, the last `max_skipped_steps` steps were all skipped. The loss scaler skips a step whose scaled
      gradients overflowed and halves its scale: a few skips are how it finds its scale, so only a long run of them
      (the scale has collapsed, the weights no longer move) stops training. A skip is read off the scale going down:
      accelerate's `optimizer_step_was_skipped` misses it with fused optimizers (transformers 5.x's default AdamW),
      which skip inside their own kernel. Without a `GradScaler` (DeepSpeed's fp16) accelerate's flag is used.

    The verdict is reduced over processes, so that every process raises `TrainingDivergedError` at the same step
    instead of leaving the others waiting in a collective.

    Args:
        accelerator: the Trainer's `Accelerator` (it reduces the flags and knows whether the step was skipped).
        max_skipped_steps: consecutive skipped steps that stop training; 0 never stops for skipped steps.
    """

    def __init__(self, accelerator, max_skipped_steps: int):
        self.accelerator = accelerator
        self.max_skipped_steps = max_skipped_steps
        self.nonfinite_loss: torch.Tensor | None = None  # kept on the device: micro-batches add no host sync
        self.skipped_in_a_row = 0
        self.loss_scale: float | None = None

    def _scaler(self):
        scaler = self.accelerator.scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _step_was_skipped(self) -> bool:
        scaler = self._scaler()
        if scaler is None:
            return self.accelerator.optimizer_step_was_skipped
        # GradScaler.update lowers the scale only when the step found inf/NaN gradients, that is when it skipped it.
        scale, self.loss_scale = self.loss_scale, scaler.get_scale()
        return scale is not None and self.loss_scale < scale

    def on_train_begin(self, args, state, control, **kwargs):
        scaler = self._scaler()  # its scale as restored from a checkpoint, or the initial one
        self.loss_scale = scaler.get_scale() if scaler is not None else None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss (called by the trainer's `training_step`)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self.nonfinite_loss = bad if self.nonfinite_loss is None else self.nonfinite_loss | bad

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        device = args.device
        bad_loss = self.nonfinite_loss if self.nonfinite_loss is not None else torch.tensor(False)
        self.nonfinite_loss = None
        # One flag for the loss, then one per trainable tensor: a single reduction tells every process all of them.
        flags = torch.stack(
            [bad_loss.to(device)] + [(~torch.isfinite(p.detach()).all()).to(device) for _, p in trainable]
        ).float()
        if args.world_size > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        bad = (flags > 0).tolist()
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if self._step_was_skipped() else 0
        bad_weights = [name for (name, _), flag in zip(trainable, bad[1:]) if flag]
        if bad[0]:
            problem = "the loss was NaN or infinite (on at least one process)"
        elif bad_weights:
            problem = f"trainable weights became NaN or infinite in the update ({', '.join(bad_weights[:3])}, ...)"
        elif self.max_skipped_steps and self.skipped_in_a_row >= self.max_skipped_steps:
            problem = (
                f"the last {self.skipped_in_a_row} optimizer steps were all skipped because the fp16-scaled gradients "
                "overflowed, so the weights have not moved since and the loss scale keeps shrinking "
                "(--max_skipped_steps sets this limit)"
            )
        else:
            return
        raise TrainingDivergedError(f"Training stopped at step {state.global_step}: {problem}. {_advice(args)}")


def _advice(args) -> str:
    last = last_complete_checkpoint(args.output_dir, warn=False)
    saved = (
        f"No checkpoint of this step was written; the newest complete one is {last}: resume from it "
        "(--resume_from_checkpoint last) once the cause is fixed."
        if last
        else "No checkpoint of this step was written."
    )
    tries = [f"a lower --learning_rate (now {args.learning_rate:g})"]
    if args.fp16:
        tries.append("--bf16 instead of --fp16 (bf16 has the range of fp32)")
    elif args.bf16:
        tries.append("fp32 (--bf16 False) to rule out precision")
    if not args.max_grad_norm:
        tries.append("gradient clipping (--max_grad_norm 1.0)")
    return (
        f"{saved} Try {', '.join(tries)}; check the data of this step: empty or very long transcripts, silent, "
        "clipped or corrupt audio, clips far longer than the rest."
    )


__all__ = ["DivergenceGuard", "TrainingDivergedError"]
