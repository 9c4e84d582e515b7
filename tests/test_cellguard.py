"""The guards around a cell's run: one process at a time (the lock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import dpzo
from dpzo import train as train_module, workflow
from dpzo.cellguard import CellBusy, CellLock

SRC = str(Path(dpzo.__file__).resolve().parents[1])

# ------------------------------------------------------------------------------------------------
# the lock
# ------------------------------------------------------------------------------------------------
HOLDER = """
import sys
from dpzo.cellguard import CellLock
with CellLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the parent closes stdin (or kills this process)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """A second process holding the cell's lock (a training job left behind by a dead Snakemake)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})
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
# the Snakemake adapter
# ------------------------------------------------------------------------------------------------
def fake_job(tmp_path: Path, *, private: bool = True) -> SimpleNamespace:
    """The parts of Snakemake's ``snakemake`` object that ``workflow.train`` reads."""
    ledger = tmp_path / "privacy.json"
    ledger.write_text(json.dumps({"private": private}))
    cell = tmp_path / "results"
    return SimpleNamespace(
        input=SimpleNamespace(ledger=str(ledger), train=str(tmp_path / "data" / "train.jsonl"), masks=[]),
        output=SimpleNamespace(metrics=str(cell / "runs" / "cell" / "metrics.json")),
        params=SimpleNamespace(checkpoint=str(cell / "checkpoints" / "cell" / "train_state.pt"), model_cfg={},
                               model_path="model", method_params={"lr": 1.0}, eval_batch_size=8, device="cpu"),
        wildcards=SimpleNamespace(model="m", task="t", method="dp-zoso", seed="13", eps="8"),
        config={}, log=[], threads=1,
    )


def test_the_train_job_refuses_a_cell_another_process_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(workflow, "_setup", lambda snakemake: None)
    monkeypatch.setattr(train_module, "run_cell", lambda **_: pytest.fail("trained a locked cell"))
    job = fake_job(tmp_path, private=False)  # every method is locked, not only private ones
    holder = hold_lock(Path(job.params.checkpoint).parent / "train.lock")
    try:
        with pytest.raises(CellBusy, match=f"pid {holder.pid}"):
            workflow.train(job)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
