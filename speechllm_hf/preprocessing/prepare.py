"""Offline validation of a manifest: every row is decoded once, bad rows are dropped with a reason, nothing silently.

`prepare_dataset` runs the checks in parallel with `Dataset.map(num_proc=...)` and returns the kept rows (audio as
given, plus a measured `duration` column) and a report whose counts always add up to the number of input rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from speechllm_hf.models.speechllm.audio_speechllm import resample

from ..data.audio import audio_duration, audio_ref, decode_audio, wav_shortfall
from ..data.manifest import SAVED_DATASET_DIR, cast_audio_undecoded, load_manifest
from ..data.tasks import (
    TASKS,
    PromptConfig,
    check_columns,
    check_task,
    fields_holding,
    missing_fields,
    response_column,
)

logger = logging.getLogger(__name__)

# One reason per row, the first check that fails: the header (unreadable, truncated, empty, too_short, too_long)
# before the samples, so that an over-long file is never decoded; then decoding (unreadable), non_finite, a clip too
# short for the model's encoder to give one audio token (too_short_for_encoder), and the row's fields: its task
# (unknown_task), a response or instruction field given as a number or other non-string (non_string_text), its
# response text (missing_text), the fields its instruction reads (missing_field), text that holds the audio token
# (audio_token_in_text), which would be read as a second audio placeholder, and text that holds another of the
# tokenizer's special tokens (special_token_in_text), which would be read as a control token. Last, across rows: an
# `id` already taken by an earlier kept row (duplicate_id).
REASONS: tuple[str, ...] = (
    "unreadable",
    "truncated",
    "empty",
    "too_short",
    "too_long",
    "non_finite",
    "too_short_for_encoder",
    "unknown_task",
    "non_string_text",
    "missing_text",
    "missing_field",
    "audio_token_in_text",
    "special_token_in_text",
    "duplicate_id",
)
ID_COLUMN = "id"  # row ids (generation outputs, evaluation records) must name one row each
REPORT_FILE = "report.json"
DROPPED_FILE = "dropped.jsonl"
# Per-row outputs of the validation map; removed from the kept rows.
_REASON, _DETAIL, _REF = "__prepare_reason", "__prepare_detail", "__prepare_audio_ref"


def _duration_reason(duration: float, min_duration: float, max_duration: float) -> str | None:
    if duration == 0:
        return "empty"
    if duration < min_duration:
        return "too_short"
    if duration > max_duration:
        return "too_long"
    return None


def _check_audio(
    audio: Any, min_duration: float, max_duration: float, target_rate: int, min_samples: int
) -> tuple[str | None, float | None, str, np.ndarray | None]:
    """(reason or None, duration in seconds or None when unknown, detail, the clip at `target_rate` when it is
    kept) for one clip."""
    try:
        duration = audio_duration(audio)
        shortfall = wav_shortfall(audio)
    except Exception as err:  # any failure is this row's problem, never the run's
        return "unreadable", None, f"{type(err).__name__}: {err}", None
    if shortfall is not None:
        declared, present = shortfall
        return (
            "truncated",
            duration,
            f"the WAV header declares {declared} bytes of samples but the file holds {present} ({duration:.3f} s): "
            "the copy was cut short; copy or export it again",
            None,
        )
    reason = _duration_reason(duration, min_duration, max_duration)
    if reason is not None:
        return reason, duration, f"{duration:.3f} s from the header", None
    try:
        waveform, rate = decode_audio(audio)
    except Exception as err:
        return "unreadable", duration, f"{type(err).__name__}: {err}", None
    # Headers can disagree with the data (truncated files): the decoded length is the one recorded and checked.
    duration = waveform.size / rate
    reason = _duration_reason(duration, min_duration, max_duration)
    if reason is not None:
        return reason, duration, f"{duration:.3f} s decoded", None
    if not np.isfinite(waveform).all():
        return "non_finite", duration, f"{int((~np.isfinite(waveform)).sum())} NaN/inf samples", None
    # A clip of a few samples can vanish when resampled: check what the model will actually receive.
    resampled = resample(waveform, rate, target_rate)
    samples = resampled.size
    if samples == 0:
        return "empty", duration, f"0 samples at {target_rate} Hz", None
    if samples < min_samples:
        return (
            "too_short_for_encoder",
            duration,
            f"{samples} samples at {target_rate} Hz; the encoder needs {min_samples} for one audio token",
            None,
        )
    return None, duration, "", resampled


def _non_string(value: Any) -> bool:
    """A value given, but not as text (`"text": 123`, `true`, an object); a list counts by its first item, the one
    a task reads (Spoken-SQuAD lists several gold answers)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value is not None and not isinstance(value, str)


def _check_fields(
    row: dict[str, Any],
    task: str,
    prompts: PromptConfig,
    text_column: str,
    audio_token: str,
    special_tokens: list[str],
) -> tuple[str | None, str]:
    """(reason or None, detail) for the fields of one row, checked against its own task."""
    task = row.get("task") or task
    if task not in TASKS:
        return "unknown_task", f"task {task!r}"
    missing = missing_fields(row, task, prompts, text_column)
    wrong = [name for name in missing if _non_string(row.get(name))]
    if wrong:
        return "non_string_text", ", ".join(f"{name} {row.get(name)!r} is not a string" for name in wrong)
    if missing:
        column = response_column(task, text_column)
        reason = "missing_text" if column in missing else "missing_field"
        return reason, f"{task} row without {', '.join(f'{name} {row.get(name)!r}' for name in missing)}"
    holding = fields_holding(row, task, prompts, audio_token, text_column)
    if holding:
        return "audio_token_in_text", f"{audio_token!r} in {', '.join(holding)}"
    holding = fields_holding(row, task, prompts, special_tokens, text_column)
    if holding:
        found = sorted({token for name in holding for token in special_tokens if token in str(row.get(name))})
        return "special_token_in_text", f"{', '.join(map(repr, found))} in {', '.join(holding)}"
    return None, ""


def _check_row(
    row: dict[str, Any],
    *,
    audio_column: str,
    text_column: str,
    task: str,
    prompts: PromptConfig | None,
    min_duration: float,
    max_duration: float,
    target_rate: int,
    min_samples: int,
    audio_token: str,
    special_tokens: list[str],
    keep_decoded: bool = False,
) -> dict[str, Any]:
    """The verdict on one row: its measured `duration`, the reason it is dropped ("" when kept), the detail and how
    its audio is named; with `keep_decoded`, a kept row's audio becomes the decoded clip at `target_rate` (a stream's
    rows are checked as they are read, and the collator then decodes nothing twice)."""
    audio = row[audio_column]
    reason, duration, detail, waveform = _check_audio(audio, min_duration, max_duration, target_rate, min_samples)
    if reason is None and prompts is not None:
        reason, detail = _check_fields(row, task, prompts, text_column, audio_token, special_tokens)
    checked = {"duration": duration, _REASON: reason or "", _DETAIL: detail, _REF: audio_ref(audio)}
    if keep_decoded and not reason:
        checked[audio_column] = {"array": waveform, "sampling_rate": target_rate}
    return checked


def describe_source(source: Any) -> str:
    """How a report names its input: the resolved path, or the shape of an in-memory dataset."""
    if isinstance(source, datasets.Dataset):
        return f"datasets.Dataset(num_rows={source.num_rows}, columns={source.column_names})"
    return str(Path(source).resolve()) if Path(source).exists() else str(source)  # a Hub dataset id


def shortest_clip_samples(processor: Any) -> int:
    """The fewest samples, at the processor's rate, of a clip that the processor turns into at least one audio token.

    The encoder's convolutions (and the projector's) need a whole receptive field for one output step, and Whisper's
    STFT needs more than its window; anything shorter passes decoding but fails in the processor, which in training
    stops the run. Found by bisection with the processor's own feature extraction on silent clips (a few calls).

    Args:
        processor: The model's `SpeechLlmProcessor`.

    Returns:
        The shortest clip length accepted, in samples at `processor.sampling_rate`.

    Raises:
        ValueError: If the processor accepts no clip of up to 30 s.
    """
    rate = processor.sampling_rate

    def accepted(samples: int) -> bool:
        try:
            processor([processor.audio_token], audio=[np.zeros(samples, dtype=np.float32)], sampling_rate=rate)
        except ValueError:  # too short for the feature extractor, or for one audio token
            return False
        return True

    low, high = 0, 1  # low: refused (none at all is empty), high: the candidate
    while not accepted(high):
        low, high = high, 2 * high
        if high > 30 * rate:
            raise ValueError(f"The processor accepts no clip of up to 30 s at {rate} Hz: check its audio_length_spec.")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if accepted(middle) else (middle, high)
    return high


def _duplicate_ids(ids: list[Any], reasons: list[str], details: list[str]) -> None:
    """Drops (in place, as duplicate_id) every otherwise kept row whose id an earlier kept row has."""
    first: dict[Any, int] = {}
    for index, (row_id, reason) in enumerate(zip(ids, reasons)):
        if reason or row_id is None:
            continue
        if row_id in first:
            reasons[index] = "duplicate_id"
            details[index] = f"{ID_COLUMN} {row_id!r} is row {first[row_id]}'s too, which is kept"
        else:
            first[row_id] = index


def _hours(durations: list[float | None]) -> float:
    return round(sum(d for d in durations if d is not None) / 3600, 6)


def row_checks(
    *,
    min_duration: float = 0.0,
    max_duration: float = 30.0,
    target_rate: int | None = None,
    processor: Any = None,
    audio_column: str = "audio",
    text_column: str = "text",
    task: str = "asr",
    prompts: PromptConfig | None = None,
    require_text: bool = True,
    audio_token: str = "<audio>",
    special_tokens: Sequence[str] = (),
) -> dict[str, Any]:
    """The settings of the per-row check (`_check_row`'s keywords) from `prepare_dataset`'s arguments of the same
    names, which it documents.

    Raises:
        ValueError: If the duration bounds are inconsistent, `target_rate` is not the processor's or `task` is unknown.
    """
    if not 0 <= min_duration <= max_duration:
        raise ValueError(f"Need 0 <= min_duration <= max_duration; got {min_duration} and {max_duration}.")
    min_samples = 0
    if processor is not None:
        if target_rate not in (None, processor.sampling_rate):
            raise ValueError(
                f"target_rate={target_rate} but the processor reads {processor.sampling_rate} Hz: leave target_rate "
                "out with a processor."
            )
        target_rate, min_samples = processor.sampling_rate, shortest_clip_samples(processor)
    if require_text:
        check_task(task)
    return {
        "audio_column": audio_column,
        "text_column": text_column,
        "task": task,
        "prompts": (prompts or PromptConfig.from_file()) if require_text else None,
        "min_duration": float(min_duration),
        "max_duration": float(max_duration),
        "target_rate": target_rate or 16000,
        "min_samples": min_samples,
        "audio_token": audio_token,
        "special_tokens": [token for token in special_tokens if token != audio_token],
    }


def prepare_dataset(
    source: str | os.PathLike | datasets.Dataset,
    output_dir: str | os.PathLike | None = None,
    *,
    num_proc: int = 1,
    min_duration: float = 0.0,
    max_duration: float = 30.0,
    target_rate: int | None = None,
    processor: Any = None,
    audio_column: str = "audio",
    text_column: str = "text",
    task: str = "asr",
    prompts: PromptConfig | None = None,
    require_text: bool = True,
    audio_token: str = "<audio>",
    special_tokens: Sequence[str] = (),
    dataset_config: str | None = None,
    split: str | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Validates every row of a manifest and keeps the good ones.

    Each row is checked once, in parallel over `num_proc` processes. A row is dropped with the first reason of
    `REASONS` that applies: `unreadable` (missing file, directory, link loop, undecodable data), `truncated` (a WAV
    file holding fewer samples than its header declares), `empty` (0 samples, also after resampling to
    `target_rate`), `too_short` / `too_long` (outside `[min_duration, max_duration]` seconds), `non_finite` (NaN/inf
    samples), `too_short_for_encoder` (with `processor`: too short for one audio token); then, when `require_text`,
    against the row's own task (its `task` column, else `task`): `unknown_task`, `non_string_text` (a field it reads
    given as a number or other non-string), `missing_text` (no response text: transcript, translation, answer,
    continuation or response),
    `missing_field` (a field the task's instruction reads, such as `target_language` or `question`) or
    `audio_token_in_text` (one of those fields holds `audio_token`, which the model would read as audio) or
    `special_token_in_text` (one holds another of `special_tokens`, which the tokenizer would read as a control
    token, such as an end of turn inside a transcript). Every row is
    checked against the fields its own task needs, so multi-task manifests keep their ST and QA rows. Last, a row
    whose `id` an earlier kept row has is dropped as `duplicate_id`. A bad row never stops the run.

    Args:
        source: Anything `load_manifest` accepts: a jsonl file, a parquet file or folder, a `datasets` source (a
            saved dataset, an audiofolder, a Hub dataset id or repo folder, ...), or a `datasets.Dataset`.
        output_dir: If given, the kept rows are saved to `output_dir/dataset` (`load_prepared` reads them back),
            the report to `output_dir/report.json` and, when rows were dropped, one line per dropped row (`index`,
            `audio` path or `"<array>"`/`"<bytes>"`, `reason`, `detail`) to `output_dir/dropped.jsonl`.
        num_proc: Processes for `Dataset.map`.
        min_duration: Shortest clip kept, in seconds.
        max_duration: Longest clip kept, in seconds.
        target_rate: The rate the model's feature extractor reads; clips must survive resampling to it. Default: the
            processor's, else 16000.
        processor: The model's `SpeechLlmProcessor`: clips too short for its encoder to give one audio token are
            dropped as `too_short_for_encoder` (`shortest_clip_samples`). Without it, only `min_duration` bounds
            the shortest clip.
        audio_column: The audio column (path, `{"bytes", "path"}` or `{"array", "sampling_rate"}`).
        text_column: The transcript column of ASR rows.
        task: The task of rows without a `task` column (see `speechllm_hf.data.tasks`).
        prompts: The prompts whose instruction fields rows must fill in; the packaged defaults when None.
        require_text: Check each row's fields against its task (and, without a `task` column, that the columns
            `task` needs exist); False checks the audio only.
        audio_token: The model's audio placeholder (`SpeechLlmConfig.audio_token`), which row texts must not hold.
        special_tokens: The tokenizer's other special tokens (`special_token_strings(tokenizer)`), which row texts
            must not hold either; `speechllm-hf train` passes the model's.
        dataset_config: The config of a Hub dataset `source` (`load_manifest`).
        split: The split of a `source` that has splits (`load_manifest`).

    Returns:
        `(kept, report)`: the kept rows, with their audio as given (paths stay paths, arrays stay arrays) and a float
        `duration` column in seconds at the clip's own rate; and the report `{"total", "kept", "dropped": {reason:
        count for every reason}, "hours": {"kept", "dropped"}, "source"}` (dropped hours count the rows whose
        duration could be read).

    Raises:
        ValueError: If the manifest cannot be loaded (see `load_manifest`) or holds no rows, the duration bounds are
            inconsistent, `target_rate` is not the processor's, `task` is unknown, or (without a `task` column) the
            manifest lacks a column `task` needs.
    """
    checks = row_checks(
        min_duration=min_duration,
        max_duration=max_duration,
        target_rate=target_rate,
        processor=processor,
        audio_column=audio_column,
        text_column=text_column,
        task=task,
        prompts=prompts,
        require_text=require_text,
        audio_token=audio_token,
        special_tokens=special_tokens,
    )
    dataset = load_manifest(
        source, audio_column=audio_column, text_column=None, dataset_config=dataset_config, split=split
    )
    if len(dataset) == 0:
        raise ValueError(f"The manifest {describe_source(source)} holds no rows: there is nothing to prepare.")
    if require_text and "task" not in dataset.column_names:
        check_columns(dataset.column_names, [task], checks["prompts"], text_column)
    feature = dataset.features[audio_column]
    if isinstance(feature, dict) and "array" in feature:
        # Sample arrays read as numpy, not as Python lists of floats: validation runs several times faster.
        dataset = dataset.with_format("numpy", columns=[audio_column], output_all_columns=True)
    checked = dataset.map(
        _check_row,
        fn_kwargs=checks,
        num_proc=num_proc if num_proc > 1 else None,
        # Audio files can change behind an unchanged manifest: never reuse an earlier verdict.
        load_from_cache_file=False,
        desc="Validating audio",
    ).with_format(None)
    rows = checked.select_columns([_REASON, _DETAIL, _REF, "duration"]).to_dict()
    reasons, durations = rows[_REASON], rows["duration"]
    if ID_COLUMN in dataset.column_names:
        _duplicate_ids(dataset[ID_COLUMN], reasons, rows[_DETAIL])
    kept_indices = [i for i, reason in enumerate(reasons) if not reason]
    dropped = {reason: 0 for reason in REASONS}
    for reason in reasons:
        if reason:
            dropped[reason] += 1
    kept = checked.select(kept_indices).remove_columns([_REASON, _DETAIL, _REF])
    if kept.features["duration"] != datasets.Value("float64"):  # all-None (nothing readable) infers a null type
        kept = kept.cast_column("duration", datasets.Value("float64"))
    report = {
        "total": len(dataset),
        "kept": len(kept),
        "dropped": dropped,
        "hours": {
            "kept": _hours([durations[i] for i in kept_indices]),
            "dropped": _hours([d for d, reason in zip(durations, reasons) if reason]),
        },
        "source": describe_source(source),
    }
    assert report["kept"] + sum(dropped.values()) == report["total"], f"rows went missing: {report}"
    logger.info(
        "Prepared %s: kept %d of %d rows (%.2f h); dropped %s.",
        report["source"],
        report["kept"],
        report["total"],
        report["hours"]["kept"],
        ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count) or "none",
    )
    if output_dir is not None:
        _write(Path(output_dir), kept, report, rows)
    return kept, report


def _write(output_dir: Path, kept: datasets.Dataset, report: dict[str, Any], rows: dict[str, list]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    kept.save_to_disk(str(output_dir / SAVED_DATASET_DIR))
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    dropped_path = output_dir / DROPPED_FILE
    dropped = [
        {"index": i, "audio": ref, "reason": reason, "detail": detail}
        for i, (reason, detail, ref) in enumerate(zip(rows[_REASON], rows[_DETAIL], rows[_REF]))
        if reason
    ]
    if dropped:
        with open(dropped_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in dropped)
    else:
        dropped_path.unlink(missing_ok=True)  # a stale list from an earlier run would blame rows that are now kept


def load_prepared(output_dir: str | os.PathLike) -> datasets.Dataset:
    """Loads the kept rows saved by `prepare_dataset(..., output_dir)`, audio columns left undecoded.

    Args:
        output_dir: The `output_dir` given to `prepare_dataset` (or `speechllm-hf prepare --output_dir`).

    Returns:
        The prepared dataset.

    Raises:
        ValueError: If `output_dir` holds no prepared dataset.
    """
    path = Path(output_dir) / SAVED_DATASET_DIR
    if not path.is_dir():
        raise ValueError(f"No prepared dataset in {str(output_dir)!r}: run `speechllm-hf prepare` into it first.")
    return cast_audio_undecoded(datasets.load_from_disk(str(path)))


__all__ = [
    "row_checks",
    "REASONS",
    "REPORT_FILE",
    "describe_source",
    "load_prepared",
    "prepare_dataset",
    "shortest_clip_samples",
]
