"""``dpzo plan``: the projection on fake tensors equals the peak tracked on real tensors, and a
cell that would not fit ``max_memory`` is refused before any job with what would fit."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
import transformers

from dpzo.bench import plan
from dpzo.pipeline.preflight import memory_problems

from .costs import random_lm

SMALL = dict(hidden=128, layers=2, vocab=1024)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("store", ["resident", "streamed"])
def test_projection_equals_the_tracked_real_peak(family, store):
    setting = plan.Setting(store=store, master="none", batch=4, length=32)
    real = plan.project(random_lm(family, **SMALL), setting, fake=False)
    fake = plan.project(random_lm(family, **SMALL, fake=True), setting)
    for what in ("step_bytes", "eval_bytes", "host_bytes"):
        assert getattr(fake, what) == pytest.approx(getattr(real, what), rel=0.05), what
    assert fake.step_bytes > 0 and fake.eval_bytes > 0
    assert (fake.host_bytes > 0) == (store == "streamed")


def test_projection_with_a_master_copy_equals_the_real_peak():
    setting = plan.Setting(store="resident", master="float32", batch=4, length=32)
    real = plan.project(random_lm("roberta", **SMALL), setting, fake=False)
    fake = plan.project(random_lm("roberta", **SMALL, fake=True), setting)
    assert fake.step_bytes == pytest.approx(real.step_bytes, rel=0.05)
    # the master copy is held on the device: the peak holds both copies of theta
    assert fake.step_bytes >= 2 * sum(p.numel() * 4 for p in random_lm("roberta", **SMALL, fake=True).parameters())


def test_placed_projection_cuts_theta_and_keeps_the_rest():
    resident = plan.project(random_lm("opt", **SMALL, fake=True), plan.Setting(batch=4, length=32))
    placed = plan.placed_over(resident, 4)
    theta = resident.extra["theta_bytes"]
    assert resident.step_bytes - placed.step_bytes == theta - -(-theta // 4)
    assert placed.row()["store"] == "placed/4"


def _model_dir(tmp_path, hidden=128, layers=2) -> str:
    config = transformers.OPTConfig(
        vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        ffn_dim=4 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=512,
    )  # fmt: skip
    config.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def _config(path: str, max_memory: dict | None) -> dict:
    model = {"path": path, "placement": "auto", "master": "none"}
    if max_memory is not None:
        model["max_memory"] = max_memory
    return {
        "models": {"small": model},
        "tasks": ["demo-sst2"],
        "methods": {"dp-zoso": {"steps": 1, "batch_size": 8, "lr": 1e-6, "clip": 1.0}, "zero-shot": {}},
        "eval_batch_size": 8,
    }


def test_a_cell_over_max_memory_is_refused_with_what_would_fit(tmp_path):
    path = _model_dir(tmp_path)
    fits = plan.config_plans(_config(path, None))[0][0].projection()
    cap = int(fits.step_bytes * 0.75)  # one GPU of three quarters of the step's peak
    problems = memory_problems(_config(path, {0: f"{cap}B", "cpu": "1GiB"}))
    assert len(problems) == 1
    message = problems[0]
    assert "model 'small'" in message and "max_memory" in message and "would fit:" in message
    # each choice named was projected to fit: check two of them by projecting them again
    planned = plan.config_plans(_config(path, None))[0][0]
    streamed = planned.projection(replace(planned.setting, store="streamed"))
    assert ("offload: streamed" in message) == (plan.peak(streamed) <= cap)
    smaller = re.search(r"batch_size (\d+) and eval_batch_size (\d+)", message)
    assert smaller is not None
    batch, eval_batch = int(smaller.group(1)), int(smaller.group(2))
    assert plan.peak(planned.projection(replace(planned.setting, batch=batch, eval_batch=eval_batch))) <= cap
    assert plan.peak(planned.projection(replace(planned.setting, batch=2 * batch, eval_batch=2 * eval_batch))) > cap
    # and a cap above the projection passes
    assert memory_problems(_config(path, {0: f"{2 * plan.peak(fits)}B"})) == []


def test_no_projection_without_max_memory(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(plan.ModelPlan, "projection", lambda self, setting=None: called.append(1))
    assert memory_problems(_config(_model_dir(tmp_path), None)) == []
    assert called == []


def test_plan_command_prints_the_rows(tmp_path, capsys):
    from dpzo.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(_config(_model_dir(tmp_path, layers=1), None)))
    assert main(["plan", "--configfile", str(config), "--memory", "1GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["model"] == "small" and row["store"] == "placed/1" and row["fits"] is True
    assert row["step_mb"] >= row["eval_mb"] > 0  # equal where the passes draw z in registers
    assert main(["plan", "--catalogue", "--models", "tiny-opt", "--table"]) == 0
    table = capsys.readouterr().out
    assert table.count("| tiny-opt |") == 4 and "streamed" in table
    assert torch.get_default_dtype() == torch.float32  # the fake build restored it


def test_plan_command_refuses_an_unknown_model(capsys):
    from dpzo.cli import main

    assert main(["plan", "--catalogue", "--models", "opt-999b"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "argument --models" in captured.err and "opt-66b" in captured.err
    assert main(["plan", "--catalogue", "--memory", "lots"]) == 2
