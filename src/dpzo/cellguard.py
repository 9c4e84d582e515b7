"""Guards around one run of a training cell, kept in the cell's checkpoint folder.

* :class:`CellLock`: one process trains a cell at a time.  A training job survives the death of
  the Snakemake that started it (its own process group, or a SLURM job); a second Snakemake
  would start the same cell again, and both would write the same snapshot and publish the same
  metrics from two runs of the mechanism.

Its files live outside the train rule's outputs, so Snakemake never deletes them when it cleans
up a failed job.  Torch-free: the workflow adapter uses this before any model is loaded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: errno values of file systems that do not support flock (some network file systems)
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CellBusy(RuntimeError):
    """Another live process holds the cell's lock."""


class CellLock:
    """``with CellLock(folder / "train.lock"):`` holds an exclusive lock on the cell for the block.

    ``flock`` on the file: the kernel releases it when the holder exits, however it dies, so a
    file left behind by a killed process never blocks.  The holder writes its pid, host and start
    time into the file; they only serve the message of a second start, which raises
    :class:`CellBusy`.  The file is removed on a clean exit.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> CellLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                message = self._busy_message(_read_holder(fd))
                os.close(fd)
                log.error(message)  # the job's log, next to the traceback Snakemake shows
                raise CellBusy(message) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _NO_LOCKS:
                    raise
                log.warning("cannot lock %s (%s): this file system has no flock, so a second process training "
                            "this cell would not be detected; make sure only one runs", self.path, exc)
                return self
            # The previous holder removes the file on exit: if it did so between our open and
            # our lock, we hold a lock on a file nobody else will open.  Lock the current file.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)  # visible to a second start on another host of a shared file system
        self._fd = fd
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding the lock (see __enter__)
        os.close(self._fd)
        self._fd = None

    def _busy_message(self, holder: dict) -> str:
        pid, host = holder.get("pid", "unknown"), holder.get("host", "unknown host")
        return (
            f"this cell is already being trained by pid {pid} on {host} since {holder.get('started', 'unknown')} "
            f"(lock {self.path}); a second run would train the same cell twice. Wait for that process to end, "
            f"or stop it (kill {pid} on {host}); `snakemake --unlock` removes only Snakemake's own lock and "
            "does not stop it"
        )


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):  # the holder is between taking the lock and writing its name
        return {}
