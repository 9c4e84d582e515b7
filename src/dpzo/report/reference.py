"""Published reference values (``config/reference/*.csv``) and how a cell finds its own.

The report puts the published number beside each of ours.  A cell (model, task, method, ε)
is matched to the reference rows of its *reference model* and *reference task*:

* a real model by the last component of its ``path`` (``facebook/opt-1.3b`` -> ``opt-1.3b``);
  a demo model by the architecture it imitates (``demo: roberta`` -> ``roberta-large``,
  ``demo: opt`` -> ``opt-1.3b``), marked as a stand-in;
* a task by the name it gives itself (``Task.reference_name``): an LM-BFF task by its directory
  (``SST-2``, ``trec`` -> ``TREC``), a MeZO task as DPZero's OPT table names it (``mezo-boolq``
  -> ``BoolQ``); the demo tasks use the SST-2 and TREC specifications, so they are matched to
  those, marked as stand-ins.

Among several published values for one key, ``ok`` rows win over ``suspect`` ones, then the
order of ``SOURCE_ORDER`` (the paper under reproduction first).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from dpzo.data.hf_tasks import MEZO_REFERENCE_NAMES
from dpzo.data.tasks import REFERENCE_NAMES
from dpzo.methods import is_private

ACCURACY_COLUMNS = (
    "source",
    "model",
    "task",
    "method",
    "published_name",
    "eps",
    "metric",
    "value",
    "error",
    "error_kind",
    "status",
    "provenance",
    "notes",
)
MEMORY_COLUMNS = (
    "source",
    "model",
    "task",
    "method",
    "published_name",
    "gpu_memory_mb",
    "seconds",
    "seconds_kind",
    "provenance",
    "notes",
)
SOURCE_ORDER = ("dpzopo-fig-acc", "mezo-zero-shot", "dpzero-table2", "dpzero-table4", "dpaggzo-table1")
STATUSES = ("ok", "suspect")
METRICS = ("accuracy", "f1")

# The paper's RoBERTa-large grid (README figure roberta-acc.png).
PAPER_MODEL = "roberta-large"
PAPER_TASKS = ("SST-2", "SST-5", "SNLI", "MNLI", "TREC")
PAPER_METHODS = ("zero-shot", "dp-sgd", "dp-prefix", "dpzero", "dp-zoso", "dp-zopo")
PAPER_EPSILONS = ("2", "4", "8")

DEMO_MODEL_STAND_INS = {"roberta": "roberta-large", "opt": "opt-1.3b"}
# LM-BFF directory (lower case) -> the task name used in the reference files; a task of this
# version says its own (``Task.reference_name``), a task name it does not know is looked up here
REFERENCE_TASKS = REFERENCE_NAMES

_EPS = re.compile(r"^([1-9][0-9]*(\.[0-9]*[1-9])?|0\.[0-9]*[1-9]|inf)$")  # as the config schema
KEY = ["reference_model", "reference_task", "method", "eps"]


class ReferenceError(ValueError):
    """A reference file that cannot be used as it is."""


def _read(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise ReferenceError(f"reference file {path} not found; it ships with the repository under config/reference/")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ReferenceError(
            f"{path}: missing column(s) {missing}; expected {list(columns)} (see config/reference/README.md)"
        )
    return table


def _numbers(
    table: pd.DataFrame, path: Path, column: str, *, required: bool, low: float = 0.0, high: float = math.inf
) -> pd.Series:
    """Parse one numeric column, naming the row (file line) of the first bad value."""
    out = []
    for i, raw in enumerate(table[column]):
        line = i + 2  # header is line 1
        if raw == "":
            if required:
                raise ReferenceError(f"{path} line {line}: column '{column}' is empty; give a number")
            out.append(math.nan)
            continue
        try:
            value = float(raw)
        except ValueError:
            raise ReferenceError(f"{path} line {line}: column '{column}' must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ReferenceError(f"{path} line {line}: column '{column}' = {value} is outside [{low}, {high}]")
        out.append(value)
    return pd.Series(out, index=table.index, dtype=float)


def _check_method(path: Path, line: int, method: str) -> None:
    """A reference row names a method of this pipeline, or a variant of one (``dp-sgd+lora``).

    A variant row is matched to the cells of the variant of that name: the name says which
    variant (its config block, e.g. ``tuning: lora``) reproduces the published setting."""
    from dpzo.methods import REGISTRY, base_method

    if base_method(method) not in REGISTRY:
        raise ReferenceError(
            f"{path} line {line}: method {method!r} is not a method of this pipeline; use one of "
            f"{', '.join(REGISTRY)} or a variant '<method>+<variant>' named as in the configs"
        )


def load_accuracy(path: str | Path) -> pd.DataFrame:
    """The published accuracies, checked: numeric values in [0, 100], ε as in result paths."""
    path = Path(path)
    table = _read(path, ACCURACY_COLUMNS)
    for i, row in table.iterrows():
        line = i + 2
        if not _EPS.match(row["eps"]):
            raise ReferenceError(
                f"{path} line {line}: eps must be written as in result paths ('2', '0.5', 'inf'), got {row['eps']!r}"
            )
        if row["status"] not in STATUSES:
            raise ReferenceError(f"{path} line {line}: status must be one of {STATUSES}, got {row['status']!r}")
        if row["metric"] not in METRICS:
            raise ReferenceError(f"{path} line {line}: metric must be one of {METRICS}, got {row['metric']!r}")
        if row["source"] not in SOURCE_ORDER:
            raise ReferenceError(f"{path} line {line}: unknown source {row['source']!r}; known: {SOURCE_ORDER}")
        if not row["provenance"].strip():
            raise ReferenceError(f"{path} line {line}: provenance is empty; say where the value comes from")
        _check_method(path, line, row["method"])
    table["value"] = _numbers(table, path, "value", required=True, high=100.0)
    table["error"] = _numbers(table, path, "error", required=False)
    duplicated = table.duplicated(["source", "model", "task", "method", "eps"], keep=False)
    if duplicated.any():
        rows = [i + 2 for i in table.index[duplicated]]
        raise ReferenceError(f"{path}: lines {rows} give the same (source, model, task, method, eps) twice; keep one")
    return table


def load_memory(path: str | Path) -> pd.DataFrame:
    """The published GPU memory and time, checked."""
    path = Path(path)
    table = _read(path, MEMORY_COLUMNS)
    for i, method in enumerate(table["method"]):
        _check_method(path, i + 2, method)
    table["gpu_memory_mb"] = _numbers(table, path, "gpu_memory_mb", required=True)
    table["seconds"] = _numbers(table, path, "seconds", required=True)
    return table


def missing_paper_cells(reference: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(task, method, ε) of the paper grid without a published RoBERTa-large value."""
    have = set(
        zip(
            reference.loc[reference.model == PAPER_MODEL, "task"],
            reference.loc[reference.model == PAPER_MODEL, "method"],
            reference.loc[reference.model == PAPER_MODEL, "eps"],
        )
    )
    missing = []
    for task in PAPER_TASKS:
        for method in PAPER_METHODS:
            for eps in PAPER_EPSILONS if is_private(method) else ("inf",):
                if (task, method, eps) not in have:
                    missing.append((task, method, eps))
    return missing


# the MeZO/DPZero tasks as DPZero's OPT table names them (``HFTask.reference_name``)
MEZO_REFERENCE_TASKS = MEZO_REFERENCE_NAMES


def reference_model(model_cfg: dict) -> tuple[str, bool]:
    """(reference model name, is a demo stand-in) for a model's config block."""
    if "demo" in model_cfg:
        return DEMO_MODEL_STAND_INS.get(str(model_cfg["demo"]), ""), True
    path = str(model_cfg.get("path", "")).rstrip("/")
    return path.rsplit("/", 1)[-1].lower(), False


def reference_task(task: str) -> tuple[str, bool]:
    """(reference task name, is a demo stand-in) for a task of this pipeline."""
    from dpzo.data.tasks import TASKS

    spec = TASKS.get(task)
    if spec is None:  # a task this version does not know: compare by name
        return REFERENCE_TASKS.get(task.lower(), task), False
    return spec.reference_name, spec.demo


def preferred(reference: pd.DataFrame) -> pd.DataFrame:
    """One published value per (reference_model, reference_task, method, eps)."""
    ranked = reference.assign(
        _status=reference["status"].map(STATUSES.index),
        _source=reference["source"].map(SOURCE_ORDER.index),
    ).sort_values(["_status", "_source"], kind="stable")
    best = ranked.drop_duplicates(["model", "task", "method", "eps"], keep="first")
    best = best.drop(columns=["_status", "_source"]).rename(
        columns={"model": "reference_model", "task": "reference_task"}
    )
    return best.reset_index(drop=True)
