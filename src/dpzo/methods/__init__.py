"""The methods of the comparison and what distinguishes them (no heavy imports: the Snakefile reads it).

Zeroth-order methods share one training loop (``dpzo.zo.loop.train_zo``); they differ only in
the properties below.  First-order methods (``dp-sgd``, ``dp-prefix``, ``ft``;
``dpzo.baselines.firstorder``) backpropagate.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


ZERO_SHOT = "zero-shot"


ICL = "icl"


@dataclass(frozen=True)
class ZOMethod:
    """What a zeroth-order method does with the per-example finite differences."""

    private: bool
    mechanism: str | None = None  # "gaussian" | "laplace" (private methods)
    clip_raw_difference: bool = False  # Tang et al.: clip l+ - l- before dividing by 2 beta
    staged: bool = False  # stagewise lr / ZO-scale schedule and proximal anchor allowed
    masked: bool = False  # trains only the coordinates of a data-free mask


ZO: dict[str, ZOMethod] = {
    "mezo": ZOMethod(private=False),
    "dp-zoso": ZOMethod(private=True, mechanism="gaussian", staged=True),
    "dp-zopo": ZOMethod(private=True, mechanism="gaussian", staged=True, masked=True),
    "dpzero": ZOMethod(private=True, mechanism="gaussian"),
    "dp-zo-gauss": ZOMethod(private=True, mechanism="gaussian", clip_raw_difference=True),
    "dp-zo-laplace": ZOMethod(private=True, mechanism="laplace", clip_raw_difference=True),
}


ZO_METHODS = tuple(ZO)


# First-order baselines (dpzo.baselines.firstorder): name -> private?
FIRST_ORDER: dict[str, bool] = {"ft": False, "dp-sgd": True, "dp-prefix": True}


PRIVATE_METHODS = tuple(name for name, m in ZO.items() if m.private) + tuple(n for n, p in FIRST_ORDER.items() if p)


METHODS = (ZERO_SHOT, ICL, *ZO_METHODS, *FIRST_ORDER)


def base_method(name: str) -> str:
    """A config may hold variants of a method, ``<method>+<variant>`` (e.g. ``dp-zopo+dynamic``)."""
    return name.split("+", 1)[0]


def is_private(method: str) -> bool:
    """Private methods run at every configured epsilon; the others only at eps = inf."""
    return base_method(method) in PRIVATE_METHODS
