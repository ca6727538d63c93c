"""Training throughput on real backbones, with the encoder-feature cache and without it, and where a step's time goes.

Whisper-base's encoder + a preset's projector + SmolLM2-135M-Instruct (the folders `scripts/offline_backbones.py`
writes, or Hub ids), on real speech: the bundled corpus's training clips, or any manifest. One step = fetch and collate
a batch (uncached: decode the wav files and extract features; cached: read encoder outputs from the memory-mapped
cache), forward, backward and an AdamW update of the projector, with the loss `SpeechLlmTrainer` computes. Each path
runs one untimed warm-up step. Forward hooks time the encoder, projector and LLM forwards inside the step; backward and
the update are timed as one (the projector's own backward is small next to the LLM's, which carries the gradient back
to the projector). Prints one JSON line.

    python benchmarks/real_throughput.py --encoder_name_or_path ~/.cache/speechllm_hf/backbones/whisper-base \
        --text_name_or_path ~/.cache/speechllm_hf/backbones/smollm2-135m-instruct --steps 6 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import datasets
import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader
from training_step import ForwardTimer

from speechllm_hf.data.collators import SpeechLlmCollator
from speechllm_hf.data.feature_cache import attach_feature_cache, build_feature_cache
from speechllm_hf.data.manifest import load_manifest
from speechllm_hf.presets import from_preset
from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.arguments import SpeechLlmTrainingArguments
from speechllm_hf.training.trainer import SpeechLlmTrainer

PARTS = ("encoder", "projector", "language_model")


def timed_step(model, processor):
    """A training step that returns its backward + update seconds (forward hooks time the forwards)."""
    args = SpeechLlmTrainingArguments(
        output_dir=tempfile.gettempdir(), use_cpu=True, report_to="none", disable_tqdm=True
    )
    trainer = SpeechLlmTrainer(model=model, args=args, processing_class=processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, batch)
        forward = time.perf_counter()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - forward

    return step


def time_path(step, loader: DataLoader, timers: dict[str, ForwardTimer]) -> dict[str, float]:
    """Mean seconds per step and per part of it, over all batches but the first (warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in ("step", "read_collate", "backward_update", *timers)}
    batches = iter(loader)
    for _ in range(len(loader)):
        for timer in timers.values():
            timer.reset()
        start = time.perf_counter()
        batch = next(batches)
        collated = time.perf_counter()
        backward_update = step(batch)
        times["step"].append(time.perf_counter() - start)
        times["read_collate"].append(collated - start)
        times["backward_update"].append(backward_update)
        for name, timer in timers.items():
            times[name].append(timer.seconds)
    return {name: float(np.mean(values[1:])) for name, values in times.items()}


def summary(times: dict[str, float], batch_size: int) -> dict:
    step = times["step"]
    return {
        "samples_per_second": round(batch_size / step, 3),
        "step_s": round(step, 3),
        "share_of_step": {
            name: round(times[name] / step, 4) for name in ("read_collate", *PARTS, "backward_update") if name in times
        },
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = from_preset(
        args.preset, encoder_name_or_path=args.encoder_name_or_path, text_name_or_path=args.text_name_or_path
    )
    rows = load_split("train") if not args.manifest else [dict(row) for row in load_manifest(args.manifest)]
    rows = datasets.Dataset.from_list(rows[: args.batch_size * (args.steps + 1)])
    step = timed_step(model, processor)
    timers = {name: ForwardTimer(getattr(model, name)) for name in PARTS}
    with tempfile.TemporaryDirectory() as folder:
        build_feature_cache(model, processor, rows, folder, batch_size=args.batch_size)
        cached_rows = attach_feature_cache(rows, folder, model, processor)
        model.train()
        uncached = time_path(
            step, DataLoader(rows, batch_size=args.batch_size, collate_fn=SpeechLlmCollator(processor)), timers
        )
        cached_collator = SpeechLlmCollator(processor, use_cached_features=True)
        cached_loader = DataLoader(cached_rows, batch_size=args.batch_size, collate_fn=cached_collator)
        cached = time_path(step, cached_loader, timers)
    if cached["encoder"]:
        raise AssertionError("the encoder ran in a cached step")
    del cached["encoder"]
    return {
        "name": "real_backbone_throughput",
        "uncached": summary(uncached, args.batch_size),
        "cached": summary(cached, args.batch_size),
        "cached_speedup": round(uncached["step"] / cached["step"], 3),
        "clip_seconds_mean": round(float(np.mean([sf.info(path).duration for path in rows["audio"]])), 2),
        "batch_size": args.batch_size,
        "preset": args.preset,
        "encoder": args.encoder_name_or_path,
        "llm": args.text_name_or_path,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder_name_or_path", default="openai/whisper-base")
    parser.add_argument("--text_name_or_path", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--preset", default="whisper-base-smollm2")
    parser.add_argument("--manifest", default="", help="training clips (default: the bundled corpus's train split)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
