"""The GPU acceptance run (``dpzo.bench.acceptance``) runs on the CPU with tiny models, as on a
bare GPU box: without snakemake, datasets or any DP accountant importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpzo.bench import acceptance

ROOT = Path(__file__).resolve().parents[1]
#: what a bare GPU box lacks: nothing the acceptance run imports may need them
ABSENT = ("dp_accounting", "prv_accountant", "opacus", "autodp", "snakemake", "datasets")


def bare_box_env(folder: Path) -> dict:
    """This environment with the absent modules made unimportable (a ``sitecustomize`` that maps
    them to None, so ``import`` raises) and the checkout's ``src`` first on the path."""
    shim = folder / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT), encoding="utf-8"
    )
    path = os.pathsep.join([str(shim), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_the_shim_makes_the_accountants_unimportable(tmp_path):
    env = bare_box_env(tmp_path)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
    code += "    except ImportError:\n        continue\n    raise SystemExit(m + ' imported')\n"
    done = subprocess.run([sys.executable, "-c", code, *ABSENT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_tiny_acceptance_run_passes_on_a_bare_box(tmp_path):
    out = tmp_path / "acceptance.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dpzo.bench.acceptance", "--tiny", "--device", "cpu", "--out", str(out)],
        env=bare_box_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wall = time.monotonic() - started
    record = json.loads(out.read_text())
    sections = record["sections"]
    assert list(sections) == list(acceptance.SECTIONS)
    for name, section in sections.items():
        assert section["status"] in ("passed", "skipped"), (name, section, done.stderr[-3000:])
        assert section["seconds"] <= section["budget_s"], name
        assert section["expectation"], name
        if section["status"] == "skipped":
            assert section["reason"], name
    assert sections["triton_philox"]["status"] == "skipped" and "CUDA" in sections["triton_philox"]["reason"]
    assert done.returncode == 0 and record["passed"] and record["tiny"]
    assert wall < 120, f"the tiny run took {wall:.0f} s"
    # the numbers each section exists for
    peaks = sections["peak_projection"]["models"]
    for entry in peaks.values():
        assert abs(entry["step_tracked_over_projected"] - 1) <= acceptance.PROJECTION_TOLERANCE
        assert abs(entry["inference_tracked_over_projected"] - 1) <= acceptance.PROJECTION_TOLERANCE
    ranks = sections["ranks"]
    assert ranks["equal"] and ranks["backend"] == "gloo" and ranks["max_abs_theta_diff"] <= acceptance.TRAJECTORY_ATOL
    cell = sections["cell"]
    assert 0 <= cell["accuracy"] <= 1 and cell["releases"] == acceptance.CELL_PARAMS["steps"]
    assert cell["cost"]["step"]["peak_mb"] > 0
    streamed = sections["streamed"]
    assert streamed["uploads_per_block"] in (acceptance.STREAMED_STEPS, acceptance.STREAMED_STEPS + 1)


def test_a_section_that_raises_or_runs_out_of_time_is_recorded_and_the_run_goes_on():
    mode = acceptance.Mode(torch.device("cpu"), tiny=True)

    def slow(mode, budget_s):
        time.sleep(5)
        return {"status": "passed"}

    def broken(mode, budget_s):
        raise RuntimeError("no such device")

    timed_out = acceptance.run_section("slow", slow, mode, 0.2)
    assert timed_out["status"] == "failed" and "budget" in timed_out["error"] and timed_out["seconds"] < 2
    failed = acceptance.run_section("broken", broken, mode, 5)
    assert failed["status"] == "failed" and "no such device" in failed["error"]


def test_the_triton_check_says_why_it_cannot_run():
    assert "no CUDA device" in acceptance.triton_unavailable(torch.device("cpu"))
    record = acceptance.check_triton_philox(acceptance.Mode(torch.device("cpu"), tiny=True), 1.0)
    assert record["status"] == "skipped" and record["reason"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with Triton")
def test_triton_z_equals_philox_on_the_device():
    case = acceptance.triton_z_difference(1234, 2**33 + 5, torch.float32, torch.device("cuda"))
    assert case["within_tolerance"], case
