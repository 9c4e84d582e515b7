"""Running the pipeline from a test: the Snakemake command line on a temporary folder's config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Fixed noise so that two runs of one cell can be compared value for value (never in a real run).
TEST_ENV = {"DPZO_INSECURE_TEST_NOISE_SEED": "7"}


def snakemake_command(workdir: Path, *args: str, cores: int | None = 2) -> list[str]:
    """``python -m snakemake`` on the repository's Snakefile, in ``workdir`` with its config.yaml.

    ``cores=None`` leaves the cores to a profile (the SLURM tests).
    """
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir)]
    cmd += ["--configfile", str(workdir / "config.yaml")]
    if cores is not None:
        cmd += ["--cores", str(cores)]
    return [*cmd, *args]


def snakemake(
    workdir: Path,
    *args: str,
    check: bool = True,
    env: dict | None = None,
    cores: int = 2,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """Run Snakemake to completion; with ``check``, a failure raises with the end of its output."""
    full_env = {**os.environ, **TEST_ENV, **(env or {})}
    proc = subprocess.run(
        snakemake_command(workdir, *args, cores=cores), capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
