"""One cell on R data-parallel ranks: ``torchrun`` on one machine, ``srun`` inside a SLURM job.

The train job (one Snakemake job per cell, as always) starts the R rank processes and waits for
them; rank 0 holds the cell's lock, trains, evaluates and writes the outputs
(:func:`dpzo.pipeline.cell.train_cell`), the other ranks train their share of every batch
(``dpzo.zo.replicas``).  When any rank fails, the launcher stops the others and the job fails
with the ranks' own messages; the cell's snapshot (written by rank 0) is kept, so the next run
resumes.

    python -m dpzo.pipeline.rank_worker <cell_run.pkl> <metrics.json> <private_diagnostics.json>

is what each rank runs (the launcher sets ``RANK``/``WORLD_SIZE``, or SLURM its
``SLURM_PROCID``/``SLURM_NTASKS``).  The rank's side lives in :mod:`dpzo.pipeline.rank_worker`:
it calls the cell's trainer, which calls this launcher, so keeping the two apart keeps the
imports one-way (cell -> ranks; rank_worker -> cell).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpzo.pipeline.cell import CellRun

log = logging.getLogger(__name__)

WORKER = "dpzo.pipeline.rank_worker"  # the module each rank runs


def in_slurm_job(environ: dict | None = None) -> bool:
    """Whether this process runs inside a SLURM allocation that ``srun`` can start steps in."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch_command(ranks: int, args: list[str], *, slurm: bool) -> tuple[list[str], dict[str, str]]:
    """The command that starts ``ranks`` processes of :data:`WORKER`, and the variables it needs.

    In a SLURM job the ranks are one ``srun`` step (``--overlap``: inside the step Snakemake's
    job already runs in); elsewhere ``torchrun --standalone`` starts them on this machine.  Both
    stop every rank when one fails.
    """
    worker = [sys.executable, "-m", WORKER, *args]
    if slurm:
        env = {"MASTER_ADDR": socket.gethostname(), "MASTER_PORT": str(_free_port())}
        return ["srun", "--overlap", f"--ntasks={ranks}", "--kill-on-bad-exit=1", *worker], env
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*torchrun, "--max-restarts=0", "-m", WORKER, *args], {}


def rank_devices(ranks: int, visible: list[str]) -> str:
    """Each rank's GPUs, ``"0,1;2,3"``: consecutive equal slices of the visible ones."""
    if len(visible) < ranks:
        raise RuntimeError(f"{ranks} ranks need at least {ranks} GPUs; this job sees {len(visible)} ({visible})")
    per_rank = len(visible) // ranks
    return ";".join(",".join(visible[r * per_rank : (r + 1) * per_rank]) for r in range(ranks))


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d for d in listed.split(",") if d]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def train_cell_on_ranks(run: CellRun, ranks: int, *, metrics_path: str | Path, diagnostics_path: str | Path) -> None:
    """Train one cell on ``ranks`` processes; rank 0 writes ``metrics_path`` and ``diagnostics_path``.

    The cell's run is handed to the ranks in a file next to its snapshot.  What the ranks print
    goes to this job's output (and so to its log).
    """
    folder = Path(run.checkpoint.path).parent if run.checkpoint else Path(metrics_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    run_file = folder / "cell_run.pkl"
    run_file.write_bytes(pickle.dumps(run))
    cmd, extra = launch_command(ranks, [str(run_file), str(metrics_path), str(diagnostics_path)], slurm=in_slurm_job())
    if run.device.startswith("cuda"):
        extra["DPZO_RANK_GPUS"] = rank_devices(ranks, _visible_gpus())  # each rank's own GPUs
    log.info("training on %d ranks: %s", ranks, " ".join(cmd))
    proc = subprocess.Popen(
        cmd, env={**os.environ, **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    tail: list[str] = []
    for line in proc.stdout:
        sys.stdout.write(line)
        tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        raise RuntimeError(
            f"the cell's {ranks} ranks failed (exit status {proc.returncode}); its snapshot, if any, is kept "
            f"and a rerun resumes from it. The ranks' last lines:\n{''.join(tail)}"
        )
    run_file.unlink(missing_ok=True)
