"""What is checked before any job: model directories beyond presence (config, weights headers,
tokenizer, label words), the device, k against the class sizes, relative model paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

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
