"""`datasets` sources beyond manifest files: audiofolders, Hub datasets (by id, or a local folder laid out as a Hub
dataset repo), saved `DatasetDict`s, Arrow files, and streaming.

`load_manifest` dispatches here; every reader returns the rows with the audio left undecoded. Audio files are never
encoded or decoded by `datasets`: its `Audio` feature imports torchcodec even to store a file path, so an audiofolder
is read from its metadata file with `datasets`' csv/json/parquet readers, and each `file_name` becomes an absolute
path in the audio column.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

ARROW_SUFFIX = ".arrow"
# datasets' AudioFolder layout: a metadata file whose `file_name` column names each clip, relative to that file.
AUDIOFOLDER_METADATA = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
AUDIOFOLDER_FILE_COLUMN = "file_name"
DATASET_CARD = "README.md"  # a Hub dataset repo's card, whose YAML front matter may name its configs and splits
DEFAULT_SPLIT = "train"

Rows = datasets.Dataset | datasets.IterableDataset


def choose_split(splits: list[str], split: str | None, name: str) -> str:
    """`split` when `name` has it; when not given, the only split, else `train`.

    Raises:
        ValueError: If `split` is not one of `splits`, or none was given and `name` has several but no `train`.
    """
    if split is None:
        if len(splits) == 1 or DEFAULT_SPLIT in splits:
            return splits[0] if len(splits) == 1 else DEFAULT_SPLIT
        raise ValueError(f"{name} has the splits {splits} and none is {DEFAULT_SPLIT!r}: choose one with --split.")
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; its splits are {splits}: pass one of them with --split.")
    return split


def no_split_options(name: str, config: str | None, split: str | None) -> None:
    """Refuses --dataset_config / --split for a source that has neither (a file, a plain folder), rather than
    reading the whole source while the user believes one part of it is read."""
    given = [flag for flag, value in (("--dataset_config", config), ("--split", split)) if value is not None]
    if given:
        raise ValueError(
            f"{name} has no configs or splits, so {' and '.join(given)} cannot apply: drop "
            f"{'them' if len(given) > 1 else 'it'}, or give a Hub dataset (id, or a folder with a {DATASET_CARD}), a "
            "saved DatasetDict or an audiofolder with split folders."
        )


def is_hub_layout(path: Path) -> bool:
    """A local folder laid out as a Hub dataset repo: it has a dataset card (`README.md`, whose YAML `configs` name
    the data files of each split, or else datasets infers splits from file names like `data/train-*.parquet`)."""
    return (path / DATASET_CARD).is_file()


def load_hub(path: str, config: str | None, split: str | None, streaming: bool, data_dir: str | None = None) -> Rows:
    """A Hub dataset (an id, or a local folder laid out as a repo, or a packaged builder with `data_dir`) through
    `datasets.load_dataset`, one split of it.

    Raises:
        ValueError: If the dataset, its config or its split cannot be found (with the splits it has).
    """
    name = f"Dataset {path!r}" + (f" (config {config!r})" if config else "")
    try:
        splits = datasets.get_dataset_split_names(path, config, data_dir=data_dir)
    except Exception as err:  # FileNotFoundError, DatasetNotFoundError, ValueError for a config: say what was tried
        where = "a local folder" if os.path.isdir(path) else "a Hub dataset (it is no local file or folder)"
        raise ValueError(f"Cannot read {name} as {where}: {type(err).__name__}: {err}") from err
    return datasets.load_dataset(
        path, config, split=choose_split(splits, split, name), streaming=streaming, data_dir=data_dir
    )


def load_dataset_dict(path: Path, split: str | None, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a folder written by `DatasetDict.save_to_disk`."""
    saved = datasets.load_from_disk(str(path))
    chosen = saved[choose_split(list(saved), split, f"Saved DatasetDict {str(path)!r}")]
    return chosen.to_iterable_dataset() if streaming else chosen


def audiofolder_metadata(path: Path, split: str | None) -> Path | None:
    """The metadata file of an audiofolder (at its top, or in the folder of `split`), None when `path` is not one.

    Raises:
        ValueError: If the metadata is in split folders and `split` names none of them.
    """
    for name in AUDIOFOLDER_METADATA:
        if (path / name).is_file():
            no_split_options(f"Audiofolder {str(path)!r}", None, split)
            return path / name
    by_split = {
        folder.name: folder / name
        for folder in sorted(p for p in path.iterdir() if p.is_dir())
        for name in AUDIOFOLDER_METADATA
        if (folder / name).is_file()
    }
    if not by_split:
        return None
    return by_split[choose_split(list(by_split), split, f"Audiofolder {str(path)!r}")]


def load_audiofolder(metadata: Path, streaming: bool, audio_column: str) -> Rows:
    """The rows of an audiofolder's metadata file, with `file_name` turned into an absolute path in `audio_column`.

    Raises:
        ValueError: If the metadata has no `file_name` column, or already has a column named `audio_column`.
    """
    builder = {".csv": "csv", ".jsonl": "json", ".parquet": "parquet"}[metadata.suffix]
    rows = datasets.load_dataset(builder, data_files=str(metadata), split=DEFAULT_SPLIT, streaming=streaming)
    columns = rows.column_names or list(next(iter(rows)))
    if AUDIOFOLDER_FILE_COLUMN not in columns:
        raise ValueError(
            f"Audiofolder metadata {str(metadata)!r} has no {AUDIOFOLDER_FILE_COLUMN!r} column naming each clip; "
            f"its columns are {columns}."
        )
    if audio_column in columns:
        raise ValueError(
            f"Audiofolder metadata {str(metadata)!r} has both {AUDIOFOLDER_FILE_COLUMN!r} and {audio_column!r}: "
            f"the clip named by {AUDIOFOLDER_FILE_COLUMN!r} becomes {audio_column!r}; rename one of them."
        )
    base = str(metadata.parent.resolve())
    return rows.map(
        lambda name: {audio_column: os.path.join(base, name)},
        input_columns=AUDIOFOLDER_FILE_COLUMN,
        remove_columns=[AUDIOFOLDER_FILE_COLUMN],
        **({} if streaming else {"desc": "Resolving audiofolder paths"}),
    )


def load_arrow(files: list[str], streaming: bool) -> Rows:
    """Arrow files (as `save_to_disk` and the datasets cache write them), memory-mapped, or streamed."""
    if streaming:
        return datasets.load_dataset("arrow", data_files=files, split=DEFAULT_SPLIT, streaming=True)
    parts = [datasets.Dataset.from_file(file) for file in files]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def stream_files(builder: str, files: list[str]) -> datasets.IterableDataset:
    """json or parquet files read row by row as they are iterated, never converted to Arrow on disk."""
    return datasets.load_dataset(builder, data_files=files, split=DEFAULT_SPLIT, streaming=True)


def looks_like_hub_id(source: str) -> bool:
    """`name` or `owner/name` with no file suffix: what a missing local path cannot be mistaken for."""
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not Path(source).suffix and not source.startswith(".")


def column_names(rows: Rows) -> list[str]:
    """The columns of a dataset; for a stream whose features are unknown (json), those of its first row."""
    if rows.column_names is not None:
        return list(rows.column_names)
    first = next(iter(rows), None)
    return list(first) if first is not None else []


__all__ = [
    "ARROW_SUFFIX",
    "AUDIOFOLDER_METADATA",
    "Rows",
    "audiofolder_metadata",
    "choose_split",
    "column_names",
    "is_hub_layout",
    "load_arrow",
    "load_audiofolder",
    "load_dataset_dict",
    "load_hub",
    "looks_like_hub_id",
    "no_split_options",
    "stream_files",
]
