"""What is checked before any job: model directories beyond presence (config, weights headers,
tokenizer, label words; the model its config.json builds on the meta device, its embedding against
the tokenizer, its output head), the device, k against the class sizes, relative model paths; and,
at parse time (so by ``snakemake -n`` too), what a job would otherwise fail on later."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from dpzo.data.inputs import model_dir_problems, model_files_in, weights_problems
from dpzo.pipeline import preflight

from .tiny import WORDS, make_clf, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A save_pretrained directory of a tiny RoBERTa whose vocabulary has SST-2's label words."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = word_tokenizer(WORDS + ["terrible", "great"])
    clf = make_clf(tokenizer, "mlm", dtype=torch.float32)
    clf.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(model_dir, out)
    return out


def test_a_complete_directory_passes_and_lists_its_files(model_dir):
    assert model_dir_problems(model_dir) == []
    files = {Path(f).name for f in model_files_in(model_dir)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert preflight.model_problem("m", str(model_dir)) is None
    assert preflight.label_word_problems("m", str(model_dir), ["SST-2"]) == []


def test_an_unparsable_config_is_named(model_dir, tmp_path):
    path = copy_of(model_dir, tmp_path)
    (path / "config.json").write_text('{"model_type": "roberta",')
    problems = model_dir_problems(path)
    assert any(str(path / "config.json") in p and "not valid JSON" in p for p in problems)


def test_a_truncated_safetensors_file_is_named(model_dir, tmp_path):
    path = copy_of(model_dir, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])  # a copy cut short
    (problem,) = weights_problems(weights)
    assert "cut short" in problem and str(weights) in problem
    weights.write_bytes(b"\x10\x00")  # not even a header
    assert "not a readable safetensors file" in weights_problems(weights)[0]
    assert any("model.safetensors" in p for p in model_dir_problems(path))


def test_a_shard_index_needs_every_shard(model_dir, tmp_path):
    path = copy_of(model_dir, tmp_path)
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = weights_problems(path / "model.safetensors.index.json")
    assert len(problems) == 1 and "model-00002-of-00002.safetensors" in problems[0] and "missing" in problems[0]
    names = {Path(f).name for f in model_files_in(path)}
    assert {"model.safetensors.index.json", "model-00001-of-00002.safetensors"} <= names


def test_a_pytorch_bin_must_be_a_readable_archive(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert weights_problems(tmp_path / "pytorch_model.bin") == []
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 cut")
    assert "not a readable PyTorch weights file" in weights_problems(tmp_path / "pytorch_model.bin")[0]


def test_label_words_must_be_single_tokens(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    # a WordPiece vocabulary that spells "great" as two pieces
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "terrible", "gr", "##eat"])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(tmp_path)
    (problem,) = preflight.label_word_problems("m", str(tmp_path), ["SST-2"])
    assert "'great'" in problem and "2 tokens" in problem and "model 'm'" in problem


def test_a_tokenizer_that_does_not_load_is_named(model_dir, tmp_path):
    path = copy_of(model_dir, tmp_path)
    (path / "tokenizer.json").write_text("{")
    (problem,) = preflight.label_word_problems("m", str(path), ["SST-2"])
    assert "tokenizer does not load" in problem and str(path) in problem


def test_a_relative_model_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = preflight.model_problem("mine", "models/my-roberta")
    assert f"resolved against {tmp_path}" in problem and str(tmp_path / "models" / "my-roberta") in problem
    assert "not a Hugging Face id in the local cache" in problem
    absolute = preflight.model_problem("mine", "/no/such/model")
    assert "not found" in absolute and "resolved against" in absolute


def test_device_problems():
    assert preflight.device_problem("cpu") is None
    if not torch.cuda.is_available():
        problem = preflight.device_problem("cuda:0")
        assert "config key 'device'" in problem and "no CUDA device" in problem and "device: cpu" in problem
    else:
        assert preflight.device_problem("cuda:0") is None
        assert "CUDA device(s)" in preflight.device_problem(f"cuda:{torch.cuda.device_count()}")


def test_k_larger_than_a_class_is_a_warning_with_the_class_counts(tmp_path):
    folder = tmp_path / "original" / "SST-2"
    folder.mkdir(parents=True)
    rows = ["sentence\tlabel"] + [f"good {i}\t1" for i in range(5)] + [f"bad {i}\t0" for i in range(2)]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    config = {"k": 3, "tasks": ["SST-2"], "data_dir": str(tmp_path), "models": {}}
    (warning,) = preflight.k_shot_warnings(config)
    assert "k = 3" in warning and "{0: 2}" in warning and "{0: 2, 1: 3}" in warning and "n = 5" in warning
    assert preflight.k_shot_warnings(config | {"k": 2}) == []


# ---------------------------------------------------------------------------------------------
# the model a config.json describes, built on the meta device (no weights)
# ---------------------------------------------------------------------------------------------
def tiny_config(cls, vocab_size: int = 50, **extra):
    """A two-layer config of ``cls`` with the test vocabulary's special ids."""
    size = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    if cls is transformers.OPTConfig:
        size = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16)
    return cls(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, **size, **extra)


def save_model(folder: Path, model, tokenizer=None) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(folder)
    (tokenizer or word_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def headless_bert(tmp_path_factory):
    """A sentence-transformers-like checkpoint: a BertModel saved without any masked-LM head."""
    return save_model(
        tmp_path_factory.mktemp("bertmodel"), transformers.BertModel(tiny_config(transformers.BertConfig))
    )


def test_a_config_that_describes_no_model_is_named(model_dir, tmp_path):
    path = copy_of(model_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"hidden_size": 7, "num_attention_heads": 12}))
    assert model_dir_problems(path) == []  # it parses: the old check let it through
    (problem,) = preflight.model_checks("m", {"path": str(path)}, ["SST-2"])
    assert "model 'm' (models.m.path)" in problem and str(path / "config.json") in problem
    assert "hidden size (7)" in problem and "save_pretrained" in problem
    assert preflight.model_checks("m", {"path": str(model_dir)}, ["SST-2"]) == []


def test_tokenizer_ids_past_the_embedding_are_named(tmp_path):
    words = [w for w in WORDS if w not in ("terrible", "great")]
    tokenizer = word_tokenizer(words + ["terrible", "great"])  # ids 0..21
    model = transformers.RobertaForMaskedLM(tiny_config(transformers.RobertaConfig, 22, type_vocab_size=1))
    fits = save_model(tmp_path / "fits", model, tokenizer)
    assert preflight.model_checks("m", {"path": str(fits)}, ["SST-2"]) == []
    tokenizer.add_tokens(["<extra>"])  # an added token: id 22, past the 22 rows
    extra = save_model(tmp_path / "extra", model, tokenizer)
    (problem,) = preflight.model_checks("m", {"path": str(extra)}, ["SST-2"])
    assert "model 'm' (models.m.path)" in problem and "ids up to 22 (23 tokens, added tokens included)" in problem
    assert "22 rows" in problem and str(extra / "config.json") in problem and "IndexError" in problem
    assert "resize_token_embeddings" in problem and "label word" not in problem
    small = transformers.RobertaForMaskedLM(tiny_config(transformers.RobertaConfig, 21, type_vocab_size=1))
    past = save_model(tmp_path / "past", small, word_tokenizer(words + ["terrible", "great"]))
    (problem,) = preflight.model_checks("m", {"path": str(past)}, ["SST-2"])
    assert "label word 'great' of SST-2 (id 21)" in problem and "label word 'terrible'" not in problem


def test_the_model_is_built_once_per_model_key(model_dir, monkeypatch):
    from dpzo.models import meta

    built = []
    real = meta.meta_model
    monkeypatch.setattr(meta, "meta_model", lambda *args, **kwargs: built.append(args) or real(*args, **kwargs))
    config = {"models": {"a": {"path": str(model_dir)}, "b": {"path": str(model_dir)}}, "tasks": ["SST-2"]}
    config |= {"data_dir": str(model_dir), "methods": {"zero-shot": {}}}
    problems = preflight.missing_inputs(config)
    assert problems and not any("model '" in p for p in problems)  # only the task data is missing
    assert len(built) == 2  # one meta model per model key, shared by its checks


# ---------------------------------------------------------------------------------------------
# the output head the prompts are scored with must be in the checkpoint
# ---------------------------------------------------------------------------------------------
def test_a_checkpoint_without_its_head_is_refused(headless_bert):
    from dpzo.models.meta import missing_head_weights

    (problem,) = preflight.model_checks("st", {"path": str(headless_bert)}, ["SST-2"])
    assert "model 'st' (models.st.path)" in problem and str(headless_bert / "model.safetensors") in problem
    for weight in ("cls.predictions.bias", "cls.predictions.transform.dense.weight"):
        assert weight in problem
    assert "cls.predictions.decoder.weight" not in problem  # tied to the stored word embeddings
    assert "bert-base-uncased" in problem and "AutoModelForMaskedLM" in problem
    assert "models.st.allow_new_head: true" in problem
    assert preflight.model_checks("st", {"path": str(headless_bert), "allow_new_head": True}, ["SST-2"]) == []
    assert "cls.predictions.transform.LayerNorm.weight" in missing_head_weights(headless_bert)


def test_a_pytorch_bin_or_sharded_checkpoint_is_read_for_its_head(headless_bert, tmp_path):
    from safetensors.torch import load_file

    binary = copy_of(headless_bert, tmp_path)
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    (problem,) = preflight.model_checks("st", {"path": str(binary)}, ["SST-2"])
    assert "pytorch_model.bin has no masked-LM prediction head" in problem
    model = transformers.BertForMaskedLM(tiny_config(transformers.BertConfig))
    torch.manual_seed(0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    word_tokenizer().save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert preflight.model_checks("b", {"path": str(tmp_path / "sharded")}, ["SST-2"]) == []


def test_complete_checkpoints_of_every_family_pass(tmp_path):
    from safetensors.torch import load_file, save_file

    from .test_families import FAMILIES, save_tiny

    for family in FAMILIES:  # masked (RoBERTa, BERT, DeBERTa-v2) and causal, tied and untied
        assert preflight.model_checks(family, {"path": str(save_tiny(tmp_path / family, family))}, ["SST-2"]) == []
    assert not transformers.AutoConfig.from_pretrained(tmp_path / "llama").tie_word_embeddings
    tied = transformers.LlamaForCausalLM(tiny_config(transformers.LlamaConfig, tie_word_embeddings=True))
    save_model(tmp_path / "tied", tied)
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    assert preflight.model_checks("tied", {"path": str(tmp_path / "tied")}, ["SST-2"]) == []
    # bert-base-uncased stores its LayerNorms (the head's too) under their old names, gamma and beta
    weights = load_file(tmp_path / "bert" / "model.safetensors")
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in weights.items()
    }
    assert "cls.predictions.transform.LayerNorm.gamma" in legacy
    save_file(legacy, tmp_path / "bert" / "model.safetensors", metadata={"format": "pt"})
    assert preflight.model_checks("bert", {"path": str(tmp_path / "bert")}, ["SST-2"]) == []
    # an untied LM head is stored on its own: without it, the causal LM's head is new
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    (problem,) = preflight.model_checks("llama", {"path": str(tmp_path / "llama")}, ["SST-2"])
    assert "has no LM head" in problem and "lm_head.weight" in problem and "AutoModelForCausalLM" in problem


def test_an_accepted_new_head_is_recorded_in_every_cells_metrics(headless_bert, tmp_path):
    from dpzo.data.splits import save_split
    from dpzo.pipeline.cell import CellRun, run_cell
    from dpzo.privacy.ledger import AccountingSettings, Cell, cell_ledger, cell_noise

    from .tiny import examples

    save_split(tmp_path / "train.jsonl", examples(8, seed=0))
    save_split(tmp_path / "test.jsonl", examples(4, seed=1))
    cell = Cell(model="st", task="SST-2", method="zero-shot", eps="inf", seed=13)
    settings = AccountingSettings(delta=1e-5, noise=cell_noise("zero-shot"))
    (tmp_path / "privacy.json").write_text(json.dumps(cell_ledger(cell, None, n=8, settings=settings)))
    run = dict(model_path=str(headless_bert), split_dir=str(tmp_path), method_params={}, accounting=settings)
    run |= dict(ledger_path=str(tmp_path / "privacy.json"), eval_batch_size=4)
    metrics = run_cell(CellRun(cell, allow_new_head=True, **run))
    assert "cls.predictions.bias" in metrics["new_head"]["initialised"]
    assert "models.st.allow_new_head" in metrics["new_head"]["note"]
    assert "new_head" not in run_cell(CellRun(cell, **run))


# ---------------------------------------------------------------------------------------------
# refused at parse time, so by `snakemake -n` too
# ---------------------------------------------------------------------------------------------
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
DEMO = {
    "models": {"d": {"demo": "roberta"}},
    "tasks": ["demo-sst2"],
    "k": 16,
    "seeds": [13],
    "epsilons": ["8"],
    "methods": {"zero-shot": {}, "dpzero+c50": {"steps": 4, "batch_size": 8, "lr": 1e-4, "clip": 50.0}},
}


def config_problems(config: dict) -> str:
    """The message of everything the parse-time checks refuse in ``config`` ("" when nothing)."""
    from dpzo.pipeline.config import ConfigError, check_config, grid_cells

    try:
        check_config(config, SCHEMA)
        grid_cells(config)
    except ConfigError as err:
        return str(err)
    return ""


def test_published_accounting_of_dpzero_takes_one_direction():
    four = json.loads(json.dumps(DEMO))
    four["methods"]["dpzero+c50"]["directions"] = 4
    assert config_problems(four) == "" and config_problems(DEMO | {"accounting": "published"}) == ""
    problem = config_problems(four | {"accounting": "published"})
    assert "config key 'methods.dpzero+c50.directions': 4" in problem and "'accounting': published" in problem
    assert "directions: 1" in problem and "accounting: common" in problem


def test_seeds_are_bounded_by_what_their_generators_take():
    assert config_problems(DEMO | {"seeds": [2**32 - 1]}) == ""  # numpy's RandomState takes up to 2^32 - 1
    for seed in (2**32, 2**64):
        problem = config_problems(DEMO | {"seeds": [seed]})
        assert f"config key 'seeds[0]': {seed} is out of range: allowed 0 to 4294967295" in problem
    problem = config_problems(DEMO | {"demo": {"seed": 2**64}})
    assert "config key 'demo.seed': 18446744073709551616 is out of range: allowed 0 to 18446744073709551615" in problem
    mask = {"steps": 4, "batch_size": 8, "lr": 1e-4, "clip": 5.0, "mask": {"ratio": 0.5, "seed": 2**64}}
    problem = config_problems(DEMO | {"methods": {"dp-zopo": mask}})
    assert "config key 'methods.dp-zopo.mask.seed': 18446744073709551616 is out of range" in problem


def test_a_method_the_architecture_cannot_serve_is_refused_at_parse_time(tmp_path):
    (tmp_path / "gpt2").mkdir()  # the config.json is enough: no weights are read at parse time
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    prefix = {"steps": 4, "batch_size": 8, "lr": 1e-4, "tuning": "prefix"}
    config = DEMO | {"models": {"g": {"path": str(tmp_path / "gpt2")}, "d": {"demo": "roberta"}}}
    config["methods"] = {"zero-shot": {}, "mezo+prefix": prefix}
    problem = config_problems(config)
    assert "model 'g' (gpt2), method 'mezo+prefix'" in problem and "Remove mezo+prefix" in problem
    assert "model 'd'" not in problem  # a demo model is built by the pipeline: nothing to read
    narrowed = config | {"models": {"g": {"path": str(tmp_path / "gpt2"), "grid": {"methods": ["zero-shot"]}}}}
    assert config_problems(narrowed) == ""
    assert config_problems(config | {"models": {"g": {"path": str(tmp_path / "absent")}}}) == ""


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"accounting": "published", "methods": {"dpzero": {"steps": 4, "batch_size": 8, "lr": 1e-4, "clip": 5.0}}},
            "config key 'methods.dpzero.directions': 2 with 'accounting': published",
        ),
        ({"seeds": [2**64]}, "config key 'seeds[0]': 18446744073709551616 is out of range"),
        ({"models": {"g": {"path": "gpt2-dir"}}}, "model 'g' (gpt2), method 'mezo+prefix'"),
    ],
    ids=["published-directions", "seed", "architecture"],
)
def test_dry_run_refuses_what_a_job_would_fail_on(tmp_path, change, message):
    """Each passes the schema; without the parse-time checks `snakemake -n` planned it and a job
    (account, fewshot, train) failed later."""
    import yaml

    from .pipeline import snakemake

    (tmp_path / "gpt2-dir").mkdir()
    (tmp_path / "gpt2-dir" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "second.yaml").write_text(yaml.safe_dump({"methods": {"dpzero": {"directions": 2}}}))
    prefix = {"steps": 4, "batch_size": 8, "lr": 1e-4, "tuning": "prefix"}
    config = DEMO | {"methods": {"zero-shot": {}, "mezo+prefix": prefix}} | change
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # the directions come from a second config file, as an overlay would bring them
    files = [str(tmp_path / "config.yaml"), str(tmp_path / "second.yaml")] if "accounting" in change else []
    proc = snakemake(tmp_path, "-n", *(["--configfile", *files] if files else []), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-3000:]
    assert not (tmp_path / "results").exists()
