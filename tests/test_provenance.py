"""The versions every cell records (``dpzo.provenance``): complete, torch-free, never failing."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpzo import provenance

SRC = Path(__file__).resolve().parents[1] / "src"
KEYS = {
    "dpzo",
    "dpzo_commit",
    "dpzo_dirty",
    "python",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "snakemake",
    "device_name",
}


def _fresh(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter on this source tree; its last printed line as JSON."""
    full = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_versions_name_dpzo_python_the_libraries_and_the_device_without_importing_torch():
    found = _fresh(
        "import json, sys; from dpzo.provenance import versions; v = versions('cpu'); "
        "print(json.dumps({'v': v, 'heavy': sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers'))}))"
    )
    v = found["v"]
    assert set(v) == KEYS and found["heavy"] == []
    import torch
    import transformers

    assert v["dpzo"] == provenance.__version__ and v["python"] == platform.python_version()
    assert v["torch"] == torch.__version__ and v["transformers"] == transformers.__version__
    assert v["device_name"] and v["device_name"] == provenance.cpu_name()
    import dpzo

    assert dpzo.__version__ == provenance.__version__
    if shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SRC / "dpzo", capture_output=True, text=True)
        if head.returncode == 0:  # this source tree is a git checkout
            assert v["dpzo_commit"] == head.stdout.strip() and isinstance(v["dpzo_dirty"], bool)


def test_an_unknown_device_or_library_is_none_not_a_failure():
    assert provenance.library_version("no_such_module_dpzo") is None
    assert provenance.device_name("cpu") == provenance.device_name(None) == provenance.cpu_name()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_of_the_source_checkout_and_whether_it_is_dirty(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()

    package = tmp_path / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert provenance.source_commit(package) == (None, None)  # not in a git checkout
    git("init", "-q")
    assert provenance.source_commit(package) == (None, None)  # in one, but not tracked by it
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert provenance.source_commit(package) == (head, False)
    (tmp_path / "results.txt").write_text("untracked output")  # untracked files do not count
    assert provenance.source_commit(package) == (head, False)
    (package / "__init__.py").write_text("x = 1\n")
    assert provenance.source_commit(package) == (head, True)


def test_without_git_the_commit_is_none_and_versions_still_work(tmp_path):
    found = _fresh(
        "import json; from dpzo.provenance import versions; print(json.dumps(versions()))",
        env={"PATH": str(tmp_path)},  # no git on the PATH
    )
    assert set(found) == KEYS and found["dpzo_commit"] is None and found["dpzo_dirty"] is None
