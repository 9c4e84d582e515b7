"""Collection of the cells' records into flat tables, and their aggregation over seeds.

``collect`` reads every cell's ``metrics.json`` and ``privacy.json`` (and the job's benchmark
file when there is one) once, and writes two tables that every later table and figure reads:

* ``cells.csv``: one row per (model, task, method, ε, seed): accuracy, time, memory, the
  privacy ledger, the method's mask settings, the published reference the cell maps to and the
  versions that made it (``VERSION_COLUMNS``);
* ``curves.csv``: the test-loss curve of every trained cell, one row per point (the published
  training curve; the training loss on private batches is in ``private_diagnostics.json``),
  each point marked ``test_noise`` when its cell was trained with the insecure test-only seed.

``summarize`` turns ``cells.csv`` into mean ± sample standard deviation over seeds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from dpzo.fileio import atomic_path, read_json_output
from dpzo.masks.settings import MaskSettings
from dpzo.methods import base_method
from dpzo.privacy.ledger import ledger_digest, recomputed_epsilons
from dpzo.privacy.selection_ledger import recomputed_selection_epsilon
from dpzo.report.reference import reference_model, reference_task

log = logging.getLogger(__name__)


class LedgerChanged(ValueError):
    """A cell's privacy.json differs from the ledger its trainer verified."""


GROUP = ["model", "task", "method", "eps"]
MASK_FIELDS = ("strategy", "scorer", "ratio", "selection", "scope", "mode")
#: cells.csv column -> key of metrics.json ``versions`` (``dpzo.provenance.versions``)
VERSION_COLUMNS = {
    "dpzo_version": "dpzo",
    "dpzo_commit": "dpzo_commit",
    "dpzo_dirty": "dpzo_dirty",
    "python_version": "python",
    "torch_version": "torch",
    "transformers_version": "transformers",
    "peft_version": "peft",
    "accelerate_version": "accelerate",
    "snakemake_version": "snakemake",
    "device_name": "device_name",
}


def eps_sort_key(eps: pd.Series) -> pd.Series:
    """ε path strings as numbers, for sorting (``inf`` last)."""
    return eps.map(lambda e: float("inf") if e == "inf" else float(e))


def _number(value) -> float:
    """A ledger number (JSON writes infinity as the string "inf"); NaN if it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


#: what ``memory_mb`` measures when the cell's cost probe ran (``dpzo.pipeline.probe``)
TRACKED_STEP = "tracked peak of one step"
TRACKED_INFERENCE = "tracked peak of inference"


def _memory(metrics: dict) -> tuple[float, str]:
    """Peak memory of the cell and what it measures: the tracked peak of one step (of one
    inference batch for the methods that do not train) where the cell probed it; before the
    probe existed, GPU allocations where there were any, else the process's resident set."""
    cost = metrics.get("cost") or {}
    if "step" in cost:
        return float(cost["step"]["peak_mb"]), TRACKED_STEP
    if "inference" in cost:
        return float(cost["inference"]["peak_mb"]), TRACKED_INFERENCE
    memory = metrics.get("memory") or {}
    if memory.get("gpu_peak_allocated_mb") is not None:
        return float(memory["gpu_peak_allocated_mb"]), "GPU peak allocated"
    if memory.get("cpu_max_rss_mb") is not None:
        return float(memory["cpu_max_rss_mb"]), "CPU peak resident set"
    return math.nan, ""


def _benchmark(path: Path | None) -> dict:
    """Wall time and peak RSS of the job from Snakemake's benchmark file, when it exists."""
    if path is None or not Path(path).exists():
        return {"job_seconds": math.nan, "job_max_rss_mb": math.nan}
    table = pd.read_csv(path, sep="\t")
    return {"job_seconds": _number(table["s"].iloc[-1]), "job_max_rss_mb": _number(table["max_rss"].iloc[-1])}


def _ledger_fields(ledger: dict) -> dict:
    out = {
        "private": bool(ledger.get("private", False)),
        "epsilon_target": _number(ledger.get("epsilon_target", "inf")),
        "delta": _number(ledger.get("delta")),
        "sigma": _number(ledger.get("sigma")) if ledger.get("private") else 0.0,
        "q": _number(ledger.get("q")),
        "n": _number(ledger.get("n")),
        "ledger_steps": _number(ledger.get("steps")),
        "directions": _number(ledger.get("directions")),
        "compositions": _number(ledger.get("compositions")),
        "clip": _number(ledger.get("clip")),
        "noise_std_on_sum": _number(ledger.get("noise_std_on_sum")),
        "mechanism": ledger.get("mechanism", ""),
        "neighbouring": ledger.get("neighbouring", ""),
        "accounting": ledger.get("accounting", ""),
        "calibrated_with": ledger.get("calibrated_with") or "",
    }
    # recomputed here from the ledger's noise and counts, never read from its epsilon_achieved
    # (a claim anyone could edit): every ε the tables publish is computed by the trainer or here
    for name, value in recomputed_epsilons(ledger).items():
        out[f"epsilon_{name}"] = _number(value)
    if ledger.get("private") and "selection" in ledger:  # a private selection: the ε above are its training's
        out["epsilon_selection"] = _number(recomputed_selection_epsilon(ledger))
    return out


def _tuning_fields(metrics: dict, method_params: Mapping | None, ledger_accountant: str) -> dict:
    """How the cell's hyperparameters were chosen (``dpzo.pipeline.tuning``): the mode, whether a
    search outside the guarantee chose them, and for a private selection the chosen point, the
    expected number of runs and the ε of the training alone (by the config's accountant)."""
    from dpzo.pipeline.tuning import TuneSettings

    tune = TuneSettings.from_params(dict(method_params or {}))
    selection = metrics.get("selection") or {}
    return {
        "tune_mode": selection.get("mode") or (tune.mode if tune else ""),
        "tuned_outside_guarantee": bool(tune and tune.mode == "none" and tune.searched_on_private_data),
        "selected": ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in selection.get("selected", {}).items()
        ),
        "expected_runs": _number(selection.get("expected_runs")),
        "grid_points": _number(selection.get("grid_points")),
        "public_task": selection.get("public_task") or "",
        "training_alone_accountant": ledger_accountant if selection else "",
    }


def _mask_fields(method_params: Mapping | None) -> dict:
    """The DP-ZOPO mask settings of the cell's method (empty for other methods)."""
    if not method_params or "mask" not in method_params:
        return {f"mask_{name}": "" for name in MASK_FIELDS}
    settings = MaskSettings.from_config(dict(method_params["mask"]))
    return {f"mask_{name}": getattr(settings, name) for name in MASK_FIELDS}


def cell_row(
    metrics_file: str | Path,
    *,
    models: Mapping[str, dict] | None = None,
    methods: Mapping[str, dict] | None = None,
    benchmark: str | Path | None = None,
) -> dict:
    """One row of ``cells.csv`` from a cell's metrics.json (and the privacy.json next to it)."""
    path = Path(metrics_file)
    metrics = read_json_output(path)
    ledger_path = path.with_name("privacy.json")
    ledger = read_json_output(ledger_path) if ledger_path.exists() else {}
    verified = (metrics.get("privacy") or {}).get("ledger_sha256")
    if verified is not None and ledger_digest(ledger) != verified:
        raise LedgerChanged(
            f"{ledger_path} is not the ledger the trainer of {path} verified (its digest changed after training); "
            f"nothing of this cell is published. Run the cell again: snakemake -f {path}"
        )
    model, task, method = metrics["model"], metrics["task"], metrics["method"]
    ref_model, model_stand_in = reference_model((models or {}).get(model, {"path": model}))
    ref_task, task_stand_in = reference_task(task)
    memory_mb, memory_kind = _memory(metrics)
    memory = metrics.get("memory") or {}
    history = metrics.get("history") or {}
    row = {
        "model": model,
        "task": task,
        "method": method,
        "base_method": base_method(method),
        "eps": str(metrics["eps"]),  # the path component, e.g. "2" (not 2.0)
        "seed": int(metrics["seed"]),
        # The task's metric (accuracy; MCC or F1 for CoLA, MRPC, QQP; F1 for generation), in %.
        "accuracy": 100.0 * float(metrics.get("score", metrics.get("accuracy"))),
        "task_metric": metrics.get("metric", "accuracy"),
        "test_n": metrics.get("test_n"),
        "n_train": metrics.get("n_train"),
        "n_params": metrics.get("n_params"),
        "steps": metrics.get("steps", 0),
        "releases": metrics.get("releases", 0),
        # runs of the mechanism behind this result (starts from scratch) and continuations from a
        # snapshot; NaN for cells written before they were counted
        "attempts": _number(metrics.get("attempts")),
        "resumes": _number(metrics.get("resumes")),
        # unaccounted runs accepted on the record (`dpzo accept-retry`); NaN before they were kept
        "accepted": float(len(metrics["accepted"])) if "accepted" in metrics else math.nan,
        "ms_per_step": _number(metrics.get("ms_per_step")),
        "train_seconds": _number(metrics.get("train_seconds")),
        "wall_seconds": _number(metrics.get("wall_seconds")),
        "memory_mb": memory_mb,
        "memory_kind": memory_kind,
        "inference_peak_mb": _number(((metrics.get("cost") or {}).get("inference") or {}).get("peak_mb")),
        "step_over_inference": _number((metrics.get("cost") or {}).get("step_over_inference")),
        "cpu_max_rss_mb": _number(memory.get("cpu_max_rss_mb")),
        "gpu_peak_allocated_mb": _number(memory.get("gpu_peak_allocated_mb")),
        "device": metrics.get("device", ""),
        "stage_starts": ";".join(str(s) for s in history.get("stage_starts", [])),
        "reference_model": ref_model,
        "reference_task": ref_task,
        "stand_in": model_stand_in or task_stand_in,
        **_benchmark(Path(benchmark) if benchmark else None),
        **_mask_fields((methods or {}).get(method)),
        **_ledger_fields(ledger),
        **_tuning_fields(metrics, (methods or {}).get(method), ledger.get("accountant", "")),
        **_verified_fields(metrics),
        **_version_fields(metrics),
    }
    return row


def _version_fields(metrics: dict) -> dict:
    """The versions that made the cell ("" where unknown; a cell written before they were recorded
    has only its torch version)."""
    recorded = metrics.get("versions") or {"torch": metrics.get("torch")}
    out = {}
    for column, key in VERSION_COLUMNS.items():
        value = recorded.get(key)
        out[column] = "" if value is None else str(value)
    return out


def _verified_fields(metrics: dict) -> dict:
    """What the trainer recomputed from the noise it added, and where that noise came from."""
    privacy = metrics.get("privacy") or {}
    noise = str(privacy.get("noise", ""))
    return {
        "noise": noise,
        "test_noise": is_test_noise(noise),
        "epsilon_verified": _number(privacy.get("epsilon_verified")),
    }


def is_test_noise(noise: str) -> bool:
    """A cell trained with the insecure test-only noise seed: it claims nothing."""
    return str(noise).startswith("insecure")


CURVE_COLUMNS = ["model", "task", "method", "eps", "seed", "step", "stage", "test_loss", "test_noise"]
DIAGNOSTIC_COLUMNS = [
    "model",
    "task",
    "method",
    "eps",
    "seed",
    "step",
    "stage",
    "loss",
    "examples",
    "clipped_fraction",
    "test_noise",
]


def _cell_test_noise(metrics: dict) -> bool:
    """Whether the cell of ``metrics`` was trained with the insecure test-only noise seed."""
    return is_test_noise((metrics.get("privacy") or {}).get("noise", ""))


def _stage_at(history: dict, step: int) -> float:
    """The schedule's stage at ``step`` (1-based count of steps done), from the stage starts."""
    starts = history.get("stage_starts") or []
    return max((s for s, start in enumerate(starts) if start < step), default=math.nan)


def curve_rows(metrics_file: str | Path) -> list[dict]:
    """The test-loss points of one cell (none for zero-shot and ICL): the published curve.

    Each point says whether its cell was trained with the insecure test-only seed (``test_noise``).
    """
    metrics = read_json_output(metrics_file)
    history = metrics.get("history") or {}
    cell = {
        "model": metrics["model"],
        "task": metrics["task"],
        "method": metrics["method"],
        "eps": str(metrics["eps"]),
        "seed": int(metrics["seed"]),
    }
    test_noise = _cell_test_noise(metrics)
    return [
        cell
        | {
            "step": int(step),
            "stage": _stage_at(history, int(step)),
            "test_loss": _number(loss),
            "test_noise": test_noise,
        }
        for step, loss in zip(history.get("test_step", []), history.get("test_loss", []))
    ]


def diagnostic_rows(
    diagnostics_file: str | Path, stage_starts: list[int] | None = None, *, test_noise: bool = False
) -> list[dict]:
    """The private diagnostics of one cell, one row per logged step (not covered by the guarantee);
    ``test_noise``: the cell was trained with the insecure test-only seed (from its metrics.json)."""
    record = read_json_output(diagnostics_file)
    history = {"stage_starts": stage_starts or []}
    cell = {
        "model": record["model"],
        "task": record["task"],
        "method": record["method"],
        "eps": str(record["eps"]),
        "seed": int(record["seed"]),
    }
    steps = record.get("step", [])
    columns = {key: record.get(key) or [math.nan] * len(steps) for key in ("loss", "examples", "clipped_fraction")}
    return [
        cell
        | {
            "step": int(step),
            "stage": _stage_at(history, int(step)),
            **{key: _number(values[i]) for key, values in columns.items()},
            "test_noise": test_noise,
        }
        for i, step in enumerate(steps)
    ]


def write_diagnostics(diagnostics_files: Iterable[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """``results/private/diagnostics.csv`` from every cell's ``private_diagnostics.json``."""
    rows = []
    for path in diagnostics_files:
        metrics_file = Path(path).with_name("metrics.json")
        metrics = read_json_output(metrics_file) if metrics_file.exists() else {}
        history = metrics.get("history") or {}
        rows += diagnostic_rows(path, history.get("stage_starts"), test_noise=_cell_test_noise(metrics))
    table = pd.DataFrame(rows, columns=DIAGNOSTIC_COLUMNS)
    write_csv(table, out_csv)
    log.info("collected %d diagnostic rows", len(table))
    return table


def load_cells(
    metrics_files: Iterable[str | Path],
    *,
    models: Mapping[str, dict] | None = None,
    methods: Mapping[str, dict] | None = None,
    benchmarks: Iterable[str | Path | None] | None = None,
) -> pd.DataFrame:
    """One row per cell (see ``cell_row``)."""
    files = list(metrics_files)
    marks = list(benchmarks) if benchmarks is not None else [None] * len(files)
    if len(marks) != len(files):
        raise ValueError(f"{len(files)} metrics files but {len(marks)} benchmark paths")
    return pd.DataFrame([cell_row(f, models=models, methods=methods, benchmark=b) for f, b in zip(files, marks)])


def load_curves(metrics_files: Iterable[str | Path]) -> pd.DataFrame:
    """The test-loss points of every cell, one row per point (the columns of ``curves.csv``)."""
    rows = [row for f in metrics_files for row in curve_rows(f)]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def summarize(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof 1) over seeds per (model, task, method, eps)."""
    grouped = cells.groupby(GROUP, sort=False)
    out = grouped.agg(
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        seeds=("seed", "count"),
        task_metric=("task_metric", "first"),
        sigma=("sigma", "mean"),
        steps=("steps", "first"),
        ms_per_step=("ms_per_step", "mean"),
        train_seconds=("train_seconds", "mean"),
        wall_seconds=("wall_seconds", "mean"),
        memory_mb=("memory_mb", "mean"),
        memory_kind=("memory_kind", "first"),
        inference_peak_mb=("inference_peak_mb", "mean"),
        step_over_inference=("step_over_inference", "mean"),
        base_method=("base_method", "first"),
        reference_model=("reference_model", "first"),
        reference_task=("reference_task", "first"),
        stand_in=("stand_in", "first"),
        test_noise=("test_noise", "any"),
        tune_mode=("tune_mode", "first"),
        tuned_outside_guarantee=("tuned_outside_guarantee", "any"),
        **{f"mask_{name}": (f"mask_{name}", "first") for name in MASK_FIELDS},
    ).reset_index()
    out = out.merge(_selection_summary(cells), how="left", on=GROUP)
    out["accuracy_std"] = out["accuracy_std"].fillna(0.0)  # one seed: no spread
    out["accuracy"] = out.apply(lambda r: f"{r.accuracy_mean:.1f} ± {r.accuracy_std:.1f}", axis=1)
    out = (
        out.assign(_eps=eps_sort_key(out["eps"])).sort_values(["model", "task", "method", "_eps"]).drop(columns="_eps")
    )
    return out.reset_index(drop=True)


def _selection_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task, method, eps) of a private selection: the ε of the training alone and with
    the selection (mean over seeds), the expected number of runs and each seed's chosen point."""
    columns = [*GROUP, "epsilon_selection", "epsilon_training_alone", "expected_runs", "selected", "public_task"]
    tuned = cells[cells["tune_mode"].isin(["private", "public"])].copy() if "tune_mode" in cells else cells.iloc[0:0]
    if tuned.empty:
        return pd.DataFrame(columns=columns)
    tuned["epsilon_training_alone"] = [
        _number(row.get(f"epsilon_{row['training_alone_accountant']}")) for _, row in tuned.iterrows()
    ]
    tuned["epsilon_selection"] = tuned["epsilon_selection"].map(_number) if "epsilon_selection" in tuned else math.nan
    tuned["selected"] = tuned.apply(lambda r: f"{r.selected} (seed {r.seed})", axis=1)
    return (
        tuned.groupby(GROUP, sort=False)
        .agg(
            epsilon_selection=("epsilon_selection", "mean"),
            epsilon_training_alone=("epsilon_training_alone", "mean"),
            expected_runs=("expected_runs", "first"),
            selected=("selected", "; ".join),
            public_task=("public_task", "first"),
        )
        .reset_index()
    )


def read_cells(path: str | Path) -> pd.DataFrame:
    """``cells.csv`` / ``summary.csv`` with ε kept as the path string and empty text kept empty."""
    text = [f"mask_{name}" for name in MASK_FIELDS if name != "ratio"]
    text += [
        "memory_kind",
        "reference_model",
        "reference_task",
        "stage_starts",
        "calibrated_with",
        "mechanism",
        "accounting",
        "noise",
        "tune_mode",
        "selected",
        "training_alone_accountant",
        "public_task",
        *VERSION_COLUMNS,  # "2.10" is a version, not a number
    ]
    table = pd.read_csv(path, dtype={"eps": str, **{c: str for c in text}})
    for column in text:
        if column in table.columns:  # an all-empty column reads as float NaN
            table[column] = table[column].astype(object).where(table[column].notna(), "").astype(str)
    return table


def write_csv(table: pd.DataFrame, out: str | Path) -> None:
    """Write ``table`` to ``out`` atomically, at full precision."""
    with atomic_path(Path(out)) as tmp:
        table.to_csv(tmp, index=False)  # full precision: rounding is for the rendered tables only


def write_collection(
    metrics_files: Iterable[str | Path],
    out_cells: str | Path,
    out_curves: str | Path,
    *,
    models: Mapping[str, dict] | None = None,
    methods: Mapping[str, dict] | None = None,
    benchmarks: Iterable[str | Path | None] | None = None,
) -> pd.DataFrame:
    """Read every cell once and write ``cells.csv`` and ``curves.csv``; returns the cells table."""
    files = list(metrics_files)
    cells = load_cells(files, models=models, methods=methods, benchmarks=benchmarks)
    curves = load_curves(files)
    write_csv(cells, out_cells)
    write_csv(curves, out_curves)
    log.info("collected %d cells", len(cells))
    return cells


def write_summary(cells_csv: str | Path, out_csv: str | Path) -> pd.DataFrame:
    """Write the summary over seeds (:func:`summarize`) of ``cells.csv`` to ``out_csv``; returns it."""
    summary = summarize(read_cells(cells_csv))
    write_csv(summary, out_csv)
    return summary


def write_agreement_table(agreement_files: Iterable[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """``synflow_agreement.csv``: one row per (model, task, scorer, queries) from the agreement files."""
    import json

    rows = []
    for path in agreement_files:
        result = json.loads(Path(path).read_text())
        rows += [{"model": result["model"], "task": result["task"], **row} for row in result["rows"]]
    table = pd.DataFrame(rows)
    with atomic_path(Path(out_csv)) as tmp:
        table.to_csv(tmp, index=False)
    return table
