"""What a method is: one small class per family, one module per method (``dpzo.methods.*``).

A method declares, in one place, everything the pipeline needs to know about it:

* ``name`` and the schema block its config follows (``config_block``, a ``$defs`` entry of
  ``workflow/schemas/config.schema.yaml``; a test checks the two agree);
* its hyperparameters dataclass (``hyperparameters``) and the checks specific to the method
  (:meth:`Method.check`);
* for a private method, what it releases and how that is accounted: the mechanism
  (``gaussian`` or ``laplace``), the neighbouring relation, the sensitivity of one release
  (the clip C) and the number of compositions (releases per run);
* for a zeroth-order method, its release rule (:meth:`ZOMethod.release`): what the trainer
  does with the per-example finite differences of one direction;
* what the rest of the pipeline asks of it instead of comparing names: who trains it
  (:attr:`Method.trainer`, and :attr:`Method.trains` / :attr:`Method.reads_training_data`
  derived from it), whether it trains on a mask (``masked``, with the method it restricts,
  ``dense_counterpart``) and whether its trainer installs a prefix of its own (``installs_prefix``).

This module imports nothing heavy: the Snakefile reads the registry.  Release rules work on
tensors through their methods only (``abs``, ``clamp``, ``sum``, ``mean``), so they need no
torch import either.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dpzo.methods.hyperparameters import FirstOrderHyperparameters, ZOHyperparameters

#: The neighbouring relation of every private method of this project (Poisson sampling).
ADD_REMOVE = "add/remove one example"

# What ``Method.trainer`` can be: who runs a cell of the method (``pipeline.cell.run_cell``).
#: two forward passes per direction, ``dpzo.zo.loop.train_zo``
TRAINER_ZO = "zeroth-order"
#: backpropagation, ``dpzo.baselines.firstorder.train_first_order``
TRAINER_FIRST_ORDER = "first-order"
#: training examples as demonstrations in every test prompt, ``dpzo.baselines.icl``
TRAINER_ICL = "icl"
#: nothing: the pretrained model is evaluated as it is
TRAINER_NONE = "none"
TRAINERS = (TRAINER_ZO, TRAINER_FIRST_ORDER, TRAINER_ICL, TRAINER_NONE)


class Method:
    """A method of the comparison: what one block under ``methods:`` of the config runs."""

    name: ClassVar[str]
    #: the ``$defs`` entry of the config schema that a block of this method follows
    config_block: ClassVar[str]
    #: the typed hyperparameters of a config block (None: the method takes none)
    hyperparameters: ClassVar[type | None] = None
    private: ClassVar[bool] = False
    #: "gaussian" | "laplace" (private methods)
    mechanism: ClassVar[str | None] = None
    neighbouring: ClassVar[str] = ADD_REMOVE
    #: the method's own published accounting, where it differs from the common one
    #: (``accounting: published`` in the config); None: accounted the common way
    published_accounting: ClassVar[str | None] = None
    #: who runs a cell of this method, one of :data:`TRAINERS`; ``pipeline.cell.run_cell`` picks
    #: the trainer by it, the workflow gives ranks to :data:`TRAINER_ZO` only, a streamed model
    #: refuses :data:`TRAINER_FIRST_ORDER` (it backpropagates)
    trainer: ClassVar[str]
    #: trains only the coordinates of a data-free mask (a zeroth-order method with a ``mask`` block)
    masked: ClassVar[bool] = False
    #: a masked method: the method it restricts to its mask (the same release on every coordinate),
    #: which the pruning ablation (``report.figures.ablation``) draws as its dense reference
    dense_counterpart: ClassVar[str | None] = None
    #: its trainer installs a key/value prefix of its own and trains only that, the model frozen
    #: (dp-prefix; a ``tuning: prefix`` block is another thing, applied before any trainer runs)
    installs_prefix: ClassVar[bool] = False

    @property
    def trains(self) -> bool:
        """Whether a cell updates weights (a zeroth- or first-order trainer): it then runs steps, has
        a training curve and, when private, makes releases."""
        return self.trainer in (TRAINER_ZO, TRAINER_FIRST_ORDER)

    @property
    def reads_training_data(self) -> bool:
        """Whether a cell uses the training split at all: every method but zero-shot (ICL shows it
        in its prompts without training).  The figures draw a method that does not as the dotted
        reference of the pretrained model."""
        return self.trainer != TRAINER_NONE

    def hyperparameters_from(self, params: dict) -> Any:
        """The typed hyperparameters of a config block, checked for this method (its ``tune`` block,
        how the values are chosen, is not a hyperparameter: ``dpzo.pipeline.tuning``)."""
        params = {key: value for key, value in params.items() if key != "tune"}
        if self.hyperparameters is None:
            if params:
                raise ValueError(f"{self.name} takes no hyperparameters; got {sorted(params)}")
            return None
        hp = self.hyperparameters.from_config(params)
        self.check(hp)
        return hp

    def check(self, hp: Any) -> None:
        """Refuse settings this method does not use (the message names them and the fix)."""

    def architecture_problem(self, model_type: str, hp: Any = None) -> str | None:
        """Why this method, with the hyperparameters ``hp``, cannot train a model of ``model_type`` (a
        transformers config's ``model_type``), or None: every zeroth-order and full-parameter method
        trains any language model; a prefix needs attention layers it knows (read before any job)."""
        tuning = getattr(hp, "tuning", None)
        return tuning.architecture_problem(model_type) if tuning is not None else None

    def sensitivity(self, hp: Any) -> float:
        """How far one example can move one release (before the noise): the clip C."""
        return float(hp.clip)

    def releases_per_step(self, directions: int) -> int:
        """Accounted releases per step, each on its own Poisson batch: one per direction here."""
        return int(directions)

    def compositions(self, hp: Any) -> int:
        """How many releases a run makes: T times :meth:`releases_per_step`."""
        return int(hp.steps) * self.releases_per_step(int(getattr(hp, "directions", 1)))

    def __repr__(self) -> str:
        return f"<method {self.name}>"


class ZOMethod(Method):
    """A zeroth-order method: trained by :func:`dpzo.zo.loop.train_zo` from two forward passes."""

    config_block = "zo_constant"
    hyperparameters = ZOHyperparameters
    trainer = TRAINER_ZO
    #: a stagewise learning-rate / ZO-scale schedule and the proximal anchor are allowed
    staged: ClassVar[bool] = False

    def release_groups(self, seeds: list[int]) -> list[list[int]]:
        """How a step's directions share batches and releases: here each its own (one Poisson
        batch and one scalar release per direction); DP-AggZO releases all of them at once."""
        return [[seed] for seed in seeds]

    def release_group(self, ds: list[Any], **kwargs: Any) -> tuple[list[Any], Any]:
        """The scalars of one group's directions (``ds``: their per-example quotients on the
        group's batch) and how many examples the clip changed: here :meth:`release` of the one."""
        (d,) = ds
        g, clipped = self.release(d, **kwargs)
        return [g], clipped

    def check(self, hp: Any) -> None:
        """Refuse a ``mask`` block on an unmasked method (or its absence on a masked one), and a stagewise
        schedule or proximal term on a method whose schedule is constant."""
        if self.masked != (hp.mask is not None):
            raise ValueError(f"{self.name}: a 'mask' block is {'required' if self.masked else 'not allowed'}")
        if self.masked and hp.tuning.kind != "full":
            raise ValueError(
                f"{self.name}: its data-free mask selects coordinates of the full model; with tuning: "
                f"{hp.tuning.kind} there are none to select (use dp-zoso with LoRA, or tuning: full)"
            )
        if not self.staged and (hp.stages > 1 or hp.lam or hp.beta_start != hp.beta_end):
            raise ValueError(
                f"{self.name} has a constant schedule: 'stages', 'lam' and beta_start != beta_end are "
                "DP-ZOSO/DP-ZOPO settings (remove them, or use dp-zoso)"
            )

    def release(self, d: Any, *, clip: float, beta: float, noise: Any = None, secret: Any = None) -> tuple[Any, Any]:
        """The scalar this direction contributes, and how many examples the clip changed.

        ``d`` holds the per-example finite-difference quotients of the batch (float64, on the
        model's device).  Non-private (MeZO): the mean of the clipped quotients, nothing
        noised.  Both results stay on the device as 0-d tensors.
        """
        clipped = (d.abs() > clip).sum()
        if len(d) == 0:
            return d.sum(), clipped  # an empty batch contributes 0
        return d.clamp(-clip, clip).mean() if clip != float("inf") else d.mean(), clipped


class PrivateZOMethod(ZOMethod):
    """A private zeroth-order method: per direction, one accounted release of a noisy clipped sum.

    Each release is ``(sum_i clip_C(v_i) + noise) / (q n)`` over a fresh Poisson batch; ``v_i``
    is what :meth:`clipped_value` says (the quotient itself here), the noise is the ledger's
    (``dpzo.privacy.mechanisms.NoisySum``, drawn from the secret RNG), and the division by the
    public expected batch size is post-processing.
    """

    private = True
    mechanism = "gaussian"

    def clipped_value(self, d: Any, beta: float) -> Any:
        """What is clipped per example: the finite-difference quotient ``d``."""
        return d

    def gradient_from(self, released: Any, beta: float) -> Any:
        """The projected gradient from the released scalar (public post-processing)."""
        return released

    def release(self, d: Any, *, clip: float, beta: float, noise: Any = None, secret: Any = None) -> tuple[Any, Any]:
        """Clip each example's value to [-C, C], sum, add the ledger's noise (``noise.release``)."""
        if noise is None or secret is None:
            raise ValueError(f"{self.name} releases through the ledger's noise and the secret RNG")
        value = self.clipped_value(d, beta)
        clipped = (value.abs() > clip).sum()
        released = noise.release(value.clamp(-clip, clip).sum(), secret)
        return self.gradient_from(released, beta), clipped


class FirstOrderMethod(Method):
    """A backpropagation baseline (``dpzo.baselines.firstorder``): one release per step."""

    config_block = "first_order"
    hyperparameters = FirstOrderHyperparameters
    trainer = TRAINER_FIRST_ORDER

    def compositions(self, hp: Any) -> int:
        """One release per step: T."""
        return int(hp.steps)
