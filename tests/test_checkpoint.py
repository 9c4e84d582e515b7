"""Resumable zeroth-order training: an interrupted run, resumed, equals the uninterrupted one."""

from __future__ import annotations

import builtins
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from dpzo.masks.settings import Mask, MaskSettings
from dpzo.methods import get_method
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo import checkpoint as checkpoint_module
from dpzo.zo.checkpoint import CheckpointPolicy, TrainingCheckpoint, TrainingInterrupted
from dpzo.zo.flat import FlatParameters
from dpzo.zo.loop import train_zo

from .test_zo import Quadratic, TwoTensorModel

N = 40


class Killed(Exception):
    """Stands in for the process dying in the middle of a step."""


def top_magnitude_masks(model: TwoTensorModel):
    """A dynamic, weight-dependent mask per stage (like DP-ZOPO's data-free rescoring)."""

    def masks(stage: int) -> Mask:
        theta = model.theta().detach()
        keep = 4 + 2 * stage
        idx = torch.sort(torch.argsort(theta.abs(), descending=True)[:keep]).values
        return Mask(idx, theta.numel(), scales=torch.linspace(1.2, 0.8, keep))

    return masks


CASES = {
    # stages, proximal anchor and two releases per step: every piece of loop state is exercised
    "dp-zoso": dict(
        hp=dict(
            steps=13,
            batch_size=8,
            lr=1e-2,
            stages=3,
            stage_steps=2,
            beta_start=1e-4,
            beta_end=1e-2,
            lam=0.3,
            clip=3.0,
            directions=2,
            log_every=2,
        ),
        private=True,
    ),
    "mezo": dict(hp=dict(steps=11, batch_size=8, lr=1e-2, log_every=3), private=False),
    # three directions on one batch, one vector release per step
    "dp-aggzo": dict(hp=dict(steps=10, batch_size=8, lr=1e-2, clip=3.0, directions=3, log_every=2), private=True),
    "dp-zopo": dict(
        hp=dict(
            steps=12,
            batch_size=8,
            lr=1e-2,
            stages=2,
            stage_steps=3,
            clip=3.0,
            log_every=1,
            mask=MaskSettings(scorer="magnitude", ratio=0.5, strategy="dynamic", mode="rank", rank_update=True),
        ),
        private=True,
    ),
}


def run(
    method,
    *,
    checkpoint=None,
    die_after_calls=None,
    noise_seed=5,
    secret=None,
    on_call=None,
    master_dtype=torch.float32,
):
    """One trainer run in a fresh 'process': new model, new generators; returns (model, history, calls).

    ``master_dtype=None`` trains in place (theta lives in the float64 model weights)."""
    case = CASES[method]
    quad = Quadratic(n=N)
    model = TwoTensorModel()
    inner = quad.loss_fn(model)
    calls = []

    def loss(index):
        calls.append(len(index))
        if on_call is not None:
            on_call(len(calls))
        if die_after_calls is not None and len(calls) > die_after_calls:
            raise Killed
        return inner(index)

    if case["private"] and secret is None:
        secret = SecretRandom(insecure_test_seed=noise_seed)
    history = train_zo(
        model,
        loss,
        N,
        ZOHyperparameters(**case["hp"]),
        method=method,
        run_seed=13,
        noise=NoisySum("gaussian", 2.0, 8.0) if case["private"] else None,
        secret=secret,
        masks=top_magnitude_masks(model) if method == "dp-zopo" else None,
        checkpoint=checkpoint,
        master_dtype=master_dtype,
    )
    return model, history, calls


def snapshots(path, identity=None, every_steps=3):
    return TrainingCheckpoint(CheckpointPolicy(path, every_steps=every_steps, every_seconds=0), identity or {"cell": 1})


def comparable(history):
    return {k: v for k, v in history.items() if k not in ("train_seconds", "ms_per_step", "resumed_from")}


@pytest.mark.parametrize("method", sorted(CASES))
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, method):
    reference, ref_history, ref_calls = run(method)
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):  # dies in the middle of a step, after at least one snapshot
        run(method, checkpoint=snapshots(path), die_after_calls=len(ref_calls) * 2 // 3)
    saved = torch.load(path, weights_only=True)
    assert 0 < saved["step"] < ref_history["steps_run"] and saved["step"] % 3 == 0
    resumed, history, calls = run(method, checkpoint=snapshots(path))
    assert torch.equal(resumed.theta(), reference.theta())  # bit-identical weights
    assert comparable(history) == comparable(ref_history)  # same loss curve, releases, masks
    assert history["resumed_from"] == [saved["step"]]
    assert len(calls) < len(ref_calls)  # it continued; it did not start over
    if CASES[method]["private"]:
        accounted = get_method(method).compositions(ZOHyperparameters(**CASES[method]["hp"]))
        assert history["releases"] == ref_history["releases"] == accounted


def assert_same_run(got, want, *, in_place):
    """Master mode: bit-identical.  In place: equal up to the rounding of in-place arithmetic
    (a snapshot restores theta, so the next pass does in two what would have been one)."""
    (model, history), (ref_model, ref_history) = got, want
    if not in_place:
        assert torch.equal(model.theta(), ref_model.theta())
        assert comparable(history) == comparable(ref_history)
        return
    torch.testing.assert_close(model.theta(), ref_model.theta(), rtol=0, atol=1e-12)
    # a rounding of theta (1e-16) shows in a difference quotient divided by 2 beta
    assert history["loss"] == pytest.approx(ref_history["loss"], rel=0, abs=1e-11)
    assert history["grad"] == pytest.approx(ref_history["grad"], rel=0, abs=1e-11)
    assert history["releases"] == ref_history["releases"] and history["examples"] == ref_history["examples"]


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("master_dtype", [torch.float64, None], ids=["master", "in-place"])
def test_resume_equals_the_uninterrupted_run_with_and_without_a_master_copy(tmp_path, method, master_dtype):
    in_place = master_dtype is None
    ref_model, ref_history, ref_calls = run(method, master_dtype=master_dtype)
    # writing snapshots does not change what the run computes
    model, history, _ = run(
        method, master_dtype=master_dtype, checkpoint=snapshots(tmp_path / "every.pt", every_steps=1)
    )
    assert_same_run((model, history), (ref_model, ref_history), in_place=in_place)
    # killed mid-step after a snapshot, then resumed in a fresh model, FlatParameters and checkpoint
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        run(method, master_dtype=master_dtype, checkpoint=snapshots(path), die_after_calls=len(ref_calls) * 2 // 3)
    step = torch.load(path, weights_only=True)["step"]
    assert 0 < step < ref_history["steps_run"]
    model, history, _ = run(method, master_dtype=master_dtype, checkpoint=snapshots(path))
    assert history["resumed_from"] == [step]
    assert_same_run((model, history), (ref_model, ref_history), in_place=in_place)


def test_a_second_interruption_resumes_from_the_newer_snapshot(tmp_path):
    reference, ref_history, ref_calls = run("dp-zoso")
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path), die_after_calls=len(ref_calls) // 3)
    first = torch.load(path, weights_only=True)["step"]
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path), die_after_calls=len(ref_calls) // 3)
    second = torch.load(path, weights_only=True)["step"]
    resumed, history, _ = run("dp-zoso", checkpoint=snapshots(path))
    assert 0 < first < second and history["resumed_from"] == [first, second]
    assert torch.equal(resumed.theta(), reference.theta())
    assert history["releases"] == ref_history["releases"] == 26


def test_a_snapshot_of_another_configuration_is_not_resumed(tmp_path):
    reference, _, ref_calls = run("dp-zoso")
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path, {"lr": 1}), die_after_calls=len(ref_calls) // 2)
    assert path.exists()
    resumed, history, calls = run("dp-zoso", checkpoint=snapshots(path, {"lr": 2}))
    assert history["resumed_from"] == [] and len(calls) == len(ref_calls)
    assert torch.equal(resumed.theta(), reference.theta())
    # different initial weights (another model) are another configuration too
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path), die_after_calls=len(ref_calls) // 2)
    state = TrainingCheckpoint(CheckpointPolicy(path, every_steps=3, every_seconds=0), {"cell": 1})
    other = TwoTensorModel(seed=99)
    from dpzo.zo.flat import FlatParameters

    assert state.resume(FlatParameters(other), public_rng=np.random.default_rng(0), secret=SecretRandom(5)) is None


@pytest.mark.parametrize("tamper", ["master", "step", "releases", "no digest"])
def test_a_snapshot_that_does_not_verify_is_ignored_and_the_run_starts_over(tmp_path, caplog, tamper):
    reference, ref_history, ref_calls = run("dp-zoso")
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path), die_after_calls=len(ref_calls) * 2 // 3)
    saved = torch.load(path, weights_only=True)
    assert saved["step"] > 0
    if tamper == "master":
        saved["master"][3] += 1e-3  # one coordinate of theta
    elif tamper == "no digest":
        del saved["digest"]  # e.g. a file from before snapshots carried one
    else:
        saved[tamper] -= 1  # a counter: the ledger check would count the wrong releases
    torch.save(saved, path)  # loads fine, keeps the old digest
    with caplog.at_level(logging.WARNING, logger="dpzo.zo.checkpoint"):
        resumed, history, calls = run("dp-zoso", checkpoint=snapshots(path))
    assert f"ignoring checkpoint {path}: its MAC does not verify" in caplog.text
    assert history["resumed_from"] == [] and len(calls) == len(ref_calls)  # started over
    assert torch.equal(resumed.theta(), reference.theta())
    assert comparable(history) == comparable(ref_history)


def killed_snapshot(tmp_path, identity=None, fraction=2 / 3):
    """The snapshot a dp-zoso run killed after ``fraction`` of its work left behind: (path, contents)."""
    _, _, ref_calls = run("dp-zoso")
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path, identity), die_after_calls=int(len(ref_calls) * fraction))
    return path, torch.load(path, weights_only=True)


def test_a_snapshot_whose_digest_was_recomputed_after_an_edit_is_ignored(tmp_path, caplog):
    """Counters rolled back and the plain SHA-256 recomputed, as anyone can: the weights would carry
    more releases than the counters say.  Only the installation key makes a MAC that verifies."""
    from dpzo.zo.checkpoint import snapshot_digest

    path, saved = killed_snapshot(tmp_path)
    saved["step"] -= 3
    saved["releases"] -= 6
    saved["digest"] = snapshot_digest(saved)
    torch.save(saved, path)
    with caplog.at_level(logging.WARNING, logger="dpzo.zo.checkpoint"):
        _, history, _ = run("dp-zoso", checkpoint=snapshots(path))
    assert "its MAC does not verify" in caplog.text and history["resumed_from"] == []


def test_a_snapshot_copied_from_another_cell_with_its_identity_rewritten_is_ignored(tmp_path, caplog):
    """The ε = 8 cell's snapshot copied into the ε = 2 cell, identity and digest made to match."""
    from dpzo.zo.checkpoint import snapshot_digest

    path, saved = killed_snapshot(tmp_path, identity={"cell": "eps8"})
    target = snapshots(path, {"cell": "eps2"})
    target.resume(FlatParameters(TwoTensorModel()), public_rng=np.random.default_rng(0))  # completes the identity
    saved["identity"] = target.identity
    saved["digest"] = snapshot_digest(saved)
    torch.save(saved, path)
    with caplog.at_level(logging.WARNING, logger="dpzo.zo.checkpoint"):
        _, history, _ = run("dp-zoso", checkpoint=snapshots(path, {"cell": "eps2"}))
    assert "its MAC does not verify" in caplog.text and history["resumed_from"] == []


def test_a_snapshot_of_another_installation_is_ignored(tmp_path, caplog, monkeypatch):
    path, _ = killed_snapshot(tmp_path)
    monkeypatch.setenv("DPZO_KEY_FILE", str(tmp_path / "other" / "installation.key"))  # a new key is made
    with caplog.at_level(logging.WARNING, logger="dpzo.zo.checkpoint"):
        _, history, _ = run("dp-zoso", checkpoint=snapshots(path))
    assert "its MAC does not verify" in caplog.text and history["resumed_from"] == []


def test_only_the_last_snapshot_the_attempt_log_records_is_resumed(tmp_path, caplog):
    """An older (genuine) snapshot put back after a later one was written: resuming it would
    publish weights whose releases the cell's record already counted once."""
    from dpzo.pipeline.cellguard import AttemptLog

    folder = tmp_path / "m" / "t" / "dp-zoso" / "eps8" / "seed13"
    log = AttemptLog(folder / "attempts.jsonl")
    path = folder / "state.pt"

    def recorded():
        return TrainingCheckpoint(CheckpointPolicy(path, every_steps=3, every_seconds=0), {"cell": 1}, record=log)

    _, _, ref_calls = run("dp-zoso")
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=recorded(), die_after_calls=len(ref_calls) // 3)
    older = path.read_bytes()
    first = torch.load(path, weights_only=True)["step"]
    with pytest.raises(Killed):  # resumed, then killed again after a later snapshot
        run("dp-zoso", checkpoint=recorded(), die_after_calls=len(ref_calls) // 3)
    later = torch.load(path, weights_only=True)["step"]
    assert later > first
    assert [r["step"] for r in log.records() if r["event"] == "snapshot"][-1] == later
    path.write_bytes(older)  # put the older one back
    with caplog.at_level(logging.WARNING, logger="dpzo.zo.checkpoint"):
        _, history, _ = run("dp-zoso", checkpoint=recorded())
    assert "not the last snapshot the cell's attempt log records" in caplog.text
    assert history["resumed_from"] == []  # started over (a new attempt, which the log counts)
    # the last snapshot that run wrote is the one the log records last: it resumes
    step = torch.load(path, weights_only=True)["step"]
    _, history, _ = run("dp-zoso", checkpoint=recorded())
    assert history["resumed_from"] == [step]


def test_a_snapshot_of_16_bit_weights_trained_in_place_verifies(tmp_path):
    """The digest covers dtypes numpy does not have (bfloat16 weights hold theta in place)."""
    from dpzo.zo.checkpoint import LoopState
    from dpzo.zo.flat import FlatParameters

    path = tmp_path / "state.pt"
    flat = FlatParameters(TwoTensorModel(dtype=torch.bfloat16), master_dtype=None)
    state = snapshots(path)
    assert state.resume(flat, public_rng=np.random.default_rng(0)) is None
    flat.perturb(seed=3, scale=0.5)  # saved restored: the perturbation is not part of theta
    state.save(LoopState(2, 0, None, {}, ([], 0, 0), 1.0), flat, public_rng=np.random.default_rng(0))
    again = FlatParameters(TwoTensorModel(dtype=torch.bfloat16), master_dtype=None)
    resumed = snapshots(path).resume(again, public_rng=np.random.default_rng(0))
    assert resumed is not None and resumed.step == 2
    assert torch.equal(again.master, flat.master) and again.master.dtype == torch.bfloat16


def test_secure_noise_state_is_never_written_and_the_resumed_run_draws_fresh_noise(tmp_path):
    _, ref_history, ref_calls = run("dp-zoso")
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path), secret=SecretRandom(), die_after_calls=len(ref_calls) // 2)
    saved = torch.load(path, weights_only=True)
    assert saved["secret_rng"] is None and saved["identity"]["secure_noise"] is True
    with pytest.raises(RuntimeError, match="never exported"):
        SecretRandom().insecure_state()
    _, history, _ = run("dp-zoso", checkpoint=snapshots(path), secret=SecretRandom())
    assert history["resumed_from"] == [saved["step"]]
    assert history["releases"] == ref_history["releases"]  # each step released exactly once
    # a snapshot written with test noise is not resumed by a secure run (nor the other way round)
    with pytest.raises(Killed):
        run("dp-zoso", checkpoint=snapshots(path), die_after_calls=len(ref_calls) // 2)
    _, history, _ = run("dp-zoso", checkpoint=snapshots(path), secret=SecretRandom())
    assert history["resumed_from"] == []


def test_sigterm_saves_after_the_current_step_then_stops(tmp_path):
    reference, _, ref_calls = run("dp-zoso")
    path = tmp_path / "state.pt"
    sent = len(ref_calls) // 2
    never = snapshots(path, every_steps=0)  # only SIGTERM writes a snapshot here

    def terminate(call):
        if call == sent:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="resumes"), never.saving_on_sigterm():
        run("dp-zoso", checkpoint=never, on_call=terminate)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed again
    saved = torch.load(path, weights_only=True)
    # two forwards per release, two releases per step: the signal came during step sent // 4
    assert saved["step"] == (sent - 1) // 4 + 1
    resumed, history, _ = run("dp-zoso", checkpoint=snapshots(path))
    assert history["resumed_from"] == [saved["step"]]
    assert torch.equal(resumed.theta(), reference.theta())


def test_policy_rejects_negative_intervals(tmp_path):
    with pytest.raises(ValueError, match="every_steps and every_seconds"):
        CheckpointPolicy(tmp_path / "x.pt", every_steps=-1)


def full_disk(monkeypatch, fail=lambda write: True):
    """Snapshot writes for which ``fail(n)`` holds (n counts writes from 1) go to /dev/full, where
    the kernel itself answers ENOSPC; returns the steps of the snapshots really written."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    written, writes = [], []
    real_save = torch.save

    def open_for_snapshot(file, mode="r", *args, **kwargs):
        if mode == "wb":
            writes.append(file)
            if fail(len(writes)):
                return builtins.open("/dev/full", "wb")
        return builtins.open(file, mode, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if getattr(f, "name", None) != "/dev/full":
            written.append(obj["step"])
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", open_for_snapshot, raising=False)
    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    return written


def test_a_full_disk_skips_a_periodic_snapshot_and_training_continues(tmp_path, monkeypatch, caplog):
    reference, ref_history, _ = run("dp-zoso")
    path = tmp_path / "state.pt"
    written = full_disk(monkeypatch, fail=lambda n: n == 2)  # the snapshot after step 6
    with caplog.at_level(logging.WARNING, logger="dpzo.zo.checkpoint"):
        model, history, _ = run("dp-zoso", checkpoint=snapshots(path))
    assert torch.equal(model.theta(), reference.theta()) and comparable(history) == comparable(ref_history)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no space" in warnings[0] and str(path) in warnings[0]
    assert "No space left on device" in warnings[0]  # the kernel's own error, through torch.save
    assert written == [3, 9, 12]  # skipped at 6; the next try came at the next interval
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["step"] == 12


def test_no_space_for_the_sigterm_snapshot_stops_the_run_and_says_so(tmp_path, monkeypatch):
    _, _, ref_calls = run("dp-zoso")
    path = tmp_path / "state.pt"
    full_disk(monkeypatch)
    never = snapshots(path, every_steps=0)

    def terminate(call):
        if call == len(ref_calls) // 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="could not be saved: no space") as stopped, never.saving_on_sigterm():
        run("dp-zoso", checkpoint=never, on_call=terminate)
    assert not stopped.value.saved and str(path) in str(stopped.value)
    assert list(tmp_path.iterdir()) == []  # neither a snapshot nor a temporary file


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs: the kernel itself runs out of space in the middle of a snapshot."""
    import shutil
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a tiny file system")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_disk_that_fills_in_the_middle_of_a_snapshot_skips_it_and_training_continues(tiny_filesystem, caplog):
    """torch's writer meets ENOSPC in the middle of the file and raises its own RuntimeError (the
    OSError only in its context); the run must still skip the snapshot, not die."""
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128, dtype=torch.float64)  # 130 KB of theta: no snapshot fits
    inputs = torch.randn(N, 128, dtype=torch.float64)

    def loss(index):
        out = model(inputs[torch.as_tensor(np.asarray(index), dtype=torch.long)])
        return 0.5 * (out**2).sum(dim=1) / 128

    hp = ZOHyperparameters(steps=6, batch_size=8, lr=1e-3, clip=3.0, log_every=2)
    path = tiny_filesystem / "train_state.pt"
    with caplog.at_level(logging.WARNING, logger="dpzo.zo.checkpoint"):
        history = train_zo(
            model,
            loss,
            N,
            hp,
            method="dp-zoso",
            run_seed=13,
            noise=NoisySum("gaussian", 2.0, 8.0),
            secret=SecretRandom(insecure_test_seed=5),
            checkpoint=snapshots(path, every_steps=2),
        )
    assert history["steps_run"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("no space left to write checkpoint" in w for w in warnings)
    assert list(tiny_filesystem.iterdir()) == []  # no partial snapshot or temporary file left
