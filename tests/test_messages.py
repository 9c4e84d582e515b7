"""Messages and logs: a job's log holds its output and traceback, training logs its progress,
config values are explained in words, `dpzo calibrate` agrees with the pipeline."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dpzo.cli import main as cli_main
from dpzo.pipeline import workflow
from dpzo.pipeline.config import ConfigError, check_config
from dpzo.privacy import accountants, records
from dpzo.progress import Progress, clock

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
BASE = {
    "models": {"d": {"demo": "roberta"}},
    "tasks": ["demo-sst2"],
    "seeds": [1],
    "epsilons": ["2"],
    "methods": {"zero-shot": {}},
    "k": 16,
}


# ---------------------------------------------------------------------------------------------
# the job's log file
# ---------------------------------------------------------------------------------------------
JOB = """
import sys, warnings
from types import SimpleNamespace
from dpzo.pipeline import workflow

def adapter(snakemake):
    workflow._setup(snakemake)
    print("hello from the job")
    warnings.warn("a library warned")
    raise ValueError("the bad value, and its fix")

workflow.run_job(adapter, SimpleNamespace(log=[sys.argv[1]], threads=1))
"""


def test_a_failing_jobs_log_holds_its_output_warnings_and_traceback(tmp_path):
    """Run as Snakemake runs a rule's script: a process of its own that fails."""
    log = tmp_path / "logs" / "train" / "cell.log"
    proc = subprocess.run([sys.executable, "-c", JOB, str(log)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    text = log.read_text()
    assert "hello from the job" in text and "a library warned" in text
    assert "Traceback" in text and "ValueError: the bad value, and its fix" in text and "the job failed" in text
    # the console still gets the output and the traceback
    assert "hello from the job" in proc.stdout and "ValueError: the bad value, and its fix" in proc.stderr


def test_run_job_restores_the_streams_and_works_without_a_log(tmp_path, monkeypatch):
    monkeypatch.setattr(workflow, "_setup", lambda snakemake: None)
    before = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError):
        workflow.run_job(
            lambda s: (_ for _ in ()).throw(RuntimeError("x")), SimpleNamespace(log=[str(tmp_path / "a.log")])
        )
    assert (sys.stdout, sys.stderr) == before and "RuntimeError: x" in (tmp_path / "a.log").read_text()
    seen = []
    workflow.run_job(seen.append, SimpleNamespace(log=[]))
    assert len(seen) == 1


# ---------------------------------------------------------------------------------------------
# progress lines
# ---------------------------------------------------------------------------------------------
def test_progress_lines_give_step_pace_elapsed_and_time_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("dpzo.progress.time.perf_counter", lambda: now[0])
    progress = Progress(100, done=20, prior_seconds=60.0)  # resumed after 20 steps and a minute
    now[0] += 8.0
    line = progress.line(30, stage=1, loss=0.5)
    # 10 steps in 8 s: 800 ms/step; 68 s so far; 70 steps left at 0.8 s each
    assert line.startswith("step 30/100 (stage 1): 800.0 ms/step, elapsed 0:01:08, left ~0:00:56")
    assert "training loss 0.5000" in line
    now[0] += 2.0
    assert "200.0 ms/step" in progress.line(40)  # the window since the previous line
    assert clock(3725) == "1:02:05" and clock(math.nan) == "?"


def test_the_zeroth_order_trainer_logs_its_progress(caplog):
    from dpzo.methods.hyperparameters import ZOHyperparameters
    from dpzo.zo.loop import train_zo

    from .test_zo import Quadratic, TwoTensorModel

    quad = Quadratic(n=8, dim=10)
    model = TwoTensorModel()
    hp = ZOHyperparameters(steps=6, batch_size=4, lr=0.01, log_every=2)
    with caplog.at_level(logging.INFO, logger="dpzo.zo.loop"):
        train_zo(model, quad.loss_fn(model), 8, hp, method="mezo", run_seed=0, master_dtype=None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/6 (stage 0)", "step 4/6 (stage 0)", "step 6/6 (stage 0)"]
    assert all("ms/step" in line and "elapsed" in line and "left ~" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# config values in words
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", ["0", "-1"])
def test_an_epsilon_that_is_not_positive_is_explained(eps):
    with pytest.raises(ConfigError) as err:
        check_config(dict(BASE, epsilons=[eps]), SCHEMA)
    assert f"'{eps}'" in str(err.value) and 'a positive number or "inf"' in str(err.value)


@pytest.mark.parametrize("delta", [0, 1.5, -1e-5, "1e-5x", "2"])
def test_a_delta_outside_the_unit_interval_is_explained(delta):
    with pytest.raises(ConfigError) as err:
        check_config(dict(BASE, delta=delta), SCHEMA)
    message = str(err.value)
    assert "config key 'delta'" in message and "must be a number in (0, 1)" in message and '"1/n"' in message
    assert message.count("config key 'delta'") == 1


def test_delta_written_without_a_dot_is_a_number():
    config = dict(BASE, **yaml.safe_load("delta: 1e-5"))
    assert config["delta"] == "1e-5"  # what YAML 1.1 makes of it
    check_config(config, SCHEMA)
    assert config["delta"] == 1e-5
    one_over_n = dict(BASE, delta="1/n")
    check_config(one_over_n, SCHEMA)
    assert one_over_n["delta"] == "1/n"


# ---------------------------------------------------------------------------------------------
# dpzo calibrate
# ---------------------------------------------------------------------------------------------
ARGS = ["calibrate", "--n", "512", "--batch-size", "32", "--steps", "60", "--epsilon", "2", "--delta", "1e-5"]


def test_calibrate_prints_the_sigma_the_pipeline_uses(capsys):
    assert cli_main(ARGS) == 0
    printed = json.loads(capsys.readouterr().out)
    pipeline = records.accounting_record(n=512, batch_size=32, steps=60, clip=1.0, epsilon_target=2.0, delta=1e-5)
    assert printed["sigma"] == pipeline["sigma"]
    assert printed["pld_discretization"] == accountants.DEFAULT_PLD_DISCRETIZATION


def test_an_accountant_failure_exits_2_with_a_message(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("discretisation failed")

    monkeypatch.setattr(accountants, "_epsilon_prv", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main([*ARGS, "--accountant", "prv"]) == 2
    err = capsys.readouterr().err
    assert "prv accountant failed" in err and "discretisation failed" in err and "--accountant pld" in err
