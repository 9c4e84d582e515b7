"""A real training cell, killed (SIGKILL, with its Snakemake) and then stopped (SIGTERM, as at a
SLURM time limit) mid-training, resumes from its checkpoint and ends exactly where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from .pipeline import TEST_ENV, snakemake, snakemake_command
from .test_workflow import TINY

CELL = "demo-roberta/demo-sst2/dp-zoso/eps8/seed13"
STEPS, DIRECTIONS = 40, 2
CONFIG = dict(
    TINY,
    methods={
        "dp-zoso": dict(TINY["methods"]["dp-zoso"], steps=STEPS, directions=DIRECTIONS, stage_steps=10, log_every=5)
    },
    checkpoint={"every_steps": 8, "every_seconds": 0},
)


@pytest.fixture
def workdir(tiny_run, tmp_path):
    """A fresh pipeline folder holding the tiny run's demo model and data (times preserved, so
    nothing upstream of the cell reruns)."""
    for part in ("results/demo", "results/data"):
        shutil.copytree(tiny_run / part, tmp_path / part, copy_function=shutil.copy2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return tmp_path


def start(workdir: Path, log: Path) -> subprocess.Popen:
    cmd = snakemake_command(workdir, "--rerun-incomplete", f"results/runs/{CELL}/metrics.json")
    env = {**os.environ, **TEST_ENV}
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def training_pid(workdir: Path) -> int:
    """The process running the train rule's script (Snakemake copies it under .snakemake/scripts)."""
    marker = str(workdir / ".snakemake" / "scripts")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "train.py" in cmdline:
                return int(entry.name)
    raise AssertionError("no training process found")


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be interrupted:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def saved_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["step"])


@pytest.mark.slow
def test_killed_and_terminated_cell_resumes_to_the_uninterrupted_result(workdir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("resume-logs")
    checkpoint = workdir / "results" / "checkpoints" / CELL / "train_state.pt"
    metrics_file = workdir / "results" / "runs" / CELL / "metrics.json"
    train_log = workdir / "logs" / "train" / f"{CELL}.log"

    # 1. SIGKILL to Snakemake and the job at once (a lost machine) once the first snapshot exists
    run = start(workdir, logs / "kill.log")
    wait_until(checkpoint.exists, run, logs / "kill.log")
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert not metrics_file.exists()  # nothing published under the final name
    first = saved_step(checkpoint)
    assert 0 < first < STEPS
    snakemake(workdir, "--unlock")  # the dead Snakemake's lock; its incomplete marks are --rerun-incomplete's

    # 2. the next run resumes; SIGTERM to the job alone (a SLURM time limit) makes it save after
    # its current step and stop; Snakemake records the failed job
    run = start(workdir, logs / "term.log")
    wait_until(
        lambda: train_log.exists() and "resuming from checkpoint" in train_log.read_text(), run, logs / "term.log"
    )
    os.kill(training_pid(workdir), signal.SIGTERM)
    assert run.wait(timeout=300) != 0
    assert "stopped by SIGTERM" in train_log.read_text() and not metrics_file.exists()
    second = saved_step(checkpoint)  # the snapshot survived Snakemake's clean-up of the failed job
    assert first <= second < STEPS

    # 3. the third run finishes from the second snapshot and removes it
    snakemake(workdir, f"results/runs/{CELL}/metrics.json")
    resumed = json.loads(metrics_file.read_text())
    ledger = json.loads((metrics_file.parent / "privacy.json").read_text())
    assert resumed["resumed_from"] == [first, second]
    assert (resumed["attempts"], resumed["resumes"]) == (1, 2)  # one run of the mechanism, continued twice
    assert resumed["steps"] == STEPS and resumed["releases"] == STEPS * DIRECTIONS == ledger["compositions"]
    assert ledger["sigma"] > 0 and not checkpoint.exists()

    # 4. the same cell, uninterrupted
    snakemake(workdir, "-f", "--", f"results/runs/{CELL}/metrics.json")
    reference = json.loads(metrics_file.read_text())
    assert reference["resumed_from"] == [] and (reference["attempts"], reference["resumes"]) == (1, 0)
    for key in ("accuracy", "test_loss", "confusion", "history", "steps", "releases"):
        assert resumed[key] == reference[key], key


@pytest.mark.slow
def test_a_private_cell_that_failed_on_its_data_is_not_retried(workdir):
    """Snakemake's retries (the SLURM profile has `retries: 2`) after a non-finite update: the
    retry refuses instead of running the mechanism again; another learning rate then runs and is
    counted as the cell's second attempt."""
    target = f"results/runs/{CELL}/metrics.json"
    attempts = workdir / "results" / "checkpoints" / CELL / "attempts.jsonl"
    # lr * g overflows the weights: the update is non-finite (no proximal pull, whose public
    # weight lr * lam would overflow before any data is involved)
    failing = dict(CONFIG, methods={"dp-zoso": dict(CONFIG["methods"]["dp-zoso"], lr=1e300, lam=0.0)})
    (workdir / "config.yaml").write_text(yaml.safe_dump(failing))
    proc = snakemake(workdir, "--retries", "1", target, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (workdir / target).exists()
    log = (workdir / "logs" / "train" / f"{CELL}.log").read_text()  # both tries log to it
    assert "data-dependent failure: FloatingPointError: non-finite update" in log
    assert "refusing to retry this private cell" in log and "Trying to restart job" in output
    records = [json.loads(line) for line in attempts.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "end"] and records[1]["data_dependent"]

    (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    snakemake(workdir, target)
    metrics = json.loads((workdir / target).read_text())
    assert (metrics["attempts"], metrics["resumes"], metrics["steps"]) == (2, 0, STEPS)
    assert not attempts.exists()  # closed with the metrics: a forced rerun counts from 1
