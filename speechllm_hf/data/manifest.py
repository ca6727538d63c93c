"""Manifests and `datasets` sources -> a `datasets.Dataset` (or, streamed, an `IterableDataset`) with an undecoded
audio column (paths, bytes or arrays, never decoded here).

Accepted sources: a JSON-lines file (`{"audio": path, "text": ..., ...}` per line; relative paths are resolved
against the file's folder), a parquet file or a folder of parquet files (MuST-C / Spoken-SQuAD style: `audio
{array, sampling_rate}` or `{bytes, path}`, `duration`, `sentence`, `translation`, `question`, `answer`), Arrow
files, a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: one split) or the output
folder of `speechllm-hf prepare` / `speechllm-hf align` (which keep their rows in `dataset/`), an audiofolder, a Hub
dataset id or a local folder laid out as a Hub dataset repo (`sources`), or a `datasets.Dataset` /
`IterableDataset`, whose `Audio` columns are cast to `decode=False` (decoding them would need torchcodec + FFmpeg).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from . import sources

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIX = ".parquet"
SAVED_DATASET_DIR = "dataset"  # where `prepare` and `align` save their rows inside their output folder


def cast_audio_undecoded(dataset: sources.Rows) -> sources.Rows:
    """Casts every `Audio` column to `Audio(decode=False)`, so rows hold `{"bytes", "path"}` dicts.

    Args:
        dataset: Any dataset, or a stream (one whose features are unknown, such as streamed json, has no `Audio`
            column).

    Returns:
        The dataset, with its `Audio` columns no longer decoded by `datasets`.
    """
    for name, feature in (dataset.features or {}).items():
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
    """Whether an audio column's feature can hold file paths: strings, `datasets.Audio`, or structs with a `path`;
    a stream's unknown feature (None: streamed json) may."""
    if feature is None:
        return True
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


def _read_files(
    path: Path, config: str | None, split: str | None, streaming: bool, audio_column: str
) -> tuple[sources.Rows, Path | None]:
    """Reads a local source (see `load_manifest`); returns the rows and the folder relative audio paths are under
    (None where paths are already absolute or there are none)."""
    if path.is_dir():
        return _read_folder(path, config, split, streaming, audio_column)
    sources.no_split_options(f"Manifest {str(path)!r}", config, split)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return (sources.stream_files("json", [str(path)]) if streaming else _read_json(path)), path.parent
    if suffix == PARQUET_SUFFIX:
        rows = sources.stream_files("parquet", [str(path)]) if streaming else _read_parquet([str(path)], path)
        return rows, path.parent
    if suffix == sources.ARROW_SUFFIX:
        return sources.load_arrow([str(path)], streaming), path.parent
    raise ValueError(
        f"Unknown manifest type {suffix or '(no extension)'!r} for {str(path)!r}: expected "
        f"{', '.join(JSON_SUFFIXES)}, {PARQUET_SUFFIX}, {sources.ARROW_SUFFIX}, a folder (of {PARQUET_SUFFIX} or "
        f"{sources.ARROW_SUFFIX} files, saved with save_to_disk, an audiofolder or laid out as a Hub dataset repo), "
        "a Hub dataset id or a datasets.Dataset."
    )


def _read_folder(
    path: Path, config: str | None, split: str | None, streaming: bool, audio_column: str
) -> tuple[sources.Rows, Path | None]:
    """A folder: saved with `save_to_disk` (or a `prepare` / `align` output), a saved `DatasetDict`, an audiofolder,
    a Hub dataset repo, or else a folder of parquet (or Arrow) files searched recursively."""
    for saved in (path, path / SAVED_DATASET_DIR):
        if (saved / "state.json").is_file():  # what Dataset.save_to_disk writes
            sources.no_split_options(f"Saved dataset {str(saved)!r}", config, split)
            rows = datasets.load_from_disk(str(saved))
            return (rows.to_iterable_dataset() if streaming else rows), path
        if (saved / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
            sources.no_split_options(f"Saved DatasetDict {str(saved)!r}", config, None)
            return sources.load_dataset_dict(saved, split, streaming), path
    metadata = sources.audiofolder_metadata(path, split)
    if metadata is not None:
        sources.no_split_options(f"Audiofolder {str(path)!r}", config, None)
        return sources.load_audiofolder(metadata, streaming, audio_column), None
    if sources.is_hub_layout(path):
        return sources.load_hub(str(path), config, split, streaming), None
    sources.no_split_options(f"Manifest folder {str(path)!r}", config, split)
    for suffix, read in ((PARQUET_SUFFIX, _read_parquet), (sources.ARROW_SUFFIX, None)):
        files = sorted(str(p) for p in path.rglob(f"*{suffix}"))
        if files and streaming:
            builder = "parquet" if suffix == PARQUET_SUFFIX else "arrow"
            return sources.stream_files(builder, files), path
        if files:
            return (read(files, path) if read else sources.load_arrow(files, False)), path
    raise ValueError(
        f"Manifest folder {str(path)!r} holds no {PARQUET_SUFFIX} or {sources.ARROW_SUFFIX} files, no saved dataset "
        "(save_to_disk, or the output folder of speechllm-hf prepare / align), no audiofolder metadata "
        f"({', '.join(sources.AUDIOFOLDER_METADATA)}) and no dataset card ({sources.DATASET_CARD}) of a Hub dataset "
        "repo."
    )


def load_manifest(
    source: str | os.PathLike | datasets.Dataset | datasets.IterableDataset,
    *,
    audio_column: str = "audio",
    text_column: str | None = "text",
    dataset_config: str | None = None,
    split: str | None = None,
    streaming: bool = False,
) -> sources.Rows:
    """Loads a manifest or `datasets` source with its audio column left undecoded.

    Args:
        source: A `.jsonl`/`.json` (JSON lines) file, a `.parquet` file, an `.arrow` file, a folder of parquet (or
            else Arrow) files (searched recursively), a folder saved with `Dataset.save_to_disk` (or a `prepare` /
            `align` output folder, which holds one in `dataset/`) or `DatasetDict.save_to_disk`, an audiofolder (a
            `metadata.csv` / `.jsonl` / `.parquet` whose `file_name` column names each clip, at the top or in one
            folder per split), a local folder laid out as a Hub dataset repo (a `README.md` dataset card, e.g.
            with `data/train-*.parquet`), a Hub dataset id, or a `datasets.Dataset` / `IterableDataset`.
        audio_column: The column holding the audio: a path string, a `{"bytes", "path"}` dict or an `{"array",
            "sampling_rate"}` dict. An audiofolder's `file_name` becomes this column.
        text_column: The transcript column, which must exist; `None` when the rows need no text.
        dataset_config: The config (subset) of a Hub dataset.
        split: The split of a Hub dataset, saved `DatasetDict` or audiofolder with split folders; by default the
            only one, else `train`.
        streaming: Read the rows as they are iterated (`datasets.IterableDataset`) instead of loading them all.

    Returns:
        The dataset (an `IterableDataset` when streaming) with every column kept; for file manifests, relative audio
        paths (strings, or the `path` of audio dicts and parquet structs without bytes) are resolved against the
        manifest's folder.

    Raises:
        ValueError: If the source does not exist (a path, or a Hub id that cannot be read), its type is unknown, a
            config or split is given for a source without them or names none of its own, or the audio or text
            column is missing (the message lists the columns there are).
    """
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        sources.no_split_options(f"A {type(source).__name__}", dataset_config, split)
        dataset, base = source, None
        if streaming and isinstance(dataset, datasets.Dataset):
            dataset = dataset.to_iterable_dataset()
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            dataset, base = _read_files(path, dataset_config, split, streaming, audio_column)
        elif sources.looks_like_hub_id(str(source)):
            dataset, base = sources.load_hub(str(source), dataset_config, split, streaming), None
        else:
            raise ValueError(f"Manifest {str(path)!r} does not exist.")
    else:
        raise ValueError(
            f"A manifest must be a path, a Hub dataset id or a datasets.Dataset; got {type(source).__name__}."
        )
    columns = sources.column_names(dataset)
    for kind, column in (("audio", audio_column), ("text", text_column)):
        if column is not None and column not in columns:
            raise ValueError(
                f"The manifest has no {kind} column {column!r}; its columns are {columns}. "
                f"Pass the right name with `{kind}_column=` (--{kind}_column on the command line)."
            )
    dataset = cast_audio_undecoded(dataset)
    if base is not None and _holds_paths((dataset.features or {}).get(audio_column)):
        dataset = dataset.map(
            _resolve,
            input_columns=audio_column,
            fn_kwargs={"base": str(base.resolve()), "column": audio_column},
            **({} if isinstance(dataset, datasets.IterableDataset) else {"desc": "Resolving audio paths"}),
        )
    return dataset


__all__ = ["SAVED_DATASET_DIR", "load_manifest", "cast_audio_undecoded"]
