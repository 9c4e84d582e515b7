"""Guards around one run of a training cell, kept in the cell's checkpoint folder.

* :class:`CellLock`: one process trains a cell at a time.  A training job survives the death of
  the Snakemake that started it (its own process group, or a SLURM job); a second Snakemake
  would start the same cell again, and both would write the same snapshot and publish the same
  metrics from two runs of the mechanism.
* :class:`AttemptLog`: every start of the cell, how it ended, and every snapshot written.  A
  private cell started from scratch again after a failure is a second run of the mechanism on
  the same data; the count is published in the cell's metrics and the privacy table.  A retry
  after a *data-dependent* failure (a non-finite loss: whether it happens depends on the private
  examples) is refused, because repeating a mechanism until its output passes a test of the data
  is a release the ledger does not account; ``dpzo accept-retry`` is the explicit, published way
  past that refusal.  The log is signed with the installation key, so editing or deleting it is
  not a way past it.

Both files live outside the train rule's outputs, so Snakemake never deletes them when it cleans
up a failed job.  Torch-free: the workflow adapter uses this before any model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dpzo import integrity
from dpzo.fileio import write_json_atomic

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
                log.warning(
                    "cannot lock %s (%s): this file system has no flock, so a second process training "
                    "this cell would not be detected; make sure only one runs",
                    self.path,
                    exc,
                )
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


def identity_digest(identity: dict) -> str:
    """SHA-256 of what a run is (method, hyperparameters, ledger, data, model, seed), canonically."""
    return integrity.canonical_digest(identity)


class RetryRefused(RuntimeError):
    """A private cell that failed for a data-dependent reason was started again unchanged."""


class AttemptLogInvalid(RuntimeError):
    """The attempt log was edited, cut short or deleted: what ran before cannot be known, so
    nothing starts until the loss of that record is acknowledged (``dpzo accept-retry``).
    ``what``: what was found wrong with it."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


class NothingToAccept(ValueError):
    """``dpzo accept-retry`` on a cell whose next run is not refused."""


DATA_DEPENDENT = "data-dependent failure"

#: the events that acknowledge an unaccounted run explicitly (``dpzo accept-retry``)
ACKNOWLEDGEMENTS = ("accepted", "reset")


def outcome_of(exc: BaseException) -> tuple[str, bool]:
    """The attempt log's text for a run that raised ``exc``, and whether the failure depended on
    the data.  An exception may name its own outcome in ``attempt_outcome`` (TrainingInterrupted)."""
    if getattr(exc, "attempt_outcome", None):
        return exc.attempt_outcome, False
    # raised by the trainers for a non-finite loss, update or weights
    if isinstance(exc, FloatingPointError):
        return f"{DATA_DEPENDENT}: {type(exc).__name__}: {exc}", True
    return f"failed: {type(exc).__name__}: {exc}", False


class AttemptLog:
    """Append-only, signed log of a cell's runs (JSON lines): one ``start`` line per start (time,
    host, pid, identity digest, the step a snapshot was resumed after or null), one ``end`` line
    per outcome (a killed run leaves none), one ``snapshot`` line per snapshot written (its step,
    releases and MAC: the record a snapshot is checked against on resume), and the explicit
    acknowledgements of :meth:`accept`.

    Every line carries a MAC under the installation key (:mod:`dpzo.integrity`) chained to the
    line before it (the first to the cell: the last five parts of the log's folder,
    ``<model>/<task>/<method>/eps<ε>/seed<seed>``), so a line cannot be edited, removed from the
    middle, or the log copied from another cell.  The head of the chain is also kept outside
    ``results/`` (beside the key), so a log cut short or deleted is noticed too.  Such a log is
    refused (:class:`AttemptLogInvalid`) until :meth:`accept` records that its history is lost.

    It covers the runs since the cell last completed: :meth:`close` moves it aside once the
    metrics are written, so a forced rerun counts anew.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- the chain -----------------------------------------------------------------------------
    def _genesis(self) -> str:
        return integrity.sign("attempt-log", "/".join(self.path.parent.parts[-5:]))

    @staticmethod
    def _line_mac(previous: str, record: dict) -> str:
        return integrity.sign("attempt-log-line", previous, integrity.canonical(record))

    def _anchor_path(self) -> Path:
        where = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:32]
        return integrity.state_dir() / "attempt-logs" / f"{where}.json"

    def _anchor(self) -> dict | None:
        try:
            return json.loads(self._anchor_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _invalid(self, what: str) -> AttemptLogInvalid:
        message = (
            f"the attempt log {self.path} {what}. It is the cell's record of the runs of the mechanism "
            "(and of a retry refused after a failure that depended on the private data), so nothing was started. "
            f"If its history is lost, acknowledge it: `dpzo accept-retry {self.path.parent} --reason '...'` "
            "(recorded in the cell's metrics and shown in the privacy table), then run again"
        )
        log.error(message)
        return AttemptLogInvalid(message, what=f"the attempt log {self.path} {what}")

    def _verified(self) -> list[tuple[dict, str]]:
        """(record, its MAC) of every line, oldest first, after checking the chain and the anchor."""
        anchor = self._anchor()
        if not self.path.exists():
            if anchor is not None:
                raise self._invalid(
                    f"is missing, but this installation recorded {anchor.get('lines')} line(s) of it "
                    f"(the last at {anchor.get('time')}): it was deleted or moved"
                )
            return []
        out, previous = [], self._genesis()
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                # Only a kill in the middle of a write tears a line, and each line is written
                # before the work it records: a torn start never trained, a torn end is a kill.
                log.warning("%s line %d is torn (a write was interrupted); skipped", self.path, number)
                continue
            mac = record.pop("mac", None) if isinstance(record, dict) else None
            if not integrity.verifies(mac, "attempt-log-line", previous, integrity.canonical(record)):
                raise self._invalid(
                    f"does not verify at line {number} (edited, reordered, lines removed before it, copied from "
                    "another cell, or written by another installation)"
                )
            out.append((record, mac))
            previous = mac
        if anchor is not None and anchor.get("head") not in {mac for _, mac in out}:
            raise self._invalid(
                f"was cut short or replaced: this installation recorded {anchor.get('lines')} line(s) ending at "
                f"{anchor.get('time')}, which it no longer holds"
            )
        return out

    def records(self) -> list[dict]:
        """The log's records, oldest first (none when there is no log); raises
        :class:`AttemptLogInvalid` for a log that does not verify.  Torn lines are skipped."""
        return [record for record, _ in self._verified()]

    def append(self, record: dict) -> None:
        """Append one signed line, durably (it must be on disk before the work it records starts)."""
        lines = self._verified()
        mac = self._line_mac(lines[-1][1] if lines else self._genesis(), record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"  # a torn last line must not swallow this one
            else:
                torn = False
            fh.write((("\n" if torn else "") + json.dumps({**record, "mac": mac}, default=str) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        anchor = {"log": str(self.path.resolve()), "head": mac, "lines": len(lines) + 1, "time": _now()}
        write_json_atomic(self._anchor_path(), anchor)

    # -- what the log decides --------------------------------------------------------------------
    def check_retry(self, identity: str, *, private: bool) -> None:
        """Refuse to start a private run whose identical run failed for a data-dependent reason
        (unless that failure was acknowledged since, :meth:`accept`)."""
        records = self.records()
        if not private:
            return
        failed = []
        for r in records:
            if r.get("event") == "end" and r.get("data_dependent") and r.get("identity") == identity:
                failed.append(r)
            elif r.get("event") in ACKNOWLEDGEMENTS:
                failed = []  # acknowledged: the retry that follows is on the record
        if failed:
            message = (
                f"refusing to retry this private cell: its run with the same hyperparameters and data failed "
                f"at {failed[-1].get('time')} with a failure that depended on the private data "
                f"({failed[-1].get('outcome')}). A retry is a second run of the mechanism, chosen because "
                "of what the data did, which the privacy ledger does not account. Change the cell's "
                "hyperparameters (the new run is then counted as one more attempt and shown in metrics.json "
                f"and the privacy table), or accept the unaccounted extra run explicitly with `dpzo accept-retry "
                f"{self.path.parent} --reason '...'` (recorded in metrics.json and shown in the privacy table)."
            )
            log.error(message)
            raise RetryRefused(message)

    def accept(self, reason: str) -> dict:
        """Acknowledge, on the record, what the log would refuse: a retry after a data-dependent
        failure, or (for a log that does not verify) the loss of its history, which is then moved
        aside to ``attempts.rejected.<time>.jsonl`` and replaced by a new log that starts with the
        acknowledgement.  Returns the line written."""
        import getpass

        if not reason.strip():
            raise ValueError("say why the unaccounted run is accepted (--reason); it is published with the result")
        base = {"time": _now(), "user": getpass.getuser(), "host": socket.gethostname(), "reason": reason}
        try:
            records = self.records()
        except AttemptLogInvalid as invalid:
            aside = None
            if self.path.exists():
                aside = self.path.with_name(f"{self.path.stem}.rejected.{_stamp()}{self.path.suffix}")
                os.replace(self.path, aside)
            self._anchor_path().unlink(missing_ok=True)
            record = {"event": "reset", **base, "why": invalid.what}
            record["previous_log"] = aside.name if aside else None
            self.append(record)
            return record
        refused = []
        for r in records:
            if r.get("event") == "end" and r.get("data_dependent"):
                refused.append(r.get("outcome"))
            elif r.get("event") in ACKNOWLEDGEMENTS:
                refused = []
        if not refused:
            raise NothingToAccept(
                f"nothing to accept: the attempt log {self.path} verifies and holds no failure that depended on the "
                "data since the last acknowledgement, so the cell's next run is not refused"
            )
        record = {"event": "accepted", **base, "failures": refused}
        self.append(record)
        return record

    def latest_snapshot(self, identity: str) -> dict | None:
        """The last snapshot recorded for the run ``identity`` (``zo.checkpoint.SnapshotRecord``)."""
        for r in reversed(self.records()):
            if r.get("event") == "snapshot" and r.get("identity") == identity:
                return r
        return None

    def snapshot_written(self, identity: str, *, step: int, releases: int, mac: str) -> None:
        """Record a snapshot, after its file is on disk and before it is renamed into place."""
        self.append(
            {
                "event": "snapshot",
                "time": _now(),
                "identity": identity,
                "step": step,
                "releases": releases,
                "snapshot_mac": mac,
            }
        )

    def summary(self) -> dict:
        """``attempts``: starts from scratch (runs of the mechanism behind the result, this one
        included); ``resumes``: continuations from a snapshot; ``accepted``: the explicit
        acknowledgements of unaccounted runs (``dpzo accept-retry``); ``attempt_log``: the records."""
        records = self.records()
        starts = [r for r in records if r.get("event") == "start"]
        return {
            "attempts": sum(r.get("resumed_after_step") is None for r in starts),
            "resumes": sum(r.get("resumed_after_step") is not None for r in starts),
            "accepted": [
                {k: r.get(k) for k in ("event", "time", "user", "reason")}
                for r in records
                if r.get("event") in ACKNOWLEDGEMENTS
            ],
            "attempt_log": records,
        }

    def close(self) -> Path | None:
        """Move the log of a completed cell aside (``attempts.<UTC time>.jsonl``, kept as its
        history and never read again): a later forced rerun starts counting at 1."""
        if not self.path.exists():
            return None
        done = self.path.with_name(f"{self.path.stem}.{_stamp()}{self.path.suffix}")
        os.replace(self.path, done)
        self._anchor_path().unlink(missing_ok=True)  # closed: a missing log is expected now
        return done

    @contextlib.contextmanager
    def attempt(self, *, private: bool) -> Iterator[Attempt]:
        """``with log.attempt(private=...) as a: run(on_start=a.start)``: the run calls
        :meth:`Attempt.start` before its first step; on leaving the block the outcome is
        appended (nothing when the run never started, e.g. it was refused)."""
        current = Attempt(self, private=private)
        try:
            yield current
        except Exception as exc:
            if current.identity is not None:
                outcome, data_dependent = outcome_of(exc)
                current.end(outcome, data_dependent=data_dependent)
                # the job's log: an uncaught exception only reaches the job's stderr
                log.error("this run of the cell ended: %s (recorded in %s)", outcome, self.path)
            raise
        if current.identity is not None:
            current.end("completed")


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


class Attempt:
    """One run of a cell, as its :class:`AttemptLog` records it."""

    def __init__(self, log_: AttemptLog, *, private: bool):
        self.log, self.private = log_, private
        self.identity: str | None = None

    def start(self, identity: dict, resumed_after_step: int | None) -> None:
        """Called once before the first training step (``resumed_after_step``: the step a snapshot
        continues after; None from scratch).  Raises :class:`RetryRefused` instead of starting a
        refused retry."""
        digest = identity_digest(identity)
        self.log.check_retry(digest, private=self.private)
        self.log.append(
            {
                "event": "start",
                "time": _now(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "identity": digest,
                "method": identity.get("method"),
                "resumed_after_step": resumed_after_step,
            }
        )
        self.identity = digest

    def end(self, outcome: str, *, data_dependent: bool = False) -> None:
        """Append this run's ``end`` line: its outcome and whether the failure depended on the data."""
        self.log.append(
            {
                "event": "end",
                "time": _now(),
                "pid": os.getpid(),
                "identity": self.identity,
                "outcome": outcome,
                "data_dependent": data_dependent,
            }
        )
