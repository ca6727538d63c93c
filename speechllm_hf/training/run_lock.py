"""One training run per output folder: `output_dir/train.lock`, held with an OS file lock, names its owner.

Two `train` processes on one `output_dir` would interleave checkpoints and rotate each other's away. The main process
(under `accelerate launch`, the other ranks of the same run share its folder) takes an exclusive `flock` on the lock
file and writes its host, pid and start time into it. The kernel releases the lock when the process dies, however it
dies, so a killed run never blocks the next one, and pid reuse cannot fool the check: a lock file still naming an
owner while nobody holds the lock is stale (that run ended without releasing it), which is reported and taken over.
A clean exit empties the file. The file is never deleted: deleting it would let a third process lock a new file
while a second still holds the old one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


def check_output_dir(output_dir: str) -> None:
    """Refuses an `output_dir` that is a file, or lies under one, before anything is trained.

    Raises:
        ValueError: naming the file in the way.
    """
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is" if path == os.path.abspath(output_dir) else f"lies under {path}, which is"
        raise ValueError(f"output_dir {output_dir} {where} a file, not a folder: choose another --output_dir.")


class OutputDirInUseError(RuntimeError):
    """Another training run holds the output folder's lock."""


class RunLock:
    """`with RunLock(output_dir):` holds `output_dir/train.lock` for the block.

    Raises:
        ValueError: on entry, when `output_dir` is a file (`check_output_dir`).
        OutputDirInUseError: on entry, when another process holds the lock; the message names it.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = os.path.join(os.fspath(output_dir), LOCK_FILE)
        self.file = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs there are not guarded
            logger.warning("No file locking on this platform: %s is not guarded against a second run.", self.path)
            return self
        check_output_dir(os.path.dirname(self.path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run: the lock lives as long as the file
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "a process that has not written its name yet"
            file.close()
            raise OutputDirInUseError(
                f"{os.path.dirname(self.path)} is in use by another training run ({owner}): two runs on one "
                "output_dir would interleave their checkpoints. Wait for it to end, or choose another --output_dir."
            ) from None
        file.seek(0)
        stale = file.read().strip()
        if stale:
            logger.warning("%s names a run that ended without releasing it (%s): taking it over.", self.path, stale)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.ctime()}) + "\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> None:
        if self.file is None:
            return
        self.file.truncate(0)  # emptied while still held: an empty file is a clean exit
        self.file.close()  # closing releases the lock
        self.file = None


__all__ = ["LOCK_FILE", "OutputDirInUseError", "RunLock", "check_output_dir"]
