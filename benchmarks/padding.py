"""Padding with random batches vs length-grouped batches on a LibriSpeech-like distribution of clip durations.

LibriSpeech's training utterances were cut at silences with a 35 s cap, most of them near the segmenter's target
length: the histogram peaks around 14-16 s with a long tail of short, sentence-final segments (mean about 12.3 s).
We draw a mixture that mimics it: 75% N(14.5 s, 2.5 s) + 25% lognormal(median 5 s, sigma 0.6), clipped to [1, 35] s.

Prints one JSON line: `{"name": "padding_fraction", "random": x, "grouped": y, "ratio": y / x, "goal": 0.05}`,
where the goal is the largest acceptable padding fraction for grouped batches.

    python benchmarks/padding.py --batch_size 16 --num 20000 --seed 0
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from speechllm_hf.data.sampler import LengthGroupedSampler, padding_fraction, to_batches

GOAL = 0.05


def librispeech_like_durations(num: int, seed: int = 0) -> np.ndarray:
    """`num` clip durations in seconds from the LibriSpeech-like mixture described in the module docstring."""
    rng = np.random.default_rng(seed)
    long_segment = rng.random(num) < 0.75
    durations = np.where(long_segment, rng.normal(14.5, 2.5, num), rng.lognormal(np.log(5.0), 0.6, num))
    return np.clip(durations, 1.0, 35.0)


def measure(durations: np.ndarray, batch_size: int, seed: int = 0) -> dict[str, float | str]:
    """Padding fractions of random batches (a shuffled order, as RandomSampler) and of length-grouped batches."""
    lengths = durations.tolist()
    random_order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    random = padding_fraction(lengths, to_batches(random_order, batch_size))
    grouped = padding_fraction(lengths, to_batches(list(LengthGroupedSampler(lengths, batch_size, seed)), batch_size))
    return {
        "name": "padding_fraction",
        "random": round(random, 4),
        "grouped": round(grouped, 4),
        "ratio": round(grouped / random, 4),
        "goal": GOAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num", type=int, default=20000, help="number of clips drawn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    durations = librispeech_like_durations(args.num, args.seed)
    print(json.dumps(measure(durations, args.batch_size, args.seed)))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "librispeech_like_durations", "measure"]
