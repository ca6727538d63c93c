"""Synthesise the tiny English speech corpus shipped in ``speechllm_hf/quickstart/corpus`` with espeak-ng.

The corpus is deliberately easy (closed vocabulary of ~60 words, 3-7 words per sentence, clean synthetic audio) so that
a tiny randomly initialised speech LLM can visibly learn ASR from it in minutes on a CPU. Variety comes from cycling
through several espeak-ng voices and drawing speaking rate and pitch from a seeded RNG.

Outputs (all paths in the manifests are relative to the corpus folder):

* ``train/NNNN.ogg`` + ``train.jsonl`` and ``dev/NNNN.ogg`` + ``dev.jsonl``: whole sentences synthesised in one go.
* ``aligned/NNNN.ogg`` + ``aligned.jsonl``: sentences built word by word with known word boundaries (for alignment
  tests). Each word is synthesised separately, its leading/trailing silence is trimmed with an energy threshold
  (10 ms frames whose RMS is below ``TRIM_THRESHOLD_DB`` relative to the loudest frame of that word), and the words are
  joined with ``WORD_GAP_S`` of silence between them and ``EDGE_PAD_S`` at both ends.
* ``metadata.json``: how the corpus was made (espeak-ng version, voices, ranges, seed, counts, command line, hours).

Usage (from the repository root, requires the ``espeak-ng`` binary, e.g. ``apt-get install espeak-ng``)::

    python scripts/make_corpus.py --output_dir speechllm_hf/quickstart/corpus --seed 0 --num_train 320 --num_dev 80
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soxr

from speechllm_hf.preprocessing.synthetic import (
    PEAK,
    PITCH_RANGE,
    SAMPLE_RATE,
    SPEED_RANGE,
    VOICES,
    Job,
    codec_description,
    draw_jobs,
    espeak,
    espeak_version,
    synthesise,
    synthesise_all,
    write_clip,
    write_manifest,
)

# espeak-ng pads words with (near) digital silence, so this cuts exactly the padding and no speech: the bounds found
# at -35 dB and at -50 dB are the same 10 ms frames, also for words with weak fricatives ("six", "fish", "cups").
TRIM_THRESHOLD_DB = -35.0
TRIM_FRAME_S = 0.01
WORD_GAP_S = 0.15
EDGE_PAD_S = 0.2

NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
SIZES = ["big", "small"]
ANIMALS = {"dog": "dogs", "cat": "cats", "bird": "birds"}
OBJECTS = {"box": "boxes", "ball": "balls", "cup": "cups", "book": "books"}
PLACES = ["table", "chair", "bed", "desk"]
PREPOSITIONS = ["on", "in", "under"]
ACTIONS = ["run", "jump", "sit", "sleep"]


def _sentence(rng: random.Random) -> str:
    """Draws one sentence from a small template grammar (3-7 words, closed vocabulary)."""
    nouns = {**ANIMALS, **OBJECTS}

    def adjective(choices: list[str]) -> str:  # optional, so that every length from 3 to 7 words occurs
        return rng.choice(["", f"{rng.choice(choices)} "])

    template = rng.randrange(7)
    if template == 0:  # "seven red boxes are on the table"
        return (
            f"{rng.choice(NUMBERS)} {adjective(COLOURS + SIZES)}{rng.choice(list(nouns.values()))} "
            f"are {rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}"
        )
    if template == 1:  # "the small dog can run"
        return f"the {adjective(COLOURS + SIZES)}{rng.choice(list(ANIMALS))} can {rng.choice(ACTIONS)}"
    if template == 2:  # "turn the blue light off"
        return f"turn the {adjective(COLOURS)}light {rng.choice(['on', 'off'])}"
    if template == 3:  # "put the green cup under the chair"
        obj = rng.choice(list(OBJECTS))
        return f"put the {adjective(COLOURS)}{obj} {rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}"
    if template == 4:  # "the cat is black"
        return f"the {rng.choice(list(nouns))} is {rng.choice(COLOURS + SIZES)}"
    if template == 5:  # "please open the door"
        return f"{rng.choice(['', 'please '])}{rng.choice(['open', 'close'])} the {rng.choice(['door', 'window'])}"
    # "i see four birds"
    return f"i see {rng.choice(NUMBERS)} {adjective(COLOURS + SIZES)}{rng.choice(list(nouns.values()))}"


def make_sentences(rng: random.Random, count: int) -> list[str]:
    """Draws ``count`` distinct sentences; duplicates are redrawn so no transcript appears twice in the corpus."""
    seen: dict[str, None] = {}  # insertion-ordered set, keeps the output deterministic
    while len(seen) < count:
        seen.setdefault(_sentence(rng), None)
    return list(seen)


def trim_silence(x: np.ndarray) -> np.ndarray:
    """Drops leading/trailing 10 ms frames whose RMS is ``TRIM_THRESHOLD_DB`` below the loudest frame."""
    frame = int(TRIM_FRAME_S * SAMPLE_RATE)
    n = len(x) // frame
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (TRIM_THRESHOLD_DB / 20))
    return x[loud[0] * frame : (loud[-1] + 1) * frame]


def concatenate_words(job: Job) -> tuple[np.ndarray, list[dict]]:
    """Builds a clip word by word so that the word boundaries (in seconds) are known exactly."""
    gap = np.zeros(int(WORD_GAP_S * SAMPLE_RATE), np.float32)
    pad = np.zeros(int(EDGE_PAD_S * SAMPLE_RATE), np.float32)
    pieces, words = [pad], []
    for word in job.text.split():
        if words:
            pieces.append(gap)
        start = sum(map(len, pieces))
        pieces.append(trim_silence(espeak(word, job.voice, job.speed, job.pitch)))
        end = start + len(pieces[-1])
        words.append({"word": word, "start": round(start / SAMPLE_RATE, 3), "end": round(end / SAMPLE_RATE, 3)})
    return np.concatenate([*pieces, pad]), words


def synthesise_clip(job: Job, out_dir: Path) -> dict:
    """Synthesises one clip (word by word for the aligned split) and returns its manifest row."""
    if job.split != "aligned":
        return synthesise(job, out_dir)
    x, words = concatenate_words(job)
    return {**write_clip(job, x, out_dir), "words": words}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", type=Path, default=Path("speechllm_hf/quickstart/corpus"), help="corpus folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for sentences, speeds and pitches")
    parser.add_argument("--num_train", type=int, default=320, help="number of train clips")
    parser.add_argument("--num_dev", type=int, default=80, help="number of dev clips")
    parser.add_argument("--num_aligned", type=int, default=12, help="number of word-aligned clips")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel synthesis threads")
    args = parser.parse_args()

    version = espeak_version()
    rng = random.Random(args.seed)
    counts = {"train": args.num_train, "dev": args.num_dev, "aligned": args.num_aligned}
    sentences = iter(make_sentences(rng, sum(counts.values())))
    jobs = draw_jobs({split: [next(sentences) for _ in range(count)] for split, count in counts.items()}, rng)

    out_dir: Path = args.output_dir
    for split in counts:  # only our own sub-folders: the corpus folder also holds __init__.py and README.md
        shutil.rmtree(out_dir / split, ignore_errors=True)
    start = time.perf_counter()
    rows = synthesise_all(jobs, out_dir, args.workers, build=synthesise_clip)
    elapsed = time.perf_counter() - start

    hours = {}
    for split in counts:
        split_rows = [r for r in rows if r["id"].startswith(f"{split}-")]
        write_manifest(split_rows, out_dir / f"{split}.jsonl")
        hours[split] = round(sum(r["duration"] for r in split_rows) / 3600, 4)

    vocab = sorted({w for r in rows for w in r["text"].split()})
    metadata = {
        "description": "Tiny synthetic English ASR corpus (closed vocabulary) for speechllm_hf tests and examples.",
        "synthesiser": version,
        "voices": VOICES,
        "voice_assignment": "cycled over clips in order train, dev, aligned",
        "speed_range_wpm": list(SPEED_RANGE),
        "pitch_range": list(PITCH_RANGE),
        "seed": args.seed,
        "counts": counts,
        "hours": hours,
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "codec": codec_description(),
        "peak": PEAK,
        "resampler": f"soxr {soxr.__version__}",
        "aligned": {
            "trim_threshold_db": TRIM_THRESHOLD_DB,
            "trim_frame_s": TRIM_FRAME_S,
            "word_gap_s": WORD_GAP_S,
            "edge_pad_s": EDGE_PAD_S,
        },
        "words_per_sentence": [3, 7],
        "vocabulary_size": len(vocab),
        "vocabulary": vocab,
        "command": shlex.join(["python", *sys.argv]),
    }
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for split in counts for p in (out_dir / split).iterdir())
    print(
        f"{len(rows)} clips ({counts}) in {elapsed:.1f} s with {args.workers} workers; "
        f"{sum(hours.values()) * 60:.1f} min of audio, {size / 2**20:.2f} MiB; vocabulary {len(vocab)} words"
    )


if __name__ == "__main__":
    main()
