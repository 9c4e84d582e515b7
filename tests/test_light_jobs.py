"""The seconds-long jobs never import torch or transformers.

A job of the default run is a fresh Python process: importing torch costs it seconds (more than
the work of most rules), so only the model jobs (demo pretraining, training, masks, the SynFlow
agreement, the audit) may load it.  Each other rule's real script runs here in a fresh process,
as Snakemake runs it (the unpickled ``snakemake`` object, the preamble's imports), on small
inputs made for it; the process reports every torch or transformers module it loaded and the
stack that imported the first one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_report import GRID, METHOD_PARAMS, MODELS, write_cell, write_diagnostics

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
HEAVY = ("torch", "transformers")
#: the model jobs: they load a model (or, the audit, run the trainer's release on torch tensors)
MODEL_RULES = {"demo_model", "train", "mask", "synflow_agreement", "audit"}

# Runs a rule's script in this fresh process: what Snakemake's preamble does, then the script.
RUNNER = r"""
import json, pickle, runpy, sys, traceback

HEAVY = %r
first = {}


class Watch:
    "Records the stack of the first heavy import (the import itself goes ahead)."

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY and not first:
            first[name] = "".join(traceback.format_stack()[-14:-1])
        return None


sys.meta_path.insert(0, Watch())
with open(sys.argv[2], "rb") as fh:
    snakemake = pickle.load(fh)
from snakemake.logging import logger
from snakemake.iocontainers import Snakemake

runpy.run_path(sys.argv[1], init_globals={"snakemake": snakemake}, run_name="__main__")
loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in HEAVY})
print("HEAVY-IMPORTS " + json.dumps({"loaded": loaded, "first": first}))
""" % (HEAVY,)  # noqa: UP031 (the script holds braces)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.pop("DPZO_INSECURE_TEST_NOISE_SEED", None)
    return env


def rule_scripts() -> dict[str, str]:
    """rule name -> its script (workflow/scripts/<name>.py), from the rule files."""
    found = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for name, body in re.findall(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)+)", smk.read_text(), re.M):
            script = re.search(r"^\s+script:\s*\n\s+\"\.\./scripts/(\w+)\.py\"", body, re.M)
            if script:
                found[name] = script.group(1)
    return found


def _named(cls, items: dict):
    """A Snakemake Namedlist as the rule's directive makes it: a list item spans its values."""
    out = cls()
    for name, value in items.items():
        start = len(out)
        if isinstance(value, list):
            out.extend(value)
            out._set_name(name, start, end=len(out))
        else:
            out.append(value)
            out._set_name(name, start)
    return out


def run_rule(workdir: Path, rule: str, *, input=None, output=None, params=None, wildcards=None) -> dict:
    """Run ``rule``'s script in a fresh process in ``workdir``; the heavy modules it loaded."""
    from snakemake.iocontainers import InputFiles, Log, OutputFiles, Params, ResourceList, Snakemake, Wildcards

    output = output or {}
    job = Snakemake(
        _named(InputFiles, input or {}),
        OutputFiles(output) if isinstance(output, list) else _named(OutputFiles, output),
        _named(Params, params or {}),
        _named(Wildcards, wildcards or {}),
        1,
        ResourceList(),
        Log([f"logs/{rule}.log"]),
        {},
        rule,
        None,
        str(ROOT / "workflow" / "scripts"),
    )
    job_file = workdir / f"{rule}.job.pickle"
    job_file.write_bytes(pickle.dumps(job, protocol=4))
    script = ROOT / "workflow" / "scripts" / f"{rule_scripts()[rule]}.py"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(script), str(job_file)],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{rule} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout.rsplit("HEAVY-IMPORTS ", 1)[1])
    for path in output.values() if isinstance(output, dict) else output:
        assert (workdir / path).exists(), (rule, path)
    return report


def tables(prefix: str) -> dict:
    return {kind: f"results/tables/{prefix}.{kind}" for kind in ("csv", "md", "tex", "html")}


FIGURES = {  # rule -> (params.figure, its inputs)
    "figure_accuracy_bars": ("accuracy_bars", ("summary", "accuracy")),
    "figure_memory_time": ("memory_time", ("summary", "memory")),
    "figure_privacy_utility": ("privacy_utility", ("summary", "accuracy")),
    "figure_training_curves": ("training_curves", ("curves", "cells")),
    "figure_ablation": ("ablation", ("summary",)),
    "figure_private_diagnostics": ("private_training_loss", ("diagnostics", "cells")),
    "figure_tuning_cost": ("tuning_cost", ("summary",)),
}


ACCOUNT_PARAMS = {
    "delta": 1.0e-5,
    "accountant": "pld",
    "convention": "common",
    "noise": "secure",
    "calibrations": "results/privacy/calibrations",
}


@pytest.fixture(scope="module")
def light_runs(tmp_path_factory) -> dict[str, dict]:
    """Every seconds-long rule run once, in the order of the DAG: rule -> what it imported."""
    from dpzo.data.tasks import TASKS

    work = tmp_path_factory.mktemp("light")
    seen = {}
    corpus = "results/demo/corpus.txt"
    seen["demo_corpus"] = run_rule(work, "demo_corpus", output={"corpus": corpus}, params={"seed": 0})
    demo = [name for name, spec in TASKS.items() if spec.demo]
    files = [
        f"results/demo/data/original/{TASKS[t].lmbff_dir}/{name}"
        for t in demo
        for name in (TASKS[t].train_file, TASKS[t].test_file)
    ]
    seen["demo_data"] = run_rule(
        work, "demo_data", input={"corpus": corpus}, output=files, params={"tasks": demo, "seed": 1}
    )
    split = "results/data/demo-sst2/k16-seed13"
    seen["fewshot"] = run_rule(
        work,
        "fewshot",
        input={"files": files[:2]},
        output={name: f"{split}/{name}.jsonl" for name in ("train", "dev", "test")},
        params={"data_dir": "results/demo/data", "max_test": 64, "hf_datasets": {"train": 1000}},
        wildcards={"task": "demo-sst2", "k": "16", "seed": "13"},
    )
    cell = {"model": "demo-roberta", "task": "demo-sst2", "method": "dp-zoso", "eps": "8", "seed": "13"}
    seen["account"] = run_rule(
        work,
        "account",
        input={"train": f"{split}/train.jsonl"},
        output={"ledger": "results/runs/demo-roberta/demo-sst2/dp-zoso/eps8/seed13/privacy.json"},
        params={**ACCOUNT_PARAMS, "method_params": {"steps": 6, "batch_size": 8, "lr": 1.0e-4, "clip": 5.0}},
        wildcards=cell,
    )
    # a private selection: its ledger, its secret draw, and the selection over candidate records
    # written as the candidate jobs (train) write them
    tuned = {**cell, "method": "dp-zoso+tuned"}
    tuned_dir = "results/runs/demo-roberta/demo-sst2/dp-zoso+tuned/eps8/seed13"
    tuning_dir = "results/tuning/demo-roberta/demo-sst2/dp-zoso+tuned/eps8/seed13"
    tuned_params = {
        "steps": 6,
        "batch_size": 8,
        "lr": 1.0e-4,
        "clip": 5.0,
        "tune": {"mode": "private", "grid": {"lr": [1.0e-4, 1.0e-3]}, "mean": 2.0},
    }
    tuned_ledger = run_rule(
        work,
        "account",
        input={"train": f"{split}/train.jsonl"},
        output={"ledger": f"{tuned_dir}/privacy.json"},
        params={**ACCOUNT_PARAMS, "method_params": tuned_params},
        wildcards=tuned,
    )
    seen["tune_draw"] = run_rule(
        work,
        "tune_draw",
        input={"ledger": f"{tuned_dir}/privacy.json"},
        output={"draws": f"{tuning_dir}/draws.json"},
        params={"method_params": tuned_params, "history": "results/checkpoints/tuned/drawn"},
        wildcards=tuned,
    )
    draws = json.loads((work / tuning_dir / "draws.json").read_text())
    candidates = []
    for i in range(draws["runs"]):
        record = work / tuning_dir / f"cand{i}" / "metrics.json"
        record.parent.mkdir(parents=True)
        point = draws["grid_points"][draws["points"][i]]
        candidate = {"index": i, "point": point, "score": float(i), "score_sigma": 1.0, "n_validation": 6}
        record.write_text(json.dumps({**tuned, "seed": 13, "score": 0.5, "candidate": candidate}))
        record.with_name("private_diagnostics.json").write_text(json.dumps({"note": "private"}))
        candidates.append(str(record.relative_to(work)))
    seen["tune_select"] = run_rule(
        work,
        "tune_select",
        input={
            "ledger": f"{tuned_dir}/privacy.json",
            "draws": f"{tuning_dir}/draws.json",
            "candidates": candidates,
            "diagnostics": [c.replace("metrics", "private_diagnostics") for c in candidates],
        },
        output={
            "metrics": f"{tuned_dir}/metrics.json",
            "diagnostics": f"{tuned_dir}/private_diagnostics.json",
            "record": f"{tuning_dir}/selection.json",
        },
        wildcards=tuned,
    )
    seen["account"]["loaded"] = sorted({*seen["account"]["loaded"], *tuned_ledger["loaded"]})
    public_params = {
        **tuned_params,
        "tune": {"mode": "public", "grid": {"lr": [1.0e-4, 1.0e-3]}, "public_task": "demo-trec"},
    }
    points = []
    for i, lr in enumerate((1.0e-4, 1.0e-3)):
        record = work / "results/tuning/public" / f"point{i}" / "metrics.json"
        record.parent.mkdir(parents=True)
        candidate = {"index": i, "point": {"lr": lr}, "score": 10.0 + i, "score_sigma": 0.0, "n_validation": 32}
        record.write_text(json.dumps({**tuned, "task": "demo-trec", "seed": 13, "score": 0.5, "candidate": candidate}))
        points.append(str(record.relative_to(work)))
    seen["tune_public_choice"] = run_rule(
        work,
        "tune_public_choice",
        input={"candidates": points},
        output={"choice": "results/tuning/public/choice.json"},
        params={"method_params": public_params},
        wildcards={**tuned, "method": "dp-zoso+public"},
    )
    # the cells of the report tests (metrics and ledgers), written as the train jobs write them
    report_root = work / "report"
    metrics = [
        str(write_cell(report_root, *key, seed, acc).relative_to(work))
        for key, seeds in GRID.items()
        for seed, acc in seeds.items()
    ]
    diagnostics = [str(write_diagnostics(work / m).relative_to(work)) for m in metrics if "/dp-zo" in m]
    t = "results/tables"
    seen["collect"] = run_rule(
        work,
        "collect",
        input={"metrics": metrics, "ledgers": [m.replace("metrics", "privacy") for m in metrics]},
        output={"cells": f"{t}/cells.csv", "curves": f"{t}/curves.csv"},
        params={"models": MODELS, "methods": METHOD_PARAMS, "benchmarks": [f"benchmarks/{m}.tsv" for m in metrics]},
    )
    seen["summarize"] = run_rule(
        work, "summarize", input={"cells": f"{t}/cells.csv"}, output={"summary": f"{t}/summary.csv"}
    )
    reference = {
        "accuracy": str(ROOT / "config/reference/accuracy.csv"),
        "memory": str(ROOT / "config/reference/memory_time.csv"),
    }
    seen["accuracy_table"] = run_rule(
        work,
        "accuracy_table",
        input={"summary": f"{t}/summary.csv", "reference": reference["accuracy"]},
        output=tables("accuracy-eps2"),
        params={"delta": 1.0e-5},
        wildcards={"eps": "2"},
    )
    seen["privacy_table"] = run_rule(work, "privacy_table", input={"cells": f"{t}/cells.csv"}, output=tables("privacy"))
    seen["versions_table"] = run_rule(
        work, "versions_table", input={"cells": f"{t}/cells.csv"}, output=tables("versions")
    )
    seen["private_diagnostics"] = run_rule(
        work,
        "private_diagnostics",
        input={"diagnostics": diagnostics},
        output={"table": "results/private/diagnostics.csv"},
    )
    files = {
        "summary": f"{t}/summary.csv",
        "curves": f"{t}/curves.csv",
        "cells": f"{t}/cells.csv",
        "diagnostics": "results/private/diagnostics.csv",
        **reference,
    }
    for rule, (name, needs) in FIGURES.items():
        inputs = {
            ("reference" if what in reference else "curves" if what == "diagnostics" else what): files[what]
            for what in needs
        }
        seen[rule] = run_rule(
            work,
            rule,
            input=inputs,
            params={"figure": name},
            output={"png": f"results/figures/{name}.png", "pdf": f"results/figures/{name}.pdf"},
        )
    agreement = work / "results/masks/demo-roberta/demo-sst2/synflow-agreement.json"
    agreement.parent.mkdir(parents=True)
    agreement.write_text(
        json.dumps(
            {
                "model": "demo-roberta",
                "task": "demo-sst2",
                "rows": [
                    {"scorer": "synflow-zo", "queries": 16, "spearman": 0.1, "top_overlap@0.05": 0.06},
                    {"scorer": "magnitude", "queries": None, "spearman": 0.3, "top_overlap@0.05": 0.2},
                ],
            }
        )
    )
    seen["synflow_agreement_table"] = run_rule(
        work,
        "synflow_agreement_table",
        input={"agreement": [str(agreement.relative_to(work))]},
        output={"table": f"{t}/synflow_agreement.csv"},
    )
    audits = []
    for eps, bound in (("8", 0.9), ("inf", 3.2)):
        path = work / f"results/audit/demo-roberta/demo-sst2/dp-zoso/eps{eps}/audit.json"
        path.parent.mkdir(parents=True)
        path.write_text(
            json.dumps(
                {
                    "model": "demo-roberta",
                    "task": "demo-sst2",
                    "eps": eps,
                    "method": "dp-zoso",
                    "epsilon_claimed": eps if eps == "inf" else float(eps),
                    "epsilon_lower_bound": bound,
                    "largest_measurable_epsilon": 5.0,
                    "confidence": 0.95,
                    "trials": 400,
                }
            )
        )
        audits.append(str(path.relative_to(work)))
    seen["plot_audit"] = run_rule(
        work, "plot_audit", input={"audits": audits}, output={"figure": "results/audit/audit.png"}
    )
    return seen


def test_every_rule_is_a_model_job_or_runs_here():
    """A new rule must be classified: a model job, or a seconds-long one run by the fixture above."""
    scripts = rule_scripts()
    assert MODEL_RULES <= set(scripts)
    light = {
        "demo_corpus",
        "demo_data",
        "fewshot",
        "account",
        "collect",
        "summarize",
        "accuracy_table",
        "privacy_table",
        "versions_table",
        "private_diagnostics",
        "synflow_agreement_table",
        "plot_audit",
        "tune_draw",
        "tune_select",
        "tune_public_choice",
        *FIGURES,
    }
    assert set(scripts) - MODEL_RULES == light


@pytest.mark.parametrize("rule", sorted(set(rule_scripts()) - MODEL_RULES))
def test_a_seconds_long_job_imports_neither_torch_nor_transformers(light_runs, rule):
    found = light_runs[rule]
    assert not found["loaded"], f"{rule} loaded {found['loaded']}; first imported at:\n" + "".join(
        found["first"].values()
    )


def _imports_of(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_dpzo_and_the_workflow_adapters_are_light():
    """Also the methods and the masks' settings and Mask, which the Snakefile and every layer read."""
    code = (
        "import json, sys; import dpzo, dpzo.pipeline.workflow, dpzo.methods, dpzo.masks.settings; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    assert _imports_of(code) == []


def test_parsing_the_snakefile_imports_neither_torch_nor_transformers(tmp_path):
    """A dry run of the default config: the Snakefile, its rule files and their helpers (every
    Snakemake invocation parses them, a cluster job included)."""
    (tmp_path / "config.yaml").write_text((ROOT / "config" / "config.yaml").read_text())
    args = [
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(tmp_path / "config.yaml"),
        "--cores",
        "1",
        "-n",
        "--quiet",
        "rules",
    ]
    code = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(m for m in sys.modules "
        f"if m.split('.')[0] in {HEAVY!r}))))\n"
        "from snakemake.cli import main\n"
        f"main({args!r})\n"
    )
    assert _imports_of(code) == []
