"""The typed hyperparameters of every method's config block, validated where they enter.

No heavy imports (torch is not needed to read a config): the accounting rule builds them in
seconds, and the trainers (``dpzo.zo.loop``, ``dpzo.baselines.firstorder``, ``dpzo.baselines.icl``) use the same
classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from dpzo.masks.settings import MaskSettings

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class StageSchedule:
    """Stagewise schedule of DP-ZOSO.

    Stage s lasts ``stage_steps * 2**s`` steps; the last stage runs until ``steps`` (so it
    is extended or truncated); every stage must start before ``steps``, so the schedules below
    reach their last stage.  The learning
    rate is multiplied by ``lr_decay`` at each stage, and the ZO scale moves geometrically from
    ``beta_start`` (stage 0) to ``beta_end`` (stage S-1), in either direction.
    """

    steps: int
    stages: int = 1
    stage_steps: int | None = None
    lr: float = 1e-4
    lr_decay: float = 0.5
    beta_start: float = 1e-3
    beta_end: float = 1e-3

    def __post_init__(self) -> None:
        if self.steps < 0 or self.stages < 1:
            raise ValueError("steps must be >= 0 and stages >= 1")
        if self.beta_start <= 0 or self.beta_end <= 0:
            raise ValueError("beta_start and beta_end must be positive")
        if len(self.stage_starts()) < self.stages:
            # the lr, beta and incremental-mask schedules are spread over the configured stages
            raise ValueError(
                f"{self.stages} stages of {self.stage_steps or self.steps}, then twice as many steps each, "
                f"do not all start within {self.steps} steps; lower 'stages' or 'stage_steps', or raise 'steps'"
            )

    def stage_starts(self) -> list[int]:
        """First step of each stage that actually runs."""
        t0 = self.stage_steps if self.stage_steps is not None else self.steps
        starts, start = [], 0
        for s in range(self.stages):
            if start >= self.steps and s > 0:
                break
            starts.append(start)
            start += t0 * 2**s
        return starts

    def stage_of(self, step: int) -> int:
        """The stage that step ``step`` (counted from 0) belongs to."""
        starts = self.stage_starts()
        return max(s for s, start in enumerate(starts) if start <= step)

    def lr_at(self, stage: int) -> float:
        """Learning rate of stage ``stage``: ``lr * lr_decay**stage``."""
        return self.lr * self.lr_decay**stage

    def beta_at(self, stage: int) -> float:
        """ZO scale of stage ``stage``, geometric from ``beta_start`` (stage 0) to ``beta_end`` (the last)."""
        if self.stages == 1:
            return self.beta_start
        frac = stage / (self.stages - 1)
        return self.beta_start * (self.beta_end / self.beta_start) ** frac


TUNING_KINDS = ("full", "lora", "prefix")

#: model types whose self-attention layers take a key/value prefix (``dpzo.models.prefix``)
PREFIX_MODEL_TYPES = ("opt", "roberta", "bert", "llama", "qwen2", "mistral")


@dataclass(frozen=True)
class TuningSettings:
    """Which parameters a method trains: ``full`` (every weight), ``lora`` adapters or a ``prefix``.

    ``lora``: low-rank adapters from the ``peft`` library (rank ``rank``, scaling
    ``alpha / rank``) on ``target_modules`` (None: peft's default modules for the model's
    architecture, e.g. query/value of RoBERTa, q_proj/v_proj of OPT and Llama); the model's
    own weights are frozen and the flat parameters hold the adapters only.
    ``prefix``: ``tokens`` trainable key/value positions in every self-attention layer, as
    MeZO's prefix baseline (``dpzo.models.prefix``: why not peft's); the model is frozen.
    """

    kind: str = "full"
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    tokens: int = 5

    def __post_init__(self) -> None:
        if self.kind not in TUNING_KINDS:
            raise ValueError(f"tuning.kind must be one of {TUNING_KINDS}; got {self.kind!r}")
        if self.rank < 1 or not self.alpha > 0:
            raise ValueError(f"tuning: rank must be >= 1 and alpha > 0; got rank {self.rank}, alpha {self.alpha}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tuning: tokens (prefix positions) must be an integer >= 1; got {self.tokens!r}")

    def architecture_problem(self, model_type: str) -> str | None:
        """Why a model of ``model_type`` cannot be tuned this way (None: it can)."""
        if self.kind == "prefix" and model_type not in PREFIX_MODEL_TYPES:
            return (
                f"tuning: prefix installs key/value positions in the self-attention layers of "
                f"{', '.join(PREFIX_MODEL_TYPES)}; a {model_type!r} model is not one of them"
            )
        return None

    @classmethod
    def from_config(cls, block: dict | str | None) -> TuningSettings:
        """From a method's ``tuning`` block (``full``, ``lora``, or ``{kind: lora, rank: 8, ...}``)."""
        if block is None:
            return cls()
        if isinstance(block, str):
            return cls(kind=block)
        block = dict(block)
        unknown = sorted(set(block) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown tuning key(s) {unknown}; allowed: {[f.name for f in fields(cls)]}")
        if block.get("target_modules") is not None:
            block["target_modules"] = tuple(block["target_modules"])
        return cls(**block)


@dataclass(frozen=True)
class ZOHyperparameters:
    """The hyperparameters of a zeroth-order config block (MeZO, DPZero, DP-ZO, DP-ZOSO, DP-ZOPO).

    ``clip`` is the per-example clip C (inf: none); ``directions`` is P, the perturbation directions per
    step, each with its own batch and release; ``beta_start``/``beta_end`` are the ZO scale; ``stages``,
    ``stage_steps`` and ``lr_decay`` the stagewise schedule (:class:`StageSchedule`) and ``lam`` the
    weight of the proximal term.
    """

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
    tuning: TuningSettings = TuningSettings()

    @classmethod
    def from_config(cls, params: dict) -> ZOHyperparameters:
        """Build from a method's config block (``beta`` is shorthand for a constant ZO scale)."""
        params = dict(params)
        if "mask" in params:
            params["mask"] = MaskSettings.from_config(params["mask"])
        if "tuning" in params:
            params["tuning"] = TuningSettings.from_config(params["tuning"])
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
        """The :class:`StageSchedule` these settings describe."""
        return StageSchedule(
            steps=self.steps,
            stages=self.stages,
            stage_steps=self.stage_steps,
            lr=self.lr,
            lr_decay=self.lr_decay,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )


@dataclass(frozen=True)
class FirstOrderHyperparameters:
    """The hyperparameters of a first-order config block (DP-SGD, DP prefix, fine-tuning).

    ``batch_size`` is B (the expected size of a Poisson batch for the private methods, the fixed
    minibatch size for ``ft``); ``physical_batch_size`` is how many examples one per-example-gradient
    pass holds (memory only); ``prefix_tokens`` is read by DP prefix tuning only.
    """

    steps: int
    batch_size: int
    lr: float
    clip: float = math.inf
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    physical_batch_size: int = 8
    prefix_tokens: int = 5
    log_every: int = 10
    tuning: TuningSettings = TuningSettings()

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"first-order hyperparameter {name}={getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size", "physical_batch_size", "prefix_tokens", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise bad(name, "must be an integer")
        if self.steps < 0:
            raise bad("steps", "must be >= 0")
        for name in ("batch_size", "physical_batch_size", "prefix_tokens", "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise bad("lr", "must be a finite number > 0")
        if not float(self.clip) > 0:  # inf allowed (no clipping; non-private runs only)
            raise bad("clip", "must be > 0 (inf: no clipping)")
        if not (math.isfinite(float(self.weight_decay)) and float(self.weight_decay) >= 0):
            raise bad("weight_decay", "must be a finite number >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"allowed: {', '.join(OPTIMIZERS)}")

    @property
    def directions(self) -> int:
        """One release per step (lets ``train.check_ledger`` compare this run with its ledger)."""
        return 1

    @classmethod
    def from_config(cls, params: dict) -> FirstOrderHyperparameters:
        """Build from a method's config block; unknown keys are refused (listing the allowed ones)."""
        params = dict(params)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown first-order hyperparameter(s) {unknown}; allowed: {known}")
        for name in ("lr", "clip", "weight_decay"):
            if name in params and isinstance(params[name], str):  # "inf" as written in JSON
                params[name] = float(params[name])
        if "tuning" in params:
            params["tuning"] = TuningSettings.from_config(params["tuning"])
        return cls(**params)


@dataclass(frozen=True)
class ICLHyperparameters:
    """The hyperparameters of an ICL config block: the number of demonstrations in each test prompt."""

    demonstrations: int = 8

    @classmethod
    def from_config(cls, params: dict) -> ICLHyperparameters:
        """Build from the config block; raises ValueError naming any unknown key."""
        unknown = sorted(set(params) - {"demonstrations"})
        if unknown:
            raise ValueError(f"unknown icl hyperparameter(s) {unknown}; allowed: ['demonstrations']")
        return cls(**params)
