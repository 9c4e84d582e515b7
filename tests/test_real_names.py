"""Real model ids and LM-BFF tasks: stand-ins saved under the real names run through the DAG;
with nothing present the run stops before any job with the list of what to download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dpzo.data.tasks import TASKS
from dpzo.pipeline.config import grid_cells
from dpzo.pipeline.preflight import missing_inputs

from .pipeline import ROOT, snakemake
from .test_workflow import job_counts
from .tiny import examples, make_clf, word_tokenizer

SNAPSHOT = "0" * 40


def save_in_hub_cache(hf_home: Path, repo_id: str, family: str) -> None:
    """A tiny random-init model in the Hugging Face cache layout, under a real repo id."""
    clf = make_clf(word_tokenizer(), family, dtype=torch.float32)
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    clf.model.save_pretrained(snapshot)
    clf.tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)


def write_sst2(data_dir: Path) -> None:
    """SST-2 in the LM-BFF (GLUE TSV) layout, with sentences the tiny vocabulary knows."""
    folder = data_dir / "original" / "SST-2"
    folder.mkdir(parents=True)
    for name, n, seed in (("train.tsv", 64, 0), ("dev.tsv", 24, 1)):
        rows = ["sentence\tlabel"] + [f"{ex.texts[0]}\t{ex.label}" for ex in examples(n, seed)]
        (folder / name).write_text("\n".join(rows) + "\n")


CONFIG = {
    "models": {"roberta-large": {"path": "roberta-large"}, "opt-1.3b": {"path": "facebook/opt-1.3b"}},
    "tasks": ["SST-2"],
    "k": 8,
    "seeds": [13],
    "epsilons": ["8"],
    "max_test": 24,
    "methods": {
        "zero-shot": {},
        "dp-zoso": {"steps": 4, "batch_size": 4, "lr": 1.0e-4, "stages": 2, "stage_steps": 2, "clip": 5.0},
    },
}


@pytest.mark.slow
def test_stand_ins_under_the_real_names_run(tmp_path):
    hf_home, data_dir = tmp_path / "hf", tmp_path / "lm-bff"
    save_in_hub_cache(hf_home, "roberta-large", "mlm")
    save_in_hub_cache(hf_home, "facebook/opt-1.3b", "causal")
    write_sst2(data_dir)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "data_dir": str(data_dir)}))
    snakemake(tmp_path, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    for model in CONFIG["models"]:
        for cell in ("zero-shot/epsinf", "dp-zoso/eps8"):
            metrics = json.loads(
                (tmp_path / "results/runs" / model / "SST-2" / cell / "seed13/metrics.json").read_text()
            )
            assert metrics["test_n"] == 24 and metrics["n_train"] == 16 and metrics["metric"] == "accuracy"
    ledger = json.loads((tmp_path / "results/runs/roberta-large/SST-2/dp-zoso/eps8/seed13/privacy.json").read_text())
    assert ledger["n"] == 16 and ledger["q"] == pytest.approx(4 / 16)


def test_nothing_present_fails_before_any_job_with_the_list(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "data_dir": str(tmp_path / "lm-bff")}))
    proc = snakemake(tmp_path, check=False, env={"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "missing or unusable inputs; nothing was run" in out
    assert "'roberta-large' is not a directory" in out and "is not a Hugging Face id in the local cache" in out
    assert "hf download facebook/opt-1.3b" in out
    assert f"{tmp_path / 'lm-bff'}/original/SST-2/train.tsv" in out and "datasets.tar" in out
    assert not (tmp_path / "results").exists()


def test_local_model_directories_are_checked(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    config = {
        "models": {
            "a": {"path": str(tmp_path / "half")},
            "b": {"path": str(tmp_path / "absent")},
            "c": {"demo": "opt"},
        },
        "tasks": ["demo-sst2"],
    }
    problems = missing_inputs(config)
    assert len(problems) == 2
    assert "models.a.path" in problems[0] and "has no weights" in problems[0] and "no tokenizer files" in problems[0]
    assert "models.b.path" in problems[1] and "not found" in problems[1]


def test_paper_config_dry_run_lists_the_whole_grid(tmp_path):
    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    (tmp_path / "config.yaml").write_text((ROOT / "config/paper.yaml").read_text())
    proc = snakemake(tmp_path, "-n", "--quiet", "rules")

    counts = job_counts(proc.stdout)
    # Independent count: RoBERTa-large runs every task x its methods x (3 eps if private) x 3 seeds;
    # each OPT model runs SST-2 x its methods x (eps 4 if private) x seed 42.
    private = {"dp-sgd", "dp-prefix", "dpzero", "dp-zoso", "dp-zopo", "dp-aggzo"}
    roberta = paper["models"]["roberta-large"]["grid"]["methods"]
    expected = len(paper["tasks"]) * sum(3 if m in private else 1 for m in roberta) * len(paper["seeds"])
    opt = paper["models"]["opt-1.3b"]["grid"]["methods"]
    expected += 2 * sum(1 for m in opt)
    assert counts["train"] == counts["account"] == expected == len(grid_cells(paper))
    assert counts["fewshot"] == len(paper["tasks"]) * len(paper["seeds"])
    assert set(paper["tasks"]) <= set(TASKS)


def test_dpzero_config_dry_run(tmp_path):
    dpzero = yaml.safe_load((ROOT / "config/dpzero.yaml").read_text())
    (tmp_path / "config.yaml").write_text((ROOT / "config/dpzero.yaml").read_text())
    counts = job_counts(snakemake(tmp_path, "-n", "--quiet", "rules").stdout)
    # Per model: non-private methods once per (task, seed), private ones at each epsilon.
    private = {"dpzero", "dpzero+opt", "dp-sgd", "dp-sgd+lora"}
    expected = sum(
        len(m["grid"]["tasks"])
        * len(m["grid"]["seeds"])
        * sum(len(dpzero["epsilons"]) if method in private else 1 for method in m["grid"]["methods"])
        for m in dpzero["models"].values()
    )
    # RoBERTa: 4 non-private + 3 private x 2 eps; each OPT model: 2 + 1 x 2
    assert counts["train"] == expected == 6 * 3 * 10 + 3 * 4 * 3 * 4
    assert dpzero["methods"]["dp-sgd+lora"]["tuning"] == {"kind": "lora", "rank": 8, "alpha": 16}
    assert dpzero["accounting"] == "published" and dpzero["delta"] == 1e-5


def test_llama_config_dry_run(tmp_path):
    """config/llama.yaml: a Llama causal LM on the MeZO tasks, full / LoRA / prefix tuning."""
    from dpzo.methods import is_private
    from dpzo.methods.hyperparameters import TuningSettings

    llama = yaml.safe_load((ROOT / "config/llama.yaml").read_text())
    (tmp_path / "config.yaml").write_text((ROOT / "config/llama.yaml").read_text())
    counts = job_counts(snakemake(tmp_path, "-n", "--quiet", "rules").stdout)
    per_cell_group = sum(len(llama["epsilons"]) if is_private(m) else 1 for m in llama["methods"])
    expected = len(llama["models"]) * len(llama["tasks"]) * len(llama["seeds"]) * per_cell_group
    assert counts["train"] == expected == len(grid_cells(llama)) == 2 * 4 * 3 * (4 + 5 * 2)
    assert all(str(m["path"]).startswith("meta-llama/") for m in llama["models"].values())
    kinds = {TuningSettings.from_config(block.get("tuning")).kind for block in llama["methods"].values()}
    assert kinds == {"full", "lora", "prefix"}
    assert not TuningSettings(kind="prefix").architecture_problem("llama")


def test_missing_hugging_face_dataset_is_listed_with_the_fetch_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    problems = missing_inputs(
        {
            "models": {"d": {"demo": "opt"}},
            "tasks": ["mezo-rte", "demo-sst2"],
            "hf_datasets": {"cache_dir": str(tmp_path / "datasets")},
        }
    )
    assert len(problems) == 1
    assert "'super_glue/rte' is not in the datasets cache" in problems[0]
    assert "datasets.load_dataset('super_glue', 'rte')" in problems[0]
    (tmp_path / "datasets" / "super_glue" / "rte").mkdir(parents=True)  # what load_dataset leaves behind
    assert (
        missing_inputs({"models": {}, "tasks": ["mezo-rte"], "hf_datasets": {"cache_dir": str(tmp_path / "datasets")}})
        == []
    )


def test_scale_config_dry_run_asks_for_the_gpus_and_ranks_of_each_model(tmp_path):
    """config/scale.yaml: the large-model grid plans without any model present, every train
    job of a model asking for its ranks x GPUs per rank (the whole 8-GPU node)."""
    import re

    scale = yaml.safe_load((ROOT / "config/scale.yaml").read_text())
    (tmp_path / "config.yaml").write_text((ROOT / "config/scale.yaml").read_text())
    out = snakemake(tmp_path, "-n", "--resources", "gpu=8").stdout  # the machine's 8 GPUs (the default profile: 1)
    counts = job_counts(snakemake(tmp_path, "-n", "--quiet", "rules").stdout)
    expected = sum(
        len(m["grid"]["tasks"]) * (1 + len(scale["epsilons"])) for m in scale["models"].values()
    )  # zero-shot once, the private method at each epsilon
    assert counts["train"] == expected == len(grid_cells(scale)) == 3 * 4 + 2 * 8
    for model, cfg in scale["models"].items():
        assert cfg["ranks"] * cfg["gpus_per_rank"] == 8
        private = re.findall(
            rf"output: results/runs/{model}/[^/]+/dp-[^/]+/eps\d/seed0/metrics.json.*?resources: ([^\n]*)", out, re.S
        )
        assert private and all("gpu=8" in r and "tasks=1" in r for r in private), (model, private[:1])
