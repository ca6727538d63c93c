"""What augmentation adds to collation: milliseconds per batch of the training collator on the bundled corpus, with no
augmentation and with each transform alone, and all together (the tiny Whisper-shaped preset's processor: 80 mel
bins). The collator is what dataloader workers run, so this is the share of a step that `--dataloader_num_workers`
can hide. Noise comes from a folder of two generated files (white noise at 16 kHz, a hum at 8 kHz, resampled once
and then cached per process). Prints one JSON line.

    python benchmarks/augmentation.py --batches 20 --batch_size 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from speechllm_hf import from_preset
from speechllm_hf.data.augmentation import AugmentationConfig, Augmenter
from speechllm_hf.data.collators import SpeechLlmCollator
from speechllm_hf.quickstart.corpus import load_split


def noise_folder(root: Path) -> str:
    rng = np.random.default_rng(0)
    sf.write(root / "white.wav", (0.1 * rng.standard_normal(16000 * 5)).astype(np.float32), 16000)
    sf.write(root / "hum.wav", 0.2 * np.sin(np.arange(8000 * 5) / 8000 * 2 * np.pi * 60), 8000)
    return str(root)


def ms_per_batch(collator, rows: list[dict], batches: int, batch_size: int) -> float:
    collator(rows[:batch_size])  # warm-up: decoders, soxr, the noise cache
    start = time.perf_counter()
    for index in range(batches):
        offset = index * batch_size % (len(rows) - batch_size)
        collator(rows[offset : offset + batch_size])
    return 1000 * (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, processor = from_preset("tiny", encoder_type="whisper", projector_type="mlp")
    rows = load_split("train")
    with tempfile.TemporaryDirectory() as folder:
        noise = noise_folder(Path(folder))
        settings = {
            "speed": AugmentationConfig(speeds=(0.9, 1.0, 1.1)),
            "noise": AugmentationConfig(noise_dir=noise),
            "gain": AugmentationConfig(gain_db=(-6.0, 6.0)),
            "masks": AugmentationConfig(mask_time_prob=0.05, mask_feature_prob=0.05),
            "all": AugmentationConfig(
                speeds=(0.9, 1.0, 1.1),
                noise_dir=noise,
                gain_db=(-6.0, 6.0),
                mask_time_prob=0.05,
                mask_feature_prob=0.05,
            ),
        }
        times = {"none": ms_per_batch(SpeechLlmCollator(processor), rows, args.batches, args.batch_size)}
        for name, config in settings.items():
            augmenter = Augmenter(config, processor.sampling_rate, processor.feature_extractor.feature_size)
            collator = SpeechLlmCollator(processor, augmentation=augmenter)
            times[name] = ms_per_batch(collator, rows, args.batches, args.batch_size)
    mean_seconds = float(np.mean([row["duration"] for row in rows]))
    result = {
        "batch_size": args.batch_size,
        "mean_clip_seconds": round(mean_seconds, 2),
        "ms_per_batch": {name: round(value, 1) for name, value in times.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
