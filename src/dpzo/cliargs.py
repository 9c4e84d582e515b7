"""What every ``dpzo`` subcommand shares: argparse value types, exit codes, errors and JSON output.

Conventions: results go to stdout as one JSON object (:func:`print_json`); errors go to stderr
as ``dpzo <name>: error: ...`` naming the offending argument, with exit code 2 (argparse's own
code for usage errors) and nothing on stdout (:func:`fail`).  Torch-free, like the parsers.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2


# --------------------------------------------------------------------------------------
# argparse value types: each error names the expected range; argparse prefixes the flag
# --------------------------------------------------------------------------------------


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
    return value


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def memory_bytes(text: str | int) -> int:
    """Bytes of a memory size as accelerate's ``max_memory`` writes them (``"70GiB"``, ``"80GB"``, 1024)."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if found is None or found.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. '70GiB', '80GB')")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def memory_size(text: str) -> int:
    """argparse type of a memory size (``80GiB``, ``80GB``), in bytes."""
    try:
        return memory_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def nonnegative_float_or_inf(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'inf', got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (or 'inf' for no privacy), got {text!r}")
    return value


def positive_float_or_inf(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def open_unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not (0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(
            f"must satisfy 0 < value < 1, got {text!r} (delta is usually below 1/n, e.g. 1e-5)"
        )
    return value


def fail(command: str, message: str) -> int:
    """Report a usage problem the way argparse does, without exiting the interpreter."""
    print(f"dpzo {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def print_json(obj: Any) -> None:
    # allow_nan=False: emit strict JSON (records spell infinity as "inf").
    print(json.dumps(obj, indent=2, allow_nan=False))
