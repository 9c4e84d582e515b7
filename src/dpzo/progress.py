"""Progress lines for a training job's log: where the run is, how fast it goes, when it ends.

A GPU cell of the paper's grid trains for an hour; on a cluster its log file is all a user can
watch.  The trainers log one line per log window (they read device values there anyway, so the
line costs no extra host synchronisation).  The log stays with the data owner: a line may carry
the training loss, which is never published.
"""

from __future__ import annotations

import math
import time


def clock(seconds: float) -> str:
    """``h:mm:ss`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Times a run of ``total`` steps that starts (or resumes) after ``done`` steps.

    ``prior_seconds`` is the training time of the steps done before a resume, so the elapsed time
    is the cell's, and the estimate of the time left uses the pace of this process only.
    """

    def __init__(self, total: int, *, done: int = 0, prior_seconds: float = 0.0):
        self.total, self.first, self.prior = int(total), int(done), float(prior_seconds)
        self.started = self._window_start = time.perf_counter()
        self._window_step = int(done)

    def line(self, done: int, *, stage: int | None = None, loss: float | None = None) -> str:
        """The progress after ``done`` steps, and the mean step time since the previous line."""
        now = time.perf_counter()
        window = max(done - self._window_step, 1)
        ms_per_step = 1000.0 * (now - self._window_start) / window
        ran = now - self.started
        pace = ran / max(done - self.first, 1)
        self._window_start, self._window_step = now, done
        where = f"step {done}/{self.total}" + (f" (stage {stage})" if stage is not None else "")
        text = (
            f"{where}: {ms_per_step:.1f} ms/step, elapsed {clock(self.prior + ran)}, "
            f"left ~{clock(pace * (self.total - done))}"
        )
        if loss is not None:
            text += f", training loss {loss:.4f} (private: for this log only)"
        return text
