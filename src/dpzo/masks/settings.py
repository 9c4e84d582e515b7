"""DP-ZOPO masks without the scoring: the mask part of a config block and the mask itself.

Torch-free to import (the Snakefile and ``dpzo.methods`` read it): :class:`MaskSettings` is what
a config asks for, :class:`Mask` the coordinates a mask job chose and a trainer trains.  A mask
holds torch tensors; torch is imported only where one is checked, written or read.  The scores
and the selection live in :mod:`dpzo.masks.prune`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from dpzo.fileio import atomic_path

if TYPE_CHECKING:
    import torch

MASK_FORMAT = "dpzo-mask-v1"

# --------------------------------------------------------------------------------------------
# DP-ZOPO masks (the scorers themselves live in dpzo.masks.prune)
# --------------------------------------------------------------------------------------------
SCORERS = ("synflow-zo", "synflow-exact", "magnitude", "random")


SELECTIONS = ("smallest", "largest")


SCOPES = ("global", "per-layer")


MODES = ("normal", "rank")


STRATEGIES = ("static", "dynamic", "incremental")


@dataclass(frozen=True)
class MaskSettings:
    """The mask part of a DP-ZOPO config block.

    Strategies (stage s of S):

    * ``static``       one mask at ``ratio``, computed before training from the initial weights;
    * ``dynamic``      stage 0 uses that mask; at each later stage boundary the same score is
                       recomputed from the *current* weights (data-free, so no privacy cost) and
                       a fresh mask at ``ratio`` replaces the old one;
    * ``incremental``  the trainable fraction grows linearly, ``ratio * (s + 1) / S``, always from
                       the initial-weight score (so the masks are nested: equal scores, stable
                       order), ending at ``ratio``.

    ``rank_update``: in ``rank`` mode the scales multiply the perturbation (as the official
    code); with ``rank_update`` they multiply the update as well, so that both use the same
    rescaled direction.
    """

    scorer: str = "synflow-exact"
    ratio: float = 0.01
    selection: str = "smallest"
    scope: str = "global"
    mode: str = "normal"
    strategy: str = "static"
    rank_update: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.scorer, SCORERS, "scorer"),
            (self.selection, SELECTIONS, "selection"),
            (self.scope, SCOPES, "scope"),
            (self.mode, MODES, "mode"),
            (self.strategy, STRATEGIES, "strategy"),
        ):
            if value not in allowed:
                raise ValueError(f"mask {name} must be one of {allowed}, got {value!r}")
        if not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(f"mask ratio must be in (0, 1], got {self.ratio}")

    @classmethod
    def from_config(cls, params: dict) -> MaskSettings:
        """Build from a config's ``mask`` block; raises ValueError naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown mask setting(s) {unknown}; allowed: {sorted(known)}")
        return cls(**params)

    def stage_ratios(self, stages: int) -> list[float]:
        """The ratio of the precomputed mask each stage starts from."""
        if self.strategy == "incremental":
            return [float(f"{self.ratio * (s + 1) / stages:.6g}") for s in range(stages)]
        return [float(self.ratio)] * stages


def ratio_label(ratio: float) -> str:
    """The ratio as written in mask file names (6 significant digits)."""
    return f"{float(ratio):.6g}"


# ---------------------------------------------------------------------------------------------
# The mask
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Mask:
    """Coordinates to train: sorted int64 flat indices into the FlatParameters vector."""

    indices: torch.Tensor
    numel: int
    scales: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numel = int(self.numel)
        _validate_mask(self.indices, self.numel, self.scales)

    @property
    def density(self) -> float:
        """Fraction of coordinates that are trained."""
        return self.indices.numel() / self.numel

    def __len__(self) -> int:
        return int(self.indices.numel())

    def save(self, path: str | Path) -> None:
        """torch.save of a plain dict, written to a temporary file and moved into place."""
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": MASK_FORMAT,
            "indices": self.indices.detach().cpu().contiguous(),
            "numel": self.numel,
            "scales": None if self.scales is None else self.scales.detach().cpu().contiguous(),
            "meta": _plain(self.meta, "meta"),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """Read a mask written by :meth:`save`, validating dtype, sortedness and range."""
        import torch

        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != MASK_FORMAT:
            raise ValueError(f"{path}: not a {MASK_FORMAT} file")
        missing = {"indices", "numel", "scales", "meta"} - set(payload)
        if missing:
            raise ValueError(f"{path}: missing fields {sorted(missing)}")
        if not isinstance(payload["numel"], int):
            raise ValueError(f"{path}: numel must be an int")
        if not isinstance(payload["meta"], dict):
            raise ValueError(f"{path}: meta must be a dict")
        return cls(indices=payload["indices"], numel=payload["numel"], scales=payload["scales"], meta=payload["meta"])


def _plain(value, where: str):
    """``value`` if it is made of str/int/float/bool/None, lists, tuples and str-keyed dicts
    (what ``torch.load(weights_only=True)`` reads back); TypeError otherwise."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # also turns np.float64 (a float subclass) into float
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: dict keys must be str")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} is not a plain value (str, int, float, bool, None, list, dict)")


def _validate_mask(indices: torch.Tensor, numel: int, scales: torch.Tensor | None) -> None:
    import torch  # here, not at the top: importing the settings must not load torch

    if not isinstance(indices, torch.Tensor) or indices.layout != torch.strided:
        raise ValueError("mask indices must be a dense tensor")
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError(
            f"mask indices must be a 1-D int64 tensor, got {indices.dtype} with shape {tuple(indices.shape)}"
        )
    if numel < 1:
        raise ValueError("numel must be positive")
    if indices.numel() == 0:
        raise ValueError("a mask must select at least one coordinate")
    if bool((indices[1:] <= indices[:-1]).any()):
        raise ValueError("mask indices must be sorted ascending and unique")
    if int(indices[0]) < 0 or int(indices[-1]) >= numel:
        raise ValueError(f"mask indices must lie in [0, {numel})")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.shape != indices.shape:
            raise ValueError("scales must be a float32 tensor aligned with the indices")
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("scales must be finite")
