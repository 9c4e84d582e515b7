"""The SLURM profile on a real SLURM cluster (throw-away, single node, on 127.0.0.1).

scripts/slurm/start-local-slurm.sh starts the cluster (installing slurm-wlm and munge with apt
when they are missing); the tiny demo grid then runs with `--workflow-profile profiles/slurm`.
Checked: every job that is not a local rule went through sbatch, with the profile's resources,
and finished in SLURM; each cell records its SLURM job; the results equal the local run's; a
forced single cell submits exactly one job, with a GPU when asked. The cluster is stopped
whatever happens (fixture finalizer), and every command is bounded by a timeout.

Select with `pytest -m slurm`; skipped (with the reason) only where a cluster cannot be started:
no root and no password-less sudo, SLURM missing and no apt-get, or the Snakemake SLURM plugin
not installed (`pip install -e '.[slurm]'`).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .pipeline import ROOT, TEST_ENV, snakemake_command
from .test_workflow import AGGREGATES, CELLS, TINY

SCRIPTS = ROOT / "scripts" / "slurm"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUBMITTED = {"demo_model": 1, "train": 3}  # one job per cell; the rest are local rules
LOCAL = {"demo_corpus", "demo_data", "fewshot", "account", *AGGREGATES}
# what profiles/slurm asks for: (memory, time limit) as squeue prints them
PROFILE_RESOURCES = {"train": ("32000M", "8:00:00"), "demo_model": ("4000M", "30:00")}


def _privilege() -> list[str] | None:
    """Prefix that runs the cluster scripts as root ([] when we are root), None if impossible."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def why_not_runnable() -> str | None:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    if _privilege() is None:
        return "starting a SLURM cluster needs root or password-less sudo"
    if not shutil.which("slurmctld", path=SYSTEM_PATH) and not shutil.which("apt-get", path=SYSTEM_PATH):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


# decided at collection, before the (session-wide) local tiny run would be set up for nothing
NOT_RUNNABLE = why_not_runnable()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(NOT_RUNNABLE is not None, reason=str(NOT_RUNNABLE)),
]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def machine_lock(timeout: float = 1200.0):
    """One local cluster per machine (it owns /etc/slurm/slurm.conf): concurrent test runs on a
    shared machine wait for each other instead of failing."""
    # read-only is enough for flock, and works whoever created the file
    fd = os.open(Path(tempfile.gettempdir()) / "dpzo-local-slurm.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd) as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"another local SLURM cluster test held the machine for {timeout:.0f} s"
                    ) from None
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def cluster():
    with machine_lock():
        yield from _cluster()


def _cluster():
    # munged wants every parent of its socket searchable by all: not under pytest's private tmp
    directory = tempfile.mkdtemp(prefix="dpzo-slurm-", dir="/tmp")
    ctld, slurmd = free_ports(2)
    settings = {
        "LOCAL_SLURM_DIR": directory,
        "LOCAL_SLURM_CTLD_PORT": ctld,
        "LOCAL_SLURM_SLURMD_PORT": slurmd,
        # room for the profile's requests (32 GB per cell) on a small machine
        "LOCAL_SLURM_CPUS": 4,
        "LOCAL_SLURM_MEMORY": 128000,
        "PATH": f"{SYSTEM_PATH}:{os.environ.get('PATH', '')}",
    }
    as_root = [*_privilege(), "env", *(f"{k}={v}" for k, v in settings.items()), "bash"]
    try:
        start = subprocess.run(
            [*as_root, str(SCRIPTS / "start-local-slurm.sh"), "--fake-gpus", "1"],
            capture_output=True,
            text=True,
            timeout=900,
        )  # apt-get included
        assert start.returncode == 0, f"the local SLURM cluster did not start:\n{start.stdout}\n{start.stderr}"
        yield
    finally:
        subprocess.run([*as_root, str(SCRIPTS / "stop-local-slurm.sh"), "--purge"], capture_output=True, timeout=300)


def on_slurm(workdir: Path, *args: str) -> str:
    """Run snakemake in ``workdir`` through profiles/slurm; returns its output."""
    profile = ["--workflow-profile", str(ROOT / "profiles" / "slurm")]
    # tiny jobs: poll sooner than the profile's 40 s
    poll = ["--slurm-init-seconds-before-status-checks", "5"]
    cmd = ["timeout", "-k", "30", "600", *snakemake_command(workdir, *profile, *poll, *args, cores=None)]
    env = {**os.environ, **TEST_ENV, "PATH": f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=700)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake on SLURM failed (rc {proc.returncode}):\n{out[-8000:]}"
    return out


def executed_jobs(out: str) -> list[dict]:
    """Every job Snakemake started: rule, local or not, first output, and the SLURM job id."""
    submitted = dict(re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)", out, re.M))
    jobs = []
    for local, rule, body in re.findall(r"^(local)?rule (\w+):\n((?:    .*\n)+)", out, re.M):
        jobid = re.search(r"^    jobid: (\d+)", body, re.M).group(1)
        output = re.search(r"^    output: ([^,\n]+)", body, re.M)
        jobs.append(
            dict(
                rule=rule, local=bool(local), output=output.group(1) if output else None, slurm_id=submitted.get(jobid)
            )
        )
    return jobs


def slurm_jobs() -> dict[str, dict]:
    """squeue's view of every job the cluster still remembers (MinJobAge keeps finished ones)."""
    out = subprocess.run(
        ["squeue", "-t", "all", "-h", "-o", "%i|%T|%m|%l|%k"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PATH": SYSTEM_PATH},
    ).stdout
    jobs = {}
    for line in out.splitlines():
        jobid, state, memory, limit, comment = line.split("|", 4)
        jobs[jobid] = dict(state=state, memory=memory, limit=limit, comment=comment)
    return jobs


def gpus_requested(jobid: str) -> str:
    out = subprocess.run(
        ["squeue", "-t", "all", "-h", "-j", jobid, "-O", "tres-per-job"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PATH": SYSTEM_PATH},
    ).stdout
    return out.strip()


def same_result(a: dict, b: dict) -> bool:
    keys = ("accuracy", "test_loss", "confusion", "history", "steps", "releases", "n_train")
    return all(a[k] == b[k] for k in keys)


def test_tiny_grid_on_slurm_matches_the_local_run(cluster, tiny_run, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    jobs = executed_jobs(on_slurm(tmp_path))

    # every job that is not a local rule was submitted with sbatch, one per cell
    remote = [j for j in jobs if not j["local"]]
    assert {r: sum(j["rule"] == r for j in remote) for r in {j["rule"] for j in remote}} == SUBMITTED
    assert all(j["slurm_id"] for j in remote)
    assert {j["rule"] for j in jobs if j["local"]} == LOCAL and not any(j["slurm_id"] for j in jobs if j["local"])

    # ... and ran to completion in SLURM with the profile's resources
    known = slurm_jobs()
    for job in remote:
        seen = known[job["slurm_id"]]
        assert seen["state"] == "COMPLETED", (job, seen)
        assert seen["comment"].startswith(f"rule_{job['rule']}_wildcards_"), seen
        assert (seen["memory"], seen["limit"]) == PROFILE_RESOURCES[job["rule"]], (job["rule"], seen)

    for cell in CELLS:
        metrics = json.loads((tmp_path / "results" / "runs" / cell / "metrics.json").read_text())
        local = json.loads((tiny_run / "results" / "runs" / cell / "metrics.json").read_text())
        train = next(j for j in remote if j["output"] == f"results/runs/{cell}/metrics.json")
        assert metrics["slurm_job_id"] == train["slurm_id"] and local["slurm_job_id"] is None
        assert same_result(metrics, local), cell  # the cluster computes exactly what a local run does
        ledgers = [
            json.loads((d / "results" / "runs" / cell / "privacy.json").read_text()) for d in (tmp_path, tiny_run)
        ]
        assert ledgers[0] == ledgers[1], cell

    # one cell, forced: exactly one job, here with a GPU (the cluster advertises a fake one)
    target = f"results/runs/{CELLS[2]}/metrics.json"
    before = json.loads((tmp_path / target).read_text())
    jobs = executed_jobs(on_slurm(tmp_path, "-f", "--set-resources", "train:gpu=1", "--", target))
    assert [(j["rule"], j["output"]) for j in jobs] == [("train", target)] and jobs[0]["slurm_id"]
    assert slurm_jobs()[jobs[0]["slurm_id"]]["state"] == "COMPLETED"
    assert gpus_requested(jobs[0]["slurm_id"]) == "gres:gpu:1"
    after = json.loads((tmp_path / target).read_text())
    assert after["slurm_job_id"] == jobs[0]["slurm_id"] != before["slurm_job_id"] and same_result(after, before)


def test_a_two_rank_cell_runs_as_one_sbatch_job_with_two_srun_tasks(cluster, tiny_run, tmp_path):
    """`ranks: 2`: one SLURM job of two tasks, the ranks one srun step; the result is the local
    single-process cell's (up to the float32 rounding of smaller batched forwards)."""
    for part in ("results/demo", "results/data"):
        shutil.copytree(tiny_run / part, tmp_path / part, copy_function=shutil.copy2)
    config = {**TINY, "models": {"demo-roberta": {"demo": "roberta", "ranks": 2}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cell = CELLS[2]  # dp-zoso
    target = f"results/runs/{cell}/metrics.json"
    jobs = executed_jobs(on_slurm(tmp_path, target))
    train = [j for j in jobs if j["rule"] == "train"]
    assert len(train) == 1 and train[0]["slurm_id"] and not train[0]["local"]
    assert slurm_jobs()[train[0]["slurm_id"]]["state"] == "COMPLETED"
    tasks = subprocess.run(
        ["squeue", "-t", "all", "-h", "-j", train[0]["slurm_id"], "-O", "NumTasks"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PATH": SYSTEM_PATH},
    ).stdout.strip()
    assert tasks == "2"
    log = (tmp_path / "logs" / "train" / f"{cell}.log").read_text()
    assert "training on 2 ranks: srun" in log and "[rank 1]" in log
    two = json.loads((tmp_path / target).read_text())
    one = json.loads((tiny_run / target).read_text())
    assert two["ranks"] == 2 and two["slurm_job_id"] == train[0]["slurm_id"]
    assert two["releases"] == one["releases"] and two["steps"] == one["steps"]
    assert two["history"]["grad"] == pytest.approx(one["history"]["grad"], rel=1e-3, abs=1e-6)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
