"""One cell on R data-parallel ranks: ``torchrun`` on one machine, ``srun`` inside a SLURM job.

The train job (one Snakemake job per cell, as always) starts the R rank processes and waits for
them; rank 0 holds the cell's lock, trains, evaluates and writes the outputs
(:func:`dpzo.pipeline.cell.train_cell`), the other ranks train their share of every batch
(``dpzo.zo.replicas``).  When any rank fails, the launcher stops the others and the job fails
with the ranks' own messages; the cell's snapshot (written by rank 0) is kept, so the next run
resumes.

    python -m dpzo.pipeline.ranks <cell_run.pkl> <metrics.json> <private_diagnostics.json>

is what each rank runs (the launcher sets ``RANK``/``WORLD_SIZE``, or SLURM its
``SLURM_PROCID``/``SLURM_NTASKS``).
"""

from __future__ import annotations

import dataclasses
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


def in_slurm_job(environ: dict | None = None) -> bool:
    """Whether this process runs inside a SLURM allocation that ``srun`` can start steps in."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch_command(ranks: int, args: list[str], *, slurm: bool) -> tuple[list[str], dict[str, str]]:
    """The command that starts ``ranks`` processes of this module, and the variables it needs.

    In a SLURM job the ranks are one ``srun`` step (``--overlap``: inside the step Snakemake's
    job already runs in); elsewhere ``torchrun --standalone`` starts them on this machine.  Both
    stop every rank when one fails.
    """
    worker = [sys.executable, "-m", "dpzo.pipeline.ranks", *args]
    if slurm:
        env = {"MASTER_ADDR": socket.gethostname(), "MASTER_PORT": str(_free_port())}
        return ["srun", "--overlap", f"--ntasks={ranks}", "--kill-on-bad-exit=1", *worker], env
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*torchrun, "--max-restarts=0", "-m", "dpzo.pipeline.ranks", *args], {}


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


def _rank_environment() -> None:
    """torch.distributed's variables from SLURM's, for ranks started by ``srun``; this rank's
    GPUs made the only visible ones (before CUDA starts), so a placement spreads over them."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if env.get("DPZO_RANK_GPUS"):
        env["CUDA_VISIBLE_DEVICES"] = env["DPZO_RANK_GPUS"].split(";")[int(env.get("LOCAL_RANK", "0"))]


def main(argv: list[str]) -> None:
    """One rank of a cell: rank 0 trains and writes the outputs, the others train their shares."""
    from dpzo.pipeline.cell import run_cell, train_cell
    from dpzo.zo.replicas import Replicas

    run_file, metrics_path, diagnostics_path = argv
    _rank_environment()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s %(message)s")
    with open(run_file, "rb") as f:
        run = pickle.load(f)  # written by train_cell_on_ranks for this very job
    if run.device.startswith("cuda"):
        run = dataclasses.replace(run, device="cuda:0")  # the first of this rank's own GPUs
    team = Replicas.from_environment(device=run.device if run.device.startswith("cuda") else "cpu")
    try:
        if team.is_main:
            train_cell(run, metrics_path=metrics_path, diagnostics_path=diagnostics_path, team=team)
        else:
            run_cell(run, team=team)  # then exit: rank 0 evaluates alone, with no collective left
    finally:
        team.close()


if __name__ == "__main__":
    main(sys.argv[1:])
