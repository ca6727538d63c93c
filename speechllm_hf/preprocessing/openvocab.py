"""The open-vocabulary synthetic ASR corpus behind `speechllm-hf synthesize`: WordNet sentences read by espeak-ng.

Unlike the bundled 57-word corpus, this one is for training a real speech LLM: thousands of clips and words, so a
model has to learn to spell, not to pick from a list. It is generated, never shipped. Sentences come from
`speechllm_hf.preprocessing.wordnet_sentences`; the dev sentences are drawn first and are never in train. Clips are
made by `speechllm_hf.preprocessing.synthetic` (eight voices, seeded rates and pitches). ``metadata.json`` is written
last, so a folder holding it with the same settings is complete and is reused as it is.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import soxr

from .synthetic import (
    PEAK,
    PITCH_RANGE,
    SAMPLE_RATE,
    SPEED_RANGE,
    VOICES,
    codec_description,
    draw_jobs,
    espeak_version,
    synthesise_all,
    write_manifest,
)
from .wordnet_sentences import DATA_FILES, LICENCE, MAX_WORDS, MIN_WORDS, WORDNET_DIR, load_wordnet_sentences

SPLITS = ("train", "dev")


def _is_complete(output_dir: Path, settings: dict) -> bool:
    """Whether ``output_dir`` holds a finished corpus made with exactly ``settings`` (manifests and every clip)."""
    try:
        metadata = json.loads((output_dir / "metadata.json").read_text(encoding="utf-8"))
        rows = {split: (output_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() for split in SPLITS}
    except (OSError, ValueError):
        return False
    if metadata.get("settings") != settings:
        return False
    counts = {"train": settings["num_train"], "dev": settings["num_dev"]}
    return all(len(rows[split]) == counts[split] for split in SPLITS) and all(
        (output_dir / json.loads(line)["audio"]).is_file() for split in SPLITS for line in rows[split]
    )


def _statistics(rows: dict[str, list[dict]]) -> dict:
    """Hours, words and distinct words per split, and how much of dev is out of train's vocabulary."""
    tokens = {split: [word for row in rows[split] for word in row["text"].split()] for split in SPLITS}
    vocabulary = {split: set(split_tokens) for split, split_tokens in tokens.items()}
    unseen_tokens = sum(word not in vocabulary["train"] for word in tokens["dev"])
    return {
        "hours": {split: round(sum(row["duration"] for row in rows[split]) / 3600, 4) for split in SPLITS},
        "words": {split: len(split_tokens) for split, split_tokens in tokens.items()},
        "distinct_words": {split: len(words) for split, words in vocabulary.items()},
        "distinct_words_total": len(vocabulary["train"] | vocabulary["dev"]),
        # Token rate: the share of dev words a model that only learned train's words cannot get from memory.
        "dev_oov_rate": round(unseen_tokens / max(len(tokens["dev"]), 1), 4),
        "dev_oov_type_rate": round(len(vocabulary["dev"] - vocabulary["train"]) / max(len(vocabulary["dev"]), 1), 4),
    }


def build_openvocab_corpus(
    output_dir: str | Path,
    num_train: int = 3000,
    num_dev: int = 200,
    seed: int = 0,
    workers: int | None = None,
    wordnet_dir: str | Path = WORDNET_DIR,
) -> tuple[dict, bool]:
    """Writes ``train.jsonl``, ``dev.jsonl``, ``train/``, ``dev/`` and ``metadata.json`` into ``output_dir``.

    Returns the metadata and whether an existing complete corpus with the same settings was reused.
    """
    output_dir = Path(output_dir)
    source = load_wordnet_sentences(wordnet_dir)
    settings = {
        "num_train": num_train,
        "num_dev": num_dev,
        "seed": seed,
        "text_source_sha256": source.sha256,
        "synthesiser": espeak_version(),
        "voices": VOICES,
        "speed_range_wpm": list(SPEED_RANGE),
        "pitch_range": list(PITCH_RANGE),
    }
    if _is_complete(output_dir, settings):
        return json.loads((output_dir / "metadata.json").read_text(encoding="utf-8")), True
    if num_train < 1 or num_dev < 1 or num_train + num_dev > len(source.sentences):
        raise ValueError(
            f"need 1 <= num_train, 1 <= num_dev and num_train + num_dev <= {len(source.sentences)} "
            f"(the distinct usable WordNet sentences); got {num_train} + {num_dev}"
        )

    rng = random.Random(seed)
    sentences = source.sentences.copy()
    rng.shuffle(sentences)
    splits = {"train": sentences[num_dev : num_dev + num_train], "dev": sentences[:num_dev]}
    jobs = draw_jobs(splits, rng)

    (output_dir / "metadata.json").unlink(missing_ok=True)  # the folder is incomplete until it is written again
    for split in SPLITS:  # only our own sub-folders: the output folder may hold other things
        shutil.rmtree(output_dir / split, ignore_errors=True)
    rows = synthesise_all(jobs, output_dir, workers or os.cpu_count() or 1)
    rows_by_split = {split: [row for row in rows if row["id"].startswith(f"{split}-")] for split in SPLITS}
    for split, split_rows in rows_by_split.items():
        write_manifest(split_rows, output_dir / f"{split}.jsonl")

    metadata = {
        "description": "Open-vocabulary synthetic English ASR corpus (WordNet usage examples read by espeak-ng).",
        "text_source": {
            "name": "WordNet 3.0 usage examples (the quoted examples in the glosses)",
            "files": [str(Path(wordnet_dir) / name) for name in DATA_FILES],
            "licence": LICENCE,
            "examples_read": source.examples,
            "usable_distinct_sentences": len(source.sentences),
            "dropped": source.dropped,
            "words_per_sentence": [MIN_WORDS, MAX_WORDS],
        },
        "voice_assignment": "cycled over clips in order train, dev",
        "counts": {split: len(split_rows) for split, split_rows in rows_by_split.items()},
        **_statistics(rows_by_split),
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "codec": codec_description(),
        "peak": PEAK,
        "resampler": f"soxr {soxr.__version__}",
        "settings": settings,
    }
    (output_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata, False


__all__ = ["SPLITS", "build_openvocab_corpus"]
