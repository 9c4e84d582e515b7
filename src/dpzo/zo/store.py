"""Where theta lives: the one contract every store of the trainable vector meets, and the factory.

The step (``dpzo.zo.step``), the loop (``dpzo.zo.loop``), the monitor, the snapshots
(``dpzo.zo.checkpoint``) and the β floor (``dpzo.zo.precision``) see theta only through
:class:`ParameterStore`.  Three stores implement it:

* :class:`~dpzo.zo.flat.FlatParameters`: one flat buffer on one device (the resident model);
* :class:`~dpzo.zo.placed.PlacedParameters`: one ``FlatParameters`` per device of a model
  placed over several devices, z drawn for the whole vector;
* :class:`~dpzo.zo.streamed.StreamedParameters`: the transformer blocks in host memory, each
  uploaded once per step, every direction's ± groups in one forward.

The resident two (:class:`ResidentStore`) can also be perturbed as a whole, which is how they
compute a step's two-point losses; the streamed store perturbs block by block inside its forward.

Adding a store: write a class with every member of :class:`ParameterStore` (its own code, no
stubs: ``tests/test_store.py`` checks each class member by member and signature by signature),
keep the trajectory equal to the resident one's (the float64 equality tests of placed and
streamed are the pattern), and choose it in :func:`build_store` from the cell's settings: that is
the only place a store is chosen (``pipeline.cell``, ``zo.loop.train_zo`` and ``bench`` call it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dpzo.zo.flat import STATE_KEYS, FlatParameters
from dpzo.zo.passes import Coefficient
from dpzo.zo.placed import PlacedParameters, parameter_runs
from dpzo.zo.streamed import StreamedParameters

__all__ = ["STATE_KEYS", "ParameterStore", "ResidentStore", "build_store"]

#: (d, l+, l-) of one pass: the per-example quotients (float64) and the losses at theta +- beta z
TwoPointLosses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: how the training loop cuts the model: ``none`` (resident, placed when loaded over several
#: devices) or ``streamed`` (blocks in host memory)
OFFLOADS = ("none", "streamed")


@runtime_checkable
class ParameterStore(Protocol):
    """The trainable vector theta, wherever it lives (module docstring).

    ``numel`` counts its coordinates; ``device`` is where the inputs go and the losses, the
    differences and the released scalars live.  Moves are lazy: an update or a pull may be
    written when the next pass runs, so :meth:`restore` comes before the weights are read for
    anything else than the step's losses (a stage boundary, a snapshot, an evaluation).
    """

    numel: int
    device: torch.device

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype theta is held in (the model's own when trained in place)."""
        ...

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype the forward computes with (the model's)."""
        ...

    @property
    def master(self) -> torch.Tensor:
        """theta, for reading (one buffer: the master itself; several: a CPU copy)."""
        ...

    def two_point_losses(
        self,
        per_example_loss: Callable[[np.ndarray], torch.Tensor],
        passes: Sequence[tuple[np.ndarray, int]],
        beta: float,
    ) -> list[TwoPointLosses]:
        """(d, l+, l-) of every (batch, seed) of a step, d = (l(theta + beta z) - l(theta - beta z)) / 2 beta.

        ``per_example_loss(index)`` returns the [len(index)] losses of one batched forward at the
        current weights.  The weights may be left perturbed: the next pass overwrites them."""
        ...

    def add_directions(self, moves: Sequence[tuple[int, Coefficient]]) -> None:
        """theta <- theta + sum_k coef_k z(seed_k) on the support (times the update scales)."""
        ...

    def pull_toward(self, anchor: torch.Tensor, weight: float) -> None:
        """theta <- theta - weight (theta - anchor) on the support (``anchor``: a :meth:`snapshot`)."""
        ...

    def restore(self) -> None:
        """The weights equal theta again, every pending move written."""
        ...

    def set_mask(
        self,
        indices: torch.Tensor | None,
        perturb_scales: torch.Tensor | None = None,
        update_scales: torch.Tensor | None = None,
    ) -> None:
        """Restrict perturbation and update to the sorted flat coordinates ``indices`` (None: dense)."""
        ...

    def snapshot(self) -> torch.Tensor:
        """A real copy of theta on the support (the proximal anchor); never an alias."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """theta and the support as CPU copies, keyed by :data:`STATE_KEYS` (any store loads it)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Continue from a :meth:`state_dict` of this model, whichever store wrote it."""
        ...

    def weights_finite(self) -> bool:
        """Whether every coordinate of theta is finite."""
        ...

    def strided_theta(self, stride: int) -> torch.Tensor:
        """Every ``stride``-th coordinate of theta (of each buffer, from its first), float32 on the CPU."""
        ...


@runtime_checkable
class ResidentStore(ParameterStore, Protocol):
    """A store whose whole theta sits on devices, perturbed as one vector."""

    def perturb(self, seed: int, scale: float) -> None:
        """work <- theta + scale z(seed) on the support (times the perturbation scales)."""
        ...

    def direction(self, seed: int) -> torch.Tensor:
        """z(seed) on the support (for tests and audits)."""
        ...


def build_store(
    model: torch.nn.Module,
    *,
    master_dtype: torch.dtype | None = torch.float32,
    offload: str = "none",
    device: str | torch.device | None = None,
    directions: int = 1,
    parts: Sequence[Sequence[str]] | None = None,
) -> ParameterStore:
    """The store of ``model``'s trainable parameters for a cell's settings.

    ``master_dtype``: theta in a master copy of that dtype, or in place (None).  ``offload``
    (:data:`OFFLOADS`): ``streamed`` keeps the blocks in host memory and computes on ``device``
    (the model must still be in host memory); otherwise the parameters stay where they were
    loaded: one buffer, or one per device of a placed model.  ``directions``: the directions per
    step, whose z a buffer keeps for the passes of a step.  ``parts`` (lists of parameter names,
    in order, covering them all) cuts the vector by hand, as the tests of placement do.
    """
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, not {offload!r}")
    if offload == "streamed":
        if device is None or parts is not None:
            raise ValueError("a streamed store needs the compute device, and cuts the model at its blocks")
        return StreamedParameters(model, master_dtype, device=device, direction_cache_size=directions)
    runs = parameter_runs(model, parts)
    if len(runs) == 1:
        return FlatParameters(model, master_dtype, direction_cache_size=directions)
    return PlacedParameters(runs, master_dtype, direction_cache_size=directions)
