"""The training loop of the zeroth-order methods.

Which method does what (``dpzo.methods.ZO`` holds the table):

* ``mezo``          non-private reference: a fixed-size batch drawn uniformly without
                    replacement each step (public seed), mean of the raw per-example
                    differences, constant learning rate and ZO scale.
* ``dp-zoso``       Poisson sampling with rate q = B/n from the secret RNG (what the
                    accountant assumes), per-example clipping of the finite-difference
                    quotient, Gaussian noise on the sum, division by the expected batch size
                    q*n, and the stagewise schedule of ``zo.StageSchedule``.
* ``dpzero``        the same release with a constant schedule (Zhang et al. 2024).
* ``dp-zo-gauss``,  Tang et al. 2024: the raw loss difference l+ - l- is clipped (C ~ 0.05),
  ``dp-zo-laplace`` noised (Gaussian, or Laplace for pure eps-DP) and only then divided by
                    2 beta, so the clip does not depend on beta.

The noise added is read from the privacy ledger (``privacy.NoisySum.from_ledger``).

Exactly ``steps`` updates run, each with ``directions`` releases; the trainer refuses to start
when this differs from what the privacy ledger accounted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from .methods import FIRST_ORDER, ICL, PRIVATE_METHODS, ZERO_SHOT, ZO, ZO_METHODS, base_method
from .methods import MaskSettings
from .prune import Mask
from .checkpoint import CheckpointPolicy, LoopState, TrainingCheckpoint, digest, file_digest
from .models import PromptClassifier
from .privacy import NoisySum, SecretRandom
from .zo import FlatParameters, StageSchedule, apply_update, clip_differences, direction_seed, spsa_differences

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ZOHyperparameters:
    steps: int
    batch_size: int
    lr: float
    beta_start: float = 1e-3
    beta_end: float = 1e-3
    stages: int = 1
    stage_steps: int | None = None
    lr_decay: float = 0.5
    lam: float = 0.0
    clip: float = math.inf
    directions: int = 1
    log_every: int = 10
    mask: MaskSettings | None = None  # DP-ZOPO only

    @classmethod
    def from_config(cls, params: dict) -> "ZOHyperparameters":
        """Build from a method's config block (``beta`` is shorthand for a constant ZO scale)."""
        params = dict(params)
        if "mask" in params:
            params["mask"] = MaskSettings.from_config(params["mask"])
        if "beta" in params:
            beta = params.pop("beta")
            params.setdefault("beta_start", beta)
            params.setdefault("beta_end", beta)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown zeroth-order hyperparameter(s) {unknown}; allowed: {sorted(known | {'beta'})}")
        return cls(**params)

    def schedule(self) -> StageSchedule:
        return StageSchedule(
            steps=self.steps,
            stages=self.stages,
            stage_steps=self.stage_steps,
            lr=self.lr,
            lr_decay=self.lr_decay,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )


def hyperparameters_for(method: str, params: dict):
    """The typed hyperparameters of a method's config block (None for zero-shot)."""
    method = base_method(method)
    if method == ZERO_SHOT:
        if params:
            raise ValueError(f"zero-shot takes no hyperparameters; got {sorted(params)}")
        return None
    if method in ZO_METHODS:
        hp = ZOHyperparameters.from_config(params)
        if ZO[method].masked != (hp.mask is not None):
            raise ValueError(f"{method}: a 'mask' block is {'required' if ZO[method].masked else 'not allowed'}")
        return hp
    if method == ICL:
        from .icl import ICLHyperparameters

        return ICLHyperparameters.from_config(params)
    if method in FIRST_ORDER:
        from .firstorder import FirstOrderHyperparameters

        return FirstOrderHyperparameters.from_config(params)
    raise ValueError(f"unknown method {method!r}")


def check_ledger(ledger: dict, *, n: int, hp: ZOHyperparameters) -> None:
    """Refuse to train anything other than what the privacy ledger accounted."""
    expected = {
        "n": n,
        "steps": hp.steps,
        "directions": hp.directions,
        "expected_batch_size": hp.batch_size,
        "clip": hp.clip,
    }
    for key, value in expected.items():
        if not math.isclose(float(ledger[key]), float(value), rel_tol=1e-12):
            raise RuntimeError(
                f"privacy ledger mismatch: {key} accounted {ledger[key]} but training would use {value}; "
                f"re-run the accounting rule for this cell"
            )
    if not math.isclose(float(ledger["q"]), hp.batch_size / n, rel_tol=1e-12):
        raise RuntimeError(f"privacy ledger mismatch: q accounted {ledger['q']} but B/n = {hp.batch_size / n}")


def train_zo(
    model: torch.nn.Module,
    per_example_loss: Callable[[np.ndarray], torch.Tensor],
    n: int,
    hp: ZOHyperparameters,
    *,
    method: str,
    run_seed: int,
    noise: NoisySum | None = None,
    secret: SecretRandom | None = None,
    master_dtype: torch.dtype = torch.float32,
    masks: Callable[[int], Mask] | None = None,
    checkpoint: TrainingCheckpoint | None = None,
) -> dict:
    """Run ``hp.steps`` zeroth-order steps on ``model`` in place; returns the training history.

    ``per_example_loss(index)`` returns the [len(index)] losses of the training examples
    ``index`` at the model's current weights (one batched forward).  Private methods need
    ``noise`` (from the ledger) and the secret RNG that samples batches and draws the noise.
    Masked methods need ``masks(stage)``: the mask to train during that stage, asked for at the
    start of each stage.  With ``checkpoint`` the loop continues from the cell's snapshot when
    there is one and writes new ones as its policy says (``dpzo.checkpoint``).
    """
    method = base_method(method)
    if method not in ZO_METHODS:
        raise ValueError(f"train_zo runs {ZO_METHODS}, not {method!r}")
    spec = ZO[method]
    if spec.masked != (masks is not None):
        raise ValueError(f"{method}: masks are {'required' if spec.masked else 'not used'}")
    private = spec.private
    if hp.batch_size > n:
        raise ValueError(f"batch_size {hp.batch_size} is larger than the training set ({n} examples)")
    if private and (secret is None or noise is None):
        raise ValueError("a private method needs the secret RNG and the ledger's noise")
    if private and math.isinf(hp.clip):
        raise ValueError(f"{method} needs a finite clip")
    q = hp.batch_size / n
    public_rng = np.random.default_rng([int(run_seed), 1])  # mezo's batches: no privacy claim
    schedule = hp.schedule()
    starts = set(schedule.stage_starts())
    flat = FlatParameters(model, master_dtype=master_dtype)
    anchor = None

    history: dict[str, list] = {"step": [], "stage": [], "lr": [], "beta": [], "loss": [], "examples": [], "clipped_fraction": [], "grad": [], "mask_size": []}
    losses_since_log: list[float] = []
    examples_since_log, clipped_since_log = 0, 0
    first_step, releases, prior_seconds, resumed_from = 0, 0, 0.0, []
    resumed = checkpoint.resume(flat, public_rng=public_rng, secret=secret) if checkpoint is not None else None
    if resumed is not None:
        first_step, releases, prior_seconds = resumed.step, resumed.releases, resumed.train_seconds
        anchor, history, resumed_from = resumed.anchor, resumed.history, resumed.resumed_from + [resumed.step]
        losses_since_log, examples_since_log, clipped_since_log = resumed.since_log
    started = time.perf_counter()
    for step in range(first_step, hp.steps):
        stage = schedule.stage_of(step)
        lr, beta = schedule.lr_at(stage), schedule.beta_at(stage)
        if step in starts:
            if masks is not None:
                mask = masks(stage)
                scales = mask.scales
                rank_update = hp.mask is not None and hp.mask.rank_update
                flat.set_mask(mask.indices, perturb_scales=scales, update_scales=scales if rank_update else None)
                history["mask_size"].append(len(mask))
            if hp.lam:
                anchor = flat.snapshot()  # theta_s: a real copy taken at the start of each stage
        seeds, grads = [], []
        for p in range(hp.directions):
            if private:
                index = secret.poisson_batch(n, q)
            else:
                index = public_rng.choice(n, size=hp.batch_size, replace=False)
            seed = direction_seed(run_seed, step, p)
            if len(index) == 0:
                d = torch.zeros(0, dtype=torch.float64)
            else:
                d, loss_plus, loss_minus = spsa_differences(lambda: per_example_loss(index), flat, seed, beta)
                if not torch.isfinite(d).all():
                    raise FloatingPointError(
                        f"non-finite loss difference at step {step} (beta={beta}); lower the learning rate or raise beta"
                    )
                losses_since_log.append(float(0.5 * (loss_plus + loss_minus).mean()))
            if private:
                # the clipped value: the quotient d, or (Tang et al.) the raw difference 2 beta d
                value = d * (2.0 * beta) if spec.clip_raw_difference else d
                clipped_since_log += int((value.abs() > hp.clip).sum())
                g = noise.release(float(clip_differences(value, hp.clip).sum()), secret)
                releases += 1
                if spec.clip_raw_difference:
                    g /= 2.0 * beta
            else:
                g = float(clip_differences(d, hp.clip).mean()) if len(d) else 0.0
            seeds.append(seed)
            grads.append(g)
            examples_since_log += len(index)
        apply_update(flat, seeds, grads, lr=lr, lam=hp.lam, anchor=anchor)
        if (step + 1) % hp.log_every == 0 or step + 1 == hp.steps:
            history["step"].append(step + 1)
            history["stage"].append(stage)
            history["lr"].append(lr)
            history["beta"].append(beta)
            history["loss"].append(float(np.mean(losses_since_log)) if losses_since_log else float("nan"))
            history["examples"].append(examples_since_log)
            history["clipped_fraction"].append(clipped_since_log / max(examples_since_log, 1))
            history["grad"].append(float(np.mean(grads)))
            losses_since_log = []
            examples_since_log, clipped_since_log = 0, 0
        if checkpoint is not None:
            checkpoint.step_done(
                step + 1,
                lambda: LoopState(step + 1, releases, anchor, history, (losses_since_log, examples_since_log, clipped_since_log),
                                  prior_seconds + time.perf_counter() - started, resumed_from),
                flat, public_rng=public_rng, secret=secret,
            )
    elapsed = prior_seconds + time.perf_counter() - started
    history["steps_run"] = hp.steps
    history["releases"] = releases  # counted, across resumes: checked against the ledger
    history["resumed_from"] = resumed_from
    history["train_seconds"] = elapsed
    history["ms_per_step"] = 1000.0 * elapsed / max(hp.steps, 1)
    history["stage_starts"] = schedule.stage_starts()
    return history


def stage_masks(hp: ZOHyperparameters, clf: PromptClassifier, mask_files: list[str] | None) -> Callable[[int], Mask]:
    """The mask of each DP-ZOPO stage under the configured strategy (``prune.MaskSettings``)."""
    from .prune import compute_mask

    settings = hp.mask
    stages = len(hp.schedule().stage_starts())
    if not mask_files or len(mask_files) != len(set(settings.stage_ratios(hp.stages))):
        raise ValueError(f"DP-ZOPO needs one precomputed mask per distinct stage ratio; got {mask_files}")
    loaded = {m.meta["ratio"]: m for m in (Mask.load(f) for f in mask_files)}

    def mask_for(stage: int) -> Mask:
        ratio = settings.stage_ratios(hp.stages)[stage]
        if settings.strategy == "dynamic" and stage > 0:
            # data-free: rescoring the current weights costs no privacy
            return compute_mask(clf.model, clf.label_ids, clf.family, settings, ratio)
        return loaded[ratio]

    log.info("DP-ZOPO: %s masks over %d stages", settings.strategy, stages)
    return mask_for


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory (MiB)."""
    import resource

    out = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_cell(
    *,
    model: str,
    model_path: str,
    family: str,
    dtype: str,
    task_name: str,
    split_dir: str,
    method: str,
    method_params: dict,
    ledger: dict,
    seed: int,
    eval_batch_size: int = 128,
    device: str = "cpu",
    mask_files: list[str] | None = None,
    checkpoint: CheckpointPolicy | None = None,
) -> dict:
    """Train (unless zero-shot) and evaluate one (model, task, method, eps, seed) cell.

    ``mask_files`` (DP-ZOPO): the precomputed mask of each stage's starting ratio, in stage
    order (see ``prune.MaskSettings``).  ``checkpoint``: where and how often zeroth-order
    training snapshots itself, and resumes from (``dpzo.checkpoint``).

    Evaluation reports the final iterate on the test split; no dev-based model selection is
    done, because choosing among iterates on private data would spend unaccounted privacy.
    """
    from pathlib import Path

    from .data import load_split
    from .evaluate import evaluate
    from .models import load_model
    from .tasks import get_task

    wall_start = time.perf_counter()
    task = get_task(task_name)
    torch.manual_seed(seed)
    lm, tokenizer, family = load_model(model_path, family=family, dtype=dtype, device=device)
    clf = PromptClassifier(lm, tokenizer, family, task)
    train_examples = load_split(Path(split_dir) / "train.jsonl")
    test_examples = load_split(Path(split_dir) / "test.jsonl")
    train_set = clf.encode(train_examples)
    test_set = clf.encode(test_examples)

    history: dict = {}
    base = base_method(method)
    if base == ICL:
        from .icl import choose_demonstrations, encode_with_demonstrations

        hp = hyperparameters_for(method, method_params)
        demos = choose_demonstrations(train_examples, hp.demonstrations, task.num_classes, seed)
        test_set = encode_with_demonstrations(clf, test_examples, demos)
    elif base != ZERO_SHOT:
        hp = hyperparameters_for(method, method_params)
        secret = None
        if base in PRIVATE_METHODS:
            check_ledger(ledger, n=len(train_set), hp=hp)
            secret = SecretRandom.from_environment()
        if base in FIRST_ORDER:
            from .firstorder import train_first_order

            history = train_first_order(
                clf, train_set, hp, method=base, run_seed=seed, sigma=float(ledger.get("sigma") or 0.0), secret=secret
            )
        else:
            snapshots = None
            if checkpoint is not None:
                # everything the run depends on: a snapshot of any other run is never resumed
                snapshots = TrainingCheckpoint(checkpoint, identity=dict(
                    model_path=model_path, dtype=dtype, task=task_name, method=method, seed=seed,
                    method_params=method_params, ledger=ledger,
                    train_data=digest(train_set.input_ids, train_set.lengths, train_set.labels),
                    masks=[file_digest(f) for f in mask_files or []],
                ))
            with snapshots.saving_on_sigterm() if snapshots else contextlib.nullcontext():
                history = train_zo(
                    lm,
                    lambda index: clf.per_example_loss(train_set.batch(index, clf.device)),
                    len(train_set),
                    hp,
                    method=method,
                    run_seed=seed,
                    noise=NoisySum.from_ledger(ledger) if secret is not None else None,
                    secret=secret,
                    masks=stage_masks(hp, clf, mask_files) if ZO[base].masked else None,
                    checkpoint=snapshots,
                )
        if base in PRIVATE_METHODS and history["releases"] != ledger["compositions"]:
            raise RuntimeError(
                f"ran {history['releases']} releases but the ledger accounted {ledger['compositions']}"
            )
    result = evaluate(clf, test_set, batch_size=eval_batch_size)
    resumed_from = history.pop("resumed_from", [])
    return {
        "model": model,
        "task": task_name,
        "method": method,
        "seed": seed,
        "accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "test_n": result["n"],
        "confusion": result["confusion"],
        "n_train": len(train_set),
        "n_params": sum(p.numel() for p in lm.parameters()),
        "steps": history.get("steps_run", 0),
        "releases": history.get("releases", 0),
        "resumed_from": resumed_from,  # steps after which an interrupted run was continued
        "ms_per_step": history.get("ms_per_step"),
        "train_seconds": history.get("train_seconds", 0.0),
        "wall_seconds": time.perf_counter() - wall_start,
        "memory": peak_memory_mb(clf.device),
        "device": str(clf.device),
        "torch": torch.__version__,
        "history": {k: v for k, v in history.items() if isinstance(v, list)},
        "history_note": "loss is the mean training loss on the sampled batches: computed on private "
        "data, it is a diagnostic and is not covered by the DP guarantee; grad is the released scalar.",
    }
