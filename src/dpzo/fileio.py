"""Atomic file writes: every output is written to a temporary file and renamed into place.

A crashed or killed job therefore never leaves a partial file under a final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); an output gets the mode any new file would
        os.chmod(tmp, _NEW_FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` as JSON lines (UTF-8, non-ASCII kept as is), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


class CorruptOutput(ValueError):
    """An output of an earlier job cannot be read; it was moved aside so the next run rebuilds it."""


def read_json_output(path: str | Path):
    """A JSON output of an earlier job (a ledger, metrics, a calibration).

    Outputs are written atomically, so an unreadable one was damaged afterwards (a full disk, a
    copy cut short, an edit).  Such a file is renamed to ``<name>.corrupt`` — kept for
    inspection, out of the way of Snakemake, which then sees the output missing and rebuilds it
    on the next run — and :class:`CorruptOutput` names it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        raise CorruptOutput(
            f"{path} is not valid JSON ({err}); it was moved to {aside} and the next run of the pipeline "
            "rebuilds it (and whatever depends on it)"
        ) from None
