"""TF32 is one config setting (``tf32``), applied the same way by a cell and by ``dpzo bench``.

On the CPU the switches change no number, but they are where CUDA reads them: a cell's training
and evaluation run with ``torch.backends.cuda.matmul.allow_tf32`` (and so
``torch.get_float32_matmul_precision()``) as the config says, and the previous settings come back.
"""

from __future__ import annotations

import json

import pytest
import torch


def matmul_settings() -> tuple[bool, bool, str]:
    return (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )


@pytest.fixture
def zero_shot_run(tmp_path):
    """A zero-shot cell of a tiny RoBERTa (evaluation only: seconds)."""
    from dpzo.data.splits import save_split
    from dpzo.privacy.ledger import AccountingSettings, Cell, cell_ledger, cell_noise

    from .test_families import save_tiny
    from .tiny import examples

    save_split(tmp_path / "train.jsonl", examples(8, seed=0))
    save_split(tmp_path / "test.jsonl", examples(4, seed=1))
    cell = Cell(model="tiny", task="SST-2", method="zero-shot", eps="inf", seed=13)
    settings = AccountingSettings(delta=1e-5, noise=cell_noise("zero-shot"))
    (tmp_path / "privacy.json").write_text(json.dumps(cell_ledger(cell, None, n=8, settings=settings)))
    model = save_tiny(tmp_path / "roberta", "roberta")
    return dict(
        cell=cell,
        model_path=str(model),
        split_dir=str(tmp_path),
        method_params={},
        accounting=settings,
        ledger_path=str(tmp_path / "privacy.json"),
        eval_batch_size=4,
    )


@pytest.mark.parametrize("tf32", [True, False])
def test_a_cell_runs_its_matmuls_as_the_config_says(zero_shot_run, monkeypatch, tf32):
    from dpzo.models import evaluate as evaluation
    from dpzo.pipeline.cell import CellRun, run_cell

    inner, seen = evaluation.evaluate, []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: seen.append(matmul_settings()) or inner(*a, **k))
    before = matmul_settings()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32  # the opposite
    try:
        run_cell(CellRun(**zero_shot_run, tf32=tf32))
        assert seen == [(tf32, tf32, "high" if tf32 else "highest")]
        assert matmul_settings()[:2] == (not tf32, not tf32)  # put back after the cell
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]


def test_the_default_is_the_bench_default_and_the_bench_goes_through_the_same_switch(monkeypatch):
    import inspect

    from dpzo.bench import run as bench
    from dpzo.pipeline.cell import CellRun

    assert CellRun.__dataclass_fields__["tf32"].default is inspect.signature(bench.run_bench).parameters["tf32"].default
    seen = []
    monkeypatch.setattr(bench, "bench_model", lambda name, **kwargs: seen.append(matmul_settings()) or {})
    before = matmul_settings()
    for tf32 in (False, True):
        record = bench.run_bench(["tiny-opt"], device="cpu", tf32=tf32)
        assert record["settings"]["tf32"] is tf32
    assert seen == [(False, False, "highest"), (True, True, "high")]
    assert matmul_settings() == before


def test_the_schema_default_is_tf32_on():
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["tf32"] == {**schema["properties"]["tf32"], "type": "boolean", "default": True}
