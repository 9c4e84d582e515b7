"""Aggregation of cell metrics into tables and figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from .fileio import atomic_path

GROUP = ["model", "task", "method", "eps"]


def load_cells(metrics_files: Iterable[str | Path]) -> pd.DataFrame:
    """One row per cell, from the cells' metrics.json and privacy.json (next to it)."""
    rows = []
    for path in metrics_files:
        path = Path(path)
        metrics = json.loads(path.read_text())
        ledger_path = path.with_name("privacy.json")
        ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
        rows.append(
            {
                "model": metrics["model"],
                "task": metrics["task"],
                "method": metrics["method"],
                "eps": str(metrics["eps"]),  # the path component, e.g. "2" (not 2.0)
                "seed": metrics["seed"],
                # the task's metric: accuracy, or F1 for the generation tasks (column "metric")
                "accuracy": 100.0 * metrics.get("score", metrics["accuracy"]),
                "metric": metrics.get("metric", "accuracy"),
                "sigma": ledger.get("sigma", 0.0),
                "delta": ledger.get("delta"),
                "steps": metrics["steps"],
                "ms_per_step": metrics.get("ms_per_step"),
                "train_seconds": metrics.get("train_seconds"),
            }
        )
    return pd.DataFrame(rows)


def eps_sort_key(eps: pd.Series) -> pd.Series:
    return eps.map(lambda e: float("inf") if e == "inf" else float(e))


def summarize(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of accuracy over seeds per (model, task, method, eps)."""
    grouped = cells.groupby(GROUP, sort=False)
    out = grouped.agg(
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        seeds=("seed", "count"),
        metric=("metric", "first"),
        sigma=("sigma", "mean"),
        steps=("steps", "first"),
        ms_per_step=("ms_per_step", "mean"),
    ).reset_index()
    out["accuracy_std"] = out["accuracy_std"].fillna(0.0)
    out["accuracy"] = out.apply(lambda r: f"{r.accuracy_mean:.1f} ± {r.accuracy_std:.1f}", axis=1)
    out = out.assign(_eps=eps_sort_key(out["eps"])).sort_values(["model", "task", "method", "_eps"]).drop(columns="_eps")
    return out.reset_index(drop=True)


def write_summary(metrics_files: Iterable[str | Path], out_csv: str | Path) -> pd.DataFrame:
    summary = summarize(load_cells(metrics_files))
    with atomic_path(Path(out_csv)) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.4f")
    return summary


def plot_accuracy(summary_csv: str | Path, out_png: str | Path) -> None:
    """Accuracy vs epsilon per (task, model), private methods as lines, references as horizontals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    summary = pd.read_csv(summary_csv, dtype={"eps": str})
    private = summary[summary["eps"] != "inf"].copy()
    private["epsilon"] = private["eps"].astype(float)
    panels = summary[["task", "model"]].drop_duplicates().values.tolist()
    sns.set_theme(style="whitegrid", palette="colorblind")
    ncols = min(len(panels), 2)
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.0 * nrows), squeeze=False)
    palette = sns.color_palette("colorblind")
    for ax, (task, model) in zip(axes.flat, panels):
        sub = private[(private.task == task) & (private.model == model)]
        for i, (method, g) in enumerate(sub.groupby("method")):
            g = g.sort_values("epsilon")
            ax.errorbar(g["epsilon"], g["accuracy_mean"], yerr=g["accuracy_std"], marker="o", capsize=3, label=method, color=palette[i])
        refs = summary[(summary.task == task) & (summary.model == model) & (summary.eps == "inf")]
        for j, row in enumerate(refs.itertuples()):
            ax.axhline(row.accuracy_mean, linestyle="--", color=palette[(3 + j) % len(palette)], label=f"{row.method} (non-private)" if row.method != "zero-shot" else "zero-shot")
        ax.set_xscale("log")
        eps_values = sorted(private["epsilon"].unique())
        ax.set_xticks(eps_values, [f"{e:g}" for e in eps_values])
        ax.minorticks_off()
        ax.set_xlabel("privacy budget ε (log scale; δ fixed)")
        panel_metrics = set(summary.loc[(summary.task == task) & (summary.model == model), "metric"])
        ax.set_ylabel(f"test {'F1' if 'f1' in panel_metrics else 'accuracy'} (%)")
        ax.set_title(f"{task} — {model}")
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
