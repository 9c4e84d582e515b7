"""A model placed over several devices: one flat buffer per device, one z for the whole vector.

A model loaded with a device map (``dpzo.models.classifier.load_model``, ``placement``) has
its layers on several GPUs (or GPUs and the CPU).  A module the device map sends to ``cpu`` or
``disk`` while a GPU is the main device is offloaded by accelerate (its weights on ``meta``,
reloaded by hooks at each forward): no buffer can hold those, so such a model is refused here
(and its config before any job, ``dpzo.pipeline.config``); host memory is what
``offload: streamed`` (``dpzo.zo.streamed``) uses.  :class:`PlacedParameters` cuts the trainable
vector, in its usual order, into *parts*: maximal runs of consecutive parameters on one device.
Each part is a :class:`~dpzo.zo.flat.FlatParameters` of its own (its buffer, its master copy,
its mask) that knows where it sits in the whole vector, so it draws exactly its coordinates of
z(seed) (z is a function of the flat index, ``dpzo.zo.philox``).  Every pass runs part by
part, each on its own device; the released scalar, a 0-d tensor on the loss's device, is
copied to each part's device without a host synchronisation.

The trajectory therefore does not depend on the placement: split over k parts or held in
one, the same steps move the same coordinates by the same amounts (``tests/test_placed.py``:
bit for bit in float64 on the CPU).  Both are stores of theta (``dpzo.zo.store.ParameterStore``),
so the step, the loop, the monitor and the checkpoint take either; a streamed model
(``dpzo.zo.streamed``) holds its parts in a ``PlacedParameters`` too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpzo.zo.flat import FlatParameters, check_mask_indices, perturbed_two_point_losses, trainable_parameters
from dpzo.zo.passes import Coefficient


def device_runs(params: list[tuple[str, torch.nn.Parameter]]) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive parameters grouped while they share a device (a device map's layers)."""
    runs: list[list[tuple[str, torch.nn.Parameter]]] = []
    for name, p in params:
        if runs and runs[-1][-1][1].device == p.device:
            runs[-1].append((name, p))
        else:
            runs.append([(name, p)])
    return runs


def parameter_runs(
    model: torch.nn.Module, parts: Sequence[Sequence[str]] | None = None
) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The trainable parameters of ``model`` cut into the runs a store holds one buffer each of:
    one per device of a placed model (one run when it is on one device).

    ``parts`` (lists of parameter names, in order, covering them all) cuts the vector there
    instead: tests split a CPU model this way to check that a split changes nothing.
    """
    params = trainable_parameters(model)
    offloaded = [name for name, p in params if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} trainable parameters have no weights on a device ({', '.join(offloaded[:3])}, ...): "
            "the device map offloaded their modules (placement or max_memory naming cpu or disk, or a model "
            "larger than the GPUs' max_memory). Put every module on a GPU, or use offload: streamed"
        )
    if parts is None:
        return device_runs(params)
    by_name = dict(params)
    runs = [[(name, by_name[name]) for name in part] for part in parts]
    if [n for run in runs for n, _ in run] != [n for n, _ in params]:
        raise ValueError("parts must list every trainable parameter once, in the model's order")
    return runs


def _to(coef: Coefficient, device: torch.device) -> Coefficient:
    return coef.to(device, non_blocking=True) if isinstance(coef, torch.Tensor) else coef


def move_part(part: FlatParameters, moves: Sequence[tuple[int, Coefficient]]) -> None:
    """``add_directions`` on one part, each coefficient copied to the part's device."""
    part.add_directions([(seed, _to(coef, part.device)) for seed, coef in moves])


def pull_part(part: FlatParameters, piece: torch.Tensor, weight: float) -> None:
    """``pull_toward`` on one part, toward its ``piece`` of the anchor (copied to its device)."""
    part.pull_toward(piece.to(part.device), weight)


class PlacedParameters:
    """The trainable vector as parts on their devices (see the module docstring).

    ``device`` is the first part's: where the inputs go, and where a device-mapped model
    returns its outputs (so the losses, the differences and the released scalars live there).
    ``active`` are the parts the mask touches (all of them when dense).  A
    :class:`~dpzo.zo.store.ResidentStore`.
    """

    def __init__(
        self,
        runs: list[list[tuple[str, torch.nn.Parameter]]],
        master_dtype: torch.dtype | None = torch.float32,
        *,
        direction_cache_size: int = 1,
    ):
        self.parts: list[FlatParameters] = []
        offset = 0
        for run in runs:
            part = FlatParameters(
                None,
                master_dtype,
                direction_cache_size=direction_cache_size,
                parameters=run,
                offset=offset,
            )
            self.parts.append(part)
            offset += part.numel
        self.numel = offset
        self.device = self.parts[0].device
        self.active = list(self.parts)
        self.mask: torch.Tensor | None = None

    # -- what the other modules read -----------------------------------------------------------
    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype theta is held in."""
        return self.parts[0].master.dtype

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype the forward computes with."""
        return self.parts[0].work_dtype

    @property
    def master(self) -> torch.Tensor:
        """theta as one CPU tensor: a copy (for digests and snapshots), never a view."""
        return torch.cat([part.master.detach().cpu() for part in self.parts])

    def weights_finite(self) -> bool:
        """Whether every coordinate of theta is finite (one host read per part)."""
        return all(part.weights_finite() for part in self.parts)

    def strided_theta(self, stride: int) -> torch.Tensor:
        """Every ``stride``-th coordinate of each part's theta (each part read where it lives), float32 on the CPU."""
        return torch.cat([part.strided_theta(stride) for part in self.parts])

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) of each part in the whole vector."""
        return [(part.offset, part.offset + part.numel) for part in self.parts]

    # -- support ---------------------------------------------------------------------------
    def set_mask(
        self,
        indices: torch.Tensor | None,
        perturb_scales: torch.Tensor | None = None,
        update_scales: torch.Tensor | None = None,
    ) -> None:
        """Restrict training to the flat coordinates ``indices`` of the whole vector (None: dense)."""
        self.restore()
        if indices is None:
            for part in self.parts:
                part.set_mask(None)
            self.active, self.mask = list(self.parts), None
            return
        indices = indices.to("cpu", torch.long)
        check_mask_indices(indices, self.numel)
        self.active = []
        for part, (lo, hi) in zip(self.parts, self.spans()):
            a, b = (int(x) for x in torch.searchsorted(indices, torch.tensor([lo, hi])))
            if a == b:
                part.set_mask(None)  # restored; an inactive part is never written
                continue

            def cut(scales: torch.Tensor | None, a: int = a, b: int = b) -> torch.Tensor | None:
                return None if scales is None else scales[a:b]

            part.set_mask(indices[a:b] - lo, perturb_scales=cut(perturb_scales), update_scales=cut(update_scales))
            self.active.append(part)
        self.mask = indices

    def anchor_pieces(self, anchor: torch.Tensor) -> list[tuple[FlatParameters, torch.Tensor]]:
        """(part, its piece of ``anchor``) for each active part: a :meth:`snapshot` cut as it was taken."""
        pieces, start = [], 0
        for part in self.active:
            size = part.numel if part.mask is None else part.mask.numel()
            pieces.append((part, anchor[start : start + size]))
            start += size
        return pieces

    # -- the passes ---------------------------------------------------------------------------
    def direction(self, seed: int) -> torch.Tensor:
        """z(seed) on the support, on the first part's device (for tests and audits)."""
        return torch.cat([part.direction(seed).to(self.device) for part in self.active])

    def two_point_losses(
        self,
        per_example_loss: Callable[[np.ndarray], torch.Tensor],
        passes: Sequence[tuple[np.ndarray, int]],
        beta: float,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(d, l+, l-) of every (batch, seed): two forwards each, every part perturbed."""
        return perturbed_two_point_losses(self, per_example_loss, passes, beta)

    def perturb(self, seed: int, scale: float) -> None:
        """work <- theta + scale * z(seed) on the support, part by part."""
        for part in self.active:
            part.perturb(seed, scale)

    def restore(self) -> None:
        """work <- theta everywhere."""
        for part in self.parts:
            part.restore()

    def add_directions(self, moves: Sequence[tuple[int, Coefficient]]) -> None:
        """theta <- theta + sum_k coef_k z(seed_k) on the support; each coefficient goes to each part's device."""
        for part in self.active:
            move_part(part, moves)

    def pull_toward(self, anchor: torch.Tensor, weight: float) -> None:
        """theta <- theta - weight (theta - anchor) on the support, part by part."""
        for part, piece in self.anchor_pieces(anchor):
            pull_part(part, piece, weight)

    # -- snapshots ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The whole vector's state, as :meth:`FlatParameters.state_dict` gives it (CPU copies)."""
        states = [part.state_dict() for part in self.parts]
        state: dict[str, torch.Tensor | None] = {"master": torch.cat([s["master"] for s in states])}
        if self.mask is None:
            return state | {"mask": None, "perturb_scales": None, "update_scales": None}
        active = [(part, s) for part, s in zip(self.parts, states) if s["mask"] is not None]
        state["mask"] = torch.cat([s["mask"] + part.offset for part, s in active])
        for key in ("perturb_scales", "update_scales"):
            state[key] = None if active[0][1][key] is None else torch.cat([s[key] for _, s in active])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Continue from :meth:`state_dict` (of this placement, another one, or one buffer)."""
        master = state["master"]
        if master.numel() != self.numel:
            raise ValueError(f"a state of {master.numel()} parameters does not fit {self.numel}")
        for part, (lo, hi) in zip(self.parts, self.spans()):
            part.load_state_dict({"master": master[lo:hi], "mask": None, "perturb_scales": None, "update_scales": None})
        if state["mask"] is not None:
            self.set_mask(state["mask"], state["perturb_scales"], state["update_scales"])
        else:
            self.set_mask(None)

    def snapshot(self) -> torch.Tensor:
        """A copy of theta on the support, in host memory (the proximal anchor of a placed model)."""
        return torch.cat([part.snapshot().cpu() for part in self.active])
