"""Validation of a streamed source as it is read: the checks of `prepare_dataset`, row by row, with the counts kept.

A stream cannot be validated before training (it is read once, lazily), so each row is checked when the Trainer
reads it: a bad row is dropped with its reason, logged as a warning (index, audio, reason, detail: what
`dropped.jsonl` holds for a prepared manifest) and counted in a `StreamReport`. A kept row carries its decoded clip
at the model's rate, so the collator does not decode it again.

Not checked on a stream: `duplicate_id` (it would keep every id read in memory, and a second pass over the stream
would repeat them all).
"""

from __future__ import annotations

import logging
from typing import Any

import datasets

from .prepare import _DETAIL, _REASON, _REF, REASONS, _check_row, _hours, row_checks

logger = logging.getLogger(__name__)

STREAM_REASONS = tuple(reason for reason in REASONS if reason != "duplicate_id")


class StreamReport:
    """The counts of `prepare_dataset`'s report for the rows of a stream read so far (every pass: a row read twice
    counts twice).

    Args:
        source: How the report names the stream (its path or Hub id).
    """

    def __init__(self, source: str):
        self.source = source
        self.total = 0
        self.dropped = dict.fromkeys(STREAM_REASONS, 0)
        self._seconds = {"kept": [], "dropped": []}

    def record(self, index: int, checked: dict[str, Any]) -> None:
        """Counts one checked row (`_check_row`'s output) and logs it when it is dropped."""
        self.total += 1
        reason = checked[_REASON]
        self._seconds["dropped" if reason else "kept"].append(checked["duration"])
        if reason:
            self.dropped[reason] += 1
            logger.warning(
                "%s: dropped row %d (%s): %s: %s", self.source, index, checked[_REF], reason, checked[_DETAIL]
            )

    def as_dict(self) -> dict[str, Any]:
        """The report in `prepare_dataset`'s form: total, kept, dropped per reason, hours, source."""
        kept = self.total - sum(self.dropped.values())
        hours = {part: _hours(seconds) for part, seconds in self._seconds.items()}
        return {
            "total": self.total,
            "kept": kept,
            "dropped": dict(self.dropped),
            "hours": hours,
            "source": self.source,
        }


def validate_stream(
    stream: datasets.IterableDataset, report: StreamReport, **settings: Any
) -> datasets.IterableDataset:
    """The rows of `stream` that pass `prepare_dataset`'s checks, each checked as it is read and counted in `report`.

    Args:
        stream: The rows (audio left undecoded: `load_manifest(..., streaming=True)`).
        report: Counts the rows read, kept and dropped per reason, in this process: a DataLoader worker process
            would count in its own copy, so read the stream in the main process (`dataloader_num_workers=0`).
        **settings: `prepare_dataset`'s keywords of the checks (`row_checks`): `min_duration`, `max_duration`,
            `processor`, `audio_column`, `text_column`, `task`, `prompts`, `require_text`, `audio_token`,
            `special_tokens`, ...

    Returns:
        The kept rows, with a measured `duration` and the audio column holding the decoded clip (`{"array",
        "sampling_rate"}` at the model's rate).

    Raises:
        ValueError: For inconsistent settings (see `row_checks`), before any row is read.
    """
    checks = row_checks(**settings)

    def check(row: dict[str, Any], index: int) -> dict[str, Any]:
        checked = _check_row(row, keep_decoded=True, **checks)
        report.record(index, checked)
        return checked

    checked = stream.map(check, with_indices=True)
    return checked.filter(lambda row: not row[_REASON]).remove_columns([_REASON, _DETAIL, _REF])


__all__ = ["STREAM_REASONS", "StreamReport", "validate_stream"]
