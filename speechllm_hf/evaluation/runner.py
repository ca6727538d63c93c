"""`evaluate`: generate answers for every partition of a data config and score them as the papers did.

Decoding follows the contrastive paper's evaluation: greedy, at most 200 new tokens, stop at a newline or the
end-of-turn token, left padding. Scores per task (metrics from `speechllm_hf.evaluation.metrics`):

- ASR: `mean_utterance_wer` (the mean of per-utterance WERs after lower-casing and removing punctuation: what the
  paper reported) and `corpus_wer` (total edits / total reference words), both fractions;
- ST: sacrebleu corpus `bleu` and `chrf` with their signatures, and `comet` when `unbabel-comet` is installed and
  its model can be loaded;
- SQA: SQuAD v1.1 `exact_match` and `f1`, max over the gold answers.

Two files go to `results_dir`, grouped by task, then language (pair), then `<dataset>/<split>` (splits are never
pooled): `<config>_preds.json` with one record per row of each slice (its reference and prediction, or why it was
not scored) and `<config>_scores.json` with the metrics and the row counts. Rows outside a partition's duration
bounds (`too_short`, `too_long`), rows without a reference or an SQA question (`missing_fields`) and rows whose
audio is unusable (`unusable_audio`) are not scored, and are counted under `skipped`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from speechllm_hf.data.audio import audio_duration
from speechllm_hf.data.manifest import load_manifest
from speechllm_hf.data.tasks import PromptConfig
from speechllm_hf.inference.generate import iter_generate

from . import metrics
from .data_config import (
    TASKS,
    DataConfig,
    DatasetEntry,
    Partition,
    language_fields,
    load_data_config,
    resolve_split_path,
    slice_indices,
)

logger = logging.getLogger(__name__)

# The contrastive paper's evaluation decoding.
EVAL_MAX_NEW_TOKENS = 200
REFERENCE_COLUMNS = {"ASR": ("sentence", "text", "transcript"), "ST": ("translation",), "SQA": ("answer",)}
SKIP_REASONS = ("too_short", "too_long", "missing_fields", "unusable_audio")


def _reference(row: dict, entry: DatasetEntry) -> str | list[str] | None:
    """The row's reference (SQA: the list of gold answers), or None when it has none."""
    columns = (entry.reference_column,) if entry.reference_column else REFERENCE_COLUMNS[entry.task]
    value = next((row[c] for c in columns if row.get(c) is not None), None)
    if entry.task == "SQA":
        answers = [value] if isinstance(value, str) else list(value or [])
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        return answers or None
    return value if isinstance(value, str) and value.strip() else None


def _header_duration(audio) -> float | None:
    """A clip's duration from its header (or array length); None when unreadable: generation then reports why."""
    try:
        return audio_duration(audio)
    except ValueError:
        return None


def _load_split(entry: DatasetEntry, language: str, partition: Partition) -> tuple[datasets.Dataset, dict[str, str]]:
    """The rows of a partition's split, and where they come from (the source's config and split, where named).

    Raises:
        ValueError: If they cannot be read (no such path, split, config or audio column), naming the entry.
    """
    path = resolve_split_path(entry, language, partition.split)
    try:
        dataset = load_manifest(path, text_column=None, dataset_config=entry.dataset_config, split=entry.split)
    except ValueError as err:
        raise ValueError(f"{entry.name}: {err}") from err
    # `split` is the partition's name in the results; the source's own split is `dataset_split`.
    source = {"path": str(path), "dataset_config": entry.dataset_config, "dataset_split": entry.split}
    return dataset, {key: value for key, value in source.items() if value is not None}


def _partition_records(
    model,
    processor,
    entry: DatasetEntry,
    language: str,
    partition: Partition,
    dataset: datasets.Dataset,
    prompts: PromptConfig,
    settings: dict,
) -> tuple[list[dict], dict[str, Any]]:
    """Generates the partition's slice of `dataset`: one record per row, and the slice's row counts."""
    indices = slice_indices(len(dataset), partition.amount)
    info = {"amount": partition.amount, "split_rows": len(dataset), "num_rows": len(indices)}
    # Decide which rows to generate from the light columns; audio is read again, lazily, while generating.
    light = dataset.remove_columns(["audio"])
    task, fields = TASKS[entry.task], language_fields(language)
    records, requests = [], []
    for index in indices:
        row = light[index] if light.column_names else {}  # audio alone: no columns left, and so no rows
        duration = row.get("duration")
        duration = float(duration) if duration is not None else _header_duration(dataset[index]["audio"])
        record = {"index": index, **({"id": row["id"]} if "id" in row else {}), "duration": duration}
        record["reference"] = _reference(row, entry)
        if entry.task == "ST" and isinstance(row.get("sentence"), str):
            record["source"] = row["sentence"]
        if entry.task == "SQA":
            record["question"] = row.get("question")
        # The config's language names win over any language code a row carries.
        row_fields = {key: value for key, value in row.items() if isinstance(value, str)}
        try:
            instruction = prompts.instructions[task].format_map({**row_fields, **fields})
        except KeyError as err:
            instruction = None
            logger.warning("%s/%s row %d has no %s for its instruction.", entry.name, partition.split, index, err)
        reason = partition.duration_reason(duration)
        if reason is None and (instruction is None or record["reference"] is None):
            reason = "missing_fields"
        if reason is not None:
            record["skipped"] = reason
        else:
            requests.append((len(records), instruction))
        records.append(record)

    lazy = ({"audio": dataset[records[r]["index"]]["audio"], "instruction": i} for r, i in requests)
    desc = f"{entry.name}/{language}/{partition.split}"
    for position, result in tqdm(iter_generate(model, processor, lazy, **settings), total=len(requests), desc=desc):
        record = records[requests[position][0]]
        record["prediction"] = result.response
        if result.error is not None:
            record.update(skipped="unusable_audio", error=result.error)
    return records, info


def score_records(task: str, records: list[dict], comet: bool = True) -> dict[str, Any]:
    """The task's metrics over the scored records (those with a prediction and no `skipped`), with row counts.

    Args:
        task: "ASR", "ST" or "SQA".
        records: The records of one `<dataset>/<split>` group of a preds file.
        comet: Also compute COMET for ST when `unbabel-comet` is installed.

    Returns:
        `{"num_scored", "skipped": {reason: count}, <metrics>}`; metrics are None when nothing was scored.
    """
    scored = [r for r in records if "skipped" not in r]
    skipped = Counter(r["skipped"] for r in records if "skipped" in r)
    result: dict[str, Any] = {
        "num_scored": len(scored),
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
    }
    references, predictions = [r["reference"] for r in scored], [r["prediction"] for r in scored]
    if task == "ASR":
        result.update(mean_utterance_wer=None, corpus_wer=None)
        if scored:
            result["mean_utterance_wer"] = metrics.mean_utterance_wer(references, predictions)
            try:
                result["corpus_wer"] = metrics.corpus_wer(references, predictions)
            except ValueError as err:  # every reference normalises to nothing
                logger.warning("corpus WER undefined: %s", err)
    elif task == "ST":
        result.update(bleu=None, chrf=None)
        if scored:
            for name in ("bleu", "chrf"):
                score = metrics.sacrebleu_score(name, references, predictions)
                result[name], result[f"{name}_signature"] = score.score, score.signature
            sources = [r.get("source") for r in scored]
            if comet and importlib.util.find_spec("comet") is not None and all(sources):
                try:
                    result["comet"] = metrics.comet(sources, references, predictions)
                except Exception as err:  # COMET downloads its model: offline or missing weights must not lose BLEU
                    logger.warning("COMET skipped: %s", err)
                    result["comet_error"] = f"{type(err).__name__}: {err}"
    else:
        result.update(exact_match=None, f1=None)
        if scored:
            result.update(metrics.squad_em_f1(references, predictions))
    return result


def evaluate(
    model,
    processor,
    data_config: DataConfig | str | os.PathLike,
    results_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    sort_window: int | None = None,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    prompts: PromptConfig | None = None,
    comet: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Generates and scores every partition of a data config; writes the preds and scores files.

    Args:
        model: A `SpeechLlmForConditionalGeneration` (in eval mode).
        processor: Its `SpeechLlmProcessor`.
        data_config: A `DataConfig` or the path of its YAML file.
        results_dir: Gets `<config>_preds.json` and `<config>_scores.json`.
        batch_size: Rows generated together (length-sorted).
        sort_window: Rows sorted by duration together; see `iter_generate`.
        max_new_tokens: Longest response (the paper: 200).
        prompts: The prompt file; None uses the packaged defaults.
        comet: Compute COMET for ST when `unbabel-comet` is installed.
        model_name: Recorded in the scores file.

    Returns:
        The content of the scores file.
    """
    config = data_config if isinstance(data_config, DataConfig) else load_data_config(data_config)
    prompts = prompts or PromptConfig.from_file()
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "stop_at_newline": True}
    preds: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    slices, not_evaluated = [], []
    for entry in config.entries:
        for language in entry.languages:
            for partition in entry.partitions:
                where = {"dataset": entry.name, "task": entry.task, "language": language, "split": partition.split}
                if partition.destination == "train":
                    logger.info("Not evaluating %s: its destination is train.", where)
                    not_evaluated.append({**where, "destination": partition.destination})
                    continue
                # Every split is read before any is generated: a wrong path, split or config fails in seconds, not
                # after hours of generation on the partitions before it.
                slices.append((entry, language, partition, *_load_split(entry, language, partition)))
    batches = {"batch_size": batch_size, "sort_window": sort_window, "prompts": prompts, **settings}
    for entry, language, partition, dataset, source in slices:
        records, info = _partition_records(model, processor, entry, language, partition, dataset, prompts, batches)
        group = f"{entry.name}/{partition.split}"
        preds.setdefault(entry.task, {}).setdefault(language, {})[group] = records
        result = {"dataset": entry.name, "split": partition.split, **source, **info}
        result.update(score_records(entry.task, records, comet=comet))
        scores.setdefault(entry.task, {}).setdefault(language, {})[group] = result
        logger.info("%s %s %s: %s", entry.task, language, group, json.dumps(result))

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    header = {"config": config.name, "model": model_name}
    scores_file = {
        **header,
        "generation": {**settings, "batch_size": batch_size},
        "not_evaluated": not_evaluated,
        "results": scores,
    }
    for suffix, content in (("preds", {**header, "results": preds}), ("scores", scores_file)):
        with open(results_dir / f"{config.name}_{suffix}.json", "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2, ensure_ascii=False)
    return scores_file


__all__ = ["EVAL_MAX_NEW_TOKENS", "SKIP_REASONS", "evaluate", "score_records"]
