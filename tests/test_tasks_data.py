"""Templates, LM-BFF readers and the k-shot protocol, on fixtures written in the real layouts."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from dpzo.data import make_k_shot, read_split, sample_k_shot, Example, load_split
from dpzo.tasks import TASKS, get_task, parse_template, render_template

SPECIAL = dict(cls="<s>", sep="</s>", mask="<mask>")


def test_sst2_template_renders_like_lmbff():
    text = render_template(TASKS["SST-2"].template, ["a gripping film"], **SPECIAL)
    assert text == "<s>a gripping film It was<mask>.</s>"


def test_trec_and_nli_templates_render_like_lmbff():
    assert render_template(TASKS["trec"].template, ["Who wrote Hamlet?"], **SPECIAL) == "<s><mask>: Who wrote Hamlet?</s>"
    nli = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
    assert render_template(nli, ["A man sleeps.", "Nobody sleeps"], **SPECIAL) == "<s>A man sleeps?<mask>, nobody sleeps</s>"


def test_causal_template_is_the_prefix_before_the_label_word():
    assert render_template(TASKS["SST-2"].causal_template, ["fine"], cls="</s>", sep="", mask="") == "</s>fine It was"


def test_parse_template_parts():
    parts = parse_template("*cls**+sentl_1*_It*mask*")
    assert [p.kind for p in parts] == ["cls", "sent", "text", "mask"]
    assert parts[1].space and parts[1].lower_first and parts[1].sent_index == 1
    assert parts[2].text == " It"


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="demo-sst2"):
        get_task("nope")


def write_sst2(root, n_pos=30, n_neg=20, n_test=1500):
    folder = root / "original" / "SST-2"
    folder.mkdir(parents=True)
    with open(folder / "train.tsv", "w") as fh:
        fh.write("sentence\tlabel\n")
        for i in range(n_pos):
            fh.write(f"good movie {i}\t1\n")
        for i in range(n_neg):
            fh.write(f"bad movie {i}\t0\n")
    with open(folder / "dev.tsv", "w") as fh:
        fh.write("sentence\tlabel\n")
        for i in range(n_test):
            fh.write(f"test sentence {i}\t{i % 2}\n")


def write_trec(root):
    folder = root / "original" / "trec"
    folder.mkdir(parents=True)
    with open(folder / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for i in range(60):
            w.writerow([i % 6, f"what is thing number {i}, really?"])
    with open(folder / "test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for i in range(12):
            w.writerow([i % 6, f"who is {i}?"])


def test_readers_parse_both_lmbff_layouts(tmp_path):
    write_sst2(tmp_path)
    write_trec(tmp_path)
    sst = read_split(TASKS["SST-2"], tmp_path, "train")
    assert len(sst) == 50 and Counter(e.label for e in sst) == {1: 30, 0: 20}
    assert sst[0].texts == ["good movie 0"]
    trec = read_split(TASKS["trec"], tmp_path, "train")
    assert len(trec) == 60 and trec[1].label == 1
    assert trec[0].texts == ["what is thing number 0, really?"]  # the comma survives csv quoting


def test_reader_rejects_labels_outside_the_label_words(tmp_path):
    folder = tmp_path / "original" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\nfine\t7\n")
    with pytest.raises(ValueError, match="label '7'"):
        read_split(TASKS["SST-2"], tmp_path, "train")


def test_missing_task_data_names_the_file_and_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="original/SST-2"):
        read_split(TASKS["SST-2"], tmp_path, "train")


def test_k_shot_protocol(tmp_path):
    write_sst2(tmp_path)
    spec = TASKS["SST-2"]
    train = read_split(spec, tmp_path, "train")
    test = read_split(spec, tmp_path, "test")
    a = sample_k_shot(train, test, k=8, seed=13, num_classes=2)
    b = sample_k_shot(train, test, k=8, seed=13, num_classes=2)
    c = sample_k_shot(train, test, k=8, seed=42, num_classes=2)
    assert Counter(e.label for e in a["train"]) == {0: 8, 1: 8}
    assert Counter(e.label for e in a["dev"]) == {0: 8, 1: 8}
    train_texts = {e.texts[0] for e in a["train"]}
    assert train_texts.isdisjoint(e.texts[0] for e in a["dev"])
    assert [e.texts for e in a["train"]] == [e.texts for e in b["train"]]  # deterministic
    assert {e.texts[0] for e in c["train"]} != train_texts  # the data seed matters
    # test: subsampled to 1000 with a fixed seed, identical for every data seed
    assert len(a["test"]) == 1000 and [e.texts for e in a["test"]] == [e.texts for e in c["test"]]


def test_k_shot_with_a_small_class_takes_what_exists():
    train = [Example(["x"], 0)] * 3 + [Example(["y"], 1)] * 20
    split = sample_k_shot(train, [], k=5, seed=0, num_classes=2)
    assert Counter(e.label for e in split["train"]) == {0: 3, 1: 5}


def test_make_k_shot_writes_jsonl_that_round_trips(tmp_path):
    write_trec(tmp_path)
    sizes = make_k_shot(TASKS["trec"], tmp_path, tmp_path / "out", k=4, seed=21)
    assert sizes == {"train": 24, "dev": 24, "test": 12}
    loaded = load_split(tmp_path / "out" / "train.jsonl")
    assert len(loaded) == 24 and all(isinstance(e.label, int) for e in loaded)
