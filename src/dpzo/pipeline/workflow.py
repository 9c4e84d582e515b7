"""Adapters from Snakemake jobs to the package: the only module that knows the ``snakemake`` object.

Each ``workflow/scripts/*.py`` shim calls one function here with its ``snakemake`` object.  An
adapter only reads ``snakemake.*`` and calls one package function, which holds the logic and
writes the outputs (atomically).  Logging goes to the job's log file.

The seconds-long jobs (demo corpus and tasks, k-shot splits, ledgers, tables and figures) never
import torch or transformers: an adapter imports its package module lazily, and only the model
jobs' modules (demo pretraining, training, masks, the audit) load torch.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class _Tee:
    """A text stream that writes to the job's log file as well as to the stream it replaces."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        self._log.flush()
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the original stream's
        return getattr(self._stream, name)


def run_job(adapter: Callable[[Any], None], snakemake) -> None:
    """Run one rule's adapter so that its log file holds everything the job says.

    What it prints and warns goes to the log as well as to the console, and a failure's
    traceback is written into the log before it propagates (Snakemake's error message points at
    the log file; on a cluster that is the file a user opens).  Called by every
    ``workflow/scripts/*.py`` shim.
    """
    log_file = snakemake.log[0] if len(snakemake.log) else None
    if log_file is None:
        adapter(snakemake)
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    streams = sys.stdout, sys.stderr
    with open(log_file, "a", encoding="utf-8") as copy:
        sys.stdout, sys.stderr = _Tee(streams[0], copy), _Tee(streams[1], copy)
        try:
            adapter(snakemake)
        except BaseException:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            copy.write(f"{stamp} the job failed:\n{traceback.format_exc()}")
            raise
        finally:
            sys.stdout, sys.stderr = streams


def _setup(snakemake) -> None:
    """Logging and warnings of the job into its log file; threads as the rule asks.

    Imports nothing heavy: torch reads ``OMP_NUM_THREADS`` when a model job loads it later, and
    when the job's package module has loaded it already its thread pool is set here too.
    """
    log_file = snakemake.log[0] if len(snakemake.log) else None
    logging.basicConfig(
        filename=log_file,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        force=True,
    )
    logging.captureWarnings(True)  # warnings are part of what the job says: into its log
    threads = max(int(getattr(snakemake, "threads", 1)), 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch = sys.modules.get("torch")
    if torch is not None:  # never imported here: a seconds-long job must not pay for it
        torch.set_num_threads(threads)


def demo_corpus(snakemake) -> None:
    """The demo's pretraining corpus (generated English-like text, seeded)."""
    from dpzo.demo.corpus import write_pretraining_corpus

    _setup(snakemake)
    write_pretraining_corpus(Path(snakemake.output.corpus), seed=int(snakemake.params.seed))


def demo_data(snakemake) -> None:
    """The demo tasks, written in the on-disk layout the real loaders read (LM-BFF's)."""
    from dpzo.demo.tasks import write_demo_tasks

    _setup(snakemake)
    write_demo_tasks(
        snakemake.params.tasks, list(snakemake.output), Path(snakemake.input.corpus), seed=int(snakemake.params.seed)
    )


def demo_model(snakemake) -> None:
    """Pretrain one demo model on the corpus and save it with ``save_pretrained``."""
    from dpzo.demo.pretrain import build_demo_model

    _setup(snakemake)
    build_demo_model(
        snakemake.params.arch,
        Path(snakemake.input.corpus),
        Path(snakemake.output.model_dir),
        seed=int(snakemake.params.seed),
        steps=snakemake.params.steps,
    )


def fewshot(snakemake) -> None:
    """The train/dev/test splits of a cell's data seed (``dpzo.data.tasks.make_cell_splits``)."""
    from dpzo.data.tasks import make_cell_splits

    _setup(snakemake)
    make_cell_splits(
        snakemake.wildcards.task,
        Path(snakemake.output.train).parent,
        seed=int(snakemake.wildcards.seed),
        k=int(snakemake.wildcards.k),
        data_dir=snakemake.params.data_dir,
        max_test=int(snakemake.params.max_test),
        hf_datasets=snakemake.params.hf_datasets,
    )


def _cell(snakemake):
    from dpzo.privacy.ledger import Cell

    wc = snakemake.wildcards
    return Cell(model=wc.model, task=wc.task, method=wc.method, eps=wc.eps, seed=int(wc.seed))


def account(snakemake) -> None:
    """Write the cell's privacy ledger (calibrated noise) before any training can start."""

    from dpzo.pipeline.tuning import chosen_params, privately_tuned, public_point, write_selection_ledger
    from dpzo.privacy.ledger import AccountingSettings, write_cell_ledger

    _setup(snakemake)
    p = snakemake.params
    settings = AccountingSettings(delta=p.delta, accountant=p.accountant, convention=p.convention, noise=p.noise)
    cell, params, role = _cell(snakemake), p.method_params, _role(snakemake)
    if role == "public-cell":  # tune: public: the point chosen on the public task is what trains
        params, _ = chosen_params(cell, params, snakemake.input.public_choice)
    elif role == "public-point":  # a grid point's run on the public task
        cell, candidate = public_point(cell, params, int(p.public_point))
        params = candidate.method_params(params)
    # the selection's ledger (every candidate and the release of the best); at ε = inf (the
    # audit's noiseless run) there is no claim to calibrate, so the plain ledger
    selection = privately_tuned(params) and cell.epsilon < float("inf")
    (write_selection_ledger if selection else write_cell_ledger)(
        cell,
        params,
        train_file=snakemake.input.train,
        # the noise source the trainer must use, as the run that planned this cell saw it
        settings=settings,
        path=snakemake.output.ledger,
        cache_dir=p.calibrations,
    )


def _role(snakemake) -> str:
    """What a job of the train or account rule is, from its rule (tuning.smk reuses both) and, for
    a cell, its method's tune block: ``cell``, ``public-cell`` (trains the point chosen on a public
    task), ``candidate`` (a run of a private selection) or ``public-point`` (a grid point's run on
    the public task)."""
    from dpzo.pipeline.tuning import publicly_tuned

    roles = {
        "tune_candidate": "candidate",
        "tune_public_candidate": "public-point",
        "tune_public_account": "public-point",
    }
    if snakemake.rule in roles:
        return roles[snakemake.rule]
    return "public-cell" if publicly_tuned(snakemake.params.method_params) else "cell"


def _cell_run(snakemake, method_params: dict, candidate=None, *, cell=None, selection=None):
    """The ``CellRun`` of a train job (or of a candidate run of a selection: ``cell`` is then the
    run's own when it trains on public data)."""
    from dpzo.pipeline.cell import CellRun, checkpoint_policy, curve_settings
    from dpzo.privacy.ledger import AccountingSettings, cell_noise

    p = snakemake.params
    cell = cell or _cell(snakemake)
    return CellRun(
        cell,
        model_path=str(p.model_path),
        split_dir=str(Path(snakemake.input.train).parent),
        method_params=dict(method_params),
        ledger_path=str(snakemake.input.ledger),
        # this process's own noise source: the ledger must have been made for it
        accounting=AccountingSettings(
            delta=p.delta, accountant=p.accountant, convention=p.convention, noise=cell_noise(cell.method)
        ),
        family=p.model_cfg.get("family", "auto"),
        dtype=p.model_cfg.get("dtype", "float32"),
        eval_batch_size=int(p.eval_batch_size),
        device=p.device,
        placement=p.model_cfg.get("placement"),
        max_memory=p.model_cfg.get("max_memory"),
        master=p.model_cfg.get("master", "float32"),
        offload=p.model_cfg.get("offload", "none"),
        mask_files=tuple(snakemake.input.masks),
        # read from the config, not from rule params: they never change a result
        checkpoint=checkpoint_policy(p.checkpoint, snakemake.config.get("checkpoint")),
        curve=curve_settings(snakemake.config.get("curves")),
        allow_new_head=bool(p.model_cfg.get("allow_new_head", False)),
        tf32=bool(p.tf32),
        candidate=candidate,
        selection=selection,
    )


def train(snakemake) -> None:
    """A job of the train rule, by its role (:func:`_role`): a cell
    (``dpzo.pipeline.cell.train_cell``: its lock, its attempts, its outputs), a candidate run of a
    private selection, or a publicly tuned method's jobs (``dpzo.pipeline.tuning``)."""
    from dpzo.pipeline.cell import train_cell

    role = _role(snakemake)
    if role != "cell":
        {"candidate": tune_candidate, "public-cell": train_public_cell, "public-point": train_public_point}[role](
            snakemake
        )
        return
    _setup(snakemake)
    train_cell(
        _cell_run(snakemake, snakemake.params.method_params),
        metrics_path=snakemake.output.metrics,
        diagnostics_path=snakemake.output.diagnostics,
        ranks=int(snakemake.params.model_cfg.get("ranks", 1)),
    )


def tune_draw(snakemake) -> None:
    """A private selection's number of candidate runs and their grid points, from the secret generator."""
    from dpzo.pipeline.tuning import write_draws

    _setup(snakemake)
    write_draws(
        _cell(snakemake),
        snakemake.params.method_params,
        ledger=snakemake.input.ledger,
        path=snakemake.output.draws,
        history=snakemake.params.history,
    )


def tune_candidate(snakemake) -> None:
    """One candidate run of a private selection: its grid point trained and scored (``dpzo.pipeline.tuning``)."""
    from dpzo.pipeline.cell import train_cell
    from dpzo.pipeline.tuning import candidate_of

    _setup(snakemake)
    params = snakemake.params.method_params
    candidate = candidate_of(_cell(snakemake), params, draws=snakemake.input.draws, index=int(snakemake.wildcards.cand))
    train_cell(
        _cell_run(snakemake, candidate.method_params(params), candidate),
        metrics_path=snakemake.output.metrics,
        diagnostics_path=snakemake.output.diagnostics,
    )


def train_public_cell(snakemake) -> None:
    """A publicly tuned cell, trained with the point chosen on the public task (published with it)."""
    from dpzo.pipeline.cell import train_cell
    from dpzo.pipeline.tuning import chosen_params

    _setup(snakemake)
    chosen, published = chosen_params(_cell(snakemake), snakemake.params.method_params, snakemake.input.public_choice)
    train_cell(
        _cell_run(snakemake, chosen, selection=published),
        metrics_path=snakemake.output.metrics,
        diagnostics_path=snakemake.output.diagnostics,
    )


def train_public_point(snakemake) -> None:
    """A grid point's run on the public task of a publicly tuned method, scored on its dev set."""
    from dpzo.pipeline.cell import train_cell
    from dpzo.pipeline.tuning import public_point

    _setup(snakemake)
    params = snakemake.params.method_params
    cell, candidate = public_point(_cell(snakemake), params, int(snakemake.params.public_point))
    train_cell(
        _cell_run(snakemake, candidate.method_params(params), candidate, cell=cell),
        metrics_path=snakemake.output.metrics,
        diagnostics_path=snakemake.output.diagnostics,
    )


def tune_public_choice(snakemake) -> None:
    """The grid point whose run on the public task scored best (``dpzo.pipeline.tuning.choose_on_public_data``)."""
    from dpzo.pipeline.tuning import choose_on_public_data

    _setup(snakemake)
    choose_on_public_data(
        _cell(snakemake),
        snakemake.params.method_params,
        candidates=list(snakemake.input.candidates),
        path=snakemake.output.choice,
    )


def tune_select(snakemake) -> None:
    """Publish the best candidate run as the cell's result (``dpzo.pipeline.tuning.select``)."""
    from dpzo.pipeline.tuning import select

    _setup(snakemake)
    select(
        _cell(snakemake),
        ledger=snakemake.input.ledger,
        draws=snakemake.input.draws,
        candidates=list(snakemake.input.candidates),
        diagnostics=list(snakemake.input.diagnostics),
        metrics_path=snakemake.output.metrics,
        diagnostics_path=snakemake.output.diagnostics,
        record_path=snakemake.output.record,
    )


def _mask_settings(snakemake):
    from dpzo.masks.settings import MaskSettings

    wc = snakemake.wildcards
    return MaskSettings(
        scorer=wc.scorer,
        selection=wc.selection,
        scope=wc.scope,
        mode=wc.mode,
        seed=int(wc.mseed),
        ratio=float(wc.ratio),
    )


def mask(snakemake) -> None:
    """Compute one data-free DP-ZOPO mask (no training data is read)."""
    from dpzo.masks.prune import write_mask

    _setup(snakemake)
    p = snakemake.params
    write_mask(
        snakemake.output.mask,
        _mask_settings(snakemake),
        model_path=str(p.model_path),
        model_cfg=p.model_cfg,
        device=p.device,
        task=snakemake.wildcards.task,
    )


def synflow_agreement(snakemake) -> None:
    """How much of the exact SynFlow ranking the zeroth-order estimate recovers on one model."""
    from dpzo.masks.prune import write_scorer_agreement

    _setup(snakemake)
    p = snakemake.params
    write_scorer_agreement(
        snakemake.output.agreement,
        model=snakemake.wildcards.model,
        task=snakemake.wildcards.task,
        model_path=str(p.model_path),
        model_cfg=p.model_cfg,
        device=p.device,
    )


def agreement_table(snakemake) -> None:
    """One row per (model, task, scorer, queries) from the agreement files."""
    from dpzo.report.collect import write_agreement_table

    _setup(snakemake)
    write_agreement_table(list(snakemake.input.agreement), snakemake.output.table)


def collect(snakemake) -> None:
    """cells.csv and curves.csv: every cell's metrics, ledger and benchmark, read once."""
    from dpzo.report.collect import write_collection

    _setup(snakemake)
    write_collection(
        snakemake.input.metrics,
        snakemake.output.cells,
        snakemake.output.curves,
        models=dict(snakemake.params.models),
        methods=dict(snakemake.params.methods),
        benchmarks=list(snakemake.params.benchmarks),
    )


def private_diagnostics(snakemake) -> None:
    """results/private/diagnostics.csv: the trainers' measurements on private batches (asked for
    by ``report.private_diagnostics``; not covered by the guarantee)."""
    from dpzo.report.collect import write_diagnostics

    _setup(snakemake)
    write_diagnostics(snakemake.input.diagnostics, snakemake.output.table)


def summarize(snakemake) -> None:
    """summary.csv: mean and standard deviation over seeds per (model, task, method, ε)."""
    from dpzo.report.collect import write_summary

    _setup(snakemake)
    write_summary(snakemake.input.cells, snakemake.output.summary)


def _table_outputs(snakemake) -> dict:
    return {kind: snakemake.output[kind] for kind in ("csv", "md", "tex", "html")}


def accuracy_table(snakemake) -> None:
    """Accuracy at one epsilon beside the published values (CSV, Markdown, LaTeX, HTML)."""
    from dpzo.report.tables import write_accuracy_table

    _setup(snakemake)
    write_accuracy_table(
        snakemake.input.summary,
        snakemake.input.reference,
        snakemake.wildcards.eps,
        snakemake.params.delta,
        _table_outputs(snakemake),
    )


def privacy_table(snakemake) -> None:
    """The privacy table: per private cell, target and achieved ε, δ, σ, q, T (four formats)."""
    from dpzo.report.tables import write_privacy_table

    _setup(snakemake)
    write_privacy_table(snakemake.input.cells, _table_outputs(snakemake))


def versions_table(snakemake) -> None:
    """The versions that made the cells: one row per combination (four formats)."""
    from dpzo.report.tables import write_versions_table

    _setup(snakemake)
    write_versions_table(snakemake.input.cells, _table_outputs(snakemake))


def figure(snakemake) -> None:
    """One of the report's figures, chosen by ``params.figure`` (see ``dpzo.report.figures``)."""
    from dpzo.report.figures import draw_figure

    _setup(snakemake)
    draw_figure(snakemake.params.figure, dict(snakemake.input.items()), snakemake.output.png, snakemake.output.pdf)


def audit(snakemake) -> None:
    """Audit one cell's release sequence (its ledger) and write audit.json."""
    from dpzo.privacy.audit import write_audit

    _setup(snakemake)
    wc = snakemake.wildcards
    write_audit(
        snakemake.input.ledger,
        snakemake.output.audit,
        trials=int(snakemake.params.trials),
        confidence=float(snakemake.params.confidence),
        labels={"model": wc.model, "task": wc.task, "eps": wc.eps},
    )


def plot_audit(snakemake) -> None:
    """The audit figure: each audited cell's empirical lower bound on ε against its claimed ε."""
    from dpzo.privacy.audit import plot_audit as plot

    _setup(snakemake)
    plot(list(snakemake.input.audits), snakemake.output.figure)
