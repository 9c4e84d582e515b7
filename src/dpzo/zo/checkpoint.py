"""Resumable zeroth-order training: periodic, atomic snapshots of the training loop.

A cell that is killed (SIGKILL, a lost node) or stopped (a SLURM time limit or pre-emption
sends SIGTERM first) continues from its last snapshot on the next run and ends bit-identical to
an uninterrupted run.

Why a snapshot and not a replay log
-----------------------------------
Zeroth-order training has an exact log: each step's public seeds and privatized scalars replay
theta_T from theta_0.  Replaying costs one full-size direction per step and direction, and
would have to re-derive dynamic DP-ZOPO masks and proximal anchors on the way; a snapshot
restores in one read and needs none of that, so that is what is stored:

* theta (the master copy, or the restored weights when training in place), the current mask
  with its scales, the proximal anchor;
* the loop's bookkeeping: steps and releases done, the loss-curve history and the partial
  sums since the last log point, training seconds so far, earlier resume points;
* the public batch generator of MeZO;
* the privacy generator's state, **only in insecure test mode**.  A secure generator's state
  is secret and is never written: a resumed secure run continues with fresh OS-seeded draws.

Privacy: every step is released once.  Steps a killed run computed after its last snapshot were
never written anywhere; the resumed run computes them once, with fresh noise and fresh Poisson
batches, so the ledger's T * P releases are exactly what the final weights depend on (the
trainer counts the releases across resumes and checks the total against the ledger).  A run
that *fails* on its own (a non-finite loss) is a data-dependent event: re-running it, from a
snapshot or from scratch, is a retry the ledger does not account (the cell's attempt log refuses
it, ``dpzo.pipeline.cellguard``).

Identity: a snapshot records what it belongs to (method, hyperparameters, ledger, training data,
model size and a digest of theta_0, whether noise is secure).  A snapshot whose identity differs
from the run at hand (the cell's config or data changed) is ignored and later replaced.

Integrity: a snapshot carries a MAC (HMAC-SHA256 under this installation's key,
:mod:`dpzo.integrity`) of its tensors and of everything else in it (counters, history, generator
states, identity, which names the cell's ledger), so only a trainer of this installation can
write one that verifies: a file edited, copied from another cell or another installation is
ignored with a warning and the run starts from step 0 (which the cell's attempt log counts as
another run of the mechanism).  Each snapshot written is also recorded (step, releases, MAC) in
the cell's append-only, signed attempt log (:class:`SnapshotRecord`) before it is renamed into
place; a snapshot that is not the last one recorded there (an older one copied back after a
later one was written) is ignored the same way, so the weights never carry releases the cell's
record counted once already.

Writing: ``torch.save`` to a temporary file in the same folder, fsync, rename; a kill during the
write leaves the previous snapshot intact.  A full disk (or quota) skips a periodic snapshot
with a warning and training continues; at SIGTERM the run stops all the same, saying that its
state could not be saved.  The workflow deletes the file once the cell's metrics are written.
It lives outside the cell's declared outputs, so Snakemake never deletes it when it cleans up
a failed or incomplete job.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from dpzo import integrity
from dpzo.fileio import atomic_path
from dpzo.zo.store import STATE_KEYS, ParameterStore

if TYPE_CHECKING:  # annotations only
    from dpzo.privacy.secret import SecretRandom

log = logging.getLogger(__name__)

FORMAT = "dpzo-zo-train-state-v3"  # v3: its digest is a MAC under the installation key
DIGEST_SAMPLES = 1 << 20  # coordinates of theta_0 hashed into the identity (all of them below this)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where a cell's snapshot lives and how often it is written.

    A snapshot is written after a step when ``every_steps`` steps (0: never by count) or
    ``every_seconds`` seconds (0: never by time) have passed since the last one, and always when
    SIGTERM arrived.  Neither value changes results, so neither is a rule parameter.
    """

    path: Path
    every_steps: int = 0
    every_seconds: float = 600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.every_steps < 0 or not self.every_seconds >= 0:
            raise ValueError(
                f"checkpoint every_steps and every_seconds must be >= 0 (0 turns that trigger off); "
                f"got {self.every_steps}, {self.every_seconds}"
            )


@dataclass
class LoopState:
    """What the training loop needs back to continue where a snapshot was taken: the proximal
    anchor, and the monitor's state (``dpzo.zo.monitor.TrainingMonitor.state_dict``)."""

    step: int  # steps completed
    releases: int  # privatized releases completed (each accounted once)
    anchor: torch.Tensor | None
    history: dict
    since_log: tuple[list, int, float]  # losses, examples, clipped since the last log point
    train_seconds: float
    resumed_from: list[int] = field(default_factory=list)
    examples_sampled: int = 0  # examples the sampler drew, for the end-of-training ledger check

    def monitor_state(self) -> dict:
        """Everything but the anchor: what ``TrainingMonitor.load_state_dict`` takes."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "anchor"}


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived: the run stops after saving its state (``saved``), to be resumed by the next run."""

    def __init__(self, message: str, *, saved: bool = True):
        super().__init__(message)
        self.saved = saved
        # what the cell's attempt log records for this run (``dpzo.pipeline.cellguard``)
        self.attempt_outcome = "interrupted (snapshot saved)" if saved else "interrupted (state not saved: no space)"


#: errno values of a full disk or an exhausted quota
NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def no_space(exc: BaseException) -> OSError | None:
    """The full-disk error behind ``exc``, or None.  torch's writer meets ENOSPC in the middle of
    a file and raises its own ``RuntimeError`` ("unexpected pos ...") with the ``OSError`` only
    as its context, so the chain of causes is searched."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def digest(*arrays: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of the arrays' bytes (dtype and shape included), for identities and snapshots."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            # as raw bytes: numpy has no bfloat16 (the in-place weights of a 16-bit model)
            t = a.detach().cpu().contiguous()
            h.update(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def theta_digest(master: torch.Tensor) -> str:
    """Digest of theta_0: every coordinate of small models, an even stride of large ones."""
    stride = max(1, master.numel() // DIGEST_SAMPLES)
    return digest(master[::stride])


#: The tensors of a snapshot (a store's ``state_dict`` and the proximal anchor); everything
#: else in it is plain data (numbers, lists, dicts).
SNAPSHOT_TENSORS = STATE_KEYS + ("anchor",)


def snapshot_digest(payload: dict) -> str:
    """SHA-256 over a snapshot's tensors (dtype, shape, bytes) and, serialised canonically, all
    its other entries (counters, history, generator states, identity); ``digest`` excluded.
    What a snapshot carries is :func:`snapshot_mac` of it, which only this installation can make."""
    h = hashlib.sha256()
    for key in SNAPSHOT_TENSORS:
        value = payload.get(key)
        h.update(f"{key}={'none' if value is None else digest(value)};".encode())
    h.update(
        integrity.canonical({k: v for k, v in payload.items() if k not in SNAPSHOT_TENSORS and k != "digest"}).encode()
    )
    return h.hexdigest()


def snapshot_mac(payload: dict) -> str:
    """The snapshot's MAC: :func:`snapshot_digest` signed with the installation key."""
    return integrity.sign(FORMAT, snapshot_digest(payload))


def identity_tag(identity: dict) -> str:
    """A short public name of a snapshot identity (its canonical SHA-256), for the attempt log."""
    return integrity.canonical_digest(identity)


class SnapshotRecord(Protocol):
    """The cell's own append-only record of the snapshots written (``pipeline.cellguard.AttemptLog``)."""

    def latest_snapshot(self, identity: str) -> dict | None:
        """The last snapshot recorded for the run ``identity`` (``step``, ``releases``, ``snapshot_mac``), or None."""

    def snapshot_written(self, identity: str, *, step: int, releases: int, mac: str) -> None:
        """Record a snapshot just written."""


class SnapshotRejected(Exception):
    """Why a snapshot on disk is not resumed (logged; the run starts from step 0)."""


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", copy=True).contiguous()


class TrainingCheckpoint:
    """Snapshots of one cell's zeroth-order training loop (see the module docstring)."""

    def __init__(self, policy: CheckpointPolicy, identity: dict, record: SnapshotRecord | None = None):
        self.policy = policy
        self.identity = dict(identity)
        self.record = record  # the cell's record of releases; None: not cross-checked (other ranks, tests)
        self._last_save = time.monotonic()
        self._last_step = 0
        self._stop = threading.Event()

    # -- SIGTERM: save at the end of the current step, then stop -----------------------------
    @contextlib.contextmanager
    def saving_on_sigterm(self) -> Iterator[None]:
        """While active, SIGTERM makes the loop save after its current step and raise
        :class:`TrainingInterrupted` (SLURM sends SIGTERM at a time limit or pre-emption and
        SIGKILL only after its grace period).  Only the main thread can own a signal handler."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    # -- resume ------------------------------------------------------------------------------
    def resume(
        self,
        store: ParameterStore,
        *,
        public_rng: np.random.Generator,
        secret: SecretRandom | None = None,
        secure_noise: bool | None = None,
    ) -> LoopState | None:
        """Restore ``store``, the generators and the loop state from the snapshot, if one for this
        very run exists; otherwise return None (start at step 0).  Call before the first step:
        the identity includes a digest of the weights as loaded (theta_0).

        ``secure_noise`` (part of the identity) defaults to ``secret``'s mode; a replica without
        the secret RNG passes rank 0's (``dpzo.zo.replicas``), and skips the secret's state.
        """
        if secret is not None:
            secure_noise = bool(secret.is_secure)
        self.identity.update(
            numel=int(store.numel),
            master_dtype=str(store.master_dtype),
            theta0=theta_digest(store.master),
            secure_noise=secure_noise,
        )
        path = self.policy.path
        if not path.exists():
            return None
        try:
            saved = self._verified(path)
        except SnapshotRejected as why:
            log.warning(
                "ignoring checkpoint %s: %s; starting from step 0 (the file is replaced by the next snapshot)",
                path,
                why,
            )
            return None
        store.load_state_dict({key: saved[key] for key in STATE_KEYS})
        public_rng.bit_generator.state = saved["public_rng"]
        if saved["secret_rng"] is not None and secret is not None:
            secret.restore_insecure_state(saved["secret_rng"])
        anchor = saved["anchor"]
        self._last_step = int(saved["step"])
        log.info("resuming from checkpoint %s after step %d", path, saved["step"])
        return LoopState(
            step=int(saved["step"]),
            releases=int(saved["releases"]),
            anchor=None if anchor is None else anchor.to(store.device),
            history=saved["history"],
            since_log=tuple(saved["since_log"]),
            train_seconds=float(saved["train_seconds"]),
            resumed_from=list(saved["resumed_from"]),
            examples_sampled=int(saved["examples_sampled"]),
        )

    def _verified(self, path: Path) -> dict:
        """The snapshot at ``path`` if this installation's trainer wrote it for this very run and it
        is the last one the cell's record holds; raises :class:`SnapshotRejected` otherwise."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # written atomically, so only a foreign or older file gets here
            raise SnapshotRejected(f"it is unreadable ({exc})") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
            raise SnapshotRejected(f"its format is {found!r}, not {FORMAT!r} (an older version or a foreign file)")
        if not integrity.verifies(saved.get("digest"), FORMAT, snapshot_digest(saved)):
            # edited (counters rolled back, identity rewritten), or written by another installation:
            # resuming it would publish weights the counted releases never produced
            raise SnapshotRejected(
                f"its MAC does not verify under this installation's key ({integrity.key_path()}): it was changed "
                "after the trainer wrote it, or written elsewhere"
            )
        if integrity.canonical(saved.get("identity")) != integrity.canonical(self.identity):
            raise SnapshotRejected("it belongs to another configuration of this cell")
        if self.record is not None:
            latest = self.record.latest_snapshot(identity_tag(self.identity))
            if latest is None or latest.get("snapshot_mac") != saved["digest"]:
                behind = (
                    "no snapshot of this run"
                    if latest is None
                    else f"a later one, after {latest['releases']} releases (step {latest['step']})"
                )
                raise SnapshotRejected(
                    f"it is not the last snapshot the cell's attempt log records: it holds {saved['releases']} "
                    f"releases (step {saved['step']}), the log records {behind} (an older snapshot put back, or "
                    "one from before the log was reset)"
                )
        return saved

    # -- save --------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether a snapshot is due after ``step`` steps: by step count, by elapsed time, or for SIGTERM."""
        p = self.policy
        by_steps = p.every_steps > 0 and step - self._last_step >= p.every_steps
        by_time = p.every_seconds > 0 and time.monotonic() - self._last_save >= p.every_seconds
        return by_steps or by_time or self._stop.is_set()

    def step_done(
        self,
        step: int,
        state: Callable[[], LoopState],
        store: ParameterStore,
        *,
        public_rng: np.random.Generator,
        secret: SecretRandom | None = None,
    ) -> None:
        """Call after every completed step (``step`` steps done): saves when due, and stops the run
        after saving if SIGTERM arrived.  ``state`` is only built when a snapshot is written."""
        if not self.due(step):
            return
        current = state()
        path = self.policy.path
        try:
            self.save(current, store, public_rng=public_rng, secret=secret)
        except (OSError, RuntimeError) as err:
            exc = no_space(err)
            if exc is None:
                raise
            # A periodic snapshot is optional: losing it costs recomputation after a kill, never
            # correctness (the previous snapshot is intact).  The next try comes at the next
            # interval, not after every step.
            self._last_save, self._last_step = time.monotonic(), current.step
            if self._stop.is_set():
                message = (
                    f"stopped by SIGTERM after step {current.step}, but the state could not be saved: no space "
                    f"left for {path} ({exc}); the next run of this cell resumes from the previous snapshot "
                    f"if there is one, else starts over; free space in {path.parent}"
                )
                log.error(message)
                raise TrainingInterrupted(message, saved=False) from exc
            log.warning(
                "no space left to write checkpoint %s (%s): this snapshot is skipped and training continues; "
                "free space in %s, or an interrupted run restarts from an older snapshot or from step 0",
                path,
                exc,
                path.parent,
            )
            return
        if self._stop.is_set():
            message = (
                f"stopped by SIGTERM after step {current.step}; the state is saved in {self.policy.path} "
                "and the next run of this cell resumes from it"
            )
            log.warning(message)  # the job's log file, next to the traceback Snakemake shows
            raise TrainingInterrupted(message)

    def save(
        self,
        state: LoopState,
        store: ParameterStore,
        *,
        public_rng: np.random.Generator,
        secret: SecretRandom | None = None,
    ) -> None:
        """Write a snapshot of the loop atomically, with a digest that resume verifies.

        The secret RNG's state is saved in test mode only: a secure generator refuses to export it.
        """
        payload = {
            "format": FORMAT,
            "identity": self.identity,
            "step": state.step,
            "releases": state.releases,
            "train_seconds": state.train_seconds,
            "resumed_from": list(state.resumed_from),
            "examples_sampled": state.examples_sampled,
            **store.state_dict(),  # theta itself (restored), the mask and its scales
            "anchor": _cpu(state.anchor),
            "history": state.history,
            "since_log": list(state.since_log),
            "public_rng": public_rng.bit_generator.state,
            # test mode only: a secure generator refuses to export its state (see SecretRandom)
            "secret_rng": secret.insecure_state() if secret is not None and not secret.is_secure else None,
        }
        payload["digest"] = snapshot_mac(payload)  # verified on resume
        # Through a Python file, not a path: the OSError(ENOSPC) of a full disk then stays in the
        # chain of what torch raises, which step_done searches (``no_space``).
        with atomic_path(self.policy.path) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must never publish a file whose data is not on disk
            if self.record is not None:  # on the record before it is in place: resume checks it there
                self.record.snapshot_written(
                    identity_tag(self.identity), step=state.step, releases=state.releases, mac=payload["digest"]
                )
        self._last_save, self._last_step = time.monotonic(), state.step
        log.info("checkpoint after step %d written to %s", state.step, self.policy.path)


def remove_checkpoint(path: str | Path) -> None:
    """Delete a finished cell's snapshot (nothing happens when there is none)."""
    Path(path).unlink(missing_ok=True)
