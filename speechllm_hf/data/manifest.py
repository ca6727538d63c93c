"""Manifests -> `datasets.Dataset` with an undecoded audio column (paths, bytes or arrays, never decoded here).

Accepted sources: a JSON-lines file (`{"audio": path, "text": ..., ...}` per line; relative paths are resolved
against the file's folder), a parquet file or a folder of parquet files (MuST-C / Spoken-SQuAD style: `audio
{array, sampling_rate}` or `{bytes, path}`, `duration`, `sentence`, `translation`, `question`, `answer`), a folder
written by `datasets.Dataset.save_to_disk` or the output folder of `speechllm-hf prepare` / `speechllm-hf align`
(which keep their rows in `dataset/`), or a `datasets.Dataset`, whose `Audio` columns are cast to `decode=False`
(decoding them would need torchcodec + FFmpeg).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIX = ".parquet"
SAVED_DATASET_DIR = "dataset"  # where `prepare` and `align` save their rows inside their output folder


def cast_audio_undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Casts every `Audio` column to `Audio(decode=False)`, so rows hold `{"bytes", "path"}` dicts.

    Args:
        dataset: Any dataset.

    Returns:
        The dataset, with its `Audio` columns no longer decoded by `datasets`.
    """
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Audio) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Audio(decode=False))
    return dataset


def _resolve_path(path: str | None, base: str) -> str | None:
    """`path` against the manifest's folder `base`; absolute paths, URLs and empty paths (reported when read) stay."""
    if not path or os.path.isabs(path) or "://" in path:
        return path
    return os.path.normpath(os.path.join(base, path))


def _resolve(audio, base: str, column: str) -> dict:
    """The row's audio with a relative file path resolved: a path string, or the `path` of an audio dict (a
    `datasets.Audio` value, a parquet struct) without bytes or samples of its own (those are read instead)."""
    if isinstance(audio, dict):
        if audio.get("bytes") is None and audio.get("array") is None and isinstance(audio.get("path"), str):
            audio = {**audio, "path": _resolve_path(audio["path"], base)}
        return {column: audio}
    return {column: _resolve_path(audio, base) if isinstance(audio, str) else audio}


def _holds_paths(feature) -> bool:
    """Whether an audio column's feature can hold file paths: strings, `datasets.Audio`, or structs with a `path`."""
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    return isinstance(feature, datasets.Audio) or (isinstance(feature, dict) and "path" in feature)


def _read_json(path: Path) -> datasets.Dataset:
    """A JSON-lines (or JSON array) file; where `datasets` fails with no sentence (StopIteration for an empty file,
    "An error occurred while generating the dataset" for a broken line), a `ValueError` says which line is wrong."""
    try:
        return datasets.Dataset.from_json(str(path))
    except Exception as err:
        raise ValueError(_json_problem(path, err)) from err


def _json_problem(path: Path, err: Exception) -> str:
    """What is wrong with a JSON manifest that `datasets` could not read: no rows, or the first line that is not a
    JSON object; `err` when every line is one."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as bad:
        return f"Manifest {name!r} is not UTF-8 text ({bad.reason} at byte {bad.start}): is it a JSON-lines file?"
    try:
        if json.loads(text) == []:
            return f"Manifest {name!r} holds no rows: it is an empty JSON array."
    except json.JSONDecodeError:
        pass  # JSON lines, read one by one below
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        return f"Manifest {name!r} holds no rows: it is empty."
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            return (
                f"Manifest {name!r} line {number} is not valid JSON ({bad.msg}, column {bad.colno}): fix or remove it."
            )
        if not isinstance(row, dict):
            return f"Manifest {name!r} line {number} holds {line.strip()[:40]}, not a JSON object with an audio field."
    return f"Cannot read manifest {name!r}: {type(err).__name__}: {err}"


def _read_parquet(files: list[str], path: Path) -> datasets.Dataset:
    """Parquet files; where they hold no rows at all, a `ValueError` that says so, for datasets' 'Instruction "train"
    corresponds to no data!'."""
    try:
        return datasets.Dataset.from_parquet(files)
    except ValueError:
        import pyarrow.parquet as pq

        if sum(pq.ParquetFile(file).metadata.num_rows for file in files) == 0:
            raise ValueError(f"Manifest {str(path)!r} holds no rows: its parquet data is empty.") from None
        raise


def _read_files(path: Path) -> tuple[datasets.Dataset, Path]:
    """Reads a jsonl/parquet file or a folder of parquet files; returns the dataset and the folder paths are under."""
    if not path.exists():
        raise ValueError(f"Manifest {str(path)!r} does not exist.")
    if path.is_dir():
        for saved in (path, path / SAVED_DATASET_DIR):
            if (saved / "state.json").is_file():  # what Dataset.save_to_disk writes
                return datasets.load_from_disk(str(saved)), path
        files = sorted(str(p) for p in path.rglob(f"*{PARQUET_SUFFIX}"))
        if not files:
            raise ValueError(
                f"Manifest folder {str(path)!r} holds no {PARQUET_SUFFIX} files and no saved dataset "
                "(Dataset.save_to_disk, or the output folder of speechllm-hf prepare / align)."
            )
        return _read_parquet(files, path), path
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _read_json(path), path.parent
    if suffix == PARQUET_SUFFIX:
        return _read_parquet([str(path)], path), path.parent
    raise ValueError(
        f"Unknown manifest type {suffix or '(no extension)'!r} for {str(path)!r}: expected "
        f"{', '.join(JSON_SUFFIXES)}, {PARQUET_SUFFIX}, a folder of {PARQUET_SUFFIX} files or a datasets.Dataset."
    )


def load_manifest(
    source: str | os.PathLike | datasets.Dataset, *, audio_column: str = "audio", text_column: str | None = "text"
) -> datasets.Dataset:
    """Loads a manifest as a `datasets.Dataset` whose audio column is left undecoded.

    Args:
        source: A `.jsonl`/`.json` (JSON lines) file, a `.parquet` file, a folder of parquet files (searched
            recursively), a folder saved with `Dataset.save_to_disk` (or a `prepare` / `align` output folder, which
            holds one in `dataset/`) or a `datasets.Dataset`.
        audio_column: The column holding the audio: a path string, a `{"bytes", "path"}` dict or an `{"array",
            "sampling_rate"}` dict.
        text_column: The transcript column, which must exist; `None` when the rows need no text.

    Returns:
        The dataset with every column kept; for file manifests, relative audio paths (strings, or the `path` of audio
        dicts and parquet structs without bytes) are resolved against the manifest's folder.

    Raises:
        ValueError: If the file does not exist, its type is unknown or the audio or text column is missing.
    """
    if isinstance(source, datasets.Dataset):
        dataset, base = source, None
    elif isinstance(source, (str, os.PathLike)):
        dataset, base = _read_files(Path(source))
    else:
        raise ValueError(f"A manifest must be a path or a datasets.Dataset; got {type(source).__name__}.")
    for kind, column in (("audio", audio_column), ("text", text_column)):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"The manifest has no {kind} column {column!r}; its columns are {dataset.column_names}. "
                f"Pass the right name with `{kind}_column=` (--{kind}_column on the command line)."
            )
    dataset = cast_audio_undecoded(dataset)
    feature = dataset.features[audio_column]
    if base is not None and _holds_paths(feature):
        dataset = dataset.map(
            _resolve,
            input_columns=audio_column,
            fn_kwargs={"base": str(base.resolve()), "column": audio_column},
            desc="Resolving audio paths",
        )
    return dataset


__all__ = ["SAVED_DATASET_DIR", "load_manifest", "cast_audio_undecoded"]
