"""Training steps the benchmarks time: forward, backward and an AdamW update of the trainable parameters.

`library_step` computes the loss as training does, through `SpeechLlmTrainer.compute_loss`; `plain_step` calls
`model(**batch).loss`, as transformers' native models are trained. `alternating_medians` times several steps in turn,
and `ForwardTimer` the encoder's share of a step.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import default_data_collator

from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

Step = Callable[[dict], None]


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def library_step(model, processor=None) -> Step:
    """A training step of our model with the loss `SpeechLlmTrainer` computes (on the CPU)."""
    args = SpeechLlmTrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "speechllm_benchmark"),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    collator = None if processor is not None else default_data_collator  # batches arrive collated here
    trainer = SpeechLlmTrainer(model=model, args=args, processing_class=processor, data_collator=collator)
    optimizer = _optimizer(model)

    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        trainer.compute_loss(model, batch).backward()
        optimizer.step()

    return step


def plain_step(model) -> Step:
    """A training step on `model(**batch).loss`."""
    optimizer = _optimizer(model)

    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


class ForwardTimer:
    """Seconds spent in `module`'s forward calls since the last `reset`, from forward hooks: the share of a step that
    a sub-module takes, measured inside the step itself."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start

    def reset(self) -> None:
        self.seconds = 0.0


def alternating_medians(
    steps: dict[str, tuple[Step, dict]], repeats: int, timers: dict[str, ForwardTimer] | None = None
) -> dict[str, dict[str, float]]:
    """Median seconds of each `(step, batch)` (`step_s`) and, for the names in `timers`, of the timed sub-module's
    forward within it (`encoder_s`). One untimed warm-up each, then the steps take turns `repeats` times, so that a
    change of machine load (shared machines) hits them alike."""
    timers = timers or {}
    times: dict[str, dict[str, list[float]]] = {name: {"step_s": [], "encoder_s": []} for name in steps}
    for repeat in range(repeats + 1):
        for name, (step, batch) in steps.items():
            if name in timers:
                timers[name].reset()
            start = time.perf_counter()
            step(batch)
            if repeat:
                times[name]["step_s"].append(time.perf_counter() - start)
                if name in timers:
                    times[name]["encoder_s"].append(timers[name].seconds)
    return {
        name: {key: round(statistics.median(values), 4) for key, values in measured.items() if values}
        for name, measured in times.items()
    }


__all__ = ["ForwardTimer", "alternating_medians", "library_step", "plain_step"]
