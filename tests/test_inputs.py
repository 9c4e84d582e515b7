"""Bad input where it enters (data files, model directories, config, CLI) and faults during a run.

Each case: one clear message naming the file or key and the fix, a non-zero exit where a
command is involved, and no output files.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dpzo.cli import main as cli_main
from dpzo.data.inputs import ModelDirError, model_dir_problems
from dpzo.data.splits import make_k_shot
from dpzo.data.tasks import TASKS
from dpzo.pipeline.config import ConfigError, check_config

from .pipeline import ROOT
from .pipeline import snakemake as run_pipeline
from .tiny import WORDS, examples, make_clf, word_tokenizer

SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SST2_HEADER = "sentence\tlabel\n"


def sst2_dir(root: Path, train: bytes | str, test: str = SST2_HEADER + "fine\t1\nbad\t0\n") -> Path:
    folder = root / "original" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_bytes(train if isinstance(train, bytes) else train.encode())
    (folder / "dev.tsv").write_text(test)
    return folder / "train.tsv"


def assert_no_split_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# task data files
# ---------------------------------------------------------------------------------------------

BAD_FILES = {  # case: (content of train.tsv, the problem, the fix)
    "empty": (b"", "is empty", "Restore it from the LM-BFF data"),
    "whitespace only": (b"\n  \n", "is empty", "Restore it from the LM-BFF data"),
    "header only": (SST2_HEADER.encode(), "has no examples", "one example per row"),
    "wrong columns": (
        b"text\tlabel\nfine\t1\n",
        "missing column(s) ['sentence']",
        "header line naming the columns sentence, label",
    ),
    "label outside the label words": (
        (SST2_HEADER + "fine\t1\nodd\t7\n").encode(),
        "row 2: label '7' is not one of ['0', '1']",
        "fix the row",
    ),
    "not UTF-8": ((SST2_HEADER + "caf\u00e9\t1\n").encode("latin-1"), "is not UTF-8 text", "Convert it to UTF-8"),
    "malformed row": (
        (SST2_HEADER + "fine\t1\nx\t1\textra\n").encode(),
        "could not be parsed",
        "expected a tab-separated file",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_task_file_names_the_file_and_writes_no_split(case, tmp_path):
    content, problem, fix = BAD_FILES[case]
    path = sst2_dir(tmp_path / "data", content)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        make_k_shot(TASKS["SST-2"], tmp_path / "data", out, k=1, seed=13)
    message = str(err.value)
    assert str(path) in message and problem in message and fix in message
    assert_no_split_written(out)


def test_missing_task_file_says_where_the_data_comes_from(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as err:
        make_k_shot(TASKS["SST-2"], tmp_path / "data", out, k=1, seed=13)
    assert "original/SST-2/train.tsv not found" in str(err.value) and "LM-BFF" in str(err.value)
    assert_no_split_written(out)


def test_csv_task_with_too_few_columns(tmp_path):
    folder = tmp_path / "original" / "trec"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("0\n1\n")
    (folder / "test.csv").write_text("0,who?\n")
    with pytest.raises(ValueError, match=r"expected at least 2 column\(s\), got 1") as err:
        make_k_shot(TASKS["trec"], tmp_path, tmp_path / "out", k=1, seed=13)
    assert "header-less CSV file whose rows are: label, sentence" in str(err.value)
    assert_no_split_written(tmp_path / "out")


def test_bad_test_file_is_caught_before_any_split_is_written(tmp_path):
    sst2_dir(tmp_path, SST2_HEADER + "fine\t1\nbad\t0\n", test=SST2_HEADER + "fine\t5\n")
    with pytest.raises(ValueError, match="dev.tsv, row 1: label '5'"):
        make_k_shot(TASKS["SST-2"], tmp_path, tmp_path / "out", k=1, seed=13)
    assert_no_split_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# model directories
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A complete save_pretrained directory of a tiny RoBERTa whose vocabulary has SST-2's label words."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = word_tokenizer(WORDS + ["terrible", "great"])
    clf = make_clf(tokenizer, "mlm", dtype=__import__("torch").float32)
    clf.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def incomplete(model_dir: Path, tmp_path: Path, drop: tuple[str, ...]) -> Path:
    out = tmp_path / "incomplete"
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name not in drop:
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_complete_model_directory_and_hub_ids_pass(model_dir):
    assert model_dir_problems(model_dir) == []
    assert model_dir_problems("roberta-large") == [] and model_dir_problems("facebook/opt-2.7b") == []


@pytest.mark.parametrize(
    "drop,needle",
    [
        (("config.json",), "has no config.json"),
        (("model.safetensors",), "has no weights"),
        (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer files"),
    ],
)
def test_incomplete_model_directory_is_refused(model_dir, tmp_path, drop, needle):
    from dpzo.models.classifier import load_model

    path = incomplete(model_dir, tmp_path, drop)
    problems = model_dir_problems(path)
    assert any(needle in p for p in problems) and "save_pretrained" in problems[-1]
    with pytest.raises(ModelDirError, match=needle):
        load_model(path)


@pytest.mark.parametrize("path", ["./models/absent", "/no/such/model/dir", "~/absent/model/dir"])
def test_missing_model_directory_is_refused(path):
    problems = model_dir_problems(path)
    assert len(problems) == 1 and "not found" in problems[0] and "save_pretrained" in problems[0]


def test_model_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    assert "is a file, not a directory" in model_dir_problems(tmp_path / "weights.bin")[0]


# ---------------------------------------------------------------------------------------------
# config keys
# ---------------------------------------------------------------------------------------------


def demo_config(**changes) -> dict:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(changes)
    return config


def config_error(config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        check_config(config, SCHEMA)
    return str(err.value)


def test_unknown_top_level_key_lists_the_allowed_ones():
    text = config_error(demo_config(epsilon=["2"]))
    assert "unknown key(s) 'epsilon'" in text and "epsilons" in text


def test_unknown_hyperparameter_lists_the_method_s_keys():
    config = demo_config()
    config["methods"]["dp-zoso"]["lr_rate"] = 1e-3
    text = config_error(config)
    assert "methods.dp-zoso" in text and "unknown key(s) 'lr_rate'" in text and "batch_size, lr" in text


def test_stages_that_never_start_are_refused_before_any_job():
    config = demo_config()
    config["methods"]["dp-zoso"].update(steps=60, stage_steps=24)  # stages at 0, 24, 72 > 60
    config["methods"]["dp-zopo"].update(stages=1, lam=0.0)  # fine
    text = config_error(config)
    assert "config key 'methods.dp-zoso'" in text and "do not all start within 60 steps" in text
    assert "dp-zopo" not in text
    check_config(demo_config(), SCHEMA)  # the demo config itself passes


def test_placement_ranks_and_master_keys_are_checked():
    config = demo_config(models={"big": {"path": "facebook/opt-13b", "gpus_per_rank": 2, "ranks": 4}})
    text = config_error(config)
    assert "models.big.gpus_per_rank" in text and "need 'models.big.placement'" in text
    config["models"]["big"]["placement"] = "everywhere"
    assert "models.big.placement" in config_error(config)
    config["models"]["big"].update(placement="balanced", master="float16", ranks=0)
    text = config_error(config)
    assert "models.big.master" in text and "models.big.ranks" in text
    config["models"]["big"].update(master="none", ranks=4, max_memory={0: "70GiB", 1: "70GiB"})
    check_config(config, SCHEMA)


@pytest.mark.parametrize(
    "placed,key",
    [
        (
            {"placement": {"model.decoder.layers.0": 0, "model.decoder.layers.1": "cpu"}},
            "placement.model.decoder.layers.1",
        ),
        ({"placement": {"model.decoder": "disk"}}, "placement.model.decoder"),
        ({"placement": "balanced", "max_memory": {0: "70GiB", "cpu": "200GiB"}}, "max_memory.cpu"),
    ],
)
def test_a_placement_that_offloads_to_host_memory_or_disk_is_refused_before_any_job(placed, key):
    """accelerate offloads a cpu or disk module of a GPU model (weights on meta, reloaded by hooks):
    the flat buffers would hold meta tensors, so the config is refused with the fix (streamed)."""
    config = demo_config(models={"big": {"path": "facebook/opt-13b", **placed}})
    text = config_error(config)
    assert f"config key 'models.big.{key}'" in text
    assert "offload modules" in text and "offload: streamed" in text
    assert text.count("would make accelerate offload") == 1


def test_wrong_type_names_the_key_and_the_expected_type():
    text = config_error(demo_config(k="many"))
    assert "config key 'k'" in text and "expected integer" in text


def test_audit_must_name_configured_model_task_and_method():
    text = config_error(demo_config(audit={"model": "gpt", "task": "SST-2", "method": "dpzero"}))
    assert "'audit.model': 'gpt' is not one of `models` (demo-roberta, demo-opt)" in text
    assert "'audit.task': 'SST-2'" in text and "'audit.method': 'dpzero'" in text


def test_unknown_audit_key():
    assert "unknown key(s) 'trial'" in config_error(demo_config(audit={"trial": 5}))


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [([], "required"), (["frobnicate"], "invalid choice")])
def test_cli_without_a_valid_subcommand_exits_2(argv, needle, capsys):
    assert cli_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err and "calibrate" in err and "audit" in err


def test_cli_module_exit_code_reaches_the_shell():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "dpzo", "calibrate", "--n", "0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == "" and "--n" in proc.stderr


# ---------------------------------------------------------------------------------------------
# the same checks through Snakemake: non-zero exit, the message, nothing written
# ---------------------------------------------------------------------------------------------


def snakemake(workdir: Path, config: dict, *targets: str) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": str(ROOT / "src")}
    return run_pipeline(workdir, *targets, check=False, env=env, cores=1, timeout=600)


def real_task_config(data_dir: Path, models: dict | None = None) -> dict:
    return demo_config(
        data_dir=str(data_dir),
        tasks=["SST-2"],
        models=models or {"demo-roberta": {"demo": "roberta"}},
        k=1,
        seeds=[13],
        epsilons=["8"],
        methods={"zero-shot": {}},
    )


def test_pipeline_refuses_missing_task_data_before_any_job(tmp_path):
    proc = snakemake(tmp_path, real_task_config(tmp_path / "lm-bff"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "original/SST-2/train.tsv" in text and "not found" in text and "LM-BFF" in text and "data_dir" in text
    assert not (tmp_path / "results").exists()


def test_pipeline_refuses_a_missing_model_directory_before_any_job(tmp_path):
    sst2_dir(tmp_path / "lm-bff", SST2_HEADER + "fine\t1\nbad\t0\n")
    config = real_task_config(tmp_path / "lm-bff", models={"mine": {"path": str(tmp_path / "models" / "mine")}})
    proc = snakemake(tmp_path, config)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "models.mine.path" in text and "not found" in text and "save_pretrained" in text
    assert not (tmp_path / "results").exists()


def test_pipeline_job_with_a_non_utf8_file_fails_and_leaves_no_split(tmp_path):
    sst2_dir(tmp_path / "lm-bff", (SST2_HEADER + "caf\u00e9\t1\n").encode("latin-1"))
    proc = snakemake(tmp_path, real_task_config(tmp_path / "lm-bff"), "results/data/SST-2/k1-seed13/train.jsonl")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train.tsv is not UTF-8 text" in text and "iconv" in text
    assert not list((tmp_path / "results").rglob("*.jsonl"))


# ---------------------------------------------------------------------------------------------
# a cell run: faults publish nothing; determinism; noise
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    from dpzo.data.splits import save_split

    path = tmp_path_factory.mktemp("split")
    save_split(path / "train.jsonl", examples(16, seed=0))
    save_split(path / "test.jsonl", examples(8, seed=1))
    return path


def cell_for(method: str, eps: str = "inf"):
    from dpzo.privacy.ledger import Cell

    return Cell(model="tiny", task="SST-2", method=method, eps=eps, seed=13)


def accounting(method: str):
    from dpzo.privacy.ledger import AccountingSettings, cell_noise

    return AccountingSettings(delta=1e-5, noise=cell_noise(method))


def zo_ledger(method: str, params: dict, eps: str = "inf") -> dict:
    """The cell's own ledger (n = 16), as the account rule writes it."""
    from dpzo.methods import hyperparameters_for
    from dpzo.privacy.ledger import cell_ledger

    return cell_ledger(cell_for(method, eps), hyperparameters_for(method, params), n=16, settings=accounting(method))


def run(model_dir, split_dir, method: str, params: dict, ledger: dict, eps: str = "inf") -> dict:
    import tempfile

    from dpzo.pipeline.cell import CellRun, run_cell

    ledger_path = Path(tempfile.mkdtemp()) / "privacy.json"
    ledger_path.write_text(json.dumps(ledger))
    return run_cell(
        CellRun(
            cell_for(method, eps),
            model_path=str(model_dir),
            split_dir=str(split_dir),
            method_params=params,
            ledger_path=str(ledger_path),
            accounting=accounting(method),
            eval_batch_size=8,
        )
    )


VOLATILE = {"ms_per_step", "train_seconds", "wall_seconds", "memory"}


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


def test_same_cell_twice_gives_identical_metrics_without_noise(model_dir, split_dir, one_thread):
    params = {"steps": 3, "batch_size": 4, "lr": 1e-2, "log_every": 1}
    ledger = zo_ledger("mezo", params)
    first, second = (run(model_dir, split_dir, "mezo", params, ledger) for _ in range(2))
    assert stable(first) == stable(second) and first["steps"] == 3


def test_same_cell_twice_gives_identical_metrics_with_the_test_noise_seed(
    model_dir, split_dir, one_thread, monkeypatch
):
    monkeypatch.setenv("DPZO_INSECURE_TEST_NOISE_SEED", "5")
    params = {"steps": 3, "batch_size": 4, "lr": 1e-2, "clip": 1.0, "log_every": 1}
    ledger = zo_ledger("dp-zoso", params, eps="2")
    assert ledger["noise"] == "insecure test seed 5"  # recorded in the ledger ...
    with pytest.warns(RuntimeWarning, match="NO privacy"):
        first, second = (run(model_dir, split_dir, "dp-zoso", params, ledger, eps="2") for _ in range(2))
    assert stable(first) == stable(second) and first["releases"] == 3
    assert first["privacy"]["noise"] == "insecure test seed 5"  # ... and in the metrics


def test_same_public_seed_draws_different_noise(model_dir, split_dir, one_thread, monkeypatch):
    monkeypatch.delenv("DPZO_INSECURE_TEST_NOISE_SEED", raising=False)
    params = {"steps": 3, "batch_size": 4, "lr": 1e-2, "clip": 1.0, "log_every": 1}
    ledger = zo_ledger("dp-zoso", params, eps="2")
    first, second = (run(model_dir, split_dir, "dp-zoso", params, ledger, eps="2") for _ in range(2))
    assert first["history"]["grad"] != second["history"]["grad"]  # the released scalars


def test_non_finite_training_publishes_no_metrics(model_dir, split_dir, tmp_path, one_thread):
    from dpzo.pipeline import workflow

    out = tmp_path / "run" / "metrics.json"
    job = SimpleNamespace(
        log=[str(tmp_path / "train.log")],
        threads=1,
        input=SimpleNamespace(ledger=str(tmp_path / "privacy.json"), train=str(split_dir / "train.jsonl"), masks=[]),
        output=SimpleNamespace(metrics=str(out), diagnostics=str(out.with_name("private_diagnostics.json"))),
        wildcards=SimpleNamespace(model="tiny", task="SST-2", method="mezo", eps="inf", seed="13"),
        params=SimpleNamespace(
            model_path=str(model_dir),
            model_cfg={},
            eval_batch_size=8,
            device="cpu",
            method_params={"steps": 2, "batch_size": 4, "lr": 1e300},
            checkpoint=str(tmp_path / "checkpoint" / "train_state.pt"),
            delta=1e-5,
            accountant="pld",
            convention="common",
            noise="none (no privacy claim)",
            tf32=True,
        ),
        rule="train",
        config={},
    )
    (tmp_path / "privacy.json").write_text(json.dumps(zo_ledger("mezo", {"steps": 2, "batch_size": 4, "lr": 1e300})))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(FloatingPointError, match="non-finite"):
            workflow.train(job)
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary file left either


def test_atomic_outputs_get_the_mode_of_any_new_file(tmp_path):
    """A temporary file is private (0600); the published output must not stay so (on a shared
    cluster, collaborators read the results)."""
    from dpzo.fileio import write_json_atomic

    write_json_atomic(tmp_path / "out.json", {"a": 1})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
