"""The report's tables: accuracy per ε beside the published values, the privacy of every cell, and
the versions that made the cells.

Each table exists twice: *tidy* (one row per record, full precision; written as CSV, the
machine-readable one) and *rendered* (rounded text in the paper's layout; written as
Markdown, LaTeX and HTML — the last is what the Snakemake report shows inline).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dpzo.fileio import atomic_path
from dpzo.methods import REPORT_ORDER, base_method
from dpzo.pipeline.tuning import OUTSIDE_GUARANTEE
from dpzo.report.collect import VERSION_COLUMNS, is_test_noise
from dpzo.report.reference import KEY

# Presentation order of the methods (the paper's: references first, then the private methods),
# declared with the methods (``dpzo.methods.REPORT_ORDER``).
METHOD_ORDER = REPORT_ORDER
MISSING = "–"


def method_sort_key(method: str) -> tuple[int, str]:
    """Report order of a method: its base method's place in ``METHOD_ORDER`` (unknown last), then the name."""
    base = base_method(method)
    rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method


def order_methods(methods) -> list[str]:
    """The distinct methods in report order (:func:`method_sort_key`)."""
    return sorted(dict.fromkeys(methods), key=method_sort_key)


@dataclass
class Table:
    """A rendered table: text cells, an optional group header per column, a title and notes."""

    title: str
    body: pd.DataFrame  # all cells are strings
    groups: list[str] | None = None  # one label per column ("" where none)
    notes: list[str] = field(default_factory=list)
    text_columns: int = 2  # leading columns of text (left-aligned); the rest are numbers


#: Marks a value computed with the insecure test-only noise seed (it claims no privacy).
TEST_NOISE_MARK = " †"
TEST_NOISE_NOTE = (
    "not private (test noise): trained with DPZO_INSECURE_TEST_NOISE_SEED set, so its noise and "
    "batches are predictable and the cell claims no privacy; a run without it recomputes the cell."
)


SELECTION_MARK = " ‡"
SELECTION_NOTE = (
    "hyperparameters chosen by private selection inside the guarantee (a random number of candidate "
    "runs, the best released; docs/tuning.md): the cell's ε covers the choice. Per cell:"
)
PUBLIC_MARK = " ◊"
OUTSIDE_MARK = " §"
OUTSIDE_NOTE = (
    f"{OUTSIDE_GUARANTEE}: the config says these hyperparameters came from a search on the same data; "
    "the ε covers the final run only, not the choice."
)


def _tuning_mark(row, notes: list[str]) -> str:
    """The mark of a cell whose hyperparameters were chosen privately (with its note: both ε, the
    expected number of runs, each seed's choice) or by a search outside the guarantee."""
    if row.tuned_outside_guarantee:
        return OUTSIDE_MARK
    if row.tune_mode == "public":
        notes.append(
            f"◊ {row.model} {row.method} on {row.task}: hyperparameters chosen on public data ({row.public_task}), "
            f"at no privacy cost; chose {row.selected}"
        )
        return PUBLIC_MARK
    if row.tune_mode != "private":
        return ""
    notes.append(
        f"‡ {row.model} {row.method} on {row.task}: ε {row.epsilon_training_alone:.2f} for the training alone, "
        f"{row.epsilon_selection:.2f} with the selection; E[runs] = {row.expected_runs:g}; chose {row.selected}"
    )
    return SELECTION_MARK


# --------------------------------------------------------------------------------------------
# accuracy per epsilon
# --------------------------------------------------------------------------------------------
def accuracy_table(summary: pd.DataFrame, published: pd.DataFrame, eps: str) -> pd.DataFrame:
    """Tidy: every (model, task, method) at ``eps`` and the non-private ones, with the published value.

    ``published`` is ``reference.preferred(...)``: one row per (reference model, reference
    task, method, eps).  ``difference`` is ours minus published, in accuracy points.
    """
    rows = summary[(summary["eps"] == eps) | (summary["eps"] == "inf")].copy()
    pub = published[[*KEY, "value", "error", "error_kind", "source", "published_name", "status", "notes", "metric"]]
    merged = rows.merge(pub, how="left", on=KEY)
    tidy = pd.DataFrame(
        {
            "model": merged["model"],
            "task": merged["task"],
            "method": merged["method"],
            "eps": merged["eps"],
            "accuracy_mean": merged["accuracy_mean"],
            "accuracy_std": merged["accuracy_std"],
            "seeds": merged["seeds"],
            "published": merged["value"],
            "published_error": merged["error"],
            "published_error_kind": merged["error_kind"].fillna(""),
            "difference": merged["accuracy_mean"] - merged["value"],
            "reference_model": merged["reference_model"],
            "reference_task": merged["reference_task"],
            "stand_in": merged["stand_in"].astype(bool),
            "test_noise": merged["test_noise"].astype(bool) if "test_noise" in merged else False,
            "tune_mode": merged["tune_mode"].fillna("") if "tune_mode" in merged else "",
            "tuned_outside_guarantee": (
                merged["tuned_outside_guarantee"].astype(bool) if "tuned_outside_guarantee" in merged else False
            ),
            **{
                column: merged[column] if column in merged else math.nan
                for column in (
                    "epsilon_selection",
                    "epsilon_training_alone",
                    "expected_runs",
                    "selected",
                    "public_task",
                )
            },
            "published_source": merged["source"].fillna(""),
            "published_name": merged["published_name"].fillna(""),
            "published_metric": merged["metric"].fillna(""),
            "published_status": merged["status"].fillna(""),
            "published_notes": merged["notes"].fillna(""),
        }
    )
    tidy["_m"] = tidy["method"].map(method_sort_key)
    tidy = tidy.sort_values(["model", "_m", "task"], kind="stable").drop(columns="_m")
    return tidy.reset_index(drop=True)


def _ours(mean: float, std: float, seeds: int) -> str:
    if pd.isna(mean):
        return MISSING
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def _signed(value: float) -> str:
    """A difference with its sign; one that rounds to zero is written 0.0 (never -0.0)."""
    if pd.isna(value):
        return MISSING
    rounded = round(float(value), 1)
    return "0.0" if rounded == 0 else f"{rounded:+.1f}"


def render_accuracy(tidy: pd.DataFrame, eps: str, delta: str | None = None) -> Table:
    """Rows (model, method), three columns per task: ours, published, difference."""
    notes: list[str] = []
    tuning_notes: list[str] = []

    def note_marker(row) -> str:
        text = f"{row.published_source} ({row.published_name})"
        if row.published_status == "suspect":
            text += ", marked suspect"
        if row.published_notes:
            text += f": {row.published_notes}"
        if text not in notes:
            notes.append(text)
        return f" [{notes.index(text) + 1}]"

    tasks = list(dict.fromkeys(tidy["task"]))
    task_refs = {t: tidy.loc[tidy.task == t, "reference_task"].iloc[0] for t in tasks}
    keys = list(dict.fromkeys(zip(tidy["model"], tidy["method"], tidy["eps"])))
    records, groups = [], ["", ""]
    for t in tasks:
        ref = f" ↔ {task_refs[t]}" if task_refs[t] and task_refs[t] != t else ""
        groups += [f"{t}{ref}"] * 3
    for model, method, row_eps in keys:
        sub = tidy[(tidy.model == model) & (tidy.method == method) & (tidy.eps == row_eps)]
        ref_model = sub["reference_model"].iloc[0]
        label = model + (f" ↔ {ref_model}" if ref_model and ref_model != model else "")
        record = [label, method if row_eps != "inf" else f"{method} (ε = ∞)"]
        for t in tasks:
            cell = sub[sub.task == t]
            if cell.empty:
                record += [MISSING, MISSING, MISSING]
                continue
            r = cell.iloc[0]
            record.append(
                _ours(r.accuracy_mean, r.accuracy_std, int(r.seeds))
                + (TEST_NOISE_MARK if r.test_noise else "")
                + _tuning_mark(r, tuning_notes)
            )
            if pd.isna(r.published):
                record += [MISSING, MISSING]
            else:
                record.append(f"{r.published:.1f}" + note_marker(r))
                record.append(_signed(r.difference))
        records.append(record)
    columns = ["model", "method"] + [c for _ in tasks for c in ("ours", "published", "Δ")]
    body = pd.DataFrame(records, columns=columns) if records else pd.DataFrame(columns=columns)
    delta_text = f", δ = {delta}" if delta else ""
    title = f"Test accuracy (%) at ε = {eps}{delta_text}: ours (mean ± std over seeds), published, Δ = ours − published"
    general = [
        "Non-private methods (ε = ∞) are repeated in every ε table, as in the paper's figure.",
        "↔ names the published model/task a cell is compared with; demo models and tasks are stand-ins "
        "(generated data, 0.6 M parameters): the comparison shows where the published value sits, "
        "not a number the demo should reach.",
        "Published ε are not always the same guarantee as ours (δ = 1/n and PRV in the DP-ZOPO figure, "
        "replace-one neighbours in DPZero); see config/reference/README.md.",
    ]
    if tidy.empty:
        general.insert(0, "No cell of this run has this ε.")
    if tidy["test_noise"].any():
        general.insert(0, f"{TEST_NOISE_MARK.strip()} {TEST_NOISE_NOTE}")
    if tidy["tuned_outside_guarantee"].any():
        general.append(f"{OUTSIDE_MARK.strip()} {OUTSIDE_NOTE}")
    if any(n.startswith("‡") for n in tuning_notes):
        general.append(f"{SELECTION_MARK.strip()} {SELECTION_NOTE}")
    general += tuning_notes
    return Table(title=title, body=body, groups=groups, notes=general + [f"[{i + 1}] {n}" for i, n in enumerate(notes)])


# --------------------------------------------------------------------------------------------
# privacy of every cell
# --------------------------------------------------------------------------------------------
PRIVACY_KEYS = [
    "model",
    "task",
    "method",
    "eps",
    "epsilon_target",
    "n",
    "q",
    "ledger_steps",
    "directions",
    "compositions",
    "clip",
    "sigma",
    "noise_std_on_sum",
    "delta",
    "mechanism",
    "calibrated_with",
    "accounting",
    "neighbouring",
    "noise",
    "attempts",  # seeds whose result took more runs of the mechanism get their own row
    "accepted",  # ... and so do seeds with an unaccounted run accepted on the record
]


def privacy_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Tidy: one row per private (model, task, method, ε) and ledger; the seeds that share it."""
    private = cells[cells["private"].astype(bool)].copy()
    achieved = sorted(c for c in cells.columns if c.startswith("epsilon_") and c != "epsilon_target")
    keys = [k for k in PRIVACY_KEYS if k in private.columns] + achieved
    columns = keys[:4] + ["seeds"] + keys[4:]
    if private.empty:
        return pd.DataFrame(columns=columns)
    filled = private.copy()
    filled[keys] = filled[keys].astype(object).where(filled[keys].notna(), "")  # NaN keys must group
    out = (
        filled.groupby(keys, sort=False, dropna=False)["seed"]
        .apply(lambda s: ", ".join(str(int(x)) for x in sorted(s)))
        .reset_index()
        .rename(columns={"seed": "seeds"})
    )
    out = out[columns].replace("", math.nan)
    out["_m"] = out["method"].map(method_sort_key)
    out["_e"] = out["eps"].map(float)
    out = out.sort_values(["model", "task", "_m", "_e"], kind="stable").drop(columns=["_m", "_e"])
    return out.reset_index(drop=True)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return MISSING
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def _noise_text(noise) -> str:
    if not isinstance(noise, str) or not noise:
        return MISSING
    return "NOT PRIVATE (test noise)" if is_test_noise(noise) else noise


def render_privacy(tidy: pd.DataFrame) -> Table:
    """The privacy table: one row per private cell group, its ledger (n, q, T, P, C, σ, δ) and the ε it
    achieves under each accountant."""
    achieved = [c for c in tidy.columns if c.startswith("epsilon_") and c != "epsilon_target"]
    records = []
    for r in tidy.itertuples(index=False):
        rd = r._asdict()
        records.append(
            [
                rd["model"],
                rd["task"],
                rd["method"],
                str(rd["eps"]),
                rd["seeds"],
                _fmt(rd.get("attempts"), ".0f"),
                _fmt(rd.get("accepted"), ".0f"),
                _fmt(rd["n"], ".0f"),
                _fmt(rd["q"], ".4g"),
                _fmt(rd["ledger_steps"], ".0f"),
                _fmt(rd["directions"], ".0f"),
                _fmt(rd["clip"], "g"),
                _fmt(rd["sigma"], ".4g"),
                _fmt(rd["delta"], ".0e") if rd["delta"] else "0",
                *[_fmt(rd[c], ".3f") for c in achieved],
                rd["calibrated_with"] or MISSING,
                _noise_text(rd.get("noise")),
            ]
        )
    columns = [
        "model",
        "task",
        "method",
        "target ε",
        "seeds",
        "attempts",
        "accepted",
        "n",
        "q",
        "T",
        "P",
        "C",
        "σ",
        "δ",
        *[f"ε {c.removeprefix('epsilon_').upper()}" for c in achieved],
        "calibrated with",
        "noise",
    ]
    body = pd.DataFrame(records, columns=columns) if records else pd.DataFrame(columns=columns)
    notes = [
        "One row per private cell group (model, task, method, target ε); seeds with the same ledger share a row.",
        "q = B/n is the Poisson sampling rate, T the steps, P the directions per step (T·P releases accounted), "
        "C the clip, σ the noise multiplier (noise std C·σ on each clipped sum).",
        "ε PLD / PRV / RDP: the ε that σ achieves under each accountant at δ, recomputed for this table from the "
        "ledger the trainer verified (the calibrating one meets the target); ε OPACUS-RDP: DPZero's published "
        "accounting; ε PURE: the Laplace variant's pure ε-DP (δ = 0). ε VERIFIED: recomputed by the trainer, before "
        "its first step, from the noise it then added (the ledger is refused when this exceeds the target). No ε "
        "here is read from a file.",
        "attempts: runs of the mechanism started from scratch behind each seed's result (1 normally; continuations "
        "from a snapshot are not counted). The ledger accounts one run: more means earlier runs stopped (killed, or "
        "failed and rerun with changed hyperparameters) and were discarded; see docs/running.md, 'What a retry costs'. accepted: runs the cell's "
        "attempt log refused (a retry after a failure that depended on the data, or a log whose history was lost) "
        "and that were accepted on the record with `dpzo accept-retry` (the reasons are in metrics.json); the "
        "guarantee does not cover them. Seeds with different counts have separate rows.",
    ]
    if "noise" in tidy and tidy["noise"].map(is_test_noise).any():
        notes.insert(0, f"NOT PRIVATE rows: {TEST_NOISE_NOTE}")
    if tidy.empty:
        notes.insert(0, "This run has no private cell.")
    return Table(
        title="Privacy of every private cell: target and achieved ε, δ, σ, q, T", body=body, notes=notes, text_columns=5
    )


# --------------------------------------------------------------------------------------------
# versions that made the cells
# --------------------------------------------------------------------------------------------
VERSION_HEADERS = {
    "dpzo_version": "dpzo",
    "dpzo_commit": "commit",
    "python_version": "Python",
    "torch_version": "torch",
    "transformers_version": "transformers",
    "peft_version": "peft",
    "accelerate_version": "accelerate",
    "snakemake_version": "Snakemake",
    "device_name": "device",
}


def cell_id(row) -> str:
    """A cell as its results folder names it: ``model/task/method/eps<ε>/seed<seed>``."""
    return f"{row.model}/{row.task}/{row.method}/eps{row.eps}/seed{int(row.seed)}"


def versions_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Tidy: one row per distinct combination of the versions that made the cells (``VERSION_COLUMNS``
    of ``cells.csv``), the number of cells it made and which (``cell_ids``, "; "-separated)."""
    columns = [*VERSION_COLUMNS, "cells", "cell_ids"]
    if cells.empty:
        return pd.DataFrame(columns=columns)
    frame = cells.copy()
    for column in VERSION_COLUMNS:  # cells.csv from before the versions were collected: unknown
        values = frame[column] if column in frame.columns else pd.Series("", index=frame.index)
        frame[column] = values.astype(object).where(values.notna(), "").astype(str)
    frame["cell_id"] = [cell_id(r) for r in frame.itertuples(index=False)]
    frame["_m"] = frame["method"].map(method_sort_key)
    frame["_e"] = frame["eps"].map(lambda e: math.inf if str(e) == "inf" else float(e))
    frame = frame.sort_values(["model", "task", "_m", "_e", "seed"], kind="stable")
    out = (
        frame.groupby(list(VERSION_COLUMNS), sort=True)["cell_id"]
        .agg(cells="count", cell_ids=lambda ids: "; ".join(ids))
        .reset_index()
    )
    return out[columns].reset_index(drop=True)


def _commit_text(commit: str, dirty: str) -> str:
    if not commit:
        return MISSING
    return commit[:12] + (" (dirty)" if dirty == "True" else "")


def render_versions(tidy: pd.DataFrame) -> Table:
    """One row per combination of versions: dpzo and its commit, Python, the libraries, the device,
    and the cells it made ("all" when it made every cell of the run)."""
    total = int(tidy["cells"].sum()) if len(tidy) else 0
    records = []
    for r in tidy.itertuples(index=False):
        rd = r._asdict()
        which = "all" if len(tidy) == 1 else rd["cell_ids"].replace("; ", ", ")
        records.append(
            [
                rd["dpzo_version"] or MISSING,
                _commit_text(rd["dpzo_commit"], rd["dpzo_dirty"]),
                *[rd[c] or MISSING for c in VERSION_HEADERS if c not in ("dpzo_version", "dpzo_commit")],
                which,
                str(int(rd["cells"])),
            ]
        )
    columns = [*VERSION_HEADERS.values(), "cells made", "n"]
    body = pd.DataFrame(records, columns=columns) if records else pd.DataFrame(columns=columns)
    notes = [
        "One row per distinct combination of the versions that made the cells (each cell's metrics.json "
        "`versions`, recorded by its train job): dpzo's version and the git commit of its source tree, "
        "Python, the libraries the results depend on and the device's name.",
        "A result that does not reproduce is compared on these first: library upgrades change results.",
    ]
    if (tidy["dpzo_dirty"] == "True").any():
        notes.append(
            "(dirty): tracked files of that checkout differed from the commit, so the commit alone does not "
            "rebuild the code that ran."
        )
    if len(tidy) > 1:
        notes.insert(0, f"The {total} cells of this run were made by {len(tidy)} different combinations of versions.")
    if (body == MISSING).any().any():
        notes.append(
            f"{MISSING}: not recorded (a cell made before versions were recorded, not in a git checkout, "
            "or a library not installed)."
        )
    if tidy.empty:
        notes.insert(0, "This run has no cell.")
    return Table(
        title="Versions that made the cells: dpzo (commit), Python, libraries, device",
        body=body,
        notes=notes,
        text_columns=len(columns) - 1,
    )


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """The table as Markdown: the title in bold, a pipe table (group labels before the headers), the notes."""
    header = list(table.body.columns)
    if table.groups:
        header = [f"{g} {h}".strip() if g else h for g, h in zip(table.groups, header)]
    lines = [
        f"**{table.title}**",
        "",
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in table.body.itertuples(index=False):
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    lines.append("")
    lines += [f"{n}  " for n in table.notes]
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_UNICODE = {
    "±": r"$\pm$",
    "↔": r"$\leftrightarrow$",
    "–": "--",
    "−": "$-$",
    "ε": r"$\varepsilon$",
    "∞": r"$\infty$",
    "Δ": r"$\Delta$",
    "σ": r"$\sigma$",
    "δ": r"$\delta$",
    "·": r"$\cdot$",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped and the report's Unicode symbols in LaTeX."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return "".join(_LATEX_UNICODE.get(ch, ch) for ch in out)


def to_latex(table: Table, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); group headers span their columns."""
    n = len(table.body.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\caption{" + latex_escape(table.title) + "}",
        r"\label{" + label + "}",
        r"\begin{tabular}{" + "l" * min(n, table.text_columns) + "r" * max(n - table.text_columns, 0) + "}",
        r"\toprule",
    ]
    if table.groups and any(table.groups):
        cells, rules, i = [], [], 0
        while i < n:
            g = table.groups[i]
            j = i
            while j + 1 < n and table.groups[j + 1] == g:
                j += 1
            span = j - i + 1
            if g:
                cells.append(r"\multicolumn{" + str(span) + "}{c}{" + latex_escape(g) + "}")
                rules.append(r"\cmidrule(lr){" + f"{i + 1}-{j + 1}" + "}")
            else:
                cells += [""] * span
            i = j + 1
        lines.append(" & ".join(cells) + r" \\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(latex_escape(c) for c in table.body.columns) + r" \\")
    lines.append(r"\midrule")
    for row in table.body.itertuples(index=False):
        lines.append(" & ".join(latex_escape(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\smallskip\footnotesize")
        lines += [latex_escape(note) + r"\\" for note in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """A self-contained page (the Snakemake report shows HTML results inline)."""
    head = ""
    if table.groups and any(table.groups):
        cells, i, n = [], 0, len(table.groups)
        while i < n:
            j = i
            while j + 1 < n and table.groups[j + 1] == table.groups[i]:
                j += 1
            cells.append(f'<th colspan="{j - i + 1}">{html.escape(table.groups[i])}</th>')
            i = j + 1
        head += "<tr>" + "".join(cells) + "</tr>"
    head += "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table.body.columns) + "</tr>"
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in table.body.itertuples(index=False)
    )
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in table.notes)
    style = (
        "body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
        "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee;text-align:center}"
        f"td:nth-child(-n+{table.text_columns}){{text-align:left}}p{{font-size:12px;color:#333;max-width:60em}}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(table.title)}</title>'
        f"<style>{style}</style></head><body><h3>{html.escape(table.title)}</h3>"
        f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>{notes}</body></html>\n"
    )


def write_table(tidy: pd.DataFrame, table: Table, outputs: Mapping[str, str | Path], label: str) -> None:
    """Write the tidy CSV and the Markdown, LaTeX and HTML renderings (each atomically)."""
    texts = {"md": lambda: to_markdown(table), "tex": lambda: to_latex(table, label), "html": lambda: to_html(table)}
    rendered = {kind: texts[kind]() for kind in outputs if kind != "csv"}  # render all before writing any
    with atomic_path(Path(outputs["csv"])) as tmp:
        tidy.to_csv(tmp, index=False)
    for kind, text in rendered.items():
        with atomic_path(Path(outputs[kind])) as tmp:
            tmp.write_text(text, encoding="utf-8")


def delta_text(delta) -> str:
    """The config's delta as the table's note shows it ("1/n" stays as written)."""
    return str(delta) if isinstance(delta, str) else f"{float(delta):g}"


def write_accuracy_table(
    summary_csv: str | Path, reference_csv: str | Path, eps: str, delta, outputs: Mapping[str, str | Path]
) -> pd.DataFrame:
    """Accuracy at one epsilon beside the published values (CSV, Markdown, LaTeX, HTML)."""
    from dpzo.report.collect import read_cells
    from dpzo.report.reference import load_accuracy, preferred

    tidy = accuracy_table(read_cells(summary_csv), preferred(load_accuracy(reference_csv)), eps)
    write_table(tidy, render_accuracy(tidy, eps, delta_text(delta)), outputs, label=f"tab:accuracy-eps{eps}")
    return tidy


def write_versions_table(cells_csv: str | Path, outputs: Mapping[str, str | Path]) -> pd.DataFrame:
    """The versions that made the cells (CSV, Markdown, LaTeX, HTML)."""
    from dpzo.report.collect import read_cells

    tidy = versions_table(read_cells(cells_csv))
    write_table(tidy, render_versions(tidy), outputs, label="tab:versions")
    return tidy


def write_privacy_table(cells_csv: str | Path, outputs: Mapping[str, str | Path]) -> pd.DataFrame:
    """Every private cell's ledger (CSV, Markdown, LaTeX, HTML)."""
    from dpzo.report.collect import read_cells

    tidy = privacy_table(read_cells(cells_csv))
    write_table(tidy, render_privacy(tidy), outputs, label="tab:privacy")
    return tidy
