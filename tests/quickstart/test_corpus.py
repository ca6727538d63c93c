"""Checks the synthetic speech corpus shipped in ``speechllm_hf/quickstart/corpus`` (see scripts/make_corpus.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm_hf.quickstart.corpus import CORPUS_DIR, SPLITS, load_split, manifest_path

EXPECTED_COUNTS = {"train": 320, "dev": 80, "aligned": 12}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {split: load_split(split) for split in SPLITS}


def test_counts_match_defaults_and_metadata(splits: dict[str, list[dict]]) -> None:
    metadata = json.loads((CORPUS_DIR / "metadata.json").read_text())
    assert {split: len(rows) for split, rows in splits.items()} == EXPECTED_COUNTS == metadata["counts"]
    for split, rows in splits.items():
        assert [r["id"] for r in rows] == [f"{split}-{i:04d}" for i in range(len(rows))]


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="train, dev, aligned"):
        load_split("test")
    with pytest.raises(ValueError):
        manifest_path("validation")


def test_transcripts_are_unique_and_simple(splits: dict[str, list[dict]]) -> None:
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(set(texts)) == len(texts)  # in particular, no transcript is shared between train and dev
    for text in texts:
        assert text == text.lower() and all(w.isalpha() for w in text.split())
        assert 3 <= len(text.split()) <= 7
    # A closed vocabulary is what lets a tiny model learn ASR from this corpus in minutes.
    assert len({w for text in texts for w in text.split()}) <= 80


def test_audio_decodes_and_matches_manifest(splits: dict[str, list[dict]]) -> None:
    for split, rows in splits.items():
        for row in rows:
            path = Path(row["audio"])
            assert path.is_absolute() and path.is_file(), row
            x, sr = sf.read(path, dtype="float32", always_2d=True)
            assert sr == 16000 and x.shape[1] == 1, row
            assert x.size > 0 and np.isfinite(x).all() and np.abs(x).max() > 0.1, row
            assert abs(len(x) / sr - row["duration"]) <= 0.01, row
            if split != "aligned":
                assert 0.8 <= row["duration"] <= 4.0, row


def test_aligned_words_are_ordered_and_inside_clip(splits: dict[str, list[dict]]) -> None:
    for row in splits["aligned"]:
        words = row["words"]
        assert [w["word"] for w in words] == row["text"].split()
        assert 0 < words[0]["start"] and words[-1]["end"] < row["duration"]
        for word in words:
            assert word["start"] < word["end"], row
        for prev, nxt in zip(words, words[1:]):
            assert prev["end"] < nxt["start"], row
