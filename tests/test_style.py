"""The workflow stays lint-clean and formatted (ruff runs from .ci/run over the Python code)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "workflow" / "rules").glob("*.smk"))]


def test_snakemake_lint_reports_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DPZO_INSECURE_TEST_NOISE_SEED": "7"},
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations, your workflow is in a good condition!" in output, output[-4000:]


@pytest.mark.skipif(shutil.which("snakefmt") is None, reason="snakefmt is in the test extra")
def test_workflow_files_are_snakefmt_formatted():
    proc = subprocess.run(
        ["snakefmt", "--check", *WORKFLOW_FILES], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
