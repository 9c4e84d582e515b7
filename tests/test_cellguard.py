"""The guards around a cell's run: one process at a time (the lock), and every start counted,
with a retry of a private cell after a data-dependent failure refused (the attempt log)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dpzo
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.pipeline import cell, workflow
from dpzo.pipeline.cellguard import Attempt, AttemptLog, AttemptLogInvalid, CellBusy, CellLock, RetryRefused
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.report import collect as report
from dpzo.report import tables
from dpzo.zo.loop import train_zo

from .test_checkpoint import Killed, snapshots
from .test_inputs import model_dir, split_dir, zo_ledger  # noqa: F401 (fixtures: a tiny model and split on disk)
from .test_report import write_cell
from .test_zo import Quadratic, TwoTensorModel

SRC = str(Path(dpzo.__file__).resolve().parents[1])

# ------------------------------------------------------------------------------------------------
# the lock
# ------------------------------------------------------------------------------------------------
HOLDER = """
import sys
from dpzo.pipeline.cellguard import CellLock
with CellLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the parent closes stdin (or kills this process)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """A second process holding the cell's lock (a training job left behind by a dead Snakemake)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_a_second_start_of_a_cell_being_trained_refuses_and_names_the_holder(tmp_path):
    lock = tmp_path / "checkpoints" / "cell" / "train.lock"
    holder = hold_lock(lock)
    try:
        with pytest.raises(CellBusy) as busy, CellLock(lock):
            pytest.fail("entered a cell another process is training")
        message = str(busy.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and str(lock) in message
        assert f"kill {holder.pid}" in message and "snakemake --unlock` removes only" in message
        started = json.loads(lock.read_text())["started"]
        assert f"since {started}" in message
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert not lock.exists()  # a clean exit removes the file
    with CellLock(lock):  # ... and releases the lock
        pass


def test_a_lock_file_left_by_a_killed_process_does_not_block(tmp_path):
    lock = tmp_path / "train.lock"
    holder = hold_lock(lock)
    holder.kill()
    holder.wait(timeout=60)
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the dead holder's file is still there
    with CellLock(lock):  # the kernel released its flock when it died
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(CellBusy, match=f"pid {os.getpid()}"), CellLock(lock):  # held now
            pass
    assert not lock.exists()


# ------------------------------------------------------------------------------------------------
# the attempt log, with the zeroth-order trainer
# ------------------------------------------------------------------------------------------------
N = 40


def train(
    log: AttemptLog | None,
    *,
    lr=1e-2,
    poisoned=False,
    method="dp-zoso",
    checkpoint=None,
    attempt=None,
    die_after_calls=None,
):
    """A private (or mezo) training run recorded in ``log``; ``poisoned``: example 0 has an infinite
    target, so the run fails with a non-finite loss once the sampler draws it (data-dependent)."""
    quad = Quadratic(n=N)
    if poisoned:
        quad.y[0] = np.inf
    model = TwoTensorModel()
    inner, calls = quad.loss_fn(model), []

    def loss(index):
        calls.append(1)
        if die_after_calls is not None and len(calls) > die_after_calls:
            raise Killed
        return inner(index)

    private = method != "mezo"
    hp = ZOHyperparameters(steps=12, batch_size=8, lr=lr, clip=3.0 if private else float("inf"), log_every=2)
    identity = {"method": method, "lr": lr, "data": "poisoned" if poisoned else "clean"}

    def run(current: Attempt) -> dict:
        return train_zo(
            model,
            loss,
            N,
            hp,
            method=method,
            run_seed=13,
            checkpoint=checkpoint,
            noise=NoisySum("gaussian", 2.0, 8.0) if private else None,
            secret=SecretRandom(insecure_test_seed=5) if private else None,
            on_start=lambda step: current.start(identity, step),
        )

    if attempt is not None:  # outside ``log.attempt``: a kill records no outcome
        return run(attempt)
    with log.attempt(private=private) as current:
        return run(current)


def test_a_private_cell_that_failed_on_its_data_is_not_retried_unchanged(tmp_path):
    log = AttemptLog(tmp_path / "attempts.jsonl")
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(log, poisoned=True)
    start, end = log.records()
    assert (start["event"], start["resumed_after_step"], start["pid"]) == ("start", None, os.getpid())
    assert end["data_dependent"] and end["outcome"].startswith("data-dependent failure: FloatingPointError: non-finite")
    # the retry SLURM's `retries: 2` would make: refused before any step, and not recorded
    with pytest.raises(RetryRefused) as refused:
        train(log, poisoned=True)
    message = str(refused.value)
    for part in (
        "depended on the private data",
        "second run of the mechanism",
        "does not account",
        "Change the cell's hyperparameters",
        f"dpzo accept-retry {log.path.parent}",
    ):
        assert part in message
    assert len(log.records()) == 2
    # changed hyperparameters: allowed, and counted as a second run of the mechanism
    history = train(log, lr=1e-3, poisoned=False)
    assert history["steps_run"] == 12
    summary = log.summary()
    assert (summary["attempts"], summary["resumes"]) == (2, 0)
    assert [r.get("outcome") for r in summary["attempt_log"] if r["event"] == "end"][-1] == "completed"


def cell_log(tmp_path, eps="8") -> AttemptLog:
    """The attempt log of a cell, in its checkpoint folder (results/checkpoints/<cell>)."""
    return AttemptLog(
        tmp_path / "results" / "checkpoints" / "m" / "t" / "dp-zoso" / f"eps{eps}" / "seed13" / "attempts.jsonl"
    )


def edit_lines(log: AttemptLog, change) -> None:
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    log.path.write_text("".join(json.dumps(change(r)) + "\n" for r in lines))


def test_an_edited_attempt_log_is_refused_and_nothing_starts(tmp_path):
    log = cell_log(tmp_path)
    with pytest.raises(FloatingPointError):
        train(log, poisoned=True)
    edit_lines(log, lambda r: {**r, "data_dependent": False} if r["event"] == "end" else r)
    with pytest.raises(AttemptLogInvalid, match="does not verify at line 2") as refused:
        train(log, poisoned=True)
    assert f"dpzo accept-retry {log.path.parent}" in str(refused.value)
    assert [json.loads(line)["event"] for line in log.path.read_text().splitlines()] == ["start", "end"]


@pytest.mark.parametrize("how", ["deleted", "cut short", "copied from another cell"])
def test_a_deleted_cut_or_foreign_attempt_log_is_refused(tmp_path, how):
    log = cell_log(tmp_path)
    with pytest.raises(FloatingPointError):
        train(log, poisoned=True)
    if how == "deleted":
        log.path.unlink()
        match = "is missing, but this installation recorded 2 line"
    elif how == "cut short":
        log.path.write_text(log.path.read_text().splitlines()[0] + "\n")  # the failure removed
        match = "was cut short or replaced"
    else:
        other = cell_log(tmp_path, eps="2")
        train(other)  # a clean run of another cell
        log.path.write_bytes(other.path.read_bytes())
        match = "does not verify at line 1"
    with pytest.raises(AttemptLogInvalid, match=match):
        train(log, poisoned=True)


def test_accept_retry_is_the_recorded_way_past_a_refusal(tmp_path, capsys):
    from dpzo.cli import main

    log = cell_log(tmp_path)
    assert main(["accept-retry", str(log.path.parent), "--reason", "x"]) == 2  # nothing refused yet
    assert "nothing to accept" in capsys.readouterr().err
    with pytest.raises(FloatingPointError):
        train(log, poisoned=True)
    runs = str(log.path.parent).replace("checkpoints", "runs")  # the folder of the cell's metrics.json
    assert main(["accept-retry", runs + "/metrics.json", "--reason", "   "]) == 2
    assert main(["accept-retry", runs, "--reason", "the sampler's overflow bug, fixed in 1a2b3c"]) == 0
    assert json.loads(capsys.readouterr().out)["event"] == "accepted"
    with pytest.raises(FloatingPointError):  # no longer refused: it runs (and fails) again
        train(log, poisoned=True)
    with pytest.raises(RetryRefused):  # the new failure is refused again
        train(log, poisoned=True)
    summary = log.summary()
    assert summary["attempts"] == 2
    assert [(a["event"], a["reason"]) for a in summary["accepted"]] == [
        ("accepted", "the sampler's overflow bug, fixed in 1a2b3c")
    ]
    # a deleted log: the acknowledgement starts a new one, and says what was lost
    log.path.unlink()
    with pytest.raises(AttemptLogInvalid):
        train(log)
    assert main(["accept-retry", runs, "--reason", "disk lost"]) == 0
    history = train(log)
    assert history["steps_run"] == 12
    summary = log.summary()
    assert [a["event"] for a in summary["accepted"]] == ["reset"] and summary["attempts"] == 1
    assert "is missing" in summary["attempt_log"][0]["why"]


def test_a_non_private_cell_that_failed_is_retried(tmp_path):
    log = AttemptLog(tmp_path / "attempts.jsonl")
    with pytest.raises(FloatingPointError):
        train(log, poisoned=True, method="mezo", lr=1e-2)
    with pytest.raises(FloatingPointError):  # started again (and failed again): nothing is private
        train(log, poisoned=True, method="mezo", lr=1e-2)
    assert log.summary()["attempts"] == 2


def test_a_resume_is_not_a_new_attempt_and_a_kill_leaves_no_outcome(tmp_path):
    log = AttemptLog(tmp_path / "attempts.jsonl")
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):  # killed mid-run: the process dies, no outcome is written
        train(log, checkpoint=snapshots(path), attempt=Attempt(log, private=True), die_after_calls=16)
    step = torch.load(path, weights_only=True)["step"]
    train(log, checkpoint=snapshots(path))
    records = log.records()
    assert [r["event"] for r in records] == ["start", "start", "end"]
    assert records[1]["resumed_after_step"] == step > 0 and records[2]["outcome"] == "completed"
    assert {k: log.summary()[k] for k in ("attempts", "resumes")} == {"attempts": 1, "resumes": 1}
    # a run started from scratch after the kill (no snapshot) is a second attempt
    path.unlink()
    train(log, checkpoint=snapshots(path))
    assert log.summary()["attempts"] == 2


def test_a_torn_line_is_skipped_and_the_next_line_starts_fresh(tmp_path, caplog):
    log = AttemptLog(tmp_path / "attempts.jsonl")
    log.append({"event": "start", "resumed_after_step": None})
    with open(log.path, "a") as fh:
        fh.write('{"event": "end", "outc')  # killed in the middle of a write
    log.append({"event": "start", "resumed_after_step": 4})
    assert [r["event"] for r in log.records()] == ["start", "start"] and "line 2 is torn" in caplog.text
    assert {k: log.summary()[k] for k in ("attempts", "resumes")} == {"attempts": 1, "resumes": 1}


def test_close_moves_the_log_aside_so_a_forced_rerun_counts_anew(tmp_path):
    log = AttemptLog(tmp_path / "attempts.jsonl")
    with log.attempt(private=True) as current:
        current.start({"method": "dp-zoso"}, None)
    done = log.close()
    assert not log.path.exists() and done.parent == tmp_path and done.name.startswith("attempts.")
    assert [json.loads(line)["event"] for line in done.read_text().splitlines()] == ["start", "end"]
    assert log.summary()["attempts"] == 0 and log.close() is None


# ------------------------------------------------------------------------------------------------
# the Snakemake adapter
# ------------------------------------------------------------------------------------------------
def fake_job(tmp_path: Path, *, private: bool = True) -> SimpleNamespace:
    """The parts of Snakemake's ``snakemake`` object that ``workflow.train`` reads."""
    ledger = tmp_path / "privacy.json"
    ledger.write_text(json.dumps({"private": private}))
    cell = tmp_path / "results"
    return SimpleNamespace(
        input=SimpleNamespace(ledger=str(ledger), train=str(tmp_path / "data" / "train.jsonl"), masks=[]),
        output=SimpleNamespace(
            metrics=str(cell / "runs" / "cell" / "metrics.json"),
            diagnostics=str(cell / "runs" / "cell" / "private_diagnostics.json"),
        ),
        params=SimpleNamespace(
            checkpoint=str(cell / "checkpoints" / "cell" / "train_state.pt"),
            model_cfg={},
            model_path="model",
            method_params={"lr": 1.0},
            eval_batch_size=8,
            device="cpu",
            tf32=True,
            delta=1e-5,
            accountant="pld",
            convention="common",
            noise="secure",
        ),
        wildcards=SimpleNamespace(model="m", task="t", method="dp-zoso", seed="13", eps="8"),
        rule="train",
        config={},
        log=[],
        threads=1,
    )


def test_the_train_job_locks_the_cell_counts_attempts_and_refuses_an_unchanged_retry(tmp_path, monkeypatch):
    monkeypatch.setattr(workflow, "_setup", lambda snakemake: None)  # keep pytest's logging
    calls = []

    def run_cell(run, *, on_start, team=None, record=None):  # one process: no replicas
        cell, method_params = run.cell, run.method_params
        calls.append(method_params["lr"])
        lock = tmp_path / "results" / "checkpoints" / "cell" / "train.lock"
        assert json.loads(lock.read_text())["pid"] == os.getpid()  # held for the whole run
        on_start({"method": "dp-zoso", "method_params": method_params}, None)
        if method_params["lr"] > 0.5:
            raise FloatingPointError("non-finite loss difference at step 3")
        return {"metric": "accuracy", "score": 0.5, "steps": 3, **cell.as_dict(), "private_diagnostics": {}}

    monkeypatch.setattr(cell, "run_cell", run_cell)
    job = fake_job(tmp_path)
    folder = Path(job.params.checkpoint).parent
    with pytest.raises(FloatingPointError):
        workflow.train(job)
    with pytest.raises(RetryRefused, match="depended on the private data"):  # the profile's retry
        workflow.train(job)
    assert calls == [1.0, 1.0] and not Path(job.output.metrics).exists()
    job.params.method_params = {"lr": 0.1}  # the hyperparameters changed after the failure
    workflow.train(job)
    metrics = json.loads(Path(job.output.metrics).read_text())
    assert (metrics["attempts"], metrics["resumes"]) == (2, 0)
    assert [r.get("outcome", "").split(":")[0] for r in metrics["attempt_log"] if r["event"] == "end"] == [
        "data-dependent failure",
        "completed",
    ]
    # once the metrics are written the log is closed: a forced rerun counts from 1
    assert sorted(p.name.split(".")[0] for p in folder.iterdir()) == ["attempts"]
    assert not (folder / "attempts.jsonl").exists() and not (folder / "train.lock").exists()
    workflow.train(job)
    assert json.loads(Path(job.output.metrics).read_text())["attempts"] == 1


def test_the_train_job_refuses_a_cell_another_process_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(workflow, "_setup", lambda snakemake: None)
    monkeypatch.setattr(cell, "run_cell", lambda *_, **__: pytest.fail("trained a locked cell"))
    job = fake_job(tmp_path, private=False)  # every method is locked, not only private ones
    holder = hold_lock(Path(job.params.checkpoint).parent / "train.lock")
    try:
        with pytest.raises(CellBusy, match=f"pid {holder.pid}"):
            workflow.train(job)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (Path(job.params.checkpoint).parent / "attempts.jsonl").exists()  # nothing started


def test_a_private_cell_that_failed_is_not_retried_by_the_next_job(
    model_dir,
    split_dir,
    tmp_path,
    one_thread,
    monkeypatch,
):
    """The real adapter and trainer, as SLURM's `retries: 2` would run them after a non-finite update."""
    monkeypatch.setattr(workflow, "_setup", lambda snakemake: None)
    monkeypatch.delenv("DPZO_INSECURE_TEST_NOISE_SEED", raising=False)
    params = {"steps": 2, "batch_size": 4, "lr": 1e300, "clip": 1.0}
    ledger = zo_ledger("dp-zoso", params, eps="2")
    assert ledger["private"]
    (tmp_path / "privacy.json").write_text(json.dumps(ledger))
    out = tmp_path / "run" / "metrics.json"
    job = SimpleNamespace(
        log=[],
        threads=1,
        rule="train",
        config={},
        input=SimpleNamespace(ledger=str(tmp_path / "privacy.json"), train=str(split_dir / "train.jsonl"), masks=[]),
        output=SimpleNamespace(metrics=str(out), diagnostics=str(out.with_name("private_diagnostics.json"))),
        wildcards=SimpleNamespace(model="tiny", task="SST-2", method="dp-zoso", eps="2", seed="13"),
        params=SimpleNamespace(
            model_path=str(model_dir),
            model_cfg={},
            eval_batch_size=8,
            device="cpu",
            tf32=True,
            method_params=params,
            checkpoint=str(tmp_path / "checkpoint" / "train_state.pt"),
            delta=1e-5,
            accountant="pld",
            convention="common",
            noise="secure",
        ),
    )
    with pytest.raises(FloatingPointError, match="non-finite"):
        workflow.train(job)
    with pytest.raises(RetryRefused, match="depended on the private data"):
        workflow.train(job)
    assert not out.exists()
    job.params.method_params = dict(job.params.method_params, lr=1e-2)  # the fix: another learning rate
    workflow.train(job)
    metrics = json.loads(out.read_text())
    assert (metrics["attempts"], metrics["resumes"], metrics["releases"]) == (2, 0, 2)
    outcomes = [r["outcome"] for r in metrics["attempt_log"] if r["event"] == "end"]
    assert (
        outcomes[0].startswith("data-dependent failure: FloatingPointError: non-finite update")
        and outcomes[1] == "completed"
    )


# ------------------------------------------------------------------------------------------------
# the privacy table
# ------------------------------------------------------------------------------------------------
def test_the_privacy_table_shows_the_attempts_of_each_cell(tmp_path):
    files = [write_cell(tmp_path, "m", "SST-2", "dp-zoso", "2", seed, 0.9) for seed in (13, 42, 21)]
    for f, attempts in zip(files, (1, 2, 1)):
        metrics = json.loads(f.read_text())
        f.write_text(json.dumps({**metrics, "attempts": attempts, "resumes": 0}))
    cells = report.load_cells(files)
    assert list(cells["attempts"]) == [1, 2, 1]
    tidy = tables.privacy_table(cells)
    assert [(r.seeds, r.attempts) for r in tidy.itertuples()] == [("13, 21", 1), ("42", 2)]
    rendered = tables.render_privacy(tidy).body
    assert list(rendered["attempts"]) == ["1", "2"]
    assert list(rendered.columns).index("attempts") == list(rendered.columns).index("seeds") + 1


def test_the_privacy_table_shows_runs_accepted_on_the_record(tmp_path):
    files = [write_cell(tmp_path, "m", "SST-2", "dp-zoso", "2", seed, 0.9) for seed in (13, 42)]
    acknowledged = [{"event": "accepted", "time": "t", "user": "u", "reason": "a fixed overflow bug"}]
    for f, accepted in zip(files, ([], acknowledged)):
        metrics = json.loads(f.read_text())
        f.write_text(json.dumps({**metrics, "attempts": 2, "resumes": 0, "accepted": accepted}))
    rendered = tables.render_privacy(tables.privacy_table(report.load_cells(files)))
    assert list(zip(rendered.body["seeds"], rendered.body["accepted"])) == [("13", "0"), ("42", "1")]
    assert any("dpzo accept-retry" in note for note in rendered.notes)
