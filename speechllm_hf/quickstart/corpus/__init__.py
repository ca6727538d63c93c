"""Tiny synthetic English speech corpus shipped with ``speechllm_hf`` for tests, examples and the quickstart.

The clips were synthesised with espeak-ng from sentences drawn from a small template grammar (closed vocabulary of
under 60 words, 3-7 words per sentence), cycling through several English voices with seeded random speaking rates and
pitches, resampled to 16 kHz mono, peak-normalised and stored as Ogg Vorbis. Splits:

* ``train`` and ``dev``: whole sentences, no transcript shared between them.
* ``aligned``: sentences built word by word with exactly known word boundaries (``words`` field), for alignment tests.

``metadata.json`` records exactly how the corpus was made; ``scripts/make_corpus.py`` in the repository regenerates it.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS_DIR: Path = Path(__file__).resolve().parent
SPLITS: tuple[str, ...] = ("train", "dev", "aligned")


def manifest_path(split: str) -> Path:
    """Returns the path of a split's JSON-lines manifest.

    Args:
        split: One of ``"train"``, ``"dev"`` or ``"aligned"``.

    Returns:
        Path to ``<split>.jsonl`` inside the corpus folder.

    Raises:
        ValueError: If ``split`` is not a known split.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown corpus split {split!r}; valid splits are {', '.join(SPLITS)}.")
    return CORPUS_DIR / f"{split}.jsonl"


def load_split(split: str) -> list[dict]:
    """Reads a split's manifest.

    Args:
        split: One of ``"train"``, ``"dev"`` or ``"aligned"``.

    Returns:
        One dict per clip with keys ``id``, ``audio`` (absolute path string), ``text``, ``duration`` (seconds),
        ``voice``, ``speed`` and ``pitch``; rows of the ``aligned`` split also have ``words``, a list of
        ``{"word", "start", "end"}`` dicts with times in seconds.

    Raises:
        ValueError: If ``split`` is not a known split.
    """
    with open(manifest_path(split), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        row["audio"] = str(CORPUS_DIR / row["audio"])
    return rows


__all__ = ["CORPUS_DIR", "SPLITS", "load_split", "manifest_path"]
