"""Fast checks of the offline demo world (synthetic corpus, LM-BFF-layout tasks, tiny models)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpzo.demo import corpus as demo_corpus
from dpzo.demo import pretrain, tasks


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    corpus = root / "corpus.txt"
    demo_corpus.write_pretraining_corpus(corpus, seed=0)
    for task in demo_corpus.DEMO_TASKS:
        tasks.write_demo_task(task, root / "data", corpus, seed=1)
    return {"root": root, "corpus": corpus, "data": root / "data"}


def _read_sst2(data: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(data / "original" / "SST-2" / f"{split}.tsv", sep="\t", quoting=3)


def _read_trec(data: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(data / "original" / "trec" / f"{split}.csv", header=None)


def test_corpus_is_deterministic_per_seed(world: dict[str, Path], tmp_path: Path) -> None:
    again, other = tmp_path / "again.txt", tmp_path / "other.txt"
    demo_corpus.write_pretraining_corpus(again, seed=0)
    demo_corpus.write_pretraining_corpus(other, seed=1)
    assert again.read_bytes() == world["corpus"].read_bytes()
    assert other.read_bytes() != again.read_bytes()
    lines = again.read_text(encoding="utf-8").splitlines()
    expected = demo_corpus.N_REVIEW_DOCUMENTS + demo_corpus.N_QUESTION_DOCUMENTS + demo_corpus.N_FILLER_DOCUMENTS
    assert len(lines) == expected and all(line.strip() for line in lines)
    text = "\n".join(lines)
    # the prompts' patterns exist in the corpus, with both orders of question annotation
    assert " It was great." in text and " It was terrible." in text
    assert " Answer type: " in text and re.search(r"^\w+: \w", text, flags=re.M)


def test_tasks_are_deterministic_per_seed(world: dict[str, Path], tmp_path: Path) -> None:
    for task in demo_corpus.DEMO_TASKS:
        tasks.write_demo_task(task, tmp_path / "same", world["corpus"], seed=1)
        tasks.write_demo_task(task, tmp_path / "other", world["corpus"], seed=2)
    for relative in ("SST-2/train.tsv", "SST-2/dev.tsv", "trec/train.csv", "trec/test.csv"):
        original = (world["data"] / "original" / relative).read_bytes()
        assert (tmp_path / "same" / "original" / relative).read_bytes() == original
        assert (tmp_path / "other" / "original" / relative).read_bytes() != original


def test_sst2_layout(world: dict[str, Path]) -> None:
    header = (world["data"] / "original" / "SST-2" / "train.tsv").read_text().splitlines()[0]
    assert header == "sentence\tlabel"
    for split, size in (("train", demo_corpus.SST2_SIZES["train"]), ("dev", demo_corpus.SST2_SIZES["dev"])):
        frame = _read_sst2(world["data"], split)
        assert list(frame.columns) == ["sentence", "label"]
        assert len(frame) == size
        assert set(frame["label"]) == {0, 1}
        assert 0.4 < frame["label"].mean() < 0.6
        assert frame["sentence"].str.len().min() > 0
        assert not frame["sentence"].str.contains("[\t\n]").any()


def test_trec_layout(world: dict[str, Path]) -> None:
    for split, size in (("train", demo_corpus.TREC_SIZES["train"]), ("test", demo_corpus.TREC_SIZES["test"])):
        frame = _read_trec(world["data"], split)
        assert frame.shape == (size, 2)
        assert frame[0].dtype.kind == "i"
        assert set(frame[0]) == set(range(6))
        shares = frame[0].value_counts(normalize=True)
        assert shares.min() > 0.05 and shares.max() < 0.3  # mild imbalance only
        assert frame[1].str.endswith("?").all()


def test_no_task_sentence_occurs_in_the_corpus(world: dict[str, Path]) -> None:
    sentences: set[str] = set()
    for line in world["corpus"].read_text(encoding="utf-8").splitlines():
        for sentence in re.split(r"(?<=[.?!])\s+", line):
            sentences.add(sentence)
            sentences.add(re.sub(r"^\w+: ", "", sentence))
    texts = []
    for split in ("train", "dev"):
        texts += list(_read_sst2(world["data"], split)["sentence"])
    for split in ("train", "test"):
        texts += list(_read_trec(world["data"], split)[1])
    assert len(texts) == len(set(texts)), "a task text occurs twice (e.g. in train and test)"
    assert not sentences.intersection(texts)


@pytest.mark.parametrize("arch", pretrain.ARCHITECTURES)
def test_tiny_build_saves_a_loadable_model(world: dict[str, Path], arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    out_dir = world["root"] / f"model-{arch}"
    torch.set_num_threads(1)
    stats = pretrain.build_demo_model(arch, world["corpus"], out_dir, seed=0, steps=5)
    assert stats["steps"] == 5 and stats["n_params"] > 0
    assert json.loads((out_dir / "pretraining.json").read_text())["steps"] == 5
    assert not list(out_dir.parent.glob(f".{out_dir.name}*")), "temporary build dir left behind"

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    for word in demo_corpus.ALL_LABEL_WORDS:
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.decode(ids) == word
    encoded = tokenizer("a dull film It was").input_ids
    if arch == "roberta":
        model = AutoModelForMaskedLM.from_pretrained(out_dir)
        assert encoded[0] == tokenizer.bos_token_id == 0 and encoded[-1] == tokenizer.eos_token_id == 2
        assert tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id is not None
        prompt = tokenizer("a dull film It was<mask>.").input_ids
        assert prompt.count(tokenizer.mask_token_id) == 1
    else:
        model = AutoModelForCausalLM.from_pretrained(out_dir)
        assert tokenizer.convert_ids_to_tokens(encoded[0]) == "</s>"  # OPT's BOS
        assert encoded[-1] != tokenizer.eos_token_id
    assert tokenizer.pad_token_id == 1
    assert model.config.vocab_size == len(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded])).logits
    assert logits.shape == (1, len(encoded), len(tokenizer))
    assert torch.isfinite(logits).all()


def test_unknown_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        tasks.write_demo_task("demo-mnli", tmp_path, tmp_path / "corpus.txt")
    with pytest.raises(ValueError):
        pretrain.build_demo_model("gpt2", tmp_path / "corpus.txt", tmp_path / "model")
