"""Data-parallel DP-ZO over torch.distributed (gloo, 2 and 3 processes) equals one process.

Each rank is a separate Python process started the way ``torchrun`` starts one (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the real environment handshake runs.
Rank 0 alone holds the (test-seeded) secret RNG; the trajectory must equal the single-process
run's to 1e-12 in float64, for DP-ZOSO (stages, proximal anchor, two directions per step),
DP-ZOPO (dynamic masks), MeZO and DP-AggZO (a vector release).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpzo.zo.replicas import SingleProcess

from .replica_worker import HF_CASE, run_case

ROOT = Path(__file__).resolve().parents[1]
CASES = ["dp-zoso", "dp-zopo", "mezo", "dp-aggzo"]
TRAJECTORY = ("loss", "grad", "examples", "clipped_fraction", "mask_size", "step", "lr", "beta")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    case: str,
    ranks: int,
    out: Path,
    checkpoint: Path | None = None,
    env: dict | None = None,
    worker: str = "tests.replica_worker",
):
    """Start ``ranks`` processes of the module ``worker``; returns their completed processes, rank order."""
    port = free_port()
    procs = []
    for rank in range(ranks):
        rank_env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        args = [sys.executable, "-m", worker, case, str(out)] + ([str(checkpoint)] if checkpoint else [])
        procs.append(
            subprocess.Popen(args, cwd=ROOT, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def results(out: Path, ranks: int) -> list[dict]:
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(ranks)]


def assert_same_trajectory(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["theta"], want["theta"], rtol=0, atol=1e-12)
    for key in TRAJECTORY:
        if key in want["history"]:
            assert got["history"][key] == pytest.approx(want["history"][key], rel=0, abs=1e-12), key
    assert got["history"]["releases"] == want["history"]["releases"]
    assert got["history"]["examples_sampled"] == want["history"]["examples_sampled"]


@pytest.fixture(scope="module")
def single_process():
    torch.set_num_threads(1)
    return {case: run_case(case, SingleProcess()) for case in CASES + [HF_CASE]}


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_replicas_follow_the_single_process_trajectory(tmp_path, single_process, case, ranks):
    out = tmp_path / "run"
    for proc in launch(case, ranks, out):
        assert proc.returncode == 0, proc.stderr[-4000:]
    per_rank = results(out, ranks)
    for got in per_rank:  # every replica holds the same weights: the single process's
        assert_same_trajectory(got, single_process[case])
    # each example of a batch went through the forward passes of exactly one rank
    assert sum(r["examples_forwarded"] for r in per_rank) == single_process[case]["examples_forwarded"]


def test_replicas_of_a_padded_transformer_batch(tmp_path, single_process):
    """A real batched forward (padding to the longest of a share, attention masks): 1e-12 in float64."""
    out = tmp_path / "run"
    for proc in launch(HF_CASE, 2, out):
        assert proc.returncode == 0, proc.stderr[-4000:]
    for got in results(out, 2):
        assert_same_trajectory(got, single_process[HF_CASE])


def test_a_rank_that_dies_ends_the_run_with_a_clear_error_and_resume_completes_it(tmp_path, single_process):
    out, snapshot = tmp_path / "run", tmp_path / "state.pt"
    total = single_process["dp-zoso"]["calls"]
    died = launch("dp-zoso", 2, out, snapshot, env={"DIE_AFTER_LOSS_CALLS": str(total * 2 // 3)})
    assert died[1].returncode == 3
    assert died[0].returncode != 0
    assert "ReplicaLost" in died[0].stderr and "stopped answering" in died[0].stderr
    assert "run the cell again" in died[0].stderr
    assert snapshot.exists() and not Path(f"{out}.rank0").exists()  # no result, the snapshot kept
    saved = torch.load(snapshot, weights_only=True)
    assert 0 < saved["step"]
    resumed = launch("dp-zoso", 2, out, snapshot)
    for proc in resumed:
        assert proc.returncode == 0, proc.stderr[-4000:]
    for got in results(out, 2):
        assert got["history"]["resumed_from"] == [saved["step"]]
        assert_same_trajectory(got, single_process["dp-zoso"])


# ---------------------------------------------------------------------------------------------
# through the pipeline: `models.<key>.ranks: 2` trains a cell on two torchrun processes
# ---------------------------------------------------------------------------------------------

PIPELINE_CELL = "demo-roberta/demo-sst2/dp-zoso/eps8/seed13"


def test_a_two_rank_in_place_cell_through_the_pipeline_matches_the_one_process_cell(tiny_run, tmp_path):
    import json
    import shutil

    import yaml

    from .pipeline import snakemake
    from .test_workflow import TINY

    for part in ("results/demo", "results/data"):
        shutil.copytree(tiny_run / part, tmp_path / part, copy_function=shutil.copy2)
    # in place on both ranks (no master copy): the memory of inference per replica
    config = {**TINY, "models": {"demo-roberta": {"demo": "roberta", "ranks": 2, "master": "none"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, f"results/runs/{PIPELINE_CELL}/metrics.json")
    one = json.loads((tiny_run / "results/runs" / PIPELINE_CELL / "metrics.json").read_text())
    two = json.loads((tmp_path / "results/runs" / PIPELINE_CELL / "metrics.json").read_text())
    log = (tmp_path / "logs/train" / f"{PIPELINE_CELL}.log").read_text()
    assert "training on 2 ranks" in log and "[rank 1]" in log
    assert two["ranks"] == 2 and "ranks" not in one
    # the same ledger, the same number of releases, the same public schedule
    assert (tmp_path / "results/runs" / PIPELINE_CELL / "privacy.json").read_text() == (
        tiny_run / "results/runs" / PIPELINE_CELL / "privacy.json"
    ).read_text()
    assert two["releases"] == one["releases"] and two["steps"] == one["steps"]
    # float32: the shares' smaller batched forwards and the in-place updates round differently, nothing more
    assert two["history"]["grad"] == pytest.approx(one["history"]["grad"], rel=1e-3, abs=1e-6)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)


def test_each_rank_gets_its_own_gpus():
    from dpzo.pipeline.ranks import rank_devices

    assert rank_devices(4, [str(i) for i in range(8)]) == "0,1;2,3;4,5;6,7"
    assert rank_devices(2, ["3", "5"]) == "3;5"
    with pytest.raises(RuntimeError, match="2 ranks need at least 2 GPUs"):
        rank_devices(2, ["0"])
