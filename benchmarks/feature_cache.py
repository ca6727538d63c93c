"""Training-step time with the encoder-feature cache / without it, each through its real data path.

A HuBERT-large-shaped encoder (random weights: 24 layers, width 1024) with a Q-Former projector and a small Llama;
one step = fetch a batch from the dataset with a DataLoader, collate it, forward, backward and AdamW update of the
projector. Uncached, the batch decodes wav files and the frozen encoder runs every step; cached, the batch reads
encoder outputs from the cache's memory-mapped Arrow file (`attach_feature_cache`, as `SpeechLlmTrainer` does). Each
path runs one untimed warm-up step first; the loss is the one `SpeechLlmTrainer` computes. Prints one JSON line with
the ratio (goal <= 0.6), the share of the uncached step the cache saves (decoding, feature extraction and the
encoder), the encoder forward's own share of the uncached step (timed inside the step by forward hooks), and the
cached path's read + collate time with the cache read as numpy arrays (what the trainer uses) and as Python lists
(the `datasets` default).

    python benchmarks/feature_cache.py --steps 5 --batch_size 4 --seconds 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader
from training_step import ForwardTimer, library_step
from transformers import HubertConfig, LlamaConfig, Wav2Vec2FeatureExtractor

from speechllm_hf import SpeechLlmConfig, SpeechLlmForConditionalGeneration, SpeechLlmProcessor
from speechllm_hf.data.collators import SpeechLlmCollator
from speechllm_hf.data.feature_cache import attach_feature_cache, build_feature_cache
from speechllm_hf.presets import tiny_tokenizer

GOAL = 0.6


def build(encoder_layers: int, text_layers: int):
    tokenizer = tiny_tokenizer()
    encoder = HubertConfig(
        hidden_size=1024,
        num_hidden_layers=encoder_layers,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=text_layers,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    config = SpeechLlmConfig(
        encoder_config=encoder, text_config=text, audio_token_id=tokenizer.convert_tokens_to_ids("<audio>")
    )
    processor = SpeechLlmProcessor(
        Wav2Vec2FeatureExtractor(return_attention_mask=True), tokenizer, audio_length_spec=config.audio_length_spec
    )
    return SpeechLlmForConditionalGeneration(config), processor


def write_clips(folder: Path, count: int, seconds: float) -> datasets.Dataset:
    """`count` wav files of noise and a manifest-like dataset of them (absolute paths, a transcript each)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        path = folder / f"clip{i}.wav"
        sf.write(path, rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1, 16000)
        rows.append({"audio": str(path), "text": "hello world"})
    return datasets.Dataset.from_list(rows)


def time_steps(step, loader: DataLoader, encoder_timer: ForwardTimer) -> dict[str, float]:
    """Mean seconds per training step, per batch fetch + collate and in the encoder's forward within the step, over all
    batches but the first (warm-up)."""
    times = {"step": [], "read_collate": [], "encoder": []}
    batches = iter(loader)
    for _ in range(len(loader)):
        encoder_timer.reset()
        start = time.perf_counter()
        batch = next(batches)
        collated = time.perf_counter()
        step(batch)
        times["step"].append(time.perf_counter() - start)
        times["read_collate"].append(collated - start)
        times["encoder"].append(encoder_timer.seconds)
    return {name: float(np.mean(values[1:])) for name, values in times.items()}


def time_collate(dataset: datasets.Dataset, collator, batch_size: int) -> float:
    """Mean seconds to fetch and collate a batch, after one warm-up batch."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    times = []
    batches = iter(loader)
    for _ in range(len(loader)):
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


def run(args: argparse.Namespace) -> dict:
    """The benchmark with the options of `add_arguments`."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build(args.encoder_layers, args.text_layers)
    step = library_step(model, processor)
    encoder_timer = ForwardTimer(model.encoder)
    with tempfile.TemporaryDirectory() as folder:
        rows = write_clips(Path(folder), args.batch_size * (args.steps + 1), args.seconds)
        build_feature_cache(model, processor, rows, Path(folder) / "cache", batch_size=args.batch_size)
        cached_rows = attach_feature_cache(rows, Path(folder) / "cache", model, processor)
        model.train()
        uncached = time_steps(
            step,
            DataLoader(rows, batch_size=args.batch_size, collate_fn=SpeechLlmCollator(processor)),
            encoder_timer,
        )
        cached_collator = SpeechLlmCollator(processor, use_cached_features=True)
        cached = time_steps(
            step, DataLoader(cached_rows, batch_size=args.batch_size, collate_fn=cached_collator), encoder_timer
        )
        as_lists = time_collate(cached_rows.with_format(None), cached_collator, args.batch_size)
    if cached["encoder"]:
        raise AssertionError("the encoder ran in a cached step")
    return {
        "name": "encoder_feature_cache",
        "ratio": round(cached["step"] / uncached["step"], 4),
        "goal": GOAL,
        "higher_is_better": False,
        "cached_step_s": round(cached["step"], 4),
        "uncached_step_s": round(uncached["step"], 4),
        "saved_share_of_step": round(1 - cached["step"] / uncached["step"], 4),
        "encoder_forward_s": round(uncached["encoder"], 4),
        "encoder_share_of_uncached_step": round(uncached["encoder"] / uncached["step"], 4),
        "cached_read_collate_s": round(cached["read_collate"], 4),
        "cached_read_collate_as_lists_s": round(as_lists, 4),
        "uncached_read_collate_s": round(uncached["read_collate"], 4),
        "batch": f"{args.batch_size} x {args.seconds} s",
        "encoder": f"HuBERT-large-shaped, {args.encoder_layers} layers of width 1024",
        "llm": f"Llama, {args.text_layers} layers of width 1024",
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="clip duration")
    parser.add_argument("--encoder_layers", type=int, default=24)
    parser.add_argument("--text_layers", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (more than the idle cores make timings erratic)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "add_arguments", "build", "run"]
