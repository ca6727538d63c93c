"""Padding with random batches vs length-grouped batches on a LibriSpeech-like distribution of clip durations.

LibriSpeech's training utterances were cut at silences with a 35 s cap, most of them near the segmenter's target
length: the histogram peaks around 14-16 s with a long tail of short, sentence-final segments (mean about 12.3 s).
We draw a mixture that mimics it: 75% N(14.5 s, 2.5 s) + 25% lognormal(median 5 s, sigma 0.6), clipped to [1, 35] s.

Prints one JSON line: `{"name": "padding_fraction", "ratio": y, "goal": 0.05, "higher_is_better": false,
"random": x, "grouped_over_random": y / x, ...}`, where `ratio` is the padding fraction of grouped batches (padded
duration / total duration of the padded batches), the goal its largest acceptable value, and `random` the
baseline's.

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
        "ratio": round(grouped, 4),
        "goal": GOAL,
        "higher_is_better": False,
        "random": round(random, 4),
        "grouped_over_random": round(grouped / random, 4),
        "batch_size": batch_size,
        "clips": len(lengths),
    }


def run(args: argparse.Namespace) -> dict:
    """The benchmark with the options of `add_arguments`."""
    return measure(librispeech_like_durations(args.num, args.seed), args.batch_size, args.seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num", type=int, default=20000, help="number of clips drawn")
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()


__all__ = ["GOAL", "add_arguments", "librispeech_like_durations", "measure", "run"]
