"""Adapters from Snakemake jobs to the package: the only module that knows the ``snakemake`` object.

Each ``workflow/scripts/*.py`` shim calls one function here with its ``snakemake`` object.
Logging goes to the job's log file; outputs are written atomically by the functions called.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from dpzo.fileio import atomic_path, write_json_atomic


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
    """Logging and warnings of the job into its log file; threads as the rule asks."""
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
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # rules that do not need torch
        pass


def demo_data(snakemake) -> None:
    from dpzo.demo import tasks

    _setup(snakemake)
    corpus = Path(snakemake.input.corpus)
    # <data_dir>/original/<TASK>/<file>: the data root is three levels above any output file.
    data_dir = Path(snakemake.output[0]).parents[2]
    for task in snakemake.params.tasks:
        tasks.write_demo_task(task, data_dir, corpus, seed=int(snakemake.params.seed))


def demo_corpus(snakemake) -> None:
    from dpzo.demo import corpus

    _setup(snakemake)
    corpus.write_pretraining_corpus(Path(snakemake.output.corpus), seed=int(snakemake.params.seed))


def demo_model(snakemake) -> None:
    from dpzo.demo import pretrain

    _setup(snakemake)
    stats = pretrain.build_demo_model(
        snakemake.params.arch,
        Path(snakemake.input.corpus),
        Path(snakemake.output.model_dir),
        seed=int(snakemake.params.seed),
        steps=snakemake.params.steps,
    )
    logging.info("pretrained %s: %s", snakemake.wildcards.model, stats)


def fewshot(snakemake) -> None:
    """The train/dev/test splits of a cell's data seed: LM-BFF k-shot, or MeZO's sampling for
    the Hugging Face tasks (where k is not used: the sizes come from ``hf_datasets``)."""
    from dpzo.data.splits import make_k_shot
    from dpzo.data.hf_tasks import HFTask
    from dpzo.data.tasks import get_task

    _setup(snakemake)
    task = get_task(snakemake.wildcards.task)
    out_dir = Path(snakemake.output.train).parent
    seed = int(snakemake.wildcards.seed)
    if isinstance(task, HFTask):
        from dpzo.data.hf_data import make_hf_splits

        hf = snakemake.params.hf_datasets
        sizes = make_hf_splits(
            task, out_dir, seed=seed, num_train=int(hf["train"]), num_dev=hf.get("dev"),
            num_test=int(snakemake.params.max_test), cache_dir=hf.get("cache_dir"),
        )
    else:
        sizes = make_k_shot(
            task, Path(snakemake.params.data_dir), out_dir, k=int(snakemake.wildcards.k), seed=seed,
            max_test=int(snakemake.params.max_test),
        )
    logging.info("split sizes: %s", sizes)


def _cell(snakemake):
    from dpzo.privacy.ledger import Cell

    wc = snakemake.wildcards
    return Cell(model=wc.model, task=wc.task, method=wc.method, eps=wc.eps, seed=int(wc.seed))


def _accounting(snakemake, noise: str):
    from dpzo.privacy.ledger import AccountingSettings

    p = snakemake.params
    return AccountingSettings(delta=p.delta, accountant=p.accountant, convention=p.convention, noise=noise)


def account(snakemake) -> None:
    """Write the cell's privacy ledger (calibrated noise) before any training can start."""
    from dpzo.methods import hyperparameters_for
    from dpzo.privacy.ledger import cell_ledger, count_examples

    _setup(snakemake)
    cell = _cell(snakemake)
    hp = hyperparameters_for(cell.method, dict(snakemake.params.method_params))
    # the noise source the trainer must use, as the run that planned this cell saw it
    settings = _accounting(snakemake, snakemake.params.noise)
    record = cell_ledger(cell, hp, n=count_examples(snakemake.input.train), settings=settings,
                         cache_dir=snakemake.params.calibrations)
    write_json_atomic(Path(snakemake.output.ledger), record)
    logging.info("ledger: %s", record)


def checkpoint_policy(path: str | Path, settings: dict | None):
    """The config's ``checkpoint`` block (read from the config, not from rule params, because the
    snapshot frequency never changes a result and so must not make Snakemake rerun cells)."""
    from dpzo.zo.checkpoint import CheckpointPolicy

    settings = settings or {}
    return CheckpointPolicy(
        Path(path), every_steps=int(settings.get("every_steps", 0)), every_seconds=float(settings.get("every_seconds", 600))
    )


def curve_settings(settings: dict | None):
    """The config's ``curves`` block (read from the config, not from rule params: the curve's
    points never change a cell's model or accuracy, so they must not make Snakemake rerun cells)."""
    from dpzo.models.evaluate import CurveSettings

    settings = settings or {}
    return CurveSettings(points=int(settings.get("points", 12)), test_examples=int(settings.get("test_examples", 128)))


def train(snakemake) -> None:
    """Train and evaluate one cell, holding its lock and recording the attempt (``dpzo.pipeline.cellguard``)."""
    from dpzo.pipeline.cellguard import AttemptLog, CellLock
    from dpzo.zo.checkpoint import remove_checkpoint
    from dpzo.fileio import read_json_output
    from dpzo.privacy.ledger import cell_noise
    from dpzo.methods import is_private
    from dpzo.pipeline.cell import CellRun, run_cell

    _setup(snakemake)
    cell = _cell(snakemake)
    ledger = read_json_output(snakemake.input.ledger)
    policy = checkpoint_policy(snakemake.params.checkpoint, snakemake.config.get("checkpoint"))
    model_cfg = snakemake.params.model_cfg
    folder = policy.path.parent  # the cell's checkpoint folder: not an output, so Snakemake keeps it
    with CellLock(folder / "train.lock"):
        attempts = AttemptLog(folder / "attempts.jsonl")
        with attempts.attempt(private=is_private(cell.method)) as attempt:
            run = CellRun(
                cell,
                model_path=str(snakemake.params.model_path),
                split_dir=str(Path(snakemake.input.train).parent),
                method_params=dict(snakemake.params.method_params),
                ledger=ledger,
                # this process's own noise source: the ledger must have been made for it
                accounting=_accounting(snakemake, cell_noise(cell.method)),
                ledger_path=str(snakemake.input.ledger),
                family=model_cfg.get("family", "auto"),
                dtype=model_cfg.get("dtype", "float32"),
                eval_batch_size=int(snakemake.params.eval_batch_size),
                device=snakemake.params.device,
                mask_files=tuple(snakemake.input.masks),
                checkpoint=policy,
                curve=curve_settings(snakemake.config.get("curves")),
            )
            metrics = run_cell(run, on_start=attempt.start)
        metrics["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")  # provenance on a cluster, None locally
        metrics.update(attempts.summary())
        # measured on private batches, not covered by the guarantee: a file of its own, never
        # published unless the config asks (report.private_diagnostics)
        write_json_atomic(Path(snakemake.output.diagnostics), {
            "note": "computed on the private training batches; NOT covered by the differential-privacy guarantee",
            **{k: metrics[k] for k in ("model", "task", "method", "eps", "seed")},
            **metrics.pop("private_diagnostics"),
        })
        write_json_atomic(Path(snakemake.output.metrics), metrics)
        remove_checkpoint(policy.path)  # only once the metrics are safely in place
        attempts.close()  # likewise: a later forced rerun counts anew
    logging.info("%s %.4f after %s steps (attempt %d, %d resumes)", metrics["metric"], metrics["score"],
                 metrics["steps"], metrics["attempts"], metrics["resumes"])


def _mask_classifier(snakemake):
    """The model of a mask rule and its task's label words (no training data is read)."""
    from dpzo.models.candidates import make_scorer
    from dpzo.models.classifier import load_model
    from dpzo.data.tasks import get_task

    cfg = snakemake.params.model_cfg
    lm, tokenizer, family = load_model(
        str(snakemake.params.model_path), family=cfg.get("family", "auto"), dtype=cfg.get("dtype", "float32"), device=snakemake.params.device
    )
    return make_scorer(lm, tokenizer, family, get_task(snakemake.wildcards.task))


def mask(snakemake) -> None:
    """Compute one data-free DP-ZOPO mask (no training data is read)."""
    from dpzo.masks.settings import MaskSettings
    from dpzo.masks.prune import compute_mask

    _setup(snakemake)
    wc = snakemake.wildcards
    settings = MaskSettings(scorer=wc.scorer, selection=wc.selection, scope=wc.scope, mode=wc.mode, seed=int(wc.mseed), ratio=float(wc.ratio))
    clf = _mask_classifier(snakemake)
    result = compute_mask(clf.model, clf.label_ids, clf.family, settings, float(wc.ratio))
    result.save(Path(snakemake.output.mask))
    logging.info("mask: %d of %d coordinates (%s)", len(result), result.numel, settings)


def synflow_agreement(snakemake) -> None:
    """How much of the exact SynFlow ranking the zeroth-order estimate recovers on one model."""
    from dpzo.masks.prune import scorer_agreement

    _setup(snakemake)
    clf = _mask_classifier(snakemake)
    result = scorer_agreement(clf.model, clf.label_ids, clf.family)
    result.update(model=snakemake.wildcards.model, task=snakemake.wildcards.task)
    write_json_atomic(Path(snakemake.output.agreement), result)
    for row in result["rows"]:
        logging.info("%s", row)


def agreement_table(snakemake) -> None:
    """One row per (model, task, scorer, queries) from the agreement files."""
    import pandas as pd

    _setup(snakemake)
    rows = []
    for path in snakemake.input.agreement:
        result = json.loads(Path(path).read_text())
        rows += [{"model": result["model"], "task": result["task"], **row} for row in result["rows"]]
    with atomic_path(Path(snakemake.output.table)) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def collect(snakemake) -> None:
    """cells.csv and curves.csv: every cell's metrics, ledger and benchmark, read once."""
    from dpzo.report.collect import write_collection

    _setup(snakemake)
    cells = write_collection(
        snakemake.input.metrics,
        snakemake.output.cells,
        snakemake.output.curves,
        models=dict(snakemake.params.models),
        methods=dict(snakemake.params.methods),
        benchmarks=list(snakemake.params.benchmarks),
    )
    logging.info("collected %d cells", len(cells))


def private_diagnostics(snakemake) -> None:
    """results/private/diagnostics.csv: the trainers' measurements on private batches (asked for
    by ``report.private_diagnostics``; not covered by the guarantee)."""
    from dpzo.report.collect import write_diagnostics

    _setup(snakemake)
    table = write_diagnostics(snakemake.input.diagnostics, snakemake.output.table)
    logging.info("collected %d diagnostic rows", len(table))


def summarize(snakemake) -> None:
    from dpzo.report.collect import write_summary

    _setup(snakemake)
    write_summary(snakemake.input.cells, snakemake.output.summary)


def _delta_text(delta) -> str:
    return str(delta) if isinstance(delta, str) else f"{float(delta):g}"


def _table_outputs(snakemake) -> dict:
    return {kind: snakemake.output[kind] for kind in ("csv", "md", "tex", "html")}


def accuracy_table(snakemake) -> None:
    """Accuracy at one epsilon beside the published values (CSV, Markdown, LaTeX, HTML)."""
    from dpzo.report.reference import load_accuracy, preferred
    from dpzo.report.collect import read_cells
    from dpzo.report.tables import accuracy_table as build, render_accuracy, write_table

    _setup(snakemake)
    eps = snakemake.wildcards.eps
    tidy = build(read_cells(snakemake.input.summary), preferred(load_accuracy(snakemake.input.reference)), eps)
    table = render_accuracy(tidy, eps, _delta_text(snakemake.params.delta))
    write_table(tidy, table, _table_outputs(snakemake), label=f"tab:accuracy-eps{eps}")


def privacy_table(snakemake) -> None:
    from dpzo.report.collect import read_cells
    from dpzo.report.tables import privacy_table as build, render_privacy, write_table

    _setup(snakemake)
    tidy = build(read_cells(snakemake.input.cells))
    write_table(tidy, render_privacy(tidy), _table_outputs(snakemake), label="tab:privacy")


def figure(snakemake) -> None:
    """One of the report's figures, chosen by ``params.figure`` (see ``dpzo.report.figures``)."""
    from dpzo.report import figures
    from dpzo.report.reference import load_accuracy, load_memory, preferred
    from dpzo.report.collect import read_cells

    _setup(snakemake)
    name = snakemake.params.figure
    inputs = snakemake.input
    read = {
        "summary": lambda: read_cells(inputs.summary),
        "accuracy": lambda: preferred(load_accuracy(inputs.reference)),
        "memory": lambda: load_memory(inputs.reference),
        "curves": lambda: read_cells(inputs.curves),
        "cells": lambda: read_cells(inputs.cells),
    }
    if name not in figures.FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(figures.FIGURES)}")
    draw, needs = figures.FIGURES[name]
    draw(*(read[what]() for what in needs), snakemake.output.png, snakemake.output.pdf)


def audit(snakemake) -> None:
    """Audit one cell's release sequence (its ledger) and write audit.json."""
    from dpzo.privacy.audit import audit as run_audit

    _setup(snakemake)
    ledger = json.loads(Path(snakemake.input.ledger).read_text())
    record = run_audit(ledger, trials=int(snakemake.params.trials), confidence=float(snakemake.params.confidence))
    wc = snakemake.wildcards
    record = {"model": wc.model, "task": wc.task, "eps": wc.eps, **record}
    write_json_atomic(Path(snakemake.output.audit), record)
    logging.info("audit: epsilon lower bound %.3f (claimed %s)", record["epsilon_lower_bound"], record["epsilon_claimed"])
    if not record["lower_bound_within_claim"]:
        # At 95% confidence this happens by chance in 1 audit in 20 at most; repeated, it is a bug.
        logging.warning("the measured lower bound exceeds the claimed epsilon")


def plot_audit(snakemake) -> None:
    from dpzo.privacy.audit import plot_audit as plot

    _setup(snakemake)
    plot(list(snakemake.input.audits), snakemake.output.figure)
