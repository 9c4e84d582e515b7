"""One cell of the grid: verify its ledger, load the model and data, train, evaluate."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpzo.fileio import read_json_output, write_json_atomic
from dpzo.masks.settings import Mask
from dpzo.methods import (
    TRAINER_FIRST_ORDER,
    TRAINER_ICL,
    TRAINER_NONE,
    TRAINER_ZO,
    ZO,
    base_method,
    get_method,
    hyperparameters_for,
    is_private,
)
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.models.classifier import PromptClassifier
from dpzo.models.evaluate import CurveSettings
from dpzo.pipeline.metrics import CellMetrics
from dpzo.pipeline.probe import cell_cost
from dpzo.privacy.ledger import (
    NO_NOISE,
    AccountingSettings,
    Cell,
    VerifiedNoise,
    check_ledger_after,
    ledger_digest,
    verify_ledger,
)
from dpzo.privacy.secret import SecretRandom
from dpzo.provenance import versions
from dpzo.zo.checkpoint import CheckpointPolicy, SnapshotRecord, TrainingCheckpoint, file_digest
from dpzo.zo.loop import train_zo
from dpzo.zo.precision import tf32_matmuls
from dpzo.zo.replicas import SingleProcess
from dpzo.zo.store import ParameterStore

log = logging.getLogger(__name__)


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
    initialised at random; the metrics list those weights under ``new_head``.  ``tf32`` (the
    config's ``tf32``): float32 matmuls on CUDA in TF32 while the cell runs, as ``dpzo bench``
    times them (``dpzo.zo.precision.tf32_matmuls``).
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
    tf32: bool = True
    candidate: Any = None  # a candidate run of a selection (dpzo.pipeline.tuning.Candidate)
    selection: dict | None = None  # how the hyperparameters were chosen, published with the metrics


@dataclass(frozen=True)
class VerifiedCell:
    """A cell whose ledger verified against it: its hyperparameters, training examples and the
    noise the trainer adds (``privacy.ledger.VerifiedNoise``)."""

    cell: Cell
    ledger: dict
    hp: Any
    task: Any
    train_examples: list
    noise: VerifiedNoise
    validation_examples: list | None = None  # a candidate run's held-out rows, scored with noise
    score_sigma: float | None = None

    @property
    def private(self) -> bool:
        return is_private(base_method(self.cell.method))


def verify_cell(run: CellRun) -> VerifiedCell:
    """Read the cell's ledger and training split and verify the ledger against the cell, before
    any model is loaded: a ledger that is not this cell's, or whose noise does not buy its ε,
    stops the run here (``privacy.ledger.verify_ledger``)."""
    from dpzo.data.splits import load_split
    from dpzo.data.tasks import get_task

    cell, ledger = run.cell, read_json_output(run.ledger_path)
    task = get_task(cell.task)
    problem = task.method_problem(cell.method)
    if problem:
        raise ValueError(problem)
    train_examples = load_split(Path(run.split_dir) / "train.jsonl")
    if run.candidate is not None and run.candidate.public:  # a run on public data, scored on its dev set
        hp = hyperparameters_for(cell.method, run.method_params)
        noise = verify_ledger(
            ledger, cell=cell, hp=hp, n=len(train_examples), settings=run.accounting, path=run.ledger_path
        )
        dev = load_split(Path(run.split_dir) / "dev.jsonl")
        return VerifiedCell(cell, ledger, hp, task, train_examples, noise, validation_examples=dev, score_sigma=0.0)
    if run.candidate is not None:  # a candidate of a private selection: the selection's ledger
        from dpzo.pipeline.tuning import verify_candidate

        checked = verify_candidate(
            run.candidate,
            cell=cell,
            ledger=ledger,
            examples=train_examples,
            params=run.method_params,
            settings=run.accounting,
            path=run.ledger_path,
        )
        return VerifiedCell(
            cell,
            ledger,
            checked.hp,
            task,
            checked.train_examples,
            checked.noise,
            validation_examples=checked.validation_examples,
            score_sigma=checked.score_sigma,
        )
    hp = hyperparameters_for(cell.method, run.method_params)
    noise = verify_ledger(
        ledger, cell=cell, hp=hp, n=len(train_examples), settings=run.accounting, path=run.ledger_path
    )
    return VerifiedCell(cell, ledger, hp, task, train_examples, noise)


@dataclass
class PreparedCell:
    """The loaded model as the cell trains and scores it, with its data encoded."""

    model: torch.nn.Module
    family: str
    clf: Any  # the task's scorer (models.classifier.PromptClassifier or a candidate scorer)
    store: ParameterStore | None  # a streamed model's store, else None: train_zo builds the resident one
    train_set: Any
    test_examples: list
    test_set: Any
    tuning: dict  # {"trainable_params", "tuning"} when adapters train instead of every weight
    identity: dict  # what the run is: a snapshot of another run is never resumed


def prepare_cell(run: CellRun, verified: VerifiedCell) -> PreparedCell:
    """Load the model (streamed: its blocks stay in host memory), attach its adapters, build the
    parameter store and the task's scorer, encode the splits, and name the run's identity."""
    from dpzo.data.splits import load_split
    from dpzo.models.adapters import apply_tuning
    from dpzo.models.candidates import make_scorer
    from dpzo.models.classifier import load_model

    cell, hp, split_dir = verified.cell, verified.hp, Path(run.split_dir)
    torch.manual_seed(cell.seed)
    streamed = run.offload == "streamed"
    lm, tokenizer, family = load_model(
        run.model_path,
        family=run.family,
        dtype=run.dtype,
        device="cpu" if streamed else run.device,  # streamed: the blocks stay in host memory
        placement=run.placement,
        max_memory=run.max_memory,
    )
    tuning = getattr(hp, "tuning", None)
    trainable = apply_tuning(lm, tuning, seed=cell.seed) if tuning is not None else 0  # LoRA, prefix: those only
    store = None  # train_zo builds a resident one; the blocks go to host memory before the model is used
    if streamed:
        from dpzo.zo.store import build_store

        trains_zo = get_method(base_method(cell.method)).trainer == TRAINER_ZO
        master = torch.float32 if run.master != "none" and trains_zo else None  # evaluation only: no master
        directions = getattr(hp, "directions", 1)
        store = build_store(lm, master_dtype=master, offload=run.offload, device=run.device, directions=directions)
    clf = make_scorer(lm, tokenizer, family, verified.task)
    test_examples = load_split(split_dir / "test.jsonl")
    identity = dict(
        model_path=run.model_path,
        dtype=run.dtype,
        task=cell.task,
        method=cell.method,
        seed=cell.seed,
        method_params=run.method_params,
        ledger=verified.ledger,
        train_data=file_digest(split_dir / "train.jsonl"),
        masks=[file_digest(f) for f in run.mask_files],
    )
    if run.candidate is not None:
        identity["candidate"] = run.candidate.index
    return PreparedCell(
        model=lm,
        family=family,
        clf=clf,
        store=store,
        train_set=clf.encode(verified.train_examples),
        test_examples=test_examples,
        test_set=clf.encode(test_examples),
        tuning={"trainable_params": trainable, "tuning": tuning.kind} if tuning and tuning.kind != "full" else {},
        identity=identity,
    )


@dataclass
class Training:
    """How a cell's trainer runs: the secret RNG (rank 0 of a private cell only), the replicas,
    the start hook and the cell's record of snapshots."""

    secret: SecretRandom | None
    team: SingleProcess
    started: Callable[[int | None], None]
    record: SnapshotRecord | None


def train_icl(run: CellRun, verified: VerifiedCell, prepared: PreparedCell, how: Training) -> dict:
    """In-context learning: no training; the test prompts get the chosen demonstrations."""
    from dpzo.baselines.icl import choose_demonstrations, encode_with_demonstrations

    how.started(None)
    demos = choose_demonstrations(
        verified.train_examples, verified.hp.demonstrations, verified.task.num_classes, verified.cell.seed
    )
    prepared.test_set = encode_with_demonstrations(prepared.clf, prepared.test_examples, demos)
    return {}


def train_nothing(run: CellRun, verified: VerifiedCell, prepared: PreparedCell, how: Training) -> dict:
    """Zero-shot: the pretrained model is evaluated as it is."""
    how.started(None)
    return {}


def _test_curve(run: CellRun, verified: VerifiedCell, prepared: PreparedCell, how: Training):
    from dpzo.models.evaluate import TestLossCurve

    if not how.team.is_main:
        return None  # published by rank 0 only
    settings = run.curve or CurveSettings()
    return TestLossCurve(
        prepared.clf, prepared.test_set, steps=verified.hp.steps, settings=settings, batch_size=run.eval_batch_size
    )


def train_first_order_cell(run: CellRun, verified: VerifiedCell, prepared: PreparedCell, how: Training) -> dict:
    """DP-SGD, DP prefix-tuning or fine-tuning (backprop); always from scratch."""
    from dpzo.baselines.firstorder import train_first_order

    how.started(None)
    return train_first_order(
        prepared.clf,
        prepared.train_set,
        verified.hp,
        method=base_method(verified.cell.method),
        run_seed=verified.cell.seed,
        sigma=verified.noise.sigma,
        secret=how.secret,
        curve=_test_curve(run, verified, prepared, how),
    )


def train_zeroth_order_cell(run: CellRun, verified: VerifiedCell, prepared: PreparedCell, how: Training) -> dict:
    """The zeroth-order methods: ``zo.loop.train_zo`` with the verified noise, the cell's masks,
    its snapshots (resumed from the last one its attempt log records) and its replicas."""
    hp, clf, train_set = verified.hp, prepared.clf, prepared.train_set
    snapshots = None
    if run.checkpoint is not None:
        snapshots = TrainingCheckpoint(run.checkpoint, identity=prepared.identity, record=how.record)
    on_sigterm = snapshots.saving_on_sigterm() if snapshots and how.team.is_main else contextlib.nullcontext()
    with on_sigterm:
        return train_zo(
            prepared.model,
            lambda index: clf.per_example_loss(train_set.batch(index, clf.device)),
            len(train_set),
            hp,
            method=verified.cell.method,
            run_seed=verified.cell.seed,
            noise=verified.noise.release,
            secret=how.secret,
            masks=_masks(run, verified, prepared),
            master_dtype=None if run.master == "none" else torch.float32,
            checkpoint=snapshots,
            curve=_test_curve(run, verified, prepared, how),
            on_start=how.started,
            team=how.team,
            store=prepared.store,
        )


#: The trainer of each kind of method (``Method.trainer``).
TRAINERS = {
    TRAINER_ICL: train_icl,
    TRAINER_NONE: train_nothing,
    TRAINER_FIRST_ORDER: train_first_order_cell,
    TRAINER_ZO: train_zeroth_order_cell,
}


def run_cell(
    run: CellRun,
    *,
    on_start: Callable[[dict, int | None], None] | None = None,
    team: SingleProcess | None = None,
    record: SnapshotRecord | None = None,
) -> dict | None:
    """Verify the cell's ledger, prepare the model and data, train, evaluate: one (model, task,
    method, ε, seed) cell.

    The ledger is verified against the cell before the model is even loaded
    (:func:`verify_cell`); the noise added is the verified one.  ``on_start(identity, step)`` is
    called once before training (evaluation for zero-shot) with what the run is and the step a
    snapshot resumed after (None: from scratch); it may raise to refuse the run
    (``dpzo.pipeline.cellguard.Attempt.start``).  ``record``: the cell's record of the snapshots
    written (its attempt log), which a snapshot must match to be resumed.

    Returns the cell's metrics (:class:`~dpzo.pipeline.metrics.CellMetrics`), with under
    ``"private_diagnostics"`` what the trainer measured on the private batches (training loss,
    batch sizes, clipped fractions): not covered by the guarantee, so the caller keeps it apart
    from what is published.  Evaluation reports the final iterate on the test split; no dev-based
    model selection is done, because choosing among iterates on private data would spend
    unaccounted privacy.

    ``team``: the replicas of a data-parallel zeroth-order run (``dpzo.zo.replicas``).  Only rank 0
    holds the secret RNG, evaluates and returns the metrics; the other ranks train their share of
    every batch and return None.
    """
    from dpzo.models.evaluate import evaluate

    wall_start = time.perf_counter()
    team = team or SingleProcess()
    kind = get_method(base_method(run.cell.method)).trainer
    if team.world_size > 1 and kind != TRAINER_ZO:
        raise ValueError(
            f"{run.cell.method} runs in one process; ranks > 1 are for the zeroth-order methods {tuple(ZO)}"
        )
    verified = verify_cell(run)
    # the secret RNG exists in one process only: the one that samples the batches and adds the noise
    secret = SecretRandom.from_environment() if verified.private and team.is_main else None
    with tf32_matmuls(run.tf32):  # training and evaluation, as the config says (the beta floor reads it)
        prepared = prepare_cell(run, verified)

        def started(resumed_after: int | None) -> None:
            if on_start is not None:
                on_start(prepared.identity, resumed_after)

        history = TRAINERS[kind](run, verified, prepared, Training(secret, team, started, record))
        if not team.is_main:
            return None  # rank 0 evaluates and writes the outputs
        if verified.private:
            check_ledger_after(verified.ledger, history, verified.noise)
        candidate = None
        if verified.validation_examples is not None:  # scored before anything else sees the model
            from dpzo.pipeline.tuning import score_candidate

            validation = evaluate(
                prepared.clf, prepared.clf.encode(verified.validation_examples), batch_size=run.eval_batch_size
            )
            candidate = score_candidate(
                validation, score_sigma=verified.score_sigma, secret=secret, candidate=run.candidate
            )
        result = evaluate(prepared.clf, prepared.test_set, batch_size=run.eval_batch_size)
        metrics = cell_metrics(run, verified, prepared, result, history, team=team, wall_start=wall_start)
        metrics.cost = cell_cost(run, verified, prepared, _masks(run, verified, prepared))  # last: it moves the weights
    out = metrics.to_json()
    if candidate is not None:
        out["candidate"] = candidate
    if run.selection is not None:
        out["selection"] = run.selection
    return out


def _masks(run: CellRun, verified: VerifiedCell, prepared: PreparedCell) -> Callable[[int], Mask] | None:
    """A masked method's stage masks (None for the others)."""
    if not get_method(base_method(verified.cell.method)).masked:
        return None
    return stage_masks(verified.hp, prepared.clf, list(run.mask_files))


def cell_metrics(
    run: CellRun,
    verified: VerifiedCell,
    prepared: PreparedCell,
    result: dict,
    history: dict,
    *,
    team: SingleProcess,
    wall_start: float,
) -> CellMetrics:
    """The cell's typed metrics record from its evaluation and training history."""
    from dpzo.models.meta import new_head_record

    device = prepared.clf.device
    return CellMetrics(
        cell=verified.cell.as_dict(),
        evaluation=result,
        history=history,
        privacy={
            "noise": run.accounting.noise if verified.private else NO_NOISE,
            "epsilon_verified": verified.noise.epsilon,
            "verified_with": verified.noise.accountant,
            "ledger_sha256": ledger_digest(verified.ledger),  # the ledger verified: tables publish no other
        },
        n_train=len(prepared.train_set),
        n_params=sum(p.numel() for p in prepared.model.parameters()),
        wall_seconds=time.perf_counter() - wall_start,
        memory=peak_memory_mb(device),
        device=str(device),
        torch_version=torch.__version__,
        versions=versions(device),
        tuning=prepared.tuning,
        ranks=team.world_size,
        new_head=new_head_record(run.model_path, prepared.family, run.cell.model) if run.allow_new_head else None,
    )


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

    if ranks > 1 and team is None and get_method(base_method(run.cell.method)).trainer == TRAINER_ZO:
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
