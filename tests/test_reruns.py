"""Honest reruns, through the Snakemake CLI: no fault, stale file or borrowed ledger makes the
pipeline publish a wrong or unaccounted result.

Each test starts from a copy of the tiny run (its results and Snakemake's records of them), damages
or changes one thing and checks what the next run does; most runs name the cell they need rather
than the whole report, to keep the suite short.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from .pipeline import snakemake
from .test_workflow import AGGREGATES, TINY, job_counts

PRIVATE = "demo-roberta/demo-sst2/dp-zoso/eps8/seed13"
PUBLIC = "demo-roberta/demo-sst2/zero-shot/epsinf/seed13"
CONFIG = TINY


@pytest.fixture(scope="module")
def grid(tiny_run, tmp_path_factory):
    """A copy of the tiny run, times and Snakemake's metadata included: up to date as it is."""
    workdir = tmp_path_factory.mktemp("reruns") / "grid"
    shutil.copytree(tiny_run, workdir, copy_function=shutil.copy2, symlinks=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout
    return workdir


def target(run: str) -> str:
    return f"results/runs/{run}/metrics.json"


def cell(workdir: Path, run: str, name: str = "metrics.json") -> Path:
    return workdir / "results" / "runs" / run / name


def output(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_plain_run_rebuilds_a_missing_cell_and_the_collected_tables(grid):
    ledger_time = cell(grid, PRIVATE, "privacy.json").stat().st_mtime_ns
    for path in (cell(grid, PRIVATE), grid / "results/tables/cells.csv", grid / "results/tables/curves.csv"):
        path.unlink()  # what a killed `-f` run leaves behind
    counts = job_counts(snakemake(grid, "-n").stdout)
    assert counts == {"train": 1} | dict.fromkeys(AGGREGATES, 1)
    snakemake(grid)
    assert cell(grid, PRIVATE).exists() and (grid / "results/tables/curves.csv").exists()
    assert cell(grid, PRIVATE, "privacy.json").stat().st_mtime_ns == ledger_time  # the ledger was kept
    assert "Nothing to be done" in snakemake(grid, "-n").stdout


@pytest.mark.slow
def test_a_ledger_with_less_noise_is_refused_before_training_and_rebuilt_once_removed(grid):
    path = cell(grid, PRIVATE, "privacy.json")
    honest = json.loads(path.read_text())
    sigma = honest["sigma"] / 2
    path.write_text(json.dumps(honest | {"sigma": sigma, "noise_std_on_sum": sigma * honest["clip"]}))
    proc = snakemake(grid, target(PRIVATE), check=False)
    text = output(proc) + (grid / "logs" / "train" / f"{PRIVATE}.log").read_text()
    assert proc.returncode != 0
    assert "LedgerMismatch" in text and str(Path("results/runs") / PRIVATE / "privacy.json") in text
    assert "does not buy the cell's ε" in text or "epsilon of its noise" in text
    assert not cell(grid, PRIVATE).exists()  # nothing published for the cell
    path.unlink()  # the fix the message gives
    snakemake(grid, target(PRIVATE))
    assert json.loads(path.read_text())["sigma"] == honest["sigma"] and cell(grid, PRIVATE).exists()


@pytest.mark.slow
def test_a_truncated_ledger_is_named_and_rebuilt_by_the_next_run(grid):
    path = cell(grid, PRIVATE, "privacy.json")
    stamp = path.stat()
    path.write_text(path.read_text()[:40])
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # damaged in place, not "newer"
    first = snakemake(grid, "-f", target(PRIVATE), check=False)  # a job that reads it
    assert first.returncode != 0 and "is not valid JSON" in output(first) and "privacy.json" in output(first)
    assert (path.parent / "privacy.json.corrupt").exists()
    planned = job_counts(snakemake(grid, "-n").stdout)  # the next run rebuilds it and what depends on it
    assert planned["account"] == planned["train"] == 1 and planned["collect"] == 1
    snakemake(grid, target(PRIVATE))
    assert json.loads(path.read_text())["cell"]["eps"] == "8"


@pytest.mark.slow
def test_test_noise_is_recorded_and_a_secure_run_recomputes_only_the_private_cells(grid):
    ledger = json.loads(cell(grid, PRIVATE, "privacy.json").read_text())
    metrics = json.loads(cell(grid, PRIVATE).read_text())
    assert ledger["noise"] == metrics["privacy"]["noise"] == "insecure test seed 7"
    privacy_table = (grid / "results/tables/privacy.md").read_text()
    assert "NOT PRIVATE (test noise)" in privacy_table
    assert "†" in (grid / "results/tables/accuracy-eps8.md").read_text()
    secure = snakemake(grid, "-n", env={"DPZO_INSECURE_TEST_NOISE_SEED": ""}).stdout
    counts = job_counts(secure)
    assert {rule: n for rule, n in counts.items() if rule not in AGGREGATES} == {"account": 1, "train": 1}
    assert f"output: results/runs/{PRIVATE}/metrics.json" in secure and f"output: results/runs/{PUBLIC}/" not in secure


@pytest.mark.slow
def test_only_covered_quantities_are_published(grid):
    metrics = json.loads(cell(grid, PRIVATE).read_text())
    history = metrics["history"]
    assert not {"loss", "examples", "clipped_fraction"} & set(history)
    assert history["test_step"][-1] == CONFIG["methods"]["dp-zoso"]["steps"] and len(history["test_loss"]) == len(
        history["test_step"]
    )
    private = json.loads(cell(grid, PRIVATE, "private_diagnostics.json").read_text())
    assert "NOT covered" in private["note"] and len(private["loss"]) == len(private["step"]) == len(
        private["clipped_fraction"]
    )
    curves = (grid / "results/tables/curves.csv").read_text().splitlines()[0].split(",")
    assert "test_loss" in curves and "loss" not in curves
    assert not (grid / "results/private").exists()
    # asked for, the diagnostics are collected into their own folder (and the report's own section)
    (grid / "private.yaml").write_text(yaml.safe_dump({"report": {"private_diagnostics": True}}))
    args = ("--configfile", str(grid / "config.yaml"), str(grid / "private.yaml"))
    planned = job_counts(snakemake(grid, "-n", *args).stdout)
    assert planned["private_diagnostics"] == planned["figure_private_diagnostics"] == 1
    assert "private_diagnostics" not in job_counts(snakemake(grid, "-n").stdout)
    snakemake(grid, "results/private/diagnostics.csv", "results/private/training-loss.png", *args)
    table = (grid / "results/private/diagnostics.csv").read_text()
    assert table.startswith("model,task,method,eps,seed,step,stage,loss,examples,clipped_fraction")
    assert (grid / "results/private/training-loss.png").stat().st_size > 10_000


@pytest.mark.slow
def test_replacing_a_models_weights_reruns_its_cells(grid, tmp_path):
    """A model configured by path: its files are inputs of its cells."""
    import transformers

    model_dir = grid / "models" / "mine"
    shutil.copytree(grid / "results/demo/models/demo-roberta", model_dir)
    config = dict(CONFIG, models={"mine": {"path": str(model_dir)}}, methods={"zero-shot": {}})
    (grid / "mine.yaml").write_text(yaml.safe_dump(config))
    args = (target(PUBLIC.replace("demo-roberta", "mine")), "--configfile", str(grid / "mine.yaml"))
    snakemake(grid, *args)
    assert "Nothing to be done" in snakemake(grid, "-n", *args).stdout
    model = transformers.AutoModelForMaskedLM.from_pretrained(model_dir)
    model.save_pretrained(model_dir)  # new weights, same directory
    assert job_counts(snakemake(grid, "-n", *args).stdout) == {"train": 1}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"device": "gpu"}, "config key 'device'"),
        ({"methods": {"dp-zoso": {k: v for k, v in CONFIG["methods"]["dp-zoso"].items() if k != "clip"}}}, "clip"),
        (
            {"methods": {"dp-zoso": dict(CONFIG["methods"]["dp-zoso"], batch_size=999)}},
            "is larger than the training set",
        ),
    ],
)
def test_bad_values_stop_before_any_job(tmp_path, change, message):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(CONFIG, **change)))
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and message in output(proc), output(proc)[-3000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_device_this_machine_lacks_stops_the_run_and_keeps_finished_results(grid):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (grid / "cuda.yaml").write_text(yaml.safe_dump({"device": "cuda"}))
    before = {run: cell(grid, run).stat().st_mtime_ns for run in (PRIVATE, PUBLIC)}
    proc = snakemake(grid, "--configfile", str(grid / "config.yaml"), str(grid / "cuda.yaml"), check=False)
    assert proc.returncode != 0 and "config key 'device': 'cuda'" in output(proc) and "no CUDA device" in output(proc)
    assert {run: cell(grid, run).stat().st_mtime_ns for run in (PRIVATE, PUBLIC)} == before  # nothing deleted
