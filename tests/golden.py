"""The stored results of the tiny pipeline, and how a run is compared with them.

Every cell of the tiny grid (all methods, insecure test noise seed fixed) is compared with a
stored fixture: the values of ``metrics.json``, ``privacy.json`` and ``private_diagnostics.json``
must be identical, timing, memory and attempt-log fields aside.  A refactor that changes a single
released scalar, a σ or an accuracy fails here.

Regenerate the fixture (only when a change of results is intended, and say why in the commit)::

    python -m tests.golden <workdir of a tiny run with every method>
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_run_golden.json"
#: measured or host-dependent: not part of what the code computes
VOLATILE = {
    "ms_per_step",
    "train_seconds",
    "wall_seconds",
    "memory",
    "cost",
    "attempt_log",
    "slurm_job_id",
    "torch",
    "device",
    "versions",
}
OUTPUTS = ("metrics.json", "privacy.json", "private_diagnostics.json")


def platform() -> dict:
    """What bit-identity of float results depends on (z is drawn by the compiled CPU passes where
    numba loads, by the torch emulation otherwise: a few ulp apart)."""
    from dpzo.zo import philox

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "compiled_z": philox.compiled() is not None,
    }


def collect(workdir: Path) -> dict:
    """{cell/output: its values without the volatile fields} for every cell of the run."""
    runs = workdir / "results" / "runs"
    found = {}
    for path in sorted(runs.glob("*/*/*/*/*/*.json")):
        if path.name in OUTPUTS:
            values = json.loads(path.read_text())
            found[str(path.relative_to(runs))] = {k: v for k, v in values.items() if k not in VOLATILE}
    return found


def assert_same(actual, expected, where: str, *, exact: bool) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (where, sorted(set(actual) ^ set(expected)))
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}", exact=exact)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]", exact=exact)
    elif isinstance(expected, float) and not exact:
        assert isinstance(actual, float) and (
            math.isnan(actual) and math.isnan(expected) or actual == pytest.approx(expected, rel=1e-6, abs=1e-12)
        ), where
    else:
        assert actual == expected and type(actual) is type(expected), (where, actual, expected)


if __name__ == "__main__":
    workdir = Path(sys.argv[1])
    FIXTURE.write_text(json.dumps({"platform": platform(), "cells": collect(workdir)}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}: {len(collect(workdir))} outputs")
