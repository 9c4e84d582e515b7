"""The pipeline, run for real through the Snakemake CLI on a tiny config in a temporary directory."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from . import golden
from .pipeline import ROOT, snakemake

TINY = {
    "demo": {"seed": 0, "task_seed": 1, "pretrain_steps": 40},
    "models": {"demo-roberta": {"demo": "roberta"}},
    "tasks": ["demo-sst2"],
    "k": 16,
    "seeds": [13],
    "epsilons": ["8"],
    "delta": 1.0e-5,
    "max_test": 64,
    "eval_batch_size": 64,
    "methods": {
        "zero-shot": {},
        "mezo": {"steps": 4, "batch_size": 8, "lr": 1.0e-4, "beta": 1.0e-3},
        "dp-zoso": {
            "steps": 6,
            "batch_size": 8,
            "lr": 1.0e-4,
            "stages": 2,
            "stage_steps": 2,
            "beta_start": 1.0e-3,
            "beta_end": 1.0e-2,
            "lam": 0.01,
            "clip": 5.0,
            "directions": 2,
            "log_every": 1,
        },
    },
}
# every other method, run once end to end through the DAG
ALL_METHODS = {
    "icl": {"demonstrations": 2},
    "dp-zopo": {
        "steps": 4,
        "batch_size": 8,
        "lr": 1.0e-4,
        "stages": 2,
        "stage_steps": 2,
        "clip": 5.0,
        "mask": {"scorer": "synflow-exact", "ratio": 0.05, "selection": "largest", "strategy": "incremental"},
    },
    "dp-zopo+dynamic": {
        "steps": 4,
        "batch_size": 8,
        "lr": 1.0e-4,
        "stages": 2,
        "stage_steps": 2,
        "clip": 5.0,
        "mask": {"scorer": "magnitude", "ratio": 0.05, "strategy": "dynamic", "mode": "rank"},
    },
    "dpzero": {"steps": 3, "batch_size": 8, "lr": 1.0e-4, "clip": 5.0},
    "dp-zo-gauss": {"steps": 3, "batch_size": 8, "lr": 1.0e-4, "clip": 0.05},
    "dp-zo-laplace": {"steps": 3, "batch_size": 8, "lr": 1.0e-4, "clip": 0.05},
    "ft": {"steps": 2, "batch_size": 4, "lr": 1.0e-4},
    "dp-sgd": {"steps": 2, "batch_size": 4, "lr": 1.0e-4, "clip": 1.0},
    "dp-prefix": {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "clip": 1.0, "prefix_tokens": 2},
}
FIGURES = ("accuracy-bars", "memory-time", "privacy-utility", "training-curves", "ablation")
TABLES = ("accuracy-eps8", "privacy", "versions")
# what reruns whenever any cell changes: the collection of cells, its tables and figures
AGGREGATES = {
    "collect",
    "summarize",
    "accuracy_table",
    "privacy_table",
    "versions_table",
    "all",
    *(f"figure_{name.replace('-', '_')}" for name in FIGURES),
}
CELLS = [
    "demo-roberta/demo-sst2/zero-shot/epsinf/seed13",
    "demo-roberta/demo-sst2/mezo/epsinf/seed13",
    "demo-roberta/demo-sst2/dp-zoso/eps8/seed13",
]


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table ({} when there is nothing to do)."""
    if "Job stats:" not in output:
        assert "Nothing to be done" in output, output[-3000:]
        return {}
    table = output.split("Job stats:")[1]
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    counts.pop("total", None)
    return counts


@pytest.mark.slow
def test_pipeline_produces_every_output(tiny_run):
    results = tiny_run / "results"
    for name in FIGURES:
        assert (results / "figures" / f"{name}.png").stat().st_size > 10_000, name
        assert (results / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
    for name in TABLES:
        for ext in ("csv", "md", "tex", "html"):
            assert (results / "tables" / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    summary = pd.read_csv(results / "tables" / "summary.csv", dtype={"eps": str})
    assert set(summary["method"]) == {"zero-shot", "mezo", "dp-zoso"}
    for cell in CELLS:
        metrics = json.loads((results / "runs" / cell / "metrics.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["test_n"] == 64
        assert (tiny_run / "logs" / "train" / f"{cell}.log").exists()
        assert (tiny_run / "benchmarks" / "train" / f"{cell}.tsv").exists()
        if metrics["steps"]:  # trained cells record their step time and peak memory
            assert metrics["ms_per_step"] > 0 and metrics["memory"]["cpu_max_rss_mb"] > 0
        versions = metrics["versions"]  # and the versions that made them
        assert versions["torch"] == metrics["torch"] and versions["dpzo"] and versions["device_name"]
        assert {"python", "transformers", "peft", "accelerate", "snakemake", "dpzo_commit"} <= set(versions)
    listed = pd.read_csv(results / "tables" / "versions.csv", dtype=str)
    assert sorted(i for ids in listed["cell_ids"] for i in ids.split("; ")) == sorted(CELLS)
    # the test-noise seed of these runs is marked on the curve points of the private cell only
    curves = pd.read_csv(results / "tables" / "curves.csv", dtype={"eps": str})
    assert set(curves.loc[curves.test_noise, "method"]) == {"dp-zoso"}
    assert not curves.loc[curves.method != "dp-zoso", "test_noise"].any()
    # the summary equals the cells' accuracies (one seed: mean = the value, std = 0)
    for cell in CELLS:
        metrics = json.loads((results / "runs" / cell / "metrics.json").read_text())
        row = summary[summary.method == metrics["method"]].iloc[0]
        assert row["accuracy_mean"] == pytest.approx(100 * metrics["accuracy"], abs=1e-3)


@pytest.mark.slow
def test_private_cell_ledger_matches_what_ran(tiny_run):
    cell = tiny_run / "results" / "runs" / "demo-roberta/demo-sst2/dp-zoso/eps8/seed13"
    ledger = json.loads((cell / "privacy.json").read_text())
    metrics = json.loads((cell / "metrics.json").read_text())
    assert ledger["private"] is True and ledger["sampler"] == "poisson"
    assert ledger["n"] == 32 and ledger["q"] == pytest.approx(8 / 32)
    assert ledger["steps"] == 6 and ledger["directions"] == 2 and ledger["compositions"] == 12
    assert metrics["steps"] == 6 and metrics["releases"] == 12
    assert ledger["sigma"] > 0 and ledger["clip"] == 5.0 and ledger["delta"] == 1e-5
    achieved = ledger["epsilon_achieved"]
    assert ledger["calibrated_with"] == "pld" and achieved["pld"] <= 8.0
    # cross-checks: RDP is a looser bound, PRV's upper bound agrees with PLD up to its eps_error
    assert achieved["rdp"] >= achieved["pld"] and abs(achieved["prv"] - achieved["pld"]) < 0.3
    # stage boundaries of the schedule were logged: stage 0 then stage 1
    assert metrics["history"]["stage"] == [0, 0, 1, 1, 1, 1]
    assert metrics["history"]["beta"][0] == pytest.approx(1e-3) and metrics["history"]["beta"][-1] == pytest.approx(
        1e-2
    )


@pytest.mark.slow
def test_single_cell_rerun_runs_exactly_that_cell(tiny_run):
    target = f"results/runs/{CELLS[2]}/metrics.json"
    before = {c: (tiny_run / "results" / "runs" / c / "metrics.json").stat().st_mtime_ns for c in CELLS}
    first = json.loads((tiny_run / target).read_text())
    dry = snakemake(tiny_run, "-f", "-n", "--", target)
    assert job_counts(dry.stdout) == {"train": 1}
    snakemake(tiny_run, "-f", "--", target)
    after = {c: (tiny_run / "results" / "runs" / c / "metrics.json").stat().st_mtime_ns for c in CELLS}
    assert after[CELLS[2]] != before[CELLS[2]]
    assert all(after[c] == before[c] for c in CELLS[:2])
    # with the test-only noise seed the private cell is deterministic: the same metrics again
    again = json.loads((tiny_run / target).read_text())
    # log: times, pid; versions: the checkout's dirty flag may change between the two runs
    volatile = {"ms_per_step", "train_seconds", "wall_seconds", "memory", "attempt_log", "versions"}
    assert {k: v for k, v in again.items() if k not in volatile} == {
        k: v for k, v in first.items() if k not in volatile
    }
    # the next full run re-aggregates and nothing else
    assert job_counts(snakemake(tiny_run, "-n").stdout) == dict.fromkeys(AGGREGATES, 1)


def planned(workdir: Path, config: dict, *args: str) -> dict[str, list[str]]:
    """Dry-run ``config`` in ``workdir``: the first output of every job that would run, per rule."""
    path = workdir / "planned.yaml"
    path.write_text(yaml.safe_dump(config))
    out = snakemake(workdir, "-n", *args, "--configfile", str(path)).stdout
    counts = job_counts(out)
    jobs: dict[str, list[str]] = {}
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, re.M):
        outputs = re.search(r"^    output: ([^,\n]+)", body, re.M)
        jobs.setdefault(rule, []).append(outputs.group(1) if outputs else "")
    assert {rule: len(v) for rule, v in jobs.items()} == counts  # every job parsed
    return {rule: sorted(v) for rule, v in jobs.items()}


def cell_files(*cells: str, name: str = "metrics.json") -> list[str]:
    return sorted(f"results/runs/{cell}/{name}" for cell in cells)


@pytest.mark.slow
def test_changing_one_methods_hyperparameters_reruns_only_that_methods_cells(tiny_run):
    variant = copy.deepcopy(TINY)
    variant["methods"]["mezo"]["lr"] = 3.0e-4
    jobs = planned(tiny_run, variant)
    assert set(jobs) - AGGREGATES == {"account", "train"}
    assert jobs["train"] == cell_files(CELLS[1]) and jobs["account"] == cell_files(CELLS[1], name="privacy.json")


@pytest.mark.slow
def test_adding_a_seed_adds_only_the_new_cells(tiny_run):
    jobs = planned(tiny_run, dict(TINY, seeds=[13, 14]))
    new_cells = [c.replace("seed13", "seed14") for c in CELLS]
    assert set(jobs) - AGGREGATES == {"fewshot", "account", "train"}  # no demo model or corpus again
    assert jobs["fewshot"] == ["results/data/demo-sst2/k16-seed14/train.jsonl"]
    assert jobs["train"] == cell_files(*new_cells) and jobs["account"] == cell_files(*new_cells, name="privacy.json")


@pytest.mark.slow
def test_adding_an_epsilon_adds_only_the_private_methods_new_cells(tiny_run):
    jobs = planned(tiny_run, dict(TINY, epsilons=["8", "2"]))
    new_cell = CELLS[2].replace("eps8", "eps2")
    assert set(jobs) - AGGREGATES == {"account", "train"}
    assert jobs["train"] == cell_files(new_cell) and jobs["account"] == cell_files(new_cell, name="privacy.json")


@pytest.mark.slow
def test_checkpoint_settings_rerun_nothing(tiny_run):
    """Snapshot frequency never changes a result, so it is not a rule parameter."""
    unchanged = planned(tiny_run, TINY)
    assert planned(tiny_run, dict(TINY, checkpoint={"every_steps": 5, "every_seconds": 30})) == unchanged
    assert not set(unchanged) - AGGREGATES


def test_bad_config_stops_before_any_job_and_names_the_key(tmp_path):
    bad = dict(TINY, tasks=["demo-sst2", "imdb"], epsilons=["4.0"])
    bad["methods"] = dict(TINY["methods"], **{"dp-zosoo": {}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    proc = snakemake(tmp_path, "-n", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "tasks[1]" in text and "'imdb'" in text and "demo-sst2" in text  # names key + allowed values
    assert "epsilons[0]" in text and "'4.0'" in text
    assert "dp-zosoo" in text and "dp-zoso" in text
    assert not (tmp_path / "results").exists()


def test_lint_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_config_grid_dry_run(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    counts = job_counts(snakemake(tmp_path, "-n", "--quiet", "rules").stdout)
    n_models, n_tasks, n_seeds = len(config["models"]), len(config["tasks"]), len(config["seeds"])
    per_group = sum(len(config["epsilons"]) if m.startswith("dp-") else 1 for m in config["methods"])
    assert counts["train"] == counts["account"] == n_models * n_tasks * n_seeds * per_group
    assert counts["fewshot"] == n_tasks * n_seeds and counts["demo_model"] == n_models
    # DP-ZOPO is in the default grid: one static mask per (model, task), one SynFlow agreement
    # per model (data-free: the task enters only through its label words).
    assert "dp-zopo" in config["methods"]
    assert counts["mask"] == n_models * n_tasks and counts["synflow_agreement"] == n_models


def test_paper_grid_plans_one_gpu_job_per_cell(tmp_path):
    """config/paper.yaml: every cell is one training job with one GPU (device: cuda); only the
    model jobs ask for a GPU (the grid's size is checked in test_real_names)."""
    from dpzo.methods import base_method
    from dpzo.pipeline.config import grid_cells

    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, "-n").stdout
    counts = job_counts(out)
    masked = {(c["model"], c["task"]) for c in grid_cells(config) if base_method(c["method"]) == "dp-zopo"}
    assert counts["train"] == counts["account"] == len(grid_cells(config)) and counts["mask"] == len(masked)
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, re.M):
        gpus = re.search(r"\bgpu=(\d+)", body)
        assert (gpus.group(1) if gpus else None) == ("1" if rule in ("train", "mask") else None), rule


def test_all_methods_overlay_plans_every_method_and_tuning(tmp_path):
    """config/all-methods.yaml on the demo: every registered method and the LoRA / prefix variants
    of the zeroth-order methods and DP-SGD, each a cell per model x task x seed (x eps if private)."""
    from dpzo.methods import REGISTRY, base_method, is_private

    files = [str(ROOT / "config" / "config.yaml"), str(ROOT / "config" / "all-methods.yaml")]
    (tmp_path / "config.yaml").write_text((ROOT / "config" / "config.yaml").read_text())
    counts = job_counts(snakemake(tmp_path, "-n", "--quiet", "rules", "--configfile", *files).stdout)
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "config" / "all-methods.yaml").read_text())
    methods = {**base["methods"], **overlay["methods"]}
    assert {base_method(m) for m in methods} == set(REGISTRY)
    tunings = {m: (b.get("tuning") or {"kind": "full"})["kind"] for m, b in methods.items()}
    assert {"mezo+lora", "dp-zoso+lora", "dp-sgd+lora"} <= {m for m, k in tunings.items() if k == "lora"}
    assert {"mezo+prefix", "dp-zoso+prefix"} <= {m for m, k in tunings.items() if k == "prefix"}
    per_group = sum(len(base["epsilons"]) if is_private(m) else 1 for m in methods)
    assert counts["train"] == len(base["models"]) * len(base["tasks"]) * len(base["seeds"]) * per_group


@pytest.mark.slow
def test_every_method_runs_through_the_dag(tiny_run):
    """Reuse the tiny run's demo model and data; add every other method and run the grid."""
    config = dict(TINY, methods=dict(TINY["methods"], **ALL_METHODS))
    (tiny_run / "config.yaml").write_text(yaml.safe_dump(config))
    counts = job_counts(snakemake(tiny_run, "-n").stdout)
    assert counts["train"] == len(ALL_METHODS)
    assert counts["mask"] == 3  # incremental: 0.025 and 0.05; dynamic: its stage-0 mask
    snakemake(tiny_run)
    runs = tiny_run / "results" / "runs" / "demo-roberta" / "demo-sst2"
    for method in ALL_METHODS:
        eps = "eps8" if method.startswith(("dp", "dpzero")) else "epsinf"
        cell = runs / method / eps / "seed13"
        metrics = json.loads((cell / "metrics.json").read_text())
        ledger = json.loads((cell / "privacy.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert ledger["private"] is (eps == "eps8"), method
        if ledger["private"]:
            assert metrics["releases"] == ledger["compositions"], method
        # the cost probe: one inference forward and one step on public test examples, tracked
        cost = metrics["cost"]
        assert cost["inference"]["peak_mb"] > cost["weights_mb"] > 0, method
        assert cost["inference"]["copied_mb_per_step"] == 0, method  # one device: nothing crosses
        if method != "icl":
            assert cost["probe"]["batch_size"] == ALL_METHODS[method]["batch_size"], method
            assert cost["step_over_inference"] == pytest.approx(
                cost["step"]["peak_mb"] / cost["inference"]["peak_mb"], rel=1e-3
            )
    # backpropagation keeps the activations and a gradient per weight: more than a forward
    dp_sgd = json.loads((runs / "dp-sgd/eps8/seed13/metrics.json").read_text())["cost"]
    assert dp_sgd["step"]["peak_mb"] > dp_sgd["inference"]["peak_mb"] + dp_sgd["weights_mb"]
    zopo = json.loads((runs / "dp-zopo/eps8/seed13/metrics.json").read_text())
    assert zopo["history"]["mask_size"][0] < zopo["history"]["mask_size"][1]  # incremental grows
    laplace = json.loads((runs / "dp-zo-laplace/eps8/seed13/privacy.json").read_text())
    assert laplace["mechanism"] == "laplace" and laplace["epsilon_achieved"]["pure"] == pytest.approx(8.0)


@pytest.mark.slow
def test_tiny_run_matches_the_stored_results(tiny_run):
    """Every method of the tiny grid gives the values stored in tests/fixtures (``tests/golden.py``):
    a refactor that changes one released scalar, σ or accuracy fails here."""
    config = dict(TINY, methods=dict(TINY["methods"], **ALL_METHODS))
    (tiny_run / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tiny_run)  # nothing to do when the every-method test already ran the grid
    stored = json.loads(golden.FIXTURE.read_text())
    # Bit-identity holds for the torch build and CPU kernels the fixture was made with; on other
    # kernels float sums may round differently, so values are then compared to 1e-6.
    exact = stored["platform"] == golden.platform()
    actual = golden.collect(tiny_run)
    assert set(stored["cells"]) <= set(actual), sorted(set(stored["cells"]) - set(actual))  # later tests may add cells
    for name, values in stored["cells"].items():
        golden.assert_same(actual[name], values, name, exact=exact)


@pytest.mark.slow
def test_audit_target_measures_a_bound_per_epsilon(tiny_run):
    """`snakemake audit_all` on the tiny grid's dp-zoso cell: at its epsilon and without noise."""
    before = (tiny_run / "config.yaml").read_text()  # later tests run the grid of the tests before
    config = dict(yaml.safe_load(before), audit={"epsilons": ["8", "inf"], "trials": 400})
    (tiny_run / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        counts = job_counts(snakemake(tiny_run, "-n", "audit_all").stdout)
        assert counts == {"account": 1, "audit": 2, "plot_audit": 1, "audit_all": 1}  # eps8's ledger is reused
        snakemake(tiny_run, "audit_all")
    finally:
        (tiny_run / "config.yaml").write_text(before)
    audits = tiny_run / "results" / "audit" / "demo-roberta" / "demo-sst2" / "dp-zoso"
    private = json.loads((audits / "eps8" / "audit.json").read_text())
    silent = json.loads((audits / "epsinf" / "audit.json").read_text())
    ledger = json.loads((tiny_run / "results/runs/demo-roberta/demo-sst2/dp-zoso/eps8/seed13/privacy.json").read_text())
    assert private["sigma"] == ledger["sigma"] and private["mechanism"]["releases"] == ledger["compositions"] == 12
    assert 0.0 <= private["epsilon_lower_bound"] <= 8.0 and private["lower_bound_within_claim"]
    assert silent["sigma"] == 0.0 and silent["epsilon_lower_bound"] > 1.0  # the attack has power
    assert (tiny_run / "results" / "audit" / "audit.png").stat().st_size > 10_000


def report_results(html: str) -> dict:
    """The results the Snakemake HTML report embeds: path -> {name, caption, mime_type, data_uri, ...}."""
    start = html.index('<script id="results">') + len('<script id="results">')
    body = html[start : html.index("</script>", start)].strip()
    assert body.startswith("var results = ")
    return json.loads(body.removeprefix("var results = ").rstrip().rstrip(";"))


@pytest.mark.slow
def test_report_contains_every_figure_and_table(tiny_run):
    """After the runs above (every method, so the ablation figure has DP-ZOPO cells): the HTML report
    embeds every figure and table byte for byte with its caption, and the accuracy table equals the
    cells' metrics aggregated here."""
    snakemake(tiny_run)  # bring the aggregates up to date (the rerun test left them stale)
    snakemake(tiny_run, "--report", "results/report.html")
    results = report_results((tiny_run / "results" / "report.html").read_text(encoding="utf-8"))
    expected = [f"results/figures/{n}.png" for n in FIGURES] + [f"results/tables/{n}.html" for n in TABLES]
    for path in expected:
        assert path in results, path
        entry = results[path]
        assert len(entry["caption"]) > 200, path  # says what it shows and how it was made
        payload = entry["data_uri"].split("base64,", 1)[1]
        assert base64.b64decode(payload) == (tiny_run / path).read_bytes(), path
    assert results["results/figures/accuracy-bars.png"]["mime_type"] == "image/png"
    assert results["results/tables/privacy.html"]["mime_type"] == "text/html"

    # the eps-8 table against the metrics files, aggregated here with the standard library
    groups: dict[tuple, list[float]] = {}
    for f in (tiny_run / "results" / "runs").glob("*/*/*/*/*/metrics.json"):
        m = json.loads(f.read_text())
        groups.setdefault((m["model"], m["task"], m["method"], m["eps"]), []).append(100 * m["accuracy"])
    table = pd.read_csv(tiny_run / "results" / "tables" / "accuracy-eps8.csv", dtype={"eps": str})
    want = {k for k in groups if k[3] in ("8", "inf")}
    assert {(r.model, r.task, r.method, r.eps) for r in table.itertuples()} == want
    for r in table.itertuples():
        values = groups[(r.model, r.task, r.method, r.eps)]
        assert r.accuracy_mean == pytest.approx(statistics.fmean(values), abs=1e-9)
        assert r.seeds == len(values)
    # demo-sst2 stands in for SST-2 on RoBERTa-large: DP-ZOSO at eps 8 is 93.2 in the paper's figure
    zoso = table[table.method == "dp-zoso"].iloc[0]
    assert (zoso.reference_task, zoso.published) == ("SST-2", 93.2)
    assert zoso.difference == pytest.approx(
        statistics.fmean(groups[("demo-roberta", "demo-sst2", "dp-zoso", "8")]) - 93.2
    )
    # the privacy table is the ledger of every private cell
    privacy = pd.read_csv(tiny_run / "results" / "tables" / "privacy.csv", dtype={"eps": str})
    for r in privacy.itertuples():
        ledger = json.loads(
            (
                tiny_run / "results" / "runs" / r.model / r.task / r.method / f"eps{r.eps}" / "seed13" / "privacy.json"
            ).read_text()
        )
        if ledger.get("sigma") is None:  # the Laplace variant: pure eps-DP, no Gaussian sigma
            assert math.isnan(r.sigma) and r.epsilon_pure == pytest.approx(ledger["epsilon_achieved"]["pure"])
        else:
            assert r.sigma == pytest.approx(ledger["sigma"]) and r.epsilon_pld == pytest.approx(
                ledger["epsilon_achieved"]["pld"]
            )
        assert r.q == pytest.approx(ledger["q"]) and r.ledger_steps == ledger["steps"]
    assert len(privacy) == sum(1 for k in groups if k[3] != "inf")
