"""The methods of the comparison: a registry of one module per method (torch-free: the Snakefile reads it).

Every module of this package that defines ``METHOD`` (or ``METHODS``, a tuple) is registered when
the package is imported; :func:`register` adds a method defined elsewhere (a new method in a
module of its own, see ``docs/architecture.md``).  What a method is and declares:
:mod:`dpzo.methods.base`.  Zeroth-order methods share one training loop
(``dpzo.zo.loop.train_zo``) and differ only in their class; first-order methods (``dp-sgd``,
``dp-prefix``, ``ft``) backpropagate (``dpzo.baselines.firstorder``).

Outside this package no code compares method names: it asks the method, e.g.
``get_method(name).trainer`` (who trains a cell: :data:`TRAINERS`), ``.masked``, ``.private``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from dpzo.methods.base import (
    TRAINER_FIRST_ORDER,
    TRAINER_ICL,
    TRAINER_NONE,
    TRAINER_ZO,
    TRAINERS,
    FirstOrderMethod,
    Method,
    ZOMethod,
)

__all__ = [
    "FIRST_ORDER",
    "ICL",
    "REGISTRY",
    "REPORT_ORDER",
    "TRAINERS",
    "TRAINER_FIRST_ORDER",
    "TRAINER_ICL",
    "TRAINER_NONE",
    "TRAINER_ZO",
    "ZERO_SHOT",
    "ZO",
    "base_method",
    "find_method",
    "get_method",
    "hyperparameters_for",
    "is_private",
    "method_names",
    "register",
    "unregister",
]

ZERO_SHOT = "zero-shot"
ICL = "icl"

#: The order the report presents methods in (the paper's: the references without privacy first,
#: then the private methods, the paper's own last).  A variant sorts with its method; a method not
#: listed sorts after these (``report.tables.method_sort_key``).
REPORT_ORDER = (
    "zero-shot",
    "icl",
    "mezo",
    "ft",
    "dp-sgd",
    "dp-prefix",
    "dpzero",
    "dp-zo-gauss",
    "dp-zo-laplace",
    "dp-zoso",
    "dp-zopo",
)

#: name -> method, in registration order
REGISTRY: dict[str, Method] = {}
#: the zeroth-order methods (a live view of the registry)
ZO: dict[str, ZOMethod] = {}
#: the first-order methods: name -> private?
FIRST_ORDER: dict[str, bool] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new); returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a Method instance (dpzo.methods.base), not {type(method).__name__}")
    if "+" in method.name:
        raise ValueError(f"method name {method.name!r}: '+' separates a method from its variant")
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered ({REGISTRY[method.name]!r})")
    if getattr(method, "trainer", None) not in TRAINERS:
        raise ValueError(
            f"method {method.name!r}: its class must say who trains it, trainer = one of {TRAINERS} "
            "(dpzo.methods.base; subclassing ZOMethod or FirstOrderMethod sets it)"
        )
    REGISTRY[method.name] = method
    if isinstance(method, ZOMethod):
        ZO[method.name] = method
    elif isinstance(method, FirstOrderMethod):
        FIRST_ORDER[method.name] = method.private
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (tests of a temporary method)."""
    REGISTRY.pop(name, None)
    ZO.pop(name, None)
    FIRST_ORDER.pop(name, None)


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in ("base", "hyperparameters"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = getattr(module, "METHODS", None) or (getattr(module, "METHOD", None),)
        for method in found:
            if method is not None:
                register(method)


_discover()


def base_method(name: str) -> str:
    """A config may hold variants of a method, ``<method>+<variant>`` (e.g. ``dp-zopo+dynamic``)."""
    return name.split("+", 1)[0]


def get_method(name: str) -> Method:
    """The method of a config name (a variant ``<method>+<variant>`` is its method)."""
    method = REGISTRY.get(base_method(name))
    if method is None:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return method


def find_method(name: str) -> Method | None:
    """The method of a config name, or None for a name this version does not know (a results
    table written by another version, say); :func:`get_method` raises instead."""
    return REGISTRY.get(base_method(name))


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(REGISTRY)


def is_private(method: str) -> bool:
    """Private methods run at every configured epsilon; the others only at eps = inf."""
    found = REGISTRY.get(base_method(method))
    return found is not None and found.private


def hyperparameters_for(method: str, params: dict) -> Any:
    """The typed hyperparameters of a method's config block (None for a method without any)."""
    return get_method(method).hyperparameters_from(params)
