"""What made a result: the versions of dpzo and of the libraries it ran on, and the device.

Every cell records :func:`versions` in its ``metrics.json`` (``"versions"``), and the report lists
each distinct combination (``results/tables/versions.*``): a result that does not reproduce is
first compared on these (a library upgrade can change a published number).

Torch-free: library versions come from the modules already imported or else from the installed
distributions' metadata; torch is imported only to name a CUDA device.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

__version__ = "0.1.0"

#: The libraries whose versions a result depends on: the key in :func:`versions` -> distribution.
LIBRARIES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "snakemake": "snakemake",
}
GIT_TIMEOUT_S = 10


def library_version(module: str, distribution: str | None = None) -> str | None:
    """The version of ``module``: the imported module's own when it is loaded (the one in use),
    else the installed distribution's; None when it is not installed."""
    from importlib import metadata

    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None) if loaded is not None else None
    if isinstance(version, str):
        return version
    try:
        return metadata.version(distribution or module)
    except metadata.PackageNotFoundError:
        return None


def _git(folder: Path, *args: str) -> str | None:
    """The output of ``git args`` run in ``folder``; None when git is missing or fails."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # never take the index lock
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def source_commit(folder: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout that holds the package's source, or (None, None).

    ``folder`` defaults to this package's directory.  The commit counts only when the package
    is tracked by that repository (an installed copy that happens to sit inside some other
    checkout has none); dirty: a tracked file differs from the commit.
    """
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    if not folder.is_dir() or _git(folder, "ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return None, None
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return commit.strip(), (bool(status.strip()) if status is not None else None)


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: object = None) -> str:
    """The name of the device a cell ran on: the GPU's for CUDA, else the CPU model.

    ``device``: a ``torch.device`` or its string (``"cuda:0"``, ``"cpu"``); None means the CPU.
    """
    kind = str(device) if device is not None else "cpu"
    if kind.startswith("cuda"):
        try:
            import torch  # a CUDA cell has loaded it already

            return str(torch.cuda.get_device_name(torch.device(kind)))
        except Exception:  # noqa: BLE001 (a name is provenance, never a reason to fail a cell)
            return kind
    if kind.startswith("mps"):
        return f"Apple MPS ({cpu_name()})"
    return cpu_name()


def versions(device: object = None) -> dict[str, str | bool | None]:
    """dpzo (version, commit and whether its checkout was dirty), Python, the libraries of
    :data:`LIBRARIES` and the device's name; None where a value is unknown.  Never fails."""
    commit, dirty = source_commit()
    return {
        "dpzo": __version__,
        "dpzo_commit": commit,
        "dpzo_dirty": dirty,
        "python": platform.python_version(),
        **{key: library_version(key, dist) for key, dist in LIBRARIES.items()},
        "device_name": device_name(device),
    }
