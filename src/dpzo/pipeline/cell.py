"""One cell of the grid: verify its ledger, load the model and data, train, evaluate."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpzo.fileio import read_json_output, write_json_atomic
from dpzo.masks.prune import Mask
from dpzo.methods import FIRST_ORDER, ICL, ZERO_SHOT, ZO, base_method, hyperparameters_for, is_private
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.models.classifier import PromptClassifier
from dpzo.models.evaluate import CurveSettings
from dpzo.privacy.ledger import (
    NO_NOISE,
    AccountingSettings,
    Cell,
    check_ledger_after,
    ledger_digest,
    verify_ledger,
)
from dpzo.privacy.secret import SecretRandom
from dpzo.provenance import versions
from dpzo.zo.checkpoint import CheckpointPolicy, SnapshotRecord, TrainingCheckpoint, file_digest
from dpzo.zo.loop import train_zo
from dpzo.zo.replicas import SingleProcess

log = logging.getLogger(__name__)


#: Measured on private batches, so not covered by the guarantee: kept out of what is published.
PRIVATE_DIAGNOSTICS = ("loss", "examples", "clipped_fraction")


def stage_masks(hp: ZOHyperparameters, clf: PromptClassifier, mask_files: list[str] | None) -> Callable[[int], Mask]:
    """The mask of each DP-ZOPO stage under the configured strategy (``prune.MaskSettings``)."""
    from dpzo.masks.prune import compute_mask

    settings = hp.mask
    if not mask_files or len(mask_files) != len(set(settings.stage_ratios(hp.stages))):
        raise ValueError(f"DP-ZOPO needs one precomputed mask per distinct stage ratio; got {mask_files}")
    loaded = {m.meta["ratio"]: m for m in (Mask.load(f) for f in mask_files)}

    def mask_for(stage: int) -> Mask:
        ratio = settings.stage_ratios(hp.stages)[stage]
        if settings.strategy == "dynamic" and stage > 0:
            # data-free: rescoring the current weights costs no privacy
            return compute_mask(clf.model, clf.label_ids, clf.family, settings, ratio)
        return loaded[ratio]

    log.info("DP-ZOPO: %s masks over %d stages", settings.strategy, hp.stages)
    return mask_for


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory (MiB)."""
    import resource

    out = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass(frozen=True)
class CellRun:
    """Everything one cell's run reads: what the cell is, its inputs, and how to run it.

    ``ledger_path`` is the cell's ``privacy.json`` (read by :func:`run_cell`); ``accounting`` the
    config's accounting with this process's noise source (the ledger must have been made for
    it).  ``placement`` / ``max_memory``: the model's device map (``models.load_model``) instead
    of ``device``; ``master``: ``float32`` or ``none`` (in place, ``dpzo.zo.flat``); ``offload``:
    ``streamed`` keeps the blocks in host memory (``dpzo.zo.streamed``).  ``mask_files`` (DP-ZOPO): the precomputed mask of each stage's starting ratio, in stage
    order (``dpzo.masks.settings.MaskSettings``).  ``checkpoint``: where and how often
    zeroth-order training snapshots itself, and resumes from.  ``curve``: the test-loss points
    recorded during training (the only training curve that is published).  ``allow_new_head``
    (``models.<key>.allow_new_head``): the checkpoint may lack its output head, which is then
    initialised at random; the metrics list those weights under ``new_head``.
    """

    cell: Cell
    model_path: str
    split_dir: str
    method_params: dict
    ledger_path: str
    accounting: AccountingSettings
    family: str = "auto"
    dtype: str = "float32"
    eval_batch_size: int = 128
    device: str = "cpu"
    placement: str | dict | None = None
    max_memory: dict | None = None
    master: str = "float32"
    offload: str = "none"
    mask_files: tuple[str, ...] = ()
    checkpoint: CheckpointPolicy | None = None
    curve: CurveSettings | None = None
    allow_new_head: bool = False


def run_cell(
    run: CellRun,
    *,
    on_start: Callable[[dict, int | None], None] | None = None,
    team: SingleProcess | None = None,
    record: SnapshotRecord | None = None,
) -> dict | None:
    """Train (unless zero-shot) and evaluate one (model, task, method, eps, seed) cell.

    Before anything else the ledger is verified against the cell (``ledger.verify_ledger``:
    its identity, the config's ``accounting``, and that its noise certifies the cell's ε); the
    noise added is the verified one.  ``on_start(identity, step)`` is called once before training (evaluation for zero-shot) with
    what the run is and the step a snapshot resumed after (None: from scratch); it may raise to
    refuse the run (``dpzo.pipeline.cellguard.Attempt.start``).

    Returns the cell's metrics, and under ``"private_diagnostics"`` what the trainer measured
    on the private batches (training loss, batch sizes, clipped fractions): not covered by the
    guarantee, so the caller keeps it apart from what is published.

    Evaluation reports the final iterate on the test split; no dev-based model selection is
    done, because choosing among iterates on private data would spend unaccounted privacy.

    ``team``: the replicas of a data-parallel zeroth-order run (``dpzo.zo.replicas``).  Only
    rank 0 holds the secret RNG, evaluates and returns the metrics; the other ranks train their
    share of every batch and return None.  ``record``: the cell's record of the snapshots written
    (its attempt log), which a snapshot must match to be resumed.
    """
    from pathlib import Path

    from dpzo.data.hf_tasks import HFTask, method_problem
    from dpzo.data.splits import load_split
    from dpzo.data.tasks import get_task
    from dpzo.models.adapters import apply_tuning
    from dpzo.models.candidates import make_scorer
    from dpzo.models.classifier import load_model
    from dpzo.models.evaluate import TestLossCurve, evaluate
    from dpzo.models.meta import new_head_record

    wall_start = time.perf_counter()
    cell, ledger, accounting = run.cell, read_json_output(run.ledger_path), run.accounting
    method, seed, split_dir = cell.method, cell.seed, Path(run.split_dir)
    task = get_task(cell.task)
    problem = method_problem(task, method) if isinstance(task, HFTask) else None
    if problem:
        raise ValueError(problem)
    base = base_method(method)
    hp = hyperparameters_for(method, run.method_params)
    train_examples = load_split(split_dir / "train.jsonl")
    # before the model is even loaded: a ledger that is not this cell's stops the run here
    verified = verify_ledger(ledger, cell=cell, hp=hp, n=len(train_examples), settings=accounting, path=run.ledger_path)
    private = is_private(base)
    team = team or SingleProcess()
    if team.world_size > 1 and base not in ZO:
        raise ValueError(f"{method} runs in one process; ranks > 1 are for the zeroth-order methods {tuple(ZO)}")
    # the secret RNG exists in one process only: the one that samples the batches and adds the noise
    secret = SecretRandom.from_environment() if private and team.is_main else None
    torch.manual_seed(seed)
    streamed = run.offload == "streamed"
    master_dtype = None if run.master == "none" else torch.float32
    lm, tokenizer, family = load_model(
        run.model_path,
        family=run.family,
        dtype=run.dtype,
        device="cpu" if streamed else run.device,  # streamed: the blocks stay in host memory
        placement=run.placement,
        max_memory=run.max_memory,
    )
    tuning = getattr(hp, "tuning", None)
    trainable = apply_tuning(lm, tuning, seed=seed) if tuning is not None else 0  # LoRA, prefix: those only
    store = None  # train_zo builds a resident one; the blocks go to host memory before the model is used
    if streamed:
        from dpzo.zo.store import build_store

        directions = getattr(hp, "directions", 1)
        master = master_dtype if base in ZO else None  # an evaluation-only cell needs no master copy
        store = build_store(lm, master_dtype=master, offload=run.offload, device=run.device, directions=directions)
    clf = make_scorer(lm, tokenizer, family, task)
    test_examples = load_split(split_dir / "test.jsonl")
    train_set = clf.encode(train_examples)
    test_set = clf.encode(test_examples)

    # everything the run depends on: a snapshot of any other run is never resumed, and a retry
    # of a failed run is recognised as the same run
    identity = dict(
        model_path=run.model_path,
        dtype=run.dtype,
        task=cell.task,
        method=method,
        seed=seed,
        method_params=run.method_params,
        ledger=ledger,
        train_data=file_digest(split_dir / "train.jsonl"),
        masks=[file_digest(f) for f in run.mask_files],
    )

    def started(resumed_after: int | None) -> None:
        if on_start is not None:
            on_start(identity, resumed_after)

    history: dict = {}
    if base == ICL:
        from dpzo.baselines.icl import choose_demonstrations, encode_with_demonstrations

        started(None)
        demos = choose_demonstrations(train_examples, hp.demonstrations, task.num_classes, seed)
        test_set = encode_with_demonstrations(clf, test_examples, demos)
    elif base != ZERO_SHOT:
        test_curve = TestLossCurve(
            clf, test_set, steps=hp.steps, settings=run.curve or CurveSettings(), batch_size=run.eval_batch_size
        )
        if not team.is_main:
            test_curve = None  # published by rank 0 only
        if base in FIRST_ORDER:
            from dpzo.baselines.firstorder import train_first_order

            started(None)  # first-order training always starts from scratch
            history = train_first_order(
                clf, train_set, hp, method=base, run_seed=seed, sigma=verified.sigma, secret=secret, curve=test_curve
            )
        else:
            snapshots = None
            if run.checkpoint is not None:
                snapshots = TrainingCheckpoint(run.checkpoint, identity=identity, record=record)
            on_sigterm = snapshots.saving_on_sigterm() if snapshots and team.is_main else contextlib.nullcontext()
            with on_sigterm:
                history = train_zo(
                    lm,
                    lambda index: clf.per_example_loss(train_set.batch(index, clf.device)),
                    len(train_set),
                    hp,
                    method=method,
                    run_seed=seed,
                    noise=verified.release,
                    secret=secret,
                    masks=stage_masks(hp, clf, list(run.mask_files)) if ZO[base].masked else None,
                    master_dtype=master_dtype,
                    checkpoint=snapshots,
                    curve=test_curve,
                    on_start=started,
                    team=team,
                    store=store,
                )
        if not team.is_main:
            return None  # rank 0 evaluates and writes the outputs
        if private:
            check_ledger_after(ledger, history)
    else:
        started(None)  # zero-shot: evaluation only
    result = evaluate(clf, test_set, batch_size=run.eval_batch_size)
    resumed_from = history.pop("resumed_from", [])
    curves = {k: v for k, v in history.items() if isinstance(v, list)}
    return {
        "model": cell.model,
        "task": cell.task,
        "method": method,
        "eps": cell.eps,
        "seed": seed,
        # The task's own metric (accuracy; mcc or f1 for some LM-BFF tasks; f1 for generation).
        "metric": result.get("metric", "accuracy"),
        "score": result["score"] if "score" in result else result[result.get("metric", "accuracy")],
        "accuracy": result.get("accuracy"),
        **{k: result[k] for k in ("f1", "em", "predictions") if k in result},
        "test_loss": result["loss"],
        "test_n": result["n"],
        "confusion": result.get("confusion"),
        "n_train": len(train_set),
        "n_params": sum(p.numel() for p in lm.parameters()),
        **(
            {"trainable_params": trainable, "tuning": tuning.kind}
            if tuning is not None and tuning.kind != "full"
            else {}
        ),
        "steps": history.get("steps_run", 0),
        "releases": history.get("releases", 0),
        "resumed_from": resumed_from,  # steps after which an interrupted run was continued
        # what the trainer itself recomputed from the noise it added (not the ledger's claim)
        "privacy": {
            "noise": accounting.noise if private else NO_NOISE,
            "epsilon_verified": verified.epsilon,
            "verified_with": verified.accountant,
            "ledger_sha256": ledger_digest(ledger),  # the ledger verified: tables publish no other
        },
        **({"ranks": team.world_size} if team.world_size > 1 else {}),  # data-parallel replicas
        **({"new_head": new_head_record(run.model_path, family, cell.model)} if run.allow_new_head else {}),
        "ms_per_step": history.get("ms_per_step"),
        "train_seconds": history.get("train_seconds", 0.0),
        "wall_seconds": time.perf_counter() - wall_start,
        "memory": peak_memory_mb(clf.device),
        "device": str(clf.device),
        "torch": torch.__version__,
        "versions": versions(clf.device),  # dpzo (and its commit), the libraries, Python, the device's name
        "history": {k: v for k, v in curves.items() if k not in PRIVATE_DIAGNOSTICS},
        "history_note": "step, stage, lr, beta, mask_size: the public schedule; grad: the released "
        "scalar; test_step/test_loss: loss on a fixed part of the test split. All covered by the "
        "guarantee (functions of the released values and public data).",
        "private_diagnostics": {k: v for k, v in curves.items() if k in PRIVATE_DIAGNOSTICS}
        | {"step": curves.get("step", [])},
    }


def checkpoint_policy(path: str | Path, settings: dict | None) -> CheckpointPolicy:
    """The config's ``checkpoint`` block (read from the config, not from rule params, because the
    snapshot frequency never changes a result and so must not make Snakemake rerun cells)."""
    settings = settings or {}
    return CheckpointPolicy(
        Path(path),
        every_steps=int(settings.get("every_steps", 0)),
        every_seconds=float(settings.get("every_seconds", 600)),
    )


def curve_settings(settings: dict | None) -> CurveSettings:
    """The config's ``curves`` block (read from the config, not from rule params: the curve's
    points never change a cell's model or accuracy, so they must not make Snakemake rerun cells)."""
    settings = settings or {}
    return CurveSettings(points=int(settings.get("points", 12)), test_examples=int(settings.get("test_examples", 128)))


def train_cell(
    run: CellRun,
    *,
    metrics_path: str | Path,
    diagnostics_path: str | Path,
    ranks: int = 1,
    team: SingleProcess | None = None,
) -> dict:
    """Train and evaluate one cell, holding its lock and recording the attempt (``dpzo.pipeline.cellguard``).

    The lock and the attempt log live in the folder of the cell's snapshot (``run.checkpoint``,
    not an output, so Snakemake keeps it).  Writes ``metrics.json`` and, apart from it,
    ``private_diagnostics.json`` (measured on private batches, not covered by the guarantee:
    never published unless the config asks).

    ``ranks`` > 1 starts that many data-parallel processes (``dpzo.pipeline.ranks``), whose
    rank 0 comes back here with its ``team``; the other methods (zero-shot, first-order, ICL)
    run in this process.
    """
    import os

    from dpzo.pipeline.cellguard import AttemptLog, CellLock
    from dpzo.zo.checkpoint import remove_checkpoint

    if ranks > 1 and team is None and base_method(run.cell.method) in ZO:
        from dpzo.pipeline.ranks import train_cell_on_ranks

        train_cell_on_ranks(run, ranks, metrics_path=metrics_path, diagnostics_path=diagnostics_path)
        return read_json_output(metrics_path)

    folder = run.checkpoint.path.parent
    with CellLock(folder / "train.lock"):
        attempts = AttemptLog(folder / "attempts.jsonl")
        with attempts.attempt(private=is_private(run.cell.method)) as attempt:
            metrics = run_cell(run, on_start=attempt.start, team=team, record=attempts)
        metrics["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")  # provenance on a cluster, None locally
        metrics.update(attempts.summary())
        write_json_atomic(
            Path(diagnostics_path),
            {
                "note": "computed on the private training batches; NOT covered by the differential-privacy guarantee",
                **{k: metrics[k] for k in ("model", "task", "method", "eps", "seed")},
                **metrics.pop("private_diagnostics"),
            },
        )
        write_json_atomic(Path(metrics_path), metrics)
        remove_checkpoint(run.checkpoint.path)  # only once the metrics are safely in place
        attempts.close()  # likewise: a later forced rerun counts anew
    log.info(
        "%s %.4f after %s steps (attempt %d, %d resumes)",
        metrics["metric"],
        metrics["score"],
        metrics["steps"],
        metrics["attempts"],
        metrics["resumes"],
    )
    return metrics
