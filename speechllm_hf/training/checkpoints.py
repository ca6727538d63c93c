"""Complete checkpoints: a checkpoint folder counts once a marker, written last, lists its files and their sizes.

The Trainer writes a checkpoint file by file (model, optimizer, scheduler, RNG state of each process, trainer state),
so a run killed half-way leaves a `checkpoint-N` folder that transformers' `get_last_checkpoint` would still pick.
Writing to a `tmp-checkpoint-N` folder and renaming it is what transformers 4.36 did and later dropped: every
process writes into the folder, and the renames failed in multi-node runs (transformers issue #27925). A marker needs
no rename. `SpeechLlmTrainer` writes it once every process has written its files, and resumes only from folders whose
marker matches their contents.
"""

from __future__ import annotations

import json
import logging
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _files(folder: str) -> dict[str, int]:
    """Relative path -> size of every file under `folder` but the marker."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMPLETE_MARKER:
                sizes[relative] = os.path.getsize(path)
    return sizes


def mark_complete(folder: str | os.PathLike) -> None:
    """Flush every file of `folder` to disk, then record them in the marker (written to a temporary file and renamed,
    so that the marker itself is never half-written)."""
    folder = os.fspath(folder)
    sizes = _files(folder)
    for relative in sizes:  # without fsync a power cut could leave a marker beside files the disk never received
        with open(os.path.join(folder, relative), "rb") as file:
            os.fsync(file.fileno())
    temporary = os.path.join(folder, f".{COMPLETE_MARKER}.tmp")
    with open(temporary, "w") as file:
        json.dump({"files": sizes}, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, os.path.join(folder, COMPLETE_MARKER))


def unmark(folder: str | os.PathLike) -> None:
    """Remove the marker of a folder about to be written again: until the new write ends, it is incomplete."""
    try:
        os.remove(os.path.join(folder, COMPLETE_MARKER))
    except FileNotFoundError:
        pass


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when its marker matches its files."""
    marker = os.path.join(folder, COMPLETE_MARKER)
    try:
        with open(marker) as file:
            recorded = json.load(file)["files"]
    except FileNotFoundError:
        return f"it has no {COMPLETE_MARKER}, so its writing did not finish"
    except (ValueError, KeyError, TypeError) as err:
        return f"its {COMPLETE_MARKER} cannot be read ({err})"
    present = _files(os.fspath(folder))
    for relative, size in sorted(recorded.items()):
        if relative not in present:
            return f"{relative} is missing"
        if present[relative] != size:
            return f"{relative} has {present[relative]} bytes, {size} when the checkpoint was written"
    return None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, newest step first."""
    if not os.path.isdir(output_dir):
        return []
    steps = {}
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps[os.path.join(output_dir, name)] = int(match.group(1))
    return sorted(steps, key=steps.get, reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike, warn: bool = True) -> str | None:
    """The newest complete checkpoint of `output_dir` (None if there is none); with `warn`, newer incomplete ones are
    named in a warning."""
    for folder in checkpoint_folders(output_dir):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        if warn:
            logger.warning("Skipping %s, an incomplete checkpoint: %s.", folder, reason)
    return None


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """What `Trainer.train` should resume from: `True` becomes the newest complete checkpoint of `output_dir`; a path
    must be a complete checkpoint.

    Raises:
        ValueError: `True` without any complete checkpoint, or a path to an incomplete one; the message says why.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(
                f"Cannot resume: {output_dir} holds no complete checkpoint (checkpoint-N folder with "
                f"{COMPLETE_MARKER}). Start without --resume_from_checkpoint, or give a checkpoint folder."
            )
        logger.info("Resuming from %s, the newest complete checkpoint.", found)
        return found
    reason = incomplete_reason(resume_from_checkpoint)
    if reason is not None:
        newest = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)), warn=False)
        raise ValueError(
            f"Cannot resume from {resume_from_checkpoint}: {reason}. "
            + (f"The newest complete checkpoint beside it is {newest}. " if newest else "")
            + f"A checkpoint written by plain transformers or an older speechllm_hf has no {COMPLETE_MARKER}: if you "
            "know that it is complete, mark it with `speechllm_hf.training.checkpoints.mark_complete(folder)`."
        )
    return os.fspath(resume_from_checkpoint)


__all__ = [
    "COMPLETE_MARKER",
    "mark_complete",
    "unmark",
    "incomplete_reason",
    "checkpoint_folders",
    "last_complete_checkpoint",
    "resolve_resume",
]
