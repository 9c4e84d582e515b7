"""Adapters from Snakemake jobs to the package: the only module that knows the ``snakemake`` object.

Each ``workflow/scripts/*.py`` shim calls one function here with its ``snakemake`` object.
Logging goes to the job's log file; outputs are written atomically by the functions called.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from .fileio import write_json_atomic


def _setup(snakemake) -> None:
    log_file = snakemake.log[0] if len(snakemake.log) else None
    logging.basicConfig(
        filename=log_file,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        force=True,
    )
    threads = max(int(getattr(snakemake, "threads", 1)), 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # rules that do not need torch
        pass


def demo_data(snakemake) -> None:
    from . import demo

    _setup(snakemake)
    corpus = Path(snakemake.input.corpus)
    # <data_dir>/original/<TASK>/<file>: the data root is three levels above any output file.
    data_dir = Path(snakemake.output[0]).parents[2]
    for task in snakemake.params.tasks:
        demo.write_demo_task(task, data_dir, corpus, seed=int(snakemake.params.seed))


def demo_corpus(snakemake) -> None:
    from . import demo

    _setup(snakemake)
    demo.write_pretraining_corpus(Path(snakemake.output.corpus), seed=int(snakemake.params.seed))


def demo_model(snakemake) -> None:
    from . import demo

    _setup(snakemake)
    stats = demo.build_demo_model(
        snakemake.params.arch,
        Path(snakemake.input.corpus),
        Path(snakemake.output.model_dir),
        seed=int(snakemake.params.seed),
        steps=snakemake.params.steps,
    )
    logging.info("pretrained %s: %s", snakemake.wildcards.model, stats)


def fewshot(snakemake) -> None:
    from .data import make_k_shot
    from .tasks import get_task

    _setup(snakemake)
    sizes = make_k_shot(
        get_task(snakemake.wildcards.task),
        Path(snakemake.params.data_dir),
        Path(snakemake.output.train).parent,
        k=int(snakemake.wildcards.k),
        seed=int(snakemake.wildcards.seed),
        max_test=int(snakemake.params.max_test),
    )
    logging.info("k-shot split sizes: %s", sizes)


def resolve_delta(delta, n: int) -> float:
    """``delta`` from the config: a number, or the string "1/n" (the official code's choice)."""
    if isinstance(delta, str):
        if delta.replace(" ", "") != "1/n":
            raise ValueError(f"delta must be a number or '1/n', got {delta!r}")
        return 1.0 / n
    return float(delta)


def account(snakemake) -> None:
    """Write the cell's privacy ledger (calibrated noise) before any training can start."""
    from .privacy import method_ledger
    from .train import hyperparameters_for

    _setup(snakemake)
    method = snakemake.wildcards.method
    with open(snakemake.input.train, encoding="utf-8") as fh:
        n = sum(1 for line in fh if line.strip())
    eps = math.inf if snakemake.wildcards.eps == "inf" else float(snakemake.wildcards.eps)
    hp = hyperparameters_for(method, dict(snakemake.params.method_params))
    record = method_ledger(
        method,
        n=n,
        batch_size=getattr(hp, "batch_size", 0) or n,
        steps=getattr(hp, "steps", 0),
        directions=getattr(hp, "directions", 1),
        clip=getattr(hp, "clip", math.inf),
        epsilon_target=eps,
        delta=resolve_delta(snakemake.params.delta, n),
        accountant=snakemake.params.accountant,
        convention=snakemake.params.convention,
    )
    write_json_atomic(Path(snakemake.output.ledger), record)
    logging.info("ledger: %s", record)


def checkpoint_policy(path: str | Path, settings: dict | None):
    """The config's ``checkpoint`` block (read from the config, not from rule params, because the
    snapshot frequency never changes a result and so must not make Snakemake rerun cells)."""
    from .checkpoint import CheckpointPolicy

    settings = settings or {}
    return CheckpointPolicy(
        Path(path), every_steps=int(settings.get("every_steps", 0)), every_seconds=float(settings.get("every_seconds", 600))
    )


def train(snakemake) -> None:
    from .checkpoint import remove_checkpoint
    from .train import run_cell

    _setup(snakemake)
    ledger = json.loads(Path(snakemake.input.ledger).read_text())
    policy = checkpoint_policy(snakemake.params.checkpoint, snakemake.config.get("checkpoint"))
    model_cfg = snakemake.params.model_cfg
    metrics = run_cell(
        model=snakemake.wildcards.model,
        model_path=str(snakemake.params.model_path),
        family=model_cfg.get("family", "auto"),
        dtype=model_cfg.get("dtype", "float32"),
        task_name=snakemake.wildcards.task,
        split_dir=str(Path(snakemake.input.train).parent),
        method=snakemake.wildcards.method,
        method_params=dict(snakemake.params.method_params),
        ledger=ledger,
        seed=int(snakemake.wildcards.seed),
        eval_batch_size=int(snakemake.params.eval_batch_size),
        device=snakemake.params.device,
        mask_files=list(snakemake.input.masks),
        checkpoint=policy,
    )
    metrics["eps"] = snakemake.wildcards.eps
    metrics["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")  # provenance on a cluster, None locally
    write_json_atomic(Path(snakemake.output.metrics), metrics)
    remove_checkpoint(policy.path)  # only once the metrics are safely in place
    logging.info("accuracy %.4f after %s steps", metrics["accuracy"], metrics["steps"])


def mask(snakemake) -> None:
    """Compute one data-free DP-ZOPO mask (no training data is read)."""
    from .methods import MaskSettings
    from .models import PromptClassifier, load_model
    from .prune import compute_mask
    from .tasks import get_task

    _setup(snakemake)
    wc = snakemake.wildcards
    settings = MaskSettings(scorer=wc.scorer, selection=wc.selection, scope=wc.scope, mode=wc.mode, seed=int(wc.mseed), ratio=float(wc.ratio))
    cfg = snakemake.params.model_cfg
    lm, tokenizer, family = load_model(
        str(snakemake.params.model_path), family=cfg.get("family", "auto"), dtype=cfg.get("dtype", "float32"), device=snakemake.params.device
    )
    clf = PromptClassifier(lm, tokenizer, family, get_task(wc.task))
    result = compute_mask(lm, clf.label_ids, family, settings, float(wc.ratio))
    result.save(Path(snakemake.output.mask))
    logging.info("mask: %d of %d coordinates (%s)", len(result), result.numel, settings)


def summarize(snakemake) -> None:
    from .report import write_summary

    _setup(snakemake)
    write_summary(snakemake.input.metrics, snakemake.output.summary)


def plot(snakemake) -> None:
    from .report import plot_accuracy

    _setup(snakemake)
    plot_accuracy(snakemake.input.summary, snakemake.output.figure)
