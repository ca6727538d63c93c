"""YAML data configs of the contrastive-pretraining code (arXiv 2412.15712) and how their partitions are read.

```yaml
DATA:
  - MuST-C:                           # a name for the results
      datapath: ${DATA_HOME}/mustc    # env vars and ~ expand; relative paths resolve against the YAML's folder
      task: ST                        # ASR, ST or SQA
      languages: [en-de, en-fr]       # ST: source-target pairs; ASR/SQA: a language code
      partitions:
        tst-COMMON:                   # the split
          amount: ":50%"              # datasets' split slicing; default ":100%"
          min_duration: 0.1           # seconds, inclusive; rows outside are skipped and counted
          max_duration: 30
          destination: test           # "train" partitions are not evaluated
```

Where a split's rows are read (the first that exists; a datapath that is a file is every split's data):

1. `datapath/<language>/<split>/` (a folder of parquet files, searched recursively), then
   `datapath/<language>/<split>.parquet`, `.jsonl`, `.json`;
2. with a single language, also `datapath/<split>/`, `datapath/<split>.parquet`, `.jsonl`, `.json`.

An entry that gives `split` (and/or `dataset_config`) names one `datasets` source instead: `datapath` is a Hub dataset
id (where no such local path exists), a folder laid out as a Hub dataset repo, a saved `DatasetDict` or an audiofolder
with split folders, and `speechllm_hf.data.load_manifest` reads that split (and config) of it for every partition and
language, as a datapath that is a file is read for every split; the partitions name the results and slice the rows.

```yaml
DATA:
  - LibriSpeech-clean:
      datapath: openslr/librispeech_asr
      dataset_config: clean
      split: test
      task: ASR
      languages: [en]
      partitions:
        test-clean: {amount: ":500"}
```

Parquet rows hold `audio` (`{array, sampling_rate}` or `{bytes, path}`), `duration`, and per task `sentence`
(ASR; `text` or `transcript` also work), `translation` (ST, with `sentence` as the source), `question` and `answer`
(SQA, one answer or a list); jsonl rows hold an audio path instead, resolved against the file's folder. An entry may
name its reference column with `reference_column`.

`amount` follows datasets' split-slicing syntax (`:10%`, `10:20`, `:50`, `-10%:`, `10%:20%`): it is resolved by
`datasets.ReadInstruction` against the loaded split's row count (percentages rounded to the closest row, datasets'
default) and applied with `Dataset.select`, so the rows are those `load_dataset(..., split="split[amount]")` gives.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import yaml

from speechllm_hf.data.sources import looks_like_hub_id

logger = logging.getLogger(__name__)

# Config task name -> speechllm_hf.data.tasks name (its prompt-file instruction).
TASKS = {"ASR": "asr", "ST": "st", "SQA": "sqa"}
PARTITION_KEYS = ("amount", "min_duration", "max_duration", "destination")
ENTRY_KEYS = ("datapath", "task", "languages", "partitions", "reference_column", "dataset_config", "split")
SOURCE_KEYS = ("dataset_config", "split")  # what makes datapath one datasets source; named as the CLI flags
SPLIT_SUFFIXES = (".parquet", ".jsonl", ".json")
# Instructions name languages in words ("Translate the audio from English to German.").
LANGUAGE_NAMES = {
    "ar": "Arabic",
    "ca": "Catalan",
    "cy": "Welsh",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fa": "Persian",
    "fr": "French",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "lv": "Latvian",
    "mn": "Mongolian",
    "nl": "Dutch",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sl": "Slovenian",
    "sv": "Swedish",
    "ta": "Tamil",
    "tr": "Turkish",
    "zh": "Chinese",
}


@dataclass(frozen=True)
class Partition:
    """One split of a dataset entry: which rows (`amount`), which durations, and what it is for."""

    split: str
    amount: str = ":100%"
    min_duration: float | None = None
    max_duration: float | None = None
    destination: str | None = None

    def duration_reason(self, duration: float | None) -> str | None:
        """ "too_short" / "too_long" for a duration outside the inclusive bounds; None otherwise or when unknown."""
        if duration is None:
            return None
        if self.min_duration is not None and duration < self.min_duration:
            return "too_short"
        if self.max_duration is not None and duration > self.max_duration:
            return "too_long"
        return None


@dataclass(frozen=True)
class DatasetEntry:
    """One item of `DATA`: a dataset, its task and languages, and the partitions to read."""

    name: str
    datapath: Path | str  # a str: a Hub dataset id
    task: str
    languages: tuple[str, ...]
    partitions: tuple[Partition, ...]
    reference_column: str | None = None
    dataset_config: str | None = None
    split: str | None = None

    @property
    def names_source(self) -> bool:
        """Whether `datapath` is one `datasets` source whose `split` (and `dataset_config`) every partition reads."""
        return self.dataset_config is not None or self.split is not None


@dataclass(frozen=True)
class DataConfig:
    """A parsed data config; `name` (the file's stem) prefixes the result files."""

    name: str
    entries: tuple[DatasetEntry, ...]


def _datapath(value: str, base: Path, names_source: bool) -> Path | str:
    """The entry's datapath with env vars and ~ expanded, relative to the YAML's folder `base`; for an entry naming one
    `datasets` source, a Hub dataset id where no such local path exists."""
    expanded = os.path.expandvars(os.path.expanduser(str(value)))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise ValueError(f"datapath {value!r} uses unset environment variables: {', '.join(unset)}.")
    path = Path(expanded) if Path(expanded).is_absolute() else base / expanded
    if names_source and not path.exists() and looks_like_hub_id(expanded):
        return expanded
    return path


def _optional_name(value, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{what} must be a name; got {value!r} (quote it in the YAML if it reads as a number).")
    return value


def _optional_float(value, what: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number of seconds; got {value!r}.") from err


def _parse_partition(split: str, settings: dict | None, where: str) -> Partition:
    settings = settings or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: partition {split!r} must be a mapping; got {settings!r}.")
    unknown = sorted(set(settings) - set(PARTITION_KEYS))
    if unknown:
        raise ValueError(f"{where}: partition {split!r} has unknown keys {unknown}; valid keys: {PARTITION_KEYS}.")
    partition = Partition(
        split=str(split),
        amount=str(settings.get("amount") or ":100%"),
        min_duration=_optional_float(settings.get("min_duration"), f"{where}/{split}: min_duration"),
        max_duration=_optional_float(settings.get("max_duration"), f"{where}/{split}: max_duration"),
        destination=settings.get("destination"),
    )
    read_instruction(partition.amount)  # a malformed amount fails now, not after hours of generation
    return partition


def _parse_entry(item, base: Path, position: int) -> DatasetEntry:
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"DATA item {position} must be a one-key mapping `- <DatasetName>: {{...}}`; got {item!r}.")
    (name, settings), where = next(iter(item.items())), f"DATA/{next(iter(item))}"
    if not isinstance(settings, dict):
        raise ValueError(f"{where} must be a mapping with datapath, task, languages and partitions.")
    missing = [key for key in ("datapath", "task", "languages", "partitions") if not settings.get(key)]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}.")
    unknown = sorted(set(settings) - set(ENTRY_KEYS))
    if unknown:
        logger.warning("%s: ignoring keys %s (evaluation reads %s).", where, unknown, ", ".join(ENTRY_KEYS))
    task = str(settings["task"]).upper()
    if task not in TASKS:
        raise ValueError(f"{where}: task {settings['task']!r} cannot be evaluated; choose one of {', '.join(TASKS)}.")
    languages = settings["languages"]
    languages = tuple(str(lang) for lang in ([languages] if isinstance(languages, str) else languages))
    if task == "ST" and any("-" not in lang for lang in languages):
        raise ValueError(f"{where}: ST languages must be source-target pairs such as 'en-de'; got {languages}.")
    if not isinstance(settings["partitions"], dict):
        raise ValueError(f"{where}: partitions must map split names to settings.")
    partitions = tuple(_parse_partition(split, s, where) for split, s in settings["partitions"].items())
    source = {key: _optional_name(settings.get(key), f"{where}: {key}") for key in SOURCE_KEYS}
    return DatasetEntry(
        name=str(name),
        datapath=_datapath(settings["datapath"], base, any(value is not None for value in source.values())),
        task=task,
        languages=languages,
        partitions=partitions,
        reference_column=settings.get("reference_column"),
        **source,
    )


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Reads and checks a data-config YAML (see the module docstring); other top-level keys are ignored.

    Raises:
        ValueError: On a malformed config, naming the entry and key at fault.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as file:
        data = yaml.safe_load(file) or {}
    items = data.get("DATA") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty `DATA:` list of `- <DatasetName>: {{...}}` items.")
    entries = tuple(_parse_entry(item, path.resolve().parent, i) for i, item in enumerate(items))
    seen = set()
    for entry in entries:
        for language in entry.languages:
            for partition in entry.partitions:
                key = (entry.name, entry.task, language, partition.split)
                if key in seen:
                    raise ValueError(f"{path}: {'/'.join(key)} is listed twice; give the entries distinct names.")
                seen.add(key)
    return DataConfig(name=path.stem, entries=entries)


def resolve_split_path(entry: DatasetEntry, language: str, split: str) -> Path | str:
    """Where a split's rows are read (see the module docstring): the datapath itself for an entry naming one
    `datasets` source or a file.

    Raises:
        ValueError: When none of the candidate paths exists; the message lists them.
    """
    if entry.names_source or entry.datapath.is_file():
        return entry.datapath
    bases = [entry.datapath / language] + ([entry.datapath] if len(entry.languages) == 1 else [])
    candidates = [c for base in bases for c in [base / split] + [base / f"{split}{s}" for s in SPLIT_SUFFIXES]]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ValueError(
        f"{entry.name}: no data for split {split!r} and language {language!r}; looked for "
        + ", ".join(str(c) for c in candidates)
        + ". For a datasets source (a Hub dataset, a folder laid out as one, a saved DatasetDict, an audiofolder), "
        "give the entry `split` (and `dataset_config`)."
    )


def read_instruction(amount: str) -> datasets.ReadInstruction:
    """datasets' instruction for `split[amount]`.

    Raises:
        ValueError: If `amount` is not datasets' slicing syntax.
    """
    try:
        # A placeholder split name: datasets' grammar only takes word characters, real names such as
        # "tst-COMMON" would not parse.
        return datasets.ReadInstruction.from_spec(f"split[{amount}]")
    except (ValueError, AssertionError) as err:
        raise ValueError(
            f"Bad amount {amount!r}: use datasets' split slicing, e.g. ':100%', ':10%', '10:20', '-10%:'."
        ) from err


def slice_indices(num_rows: int, amount: str) -> list[int]:
    """The row indices `split[amount]` selects from a split of `num_rows` rows, in order."""
    instructions = read_instruction(amount).to_absolute({"split": num_rows})
    return [index for part in instructions for index in range(part.from_, part.to)]


def language_fields(language: str) -> dict[str, str]:
    """`source_language` (and `target_language` for a pair) in words for the prompt file's instructions."""
    source, _, target = language.partition("-")
    fields = {"source_language": LANGUAGE_NAMES.get(source, source)}
    if target:
        fields["target_language"] = LANGUAGE_NAMES.get(target, target)
    return fields


__all__ = [
    "TASKS",
    "LANGUAGE_NAMES",
    "Partition",
    "DatasetEntry",
    "DataConfig",
    "load_data_config",
    "resolve_split_path",
    "read_instruction",
    "slice_indices",
    "language_fields",
]
