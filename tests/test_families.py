"""Every common model family, masked and causal, runs every method: a tiny random model of each
saved with ``save_pretrained`` and loaded back through the Auto classes, one cell per method
(``run_cell``, as the train job runs it), and the family a method cannot serve refused before
any job with a message naming both."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from dpzo.data.splits import save_split
from dpzo.masks.settings import MaskSettings
from dpzo.methods import get_method, hyperparameters_for, is_private
from dpzo.pipeline.cell import CellRun, run_cell
from dpzo.privacy.ledger import AccountingSettings, Cell, cell_ledger, cell_noise

from .tiny import WORDS, examples, word_tokenizer

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
FAMILIES = {
    "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM, dict(type_vocab_size=1, **SMALL)),
    "bert": (transformers.BertConfig, transformers.BertForMaskedLM, dict(SMALL)),
    "deberta-v2": (transformers.DebertaV2Config, transformers.DebertaV2ForMaskedLM, dict(SMALL)),
    "opt": (
        transformers.OPTConfig,
        transformers.OPTForCausalLM,
        dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16),
    ),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(n_embd=16, n_layer=2, n_head=2)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=1, **SMALL)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=1, **SMALL)),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_key_value_heads=1, head_dim=8, **SMALL),
    ),
}
STEPS = {"steps": 2, "batch_size": 4, "lr": 1e-3}
METHODS = {
    "zero-shot": {},
    "icl": {"demonstrations": 1},
    "mezo": dict(STEPS),
    "dp-zoso": dict(STEPS, steps=3, stages=2, stage_steps=1, clip=1.0),
    "dp-zopo": dict(STEPS, clip=1.0, mask={"scorer": "magnitude", "ratio": 0.3}),
    "dpzero": dict(STEPS, clip=1.0),
    "dp-zo-gauss": dict(STEPS, clip=0.05),
    "dp-aggzo": dict(STEPS, clip=1.0, directions=2),
    "dp-sgd": dict(STEPS, clip=1.0),
    "ft": dict(STEPS),
    "dp-prefix": dict(STEPS, lr=1e-2, clip=1.0, prefix_tokens=2),
    # LoRA adapters from peft, on the architecture's default target modules
    "dp-zoso+lora": dict(STEPS, clip=1.0, tuning={"kind": "lora", "rank": 2}),
    "dp-sgd+lora": dict(STEPS, clip=1.0, tuning="lora"),
    # key/value prefixes in every attention layer (dpzo.models.prefix)
    "mezo+prefix": dict(STEPS, lr=1e-2, beta=1e-1, tuning={"kind": "prefix", "tokens": 2}),
    "dp-zoso+prefix": dict(STEPS, lr=1e-2, beta=1e-1, clip=1.0, tuning={"kind": "prefix", "tokens": 2}),
    "dp-sgd+prefix": dict(STEPS, lr=1e-2, clip=1.0, tuning={"kind": "prefix", "tokens": 2}),
}
#: what each family's architecture cannot serve (the rest must run): DeBERTa-v2's disentangled
#: attention and GPT-2's fused c_attn take no key/value prefix
NO_PREFIX = {"deberta-v2", "gpt2"}
REFUSED = {method: NO_PREFIX for method in METHODS if "prefix" in method}


def byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE over the test vocabulary in which every word (with its leading space) is
    one token: transformers loads a Qwen2 checkpoint's tokenizer as its byte-level Qwen2Tokenizer,
    which a word-level vocabulary does not survive."""
    from tokenizers import ByteLevelBPETokenizer

    words = " ".join(w for w in WORDS if not w.startswith("<"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [words, " " + words] * 50, vocab_size=400, special_tokens=list(WORDS[:5]), show_progress=False
    )
    special = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **special)


def save_tiny(folder: Path, family: str) -> Path:
    config_cls, model_cls, size = FAMILIES[family]
    key = "n_positions" if family == "gpt2" else "max_position_embeddings"
    config = config_cls(vocab_size=400, **{key: 128}, **SPECIAL, **size)
    torch.manual_seed(0)
    model_cls(config).eval().save_pretrained(folder)
    (byte_level_tokenizer() if family == "qwen2" else word_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("split")
    save_split(path / "train.jsonl", examples(16, seed=0))
    save_split(path / "test.jsonl", examples(8, seed=1))
    return path


def cell(method: str) -> Cell:
    return Cell(model="tiny", task="SST-2", method=method, eps="8" if is_private(method) else "inf", seed=13)


def settings(method: str) -> AccountingSettings:
    return AccountingSettings(delta=1e-5, noise=cell_noise(method))


@pytest.fixture(scope="module")
def ledger_json(tmp_path_factory):
    """The cell's ledger as the account rule writes it, per method (methods with the same T
    share a calibration, as the account rule's cache does)."""
    cache = tmp_path_factory.mktemp("calibrations")

    @functools.cache
    def of(method: str) -> str:
        hp = hyperparameters_for(method, METHODS[method])
        return json.dumps(cell_ledger(cell(method), hp, n=16, settings=settings(method), cache_dir=cache))

    return of


def mask_file(folder: Path, model_dir: Path) -> str:
    from dpzo.masks.prune import write_mask

    path = folder / "mask.pt"
    write_mask(
        path,
        MaskSettings(scorer="magnitude", ratio=0.3),
        model_path=str(model_dir),
        model_cfg={},
        device="cpu",
        task="SST-2",
    )
    return str(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_runs_on_every_family(models, split_dir, ledger_json, tmp_path, family, one_thread):
    model_dir = models[family]
    ran = {}
    for method, params in METHODS.items():
        if family in REFUSED.get(method, ()):
            continue
        (tmp_path / method).mkdir()
        (tmp_path / method / "privacy.json").write_text(ledger_json(method))
        run = CellRun(
            cell(method),
            model_path=str(model_dir),
            split_dir=str(split_dir),
            method_params=params,
            ledger_path=str(tmp_path / method / "privacy.json"),
            accounting=settings(method),
            eval_batch_size=8,
            mask_files=(mask_file(tmp_path / method, model_dir),) if method == "dp-zopo" else (),
        )
        metrics = run_cell(run)
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["test_n"] == 8 and math.isfinite(metrics["test_loss"])
        expected_steps = params.get("steps", 0)
        assert metrics["steps"] == expected_steps, method
        if is_private(method):
            accounted = get_method(method).compositions(hyperparameters_for(method, params))
            assert metrics["releases"] == accounted == json.loads(ledger_json(method))["compositions"], method
        if "+lora" in method:  # the adapters are all that trained
            assert metrics["tuning"] == "lora" and 0 < metrics["trainable_params"] < metrics["n_params"] / 10, method
        if "+prefix" in method:  # 2 positions x (key, value) x layers x key/value heads x head_dim
            cfg = transformers.AutoConfig.from_pretrained(model_dir)
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            assert metrics["tuning"] == "prefix", method
            assert metrics["trainable_params"] == 2 * 2 * cfg.num_hidden_layers * kv_heads * head_dim, method
        ran[method] = metrics["accuracy"]
    assert set(ran) == {m for m in METHODS if family not in REFUSED.get(m, ())}


def test_a_method_a_family_cannot_serve_is_refused_before_any_job(models, tmp_path):
    from dpzo.pipeline.preflight import missing_inputs

    from .pipeline import snakemake

    config = {
        "models": {"tiny-gpt2": {"path": str(models["gpt2"])}, "tiny-llama": {"path": str(models["llama"])}},
        "tasks": ["SST-2"],
        "data_dir": str(tmp_path / "lm-bff"),
        "seeds": [13],
        "epsilons": ["8"],
        "methods": {m: METHODS[m] for m in ("zero-shot", "dp-prefix", "dp-zoso+prefix", "dp-zoso+lora")},
    }
    problems = [p for p in missing_inputs(config) if "prefix" in p]
    assert len(problems) == 2  # the Llama model can take a prefix, the GPT-2 one cannot (LoRA it can)
    for method in ("dp-prefix", "dp-zoso+prefix"):
        named = [p for p in problems if f"model 'tiny-gpt2' (gpt2), method '{method}'" in p]
        assert len(named) == 1 and f"Remove {method}" in named[0]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, check=False)
    assert proc.returncode != 0 and "model 'tiny-gpt2' (gpt2), method 'dp-zoso+prefix'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_new_families_through_the_pipeline(models, tmp_path):
    """BERT (masked) and Llama (causal) checkpoints through the whole DAG: ledgers, cells, tables."""
    from .pipeline import snakemake
    from .test_real_names import write_sst2

    write_sst2(tmp_path / "lm-bff")
    config = {
        "models": {"tiny-bert": {"path": str(models["bert"])}, "tiny-llama": {"path": str(models["llama"])}},
        "tasks": ["SST-2"],
        "data_dir": str(tmp_path / "lm-bff"),
        "k": 8,
        "seeds": [13],
        "epsilons": ["8"],
        "max_test": 16,
        # the private path of each family is the cell test above; here the DAG (no calibration)
        "methods": {"zero-shot": {}, "mezo": dict(METHODS["mezo"])},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path)
    for model in config["models"]:
        for run in ("zero-shot/epsinf", "mezo/epsinf"):
            metrics = json.loads(
                (tmp_path / "results/runs" / model / "SST-2" / run / "seed13/metrics.json").read_text()
            )
            assert metrics["test_n"] == 16 and metrics["n_train"] == 16
    assert (tmp_path / "results/tables/summary.csv").exists()
