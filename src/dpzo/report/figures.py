"""The report's figures, in one style (seaborn "whitegrid", colour-blind-safe colours).

1. ``accuracy_bars``     accuracy per task and method, one panel per (model, ε), published values
                         as markers on the bars (the shape of the paper's ``roberta-acc.png``);
2. ``memory_time``       the tracked peak of a step (and of inference) and time per method, ours
                         and the published ones
                         (the shape of ``memory.png``);
3. ``privacy_utility``   accuracy against ε per (model, task), non-private methods as lines;
4. ``training_curves``   training loss against step, stage boundaries marked;
5. ``ablation``          DP-ZOPO variants (strategy / scorer / ratio / selection) against DP-ZOSO.

Each method keeps one colour in every figure (``method_colours``).  Every figure is written as
PNG and PDF; legends sit outside the axes so that they never cover data.

A figure that draws a cell trained with the insecure test-only noise seed says so: its title
gains :data:`TEST_NOISE_NOTICE` (``noise_notice``) and the legend entry or tick label of each
such method is marked † as in the tables; the saved files carry the title as their metadata.
Each function returns its (closed) figure, for inspection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from dpzo.fileio import atomic_path
from dpzo.methods import base_method, find_method
from dpzo.privacy.secret import TEST_NOISE_NOTICE
from dpzo.report.tables import TEST_NOISE_MARK, order_methods

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ZERO_SHOT_GREY = (0.45, 0.45, 0.45)
SOURCE_TITLES = {"dpzopo-fig-mem": "DP-ZOPO README memory.png", "dpzero-table3": "DPZero Table 3"}
DPI = 150


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    return plt


# Colour-blind palette (seaborn "colorblind") by base method: the paper's methods get the most
# distinct hues; zero-shot is grey in every figure.
_PALETTE_INDEX = {
    "dp-zoso": 0,
    "mezo": 1,
    "dpzero": 2,
    "dp-zopo": 3,
    "dp-sgd": 4,
    "dp-prefix": 5,
    "ft": 6,
    "icl": 8,
    "dp-zo-gauss": 9,
}
_EXTRA_COLOURS = {"zero-shot": ZERO_SHOT_GREY, "dp-zo-laplace": (0.15, 0.15, 0.15)}


def _shade(colour: tuple, t: float) -> tuple:
    """t in (0, 1): up to 0.5 darker than ``colour``, above it lighter (mixed with white); never equal."""
    if t <= 0.5:
        return tuple(c * (0.35 + t) for c in colour)
    return tuple(c + (1.0 - c) * (0.15 + 1.1 * (t - 0.5)) for c in colour)


def method_colours(methods: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per base method; variants (``<method>+<variant>``) are darker shades of it."""
    import seaborn as sns

    palette = sns.color_palette("colorblind", 10)
    colours = {}
    ordered = order_methods(methods)
    for method in ordered:
        base = base_method(method)
        colour = _EXTRA_COLOURS.get(base) or (palette[_PALETTE_INDEX[base]] if base in _PALETTE_INDEX else palette[7])
        variants = [m for m in ordered if base_method(m) == base and m != base]
        if method in variants:  # shades from dark to light around the base colour, one per variant
            colour = _shade(colour, (variants.index(method) + 0.5) / len(variants))
        colours[method] = colour
    return colours


def is_pretrained_reference(method: str) -> bool:
    """A method that evaluates the pretrained model as it is (zero-shot, ``reads_training_data``
    False): every figure draws it as a dotted reference line.  A method this version does not
    know is not one."""
    found = find_method(method)
    return found is not None and not found.reads_training_data


def is_masked(method: str) -> bool:
    """A method that trains on a data-free mask (DP-ZOPO): the pruning ablation draws its variants."""
    found = find_method(method)
    return found is not None and found.masked


def noise_flags(frame: pd.DataFrame) -> pd.Series:
    """The ``test_noise`` column of a table as booleans (all False where it has none)."""
    if "test_noise" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame["test_noise"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))


def noise_notice(*frames: pd.DataFrame) -> str:
    """The line a figure's title gains when any row it draws comes from a test-noise cell ("" if none)."""
    if any(noise_flags(frame).any() for frame in frames):
        return f"{TEST_NOISE_NOTICE}: the results marked{TEST_NOISE_MARK} claim no privacy"
    return ""


def marked_methods(frame: pd.DataFrame) -> set[str]:
    """The methods with a row from a test-noise cell (their legend entries are marked)."""
    return set(frame.loc[noise_flags(frame), "method"]) if len(frame) else set()


def _mark(label: str, marked: bool) -> str:
    return label + TEST_NOISE_MARK if marked else label


def _suptitle(fig, title: str, *frames: pd.DataFrame) -> None:
    """The figure's title, with the test-noise notice when any of ``frames`` holds such a cell."""
    notice = noise_notice(*frames)
    fig.suptitle(title + (f"\n{notice}" if notice else ""), y=1.0)


def _save(fig: Figure, png: str | Path, pdf: str | Path) -> Figure:
    """Write the figure as PNG and PDF (its title as their metadata) and close it; returns it."""
    import matplotlib.pyplot as plt

    title = fig.get_suptitle()
    for path, fmt in ((png, "png"), (pdf, "pdf")):
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", metadata={"Title": title} if title else None)
    plt.close(fig)
    return fig


def _legend_below(fig, handles, labels, ncol: int | None = None) -> None:
    if not handles:
        return
    ncol = ncol or min(len(handles), 4)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False, fontsize=9)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def _panels(plt, cells: pd.DataFrame, width: float, height: float):
    """One axes per (model, task) present, a row per model's tasks where they fit; unused axes hidden."""
    pairs = sorted(set(zip(cells["model"], cells["task"]))) if len(cells) else []
    ncols = max(1, min(3, cells.groupby("model")["task"].nunique().max() if len(cells) else 1))
    nrows = max(1, math.ceil(len(pairs) / ncols))
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(width * ncols, height * nrows))
    flat = list(axes.flat)
    for ax in flat[len(pairs) :]:
        ax.set_visible(False)
    return fig, list(zip(pairs, flat)), flat[0]


def _private_eps(summary: pd.DataFrame) -> list[str]:
    return sorted({e for e in summary["eps"] if e != "inf"}, key=float)


def _ref_label(model: str, ref: str, stand_in: bool) -> str:
    if not ref or ref == model:
        return ""
    return f"published: {ref}" + (" (stand-in)" if stand_in else "")


# --------------------------------------------------------------------------------------------
# 1. accuracy bars per epsilon
# --------------------------------------------------------------------------------------------
def accuracy_bars(summary: pd.DataFrame, published: pd.DataFrame, png: str | Path, pdf: str | Path) -> Figure:
    """Figure 1: test accuracy per task and method, one panel per (model, ε), published values as markers."""
    from dpzo.report.tables import accuracy_table

    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colours = method_colours(summary["method"])
    models = sorted(summary["model"].unique())
    epsilons = _private_eps(summary) or ["inf"]
    n_tasks = summary.groupby("model")["task"].nunique().max() if len(summary) else 1
    width_per_task = max(2.2, 0.45 * len(colours))
    fig, axes = plt.subplots(
        len(models) or 1,
        len(epsilons),
        squeeze=False,
        sharey=True,
        figsize=(max(4.5, width_per_task * n_tasks) * len(epsilons), 3.6 * max(len(models), 1)),
    )
    shown_methods = []
    for r, model in enumerate(models):
        for c, eps in enumerate(epsilons):
            ax = axes[r][c]
            tidy = accuracy_table(summary[summary.model == model], published, eps)
            tasks = sorted(summary.loc[summary.model == model, "task"].unique())
            methods = order_methods(tidy["method"])
            width = 0.8 / max(len(methods), 1)
            for i, method in enumerate(methods):
                rows = tidy[tidy.method == method].set_index("task").reindex(tasks)
                x = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
                ax.bar(
                    x,
                    rows["accuracy_mean"],
                    width * 0.95,
                    yerr=rows["accuracy_std"],
                    color=colours[method],
                    capsize=2,
                    error_kw={"elinewidth": 0.8},
                    zorder=2,
                )
                ax.scatter(
                    x,
                    rows["published"],
                    marker="D",
                    s=22,
                    facecolor="white",
                    edgecolor="black",
                    linewidth=1.0,
                    zorder=3,
                )
                if method not in shown_methods:
                    shown_methods.append(method)
            labels = []
            for t in tasks:
                ref = tidy.loc[tidy.task == t, "reference_task"]
                ref = ref.iloc[0] if len(ref) else ""
                labels.append(t + (f"\n(↔ {ref})" if ref and ref != t else ""))
            ax.set_xticks(range(len(tasks)), labels)
            ax.set_ylim(0, 105)
            eps_text = "ε = ∞ (no private cells)" if eps == "inf" else f"ε = {eps}"
            ref_model = tidy["reference_model"].iloc[0] if len(tidy) else ""
            stand = bool(tidy["stand_in"].any()) if len(tidy) else False
            sub = _ref_label(model, ref_model, stand)
            ax.set_title(f"{model}, {eps_text}" + (f"\n{sub}" if sub else ""), fontsize=10)
            if c == 0:
                ax.set_ylabel("test accuracy (%)")
            ax.set_xlabel("task")
    marked = marked_methods(summary)
    handles = [Patch(color=colours[m], label=_mark(m, m in marked)) for m in order_methods(shown_methods)]
    handles.append(
        Line2D(
            [], [], marker="D", linestyle="", markerfacecolor="white", markeredgecolor="black", label="published value"
        )
    )
    _suptitle(fig, "Test accuracy per task and method (bars: ours, mean ± std over seeds; ◇: published)", summary)
    fig.tight_layout()
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=min(len(handles), 6))
    return _save(fig, png, pdf)


# --------------------------------------------------------------------------------------------
# 2. memory and time per method
# --------------------------------------------------------------------------------------------
def memory_time(summary: pd.DataFrame, reference: pd.DataFrame, png: str | Path, pdf: str | Path) -> Figure:
    """Ours: the tracked peak of one step per method (of inference for the methods that do not
    train), with the inference peak of the same batch marked on each bar, as the paper compares
    a step's memory with inference; and the wall time per cell (load, train, evaluate); means over
    ε, seeds and tasks.  Published: GPU memory and time per method."""
    plt = _pyplot()

    colours = method_colours(list(summary["method"]) + list(reference["method"]))
    panels = [*_our_memory_panels(summary), *_published_memory_panels(reference)]
    most = max((len(p["methods"]) for p in panels), default=1)
    fig, axes = plt.subplots(len(panels), 2, squeeze=False, figsize=(max(11, 1.3 * most), 2.7 * len(panels)))
    rotation = 20 if most <= 6 else 40  # long method lists: steeper labels that do not overlap
    for r, panel in enumerate(panels):
        methods = panel["methods"]
        for c, (values, label) in enumerate(
            ((panel["memory"], panel["memory_label"]), (panel["seconds"], panel["seconds_label"]))
        ):
            ax = axes[r][c]
            bars = ax.bar(range(len(methods)), values, color=[colours[m] for m in methods], zorder=2)
            ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8, padding=2)
            if c == 0 and panel.get("inference") is not None:
                ax.scatter(
                    range(len(methods)),
                    panel["inference"],
                    marker="_",
                    s=400,
                    color="black",
                    zorder=3,
                    label="inference peak, same batch",
                )
                ax.legend(fontsize=7, loc="upper left")
            ax.set_xticks(range(len(methods)), panel["ticks"], rotation=rotation, ha="right", rotation_mode="anchor")
            ax.set_ylabel(label)
            ax.set_ylim(0, max([v for v in values if not math.isnan(v)] or [1]) * 1.18)
            ax.set_title(panel["title"], fontsize=10)
    _suptitle(fig, "Peak memory and time per method (ours above, published below)", summary)
    fig.tight_layout()
    return _save(fig, png, pdf)


def _our_memory_panels(summary: pd.DataFrame) -> list[dict]:
    panels = []
    for model, sub in summary.groupby("model", sort=True):
        if "inference_peak_mb" not in sub:  # a summary written before the cost probe
            sub = sub.assign(inference_peak_mb=math.nan)
        agg = sub.groupby("method").agg(
            memory=("memory_mb", "mean"),
            inference=("inference_peak_mb", "mean"),
            seconds=("wall_seconds", "mean"),
            kind=("memory_kind", "first"),
        )
        agg = agg.loc[order_methods(agg.index)]
        kind = next((k for k in agg["kind"] if k), "peak memory")
        marked = marked_methods(sub)
        panels.append(
            {
                "title": f"ours: {model}",
                "methods": list(agg.index),
                "memory": agg["memory"],
                "memory_label": f"{kind} (MiB)".replace("one step (MiB)", "one step\n(MiB, live tensors)"),
                "inference": None if agg["inference"].isna().all() else agg["inference"],
                "seconds": agg["seconds"],
                "seconds_label": "wall time per cell (s)\nload + train + evaluate",
                "ticks": [_mark(m, m in marked) for m in agg.index],
            }
        )
    return panels


def _published_memory_panels(reference: pd.DataFrame) -> list[dict]:
    panels = []
    for (source, model), sub in reference.groupby(["source", "model"], sort=False):
        sub = sub.set_index("method").loc[order_methods(sub["method"])]
        kind = sub["seconds_kind"].iloc[0]
        task = sub["task"].iloc[0]
        panels.append(
            {
                "title": f"published: {model}{', ' + task if task else ''} ({SOURCE_TITLES.get(source, source)})",
                "methods": list(sub.index),
                "memory": sub["gpu_memory_mb"],
                "memory_label": "GPU memory (MB)",
                "inference": None,
                "seconds": sub["seconds"],
                "seconds_label": "time per step (s)" if kind == "per step" else "time per run (s)",
                "ticks": [
                    m if name.lower() == m else f"{m}\n({name})" for m, name in zip(sub.index, sub["published_name"])
                ],
            }
        )
    return panels


def _short(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


# --------------------------------------------------------------------------------------------
# 3. privacy-utility curves
# --------------------------------------------------------------------------------------------
def privacy_utility(summary: pd.DataFrame, published: pd.DataFrame, png: str | Path, pdf: str | Path) -> Figure:
    """Figure 3: accuracy against ε per (model, task), published curves dotted, non-private methods as lines."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colours = method_colours(summary["method"])
    fig, panels, first = _panels(plt, summary, 5.2, 3.8)
    legend: dict[str, object] = {}
    marked = marked_methods(summary[summary.eps != "inf"]) if len(summary) else set()
    marked_inf = marked_methods(summary[summary.eps == "inf"]) if len(summary) else set()
    if not panels:
        first.set_visible(True)
        _empty(first, "no cells in this run")
    for (model, task), ax in panels:
        cell = summary[(summary.model == model) & (summary.task == task)]
        private = cell[cell.eps != "inf"].assign(epsilon=lambda d: d["eps"].astype(float))
        ref_model, ref_task = cell["reference_model"].iloc[0], cell["reference_task"].iloc[0]
        ticks = set(private["epsilon"])
        plotted_published = False
        for method in order_methods(private["method"]):
            g = private[private.method == method].sort_values("epsilon")
            h = ax.errorbar(
                g["epsilon"],
                g["accuracy_mean"],
                yerr=g["accuracy_std"],
                marker="o",
                capsize=3,
                color=colours[method],
                label=_mark(method, method in marked),
            )
            legend.setdefault(method, h)
            pub = published[
                (published.reference_model == ref_model)
                & (published.reference_task == ref_task)
                & (published.method == method)
                & (published.eps != "inf")
            ]
            if len(pub):
                eps_pub = pub["eps"].astype(float)
                ax.plot(
                    eps_pub,
                    pub["value"],
                    linestyle=":",
                    marker="D",
                    markerfacecolor="white",
                    color=colours[method],
                    linewidth=1,
                )
                ticks |= set(eps_pub)
                plotted_published = True
        for method in order_methods(cell.loc[cell.eps == "inf", "method"]):
            row = cell[(cell.eps == "inf") & (cell.method == method)].iloc[0]
            name = _mark(f"{method} (ε = ∞)", method in marked_inf)
            h = ax.axhline(
                row.accuracy_mean,
                linestyle=":" if is_pretrained_reference(method) else "--",
                color=colours[method],
                linewidth=1.5,
                label=name,
            )
            legend.setdefault(name, h)
        ax.set_xscale("log")
        if ticks:
            ticks = sorted(ticks)
            ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
            ax.set_xlim(min(ticks) / 1.4, max(ticks) * 1.4)
        ax.minorticks_off()
        ax.set_xlabel("privacy budget ε (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ref = f"{ref_model} {ref_task}".strip()
        sub = _ref_label(f"{model} {task}", ref, bool(cell["stand_in"].any()))
        if sub and not plotted_published:
            sub = f"{ref}: nothing published for these methods"
        ax.set_title(f"{model}, {task}" + (f"\n{sub}" if sub else ""), fontsize=10)
    legend["published"] = Line2D(
        [], [], linestyle=":", marker="D", markerfacecolor="white", color="black", label="published (same colour)"
    )
    _suptitle(fig, "Privacy-utility: accuracy against ε (mean ± std over seeds; δ fixed per run)", summary)
    fig.tight_layout()
    _legend_below(fig, list(legend.values()), [h.get_label() for h in legend.values()], ncol=min(len(legend), 4))
    return _save(fig, png, pdf)


# --------------------------------------------------------------------------------------------
# the cost of choosing the hyperparameters
# --------------------------------------------------------------------------------------------
def tuning_cost(summary: pd.DataFrame, png: str | Path, pdf: str | Path) -> Figure:
    """Accuracy of each privately tuned method against the ε of the whole selection (what the cell
    guarantees) and against the ε of its training alone (what a paper that tunes outside the
    guarantee would report), beside the same base method with given hyperparameters."""
    plt = _pyplot()

    tuned = summary[summary["tune_mode"] == "private"] if "tune_mode" in summary else summary.iloc[0:0]
    pairs = tuned[["model", "task"]].drop_duplicates()
    fig, panels, first = _panels(plt, pairs, 5.2, 3.8)
    colours = method_colours(summary["method"])
    legend: dict[str, object] = {}
    if not panels:
        first.set_visible(True)
        _empty(first, "no privately tuned method in this run (methods.<name>.tune: {mode: private})")
    for (model, task), ax in panels:
        cell = summary[(summary.model == model) & (summary.task == task) & (summary.eps != "inf")]
        ticks: set[float] = set()
        for method in order_methods(cell.loc[cell.tune_mode == "private", "method"]):
            g = cell[cell.method == method].sort_values("epsilon_selection")
            colour = colours[method]
            for column, style, what in (
                ("epsilon_selection", "-", "ε with the selection"),
                ("epsilon_training_alone", "--", "ε of the training alone"),
            ):
                label = f"{method}: {what}"
                ticks |= set(g[column].round(2))
                legend[label] = ax.errorbar(
                    g[column],
                    g["accuracy_mean"],
                    yerr=g["accuracy_std"],
                    marker="o",
                    capsize=3,
                    linestyle=style,
                    color=colour,
                    label=label,
                )
            base = base_method(method)
            given = cell[(cell.method == base) & (cell.tune_mode != "private")]
            if len(given):
                given = given.assign(epsilon=given["eps"].astype(float)).sort_values("epsilon")
                ticks |= set(given["epsilon"])
                label = f"{base}: given hyperparameters"
                legend[label] = ax.errorbar(
                    given["epsilon"],
                    given["accuracy_mean"],
                    yerr=given["accuracy_std"],
                    marker="s",
                    capsize=3,
                    linestyle=":",
                    color="0.35",  # grey: the reference, apart from the tuned method's colour
                    label=label,
                )
        ax.set_xscale("log")
        ax.minorticks_off()
        if ticks:
            ax.set_xticks(sorted(ticks), [f"{e:g}" for e in sorted(ticks)])
        ax.set_xlabel("privacy budget ε (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}, {task}", fontsize=10)
    _suptitle(fig, "The cost of choosing the hyperparameters (mean ± std over seeds)", summary)
    fig.tight_layout()
    if legend:
        _legend_below(fig, list(legend.values()), list(legend), ncol=min(len(legend), 2))
    return _save(fig, png, pdf)


# --------------------------------------------------------------------------------------------
# 4. training curves
# --------------------------------------------------------------------------------------------
def training_curves(curves: pd.DataFrame, cells: pd.DataFrame, png: str | Path, pdf: str | Path) -> Figure:
    """Mean test loss over seeds (band: ± std) per (method, ε); dotted verticals: stage starts.

    The published training curve: a function of the released iterates and of test data."""
    return _curves(
        curves,
        cells,
        png,
        pdf,
        value="test_loss",
        ylabel="test loss (nats)\nmean CE on a fixed test subset",
        title="Test loss against step (mean over seeds, band ± std; covered by the guarantee)",
    )


def private_training_loss(curves: pd.DataFrame, cells: pd.DataFrame, png: str | Path, pdf: str | Path) -> Figure:
    """The training loss on the private batches (``results/private/``): NOT covered by the guarantee."""
    return _curves(
        curves,
        cells,
        png,
        pdf,
        value="loss",
        ylabel="training loss (nats)\nmean CE on the sampled batches",
        title="Training loss on the private batches (NOT covered by the privacy guarantee)",
    )


def _curves(
    curves: pd.DataFrame, cells: pd.DataFrame, png: str | Path, pdf: str | Path, *, value: str, ylabel: str, title: str
) -> Figure:
    """One panel per (model, task): ``value`` against step per (method, ε), stage starts dotted.

    A curve's test noise is read from ``curves`` (its ``test_noise`` column), else from the cells of its method."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colours = method_colours(cells["method"]) if len(cells) else {}
    fig, panels, first = _panels(plt, cells, 5.4, 3.8)
    styles = ["-", "--", "-.", ":"]
    eps_values = sorted(set(curves["eps"]), key=lambda e: math.inf if e == "inf" else float(e)) if len(curves) else []
    eps_style = {e: styles[i % len(styles)] for i, e in enumerate(eps_values)}
    used_methods, any_stage = [], False
    # the cells that drew curves: their own flag, or (tables written before curves had one) their cells'
    drawn = curves if "test_noise" in curves.columns else cells[cells["method"].isin(set(curves["method"]))]
    marked = marked_methods(drawn)
    if not panels:
        first.set_visible(True)
        _empty(first, "no cells in this run")
    for (model, task), ax in panels:
        sub = curves[(curves.model == model) & (curves.task == task)]
        if sub.empty:
            _empty(ax, f"{model}, {task}: no training curves\n(zero-shot / ICL only)")
            continue
        for (method, eps), g in sub.groupby(["method", "eps"], sort=False):
            stats = g.groupby("step")[value].agg(["mean", "std"]).reset_index()
            colour = colours.get(method)
            # few logged points (short runs log at the last step only): markers keep them visible
            marker = "o" if len(stats) <= 5 else None
            ax.plot(
                stats["step"],
                stats["mean"],
                color=colour,
                linestyle=eps_style[eps],
                linewidth=1.4,
                marker=marker,
                markersize=4,
            )
            spread = stats["std"].fillna(0)
            ax.fill_between(
                stats["step"], stats["mean"] - spread, stats["mean"] + spread, color=colour, alpha=0.15, linewidth=0
            )
            if method not in used_methods:
                used_methods.append(method)
        for method in order_methods(sub["method"]):
            starts = cells[(cells.model == model) & (cells.task == task) & (cells.method == method)]["stage_starts"]
            bounds = sorted(
                {int(s) for text in starts for s in str(text).split(";") if s.strip().isdigit() and int(s) > 0}
            )
            for b in bounds:
                ax.axvline(b, color=colours.get(method), linestyle=(0, (1, 2)), linewidth=1.2, alpha=0.9)
                any_stage = True
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model}, {task}", fontsize=10)
    handles = [
        Line2D([], [], color=colours[m], linewidth=2, label=_mark(m, m in marked)) for m in order_methods(used_methods)
    ]
    handles += [
        Line2D([], [], color="black", linestyle=eps_style[e], label=f"ε = {'∞' if e == 'inf' else e}")
        for e in eps_values
    ]
    if any_stage:
        handles.append(Line2D([], [], color="black", linestyle=(0, (1, 2)), label="stage boundary (method's colour)"))
    _suptitle(fig, title, drawn)
    fig.tight_layout()
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=min(max(len(handles), 1), 5))
    return _save(fig, png, pdf)


# --------------------------------------------------------------------------------------------
# 5. pruning ablation
# --------------------------------------------------------------------------------------------
ABLATION_HINT = (
    "No DP-ZOPO cells in this run.\nThe ablation overlay produces them:\n"
    "snakemake --cores 2 --configfile config/config.yaml config/ablation.yaml"
)


def ablation_label(row: Any, marked: bool = False) -> str:
    """The label of one DP-ZOPO variant: its method (marked † when ``marked``: test noise), then
    strategy · scorer · ratio · selection."""
    ratio = float(row.mask_ratio) if str(row.mask_ratio) not in ("", "nan") else math.nan
    ratio_text = f"{100 * ratio:g} %" if not math.isnan(ratio) else "?"
    method = _mark(row.method, marked)
    return f"{method}\n{row.mask_strategy} · {row.mask_scorer} · {ratio_text} · {row.mask_selection}"


def _ablation_panel(ax, summary, zopo, model, task, *, epsilons, eps_colour, dense_methods, is_zero, marked) -> None:
    """One (model, task) panel: each variant's accuracy per ε, the dense method's and zero-shot's as lines."""
    sub = zopo[(zopo.model == model) & (zopo.task == task)].copy()
    sub["label"] = [ablation_label(r, r.method in marked) for r in sub.itertuples()]
    order = (
        sub.sort_values(["mask_strategy", "mask_scorer", "mask_ratio", "mask_selection", "method"])["label"]
        .drop_duplicates()
        .tolist()
    )
    y = {label: i for i, label in enumerate(order)}
    offset = 0.6 / max(len(epsilons), 1)
    here = (summary.model == model) & (summary.task == task)
    for j, eps in enumerate(epsilons):
        g = sub[sub.eps == eps]
        ys = [y[label] + (j - (len(epsilons) - 1) / 2) * offset for label in g["label"]]
        ax.errorbar(g["accuracy_mean"], ys, xerr=g["accuracy_std"], fmt="o", color=eps_colour[eps], capsize=3)
        dense = summary[here & summary.method.isin(dense_methods) & (summary.eps == eps)]
        if len(dense):
            ax.axvline(dense["accuracy_mean"].iloc[0], color=eps_colour[eps], linestyle="--", linewidth=1.2)
    zero = summary[here & is_zero]
    if len(zero):
        ax.axvline(zero["accuracy_mean"].iloc[0], color=ZERO_SHOT_GREY, linestyle=":", linewidth=1.5)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"{model}, {task}", fontsize=10)


def _ablation_legend(epsilons, eps_colour, dense_name: str, marked_dense: set, zero_marked: bool) -> list:
    """The legend's entries: the variants and the dense line per ε, and zero-shot (test noise marked)."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=eps_colour[e], marker="o", linestyle="", label=f"DP-ZOPO variant, ε = {e}")
        for e in epsilons
    ]
    handles += [
        Line2D(
            [],
            [],
            color=eps_colour[e],
            linestyle="--",
            label=_mark(f"{dense_name} (dense), ε = {e}", e in marked_dense),
        )
        for e in epsilons
    ]
    handles.append(Line2D([], [], color=ZERO_SHOT_GREY, linestyle=":", label=_mark("zero-shot", zero_marked)))
    return handles


def ablation(summary: pd.DataFrame, png: str | Path, pdf: str | Path) -> Figure:
    """Accuracy of every DP-ZOPO variant (strategy · scorer · ratio · selection) per ε."""
    import seaborn as sns

    plt = _pyplot()
    masked_rows = summary["base_method"].map(is_masked).astype(bool)
    zopo = summary[masked_rows]
    groups = sorted(set(zip(zopo["model"], zopo["task"])))
    if not groups:
        fig, ax = plt.subplots(figsize=(7, 2.5))
        _empty(ax, ABLATION_HINT)
        fig.suptitle("DP-ZOPO pruning ablation")
        return _save(fig, png, pdf)
    epsilons = _private_eps(zopo)
    palette = (
        sns.color_palette("colorblind", 10) if len(epsilons) <= 10 else sns.color_palette("viridis", len(epsilons))
    )
    eps_colour = dict(zip(epsilons, palette[: len(epsilons)]))
    # the dense method the variants restrict to a mask (DP-ZOSO for DP-ZOPO: Method.dense_counterpart)
    dense_methods = sorted({find_method(b).dense_counterpart for b in zopo["base_method"]} - {None})
    is_zero = summary["method"].map(is_pretrained_reference).astype(bool)
    # every row drawn: the variants, and the dense and zero-shot lines of their (model, task)
    pairs = set(groups)
    in_groups = pd.Series([pair in pairs for pair in zip(summary["model"], summary["task"])], index=summary.index)
    drawn = summary[in_groups & (summary["method"].isin(dense_methods) | is_zero | masked_rows)]
    marked = marked_methods(drawn)
    marked_dense = {e for e in epsilons if marked_methods(drawn[drawn.eps == e]) & set(dense_methods)}
    n_variants = zopo["method"].nunique()
    fig, axes = plt.subplots(
        len(groups), 1, squeeze=False, figsize=(8.5, 0.65 * n_variants * len(groups) + 1.6 * len(groups))
    )
    for ax, (model, task) in zip(axes[:, 0], groups):
        _ablation_panel(
            ax,
            summary,
            zopo,
            model,
            task,
            epsilons=epsilons,
            eps_colour=eps_colour,
            dense_methods=dense_methods,
            is_zero=is_zero,
            marked=marked,
        )
    zero_marked = any(is_pretrained_reference(m) for m in marked)
    handles = _ablation_legend(epsilons, eps_colour, " / ".join(dense_methods), marked_dense, zero_marked)
    _suptitle(fig, "DP-ZOPO pruning ablation: strategy · scorer · trainable fraction · selection", drawn)
    fig.tight_layout()
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=2)
    return _save(fig, png, pdf)


#: Every figure a rule can ask for (``params.figure``): the function and the inputs it reads, in
#: argument order (``workflow.figure`` reads them).
FIGURES = {
    "accuracy_bars": (accuracy_bars, ("summary", "accuracy")),
    "privacy_utility": (privacy_utility, ("summary", "accuracy")),
    "memory_time": (memory_time, ("summary", "memory")),
    "training_curves": (training_curves, ("curves", "cells")),
    "private_training_loss": (private_training_loss, ("curves", "cells")),
    "ablation": (ablation, ("summary",)),
    "tuning_cost": (tuning_cost, ("summary",)),
}


def draw_figure(name: str, inputs: Mapping[str, str | Path], png: str | Path, pdf: str | Path) -> None:
    """Draw figure ``name`` of :data:`FIGURES` from the files it needs (``inputs``: ``summary``,
    ``reference``, ``curves``, ``cells``, as the figure's rule names them)."""
    from dpzo.report.collect import read_cells
    from dpzo.report.reference import load_accuracy, load_memory, preferred

    read = {
        "summary": lambda: read_cells(inputs["summary"]),
        "accuracy": lambda: preferred(load_accuracy(inputs["reference"])),
        "memory": lambda: load_memory(inputs["reference"]),
        "curves": lambda: read_cells(inputs["curves"]),
        "cells": lambda: read_cells(inputs["cells"]),
    }
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    draw, needs = FIGURES[name]
    draw(*(read[what]() for what in needs), png, pdf)
