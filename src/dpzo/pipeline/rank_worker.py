"""One rank of a cell on R data-parallel ranks: what ``dpzo.pipeline.ranks`` starts R times.

    python -m dpzo.pipeline.rank_worker <cell_run.pkl> <metrics.json> <private_diagnostics.json>

Rank 0 trains, evaluates and writes the outputs (:func:`dpzo.pipeline.cell.train_cell`); the
other ranks train their share of every batch (:func:`dpzo.pipeline.cell.run_cell`).  It is a
module apart from the launcher because it calls the cell's code and the cell calls the
launcher: this way the imports go one way (cell -> ranks, rank_worker -> cell).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys

from dpzo.pipeline.cell import run_cell, train_cell
from dpzo.zo.replicas import Replicas


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
