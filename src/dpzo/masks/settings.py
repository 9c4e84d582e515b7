"""The mask part of a DP-ZOPO config block (torch-free: the Snakefile reads it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

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
