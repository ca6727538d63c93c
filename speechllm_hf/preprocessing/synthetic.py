"""Synthetic English speech with espeak-ng: seeded voice, rate and pitch draws, 16 kHz Ogg Vorbis clips, manifests.

One piece of code for every synthetic corpus: `speechllm-hf synthesize` (the open-vocabulary corpus, see
`speechllm_hf.preprocessing.openvocab`) and ``scripts/make_corpus.py`` (the tiny corpus bundled in
``speechllm_hf/quickstart/corpus``).
The espeak-ng binary is needed (``apt-get install espeak-ng``); the Python side only resamples, scales and encodes.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm.auto import tqdm

SAMPLE_RATE = 16000
PEAK = 0.9
# libsndfile maps this to Vorbis quality 1 - level (its default is 0.6, i.e. q0.4); q0.3 keeps a corpus small and
# is still transparent enough for clean synthetic speech.
VORBIS_COMPRESSION_LEVEL = 0.7
# Variants must be attached to "en"/"en-us"/...: espeak-ng 1.51 silently ignores them on "en-gb" (identical output).
VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-us+f2", "en+f3", "en-us+m3", "en-gb-scotland+f4", "en-029"]
SPEED_RANGE = (140, 190)  # words per minute
PITCH_RANGE = (30, 70)  # espeak-ng pitch, 0-99


@dataclass(frozen=True)
class Job:
    """One clip to synthesise."""

    split: str
    index: int
    text: str
    voice: str
    speed: int
    pitch: int

    @property
    def audio(self) -> str:
        return f"{self.split}/{self.index:04d}.ogg"


def espeak_version() -> str:
    """The espeak-ng version line; a clear error when the binary is missing (it is a system package, not a wheel)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: install it with `apt-get install espeak-ng`")
    return subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout.strip()


def draw_jobs(splits: dict[str, list[str]], rng: random.Random) -> list[Job]:
    """One job per sentence, split by split: voices cycle over all clips, rate and pitch are drawn from ``rng``.

    All random draws happen here, sequentially, so a corpus does not depend on how many workers synthesise it.
    """
    jobs: list[Job] = []
    for split, sentences in splits.items():
        for index, text in enumerate(sentences):
            voice = VOICES[len(jobs) % len(VOICES)]
            jobs.append(Job(split, index, text, voice, rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE)))
    return jobs


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Synthesises ``text`` with espeak-ng and returns float32 mono audio at ``SAMPLE_RATE``."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
        subprocess.run(cmd, check=True, capture_output=True)
        x, sr = sf.read(wav, dtype="float32", always_2d=True)
    return soxr.resample(x.mean(axis=1), sr, SAMPLE_RATE).astype(np.float32)


def peak_normalise(x: np.ndarray) -> np.ndarray:
    """Scales to a peak of ``PEAK`` so that every voice has the same level."""
    return (x * (PEAK / np.abs(x).max())).astype(np.float32)


def write_clip(job: Job, x: np.ndarray, out_dir: Path) -> dict:
    """Peak-normalises ``x``, writes it as Ogg Vorbis under ``out_dir`` and returns the clip's manifest row."""
    x = peak_normalise(x)
    sf.write(
        out_dir / job.audio, x, SAMPLE_RATE, format="OGG", subtype="VORBIS", compression_level=VORBIS_COMPRESSION_LEVEL
    )
    return {
        "id": f"{job.split}-{job.index:04d}",
        "audio": job.audio,
        "text": job.text,
        "duration": round(len(x) / SAMPLE_RATE, 3),
        "voice": job.voice,
        "speed": job.speed,
        "pitch": job.pitch,
    }


def synthesise(job: Job, out_dir: Path) -> dict:
    """Synthesises the whole sentence of ``job`` in one go and writes it; returns its manifest row."""
    return write_clip(job, espeak(job.text, job.voice, job.speed, job.pitch), out_dir)


def synthesise_all(
    jobs: list[Job], out_dir: Path, workers: int, build: Callable[[Job, Path], dict] = synthesise
) -> list[dict]:
    """Runs ``build`` on every job with a progress bar; the rows come back in job order.

    Threads suffice: the work happens in espeak-ng subprocesses and GIL-free C code (soxr, libsndfile).
    """
    for split in dict.fromkeys(job.split for job in jobs):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(lambda job: build(job, out_dir), jobs), total=len(jobs), desc="synthesising"))


def write_manifest(rows: list[dict], path: Path) -> None:
    """Writes ``rows`` as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def codec_description() -> str:
    """How the clips are encoded, for a corpus's metadata."""
    return f"Ogg Vorbis, libsndfile {sf.__libsndfile_version__}, compression_level {VORBIS_COMPRESSION_LEVEL}"


__all__ = [
    "SAMPLE_RATE",
    "PEAK",
    "VOICES",
    "SPEED_RANGE",
    "PITCH_RANGE",
    "Job",
    "espeak_version",
    "draw_jobs",
    "espeak",
    "peak_normalise",
    "write_clip",
    "synthesise",
    "synthesise_all",
    "write_manifest",
    "codec_description",
]
