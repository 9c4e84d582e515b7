"""Templates, LM-BFF readers and the k-shot protocol, on fixtures written in the real layouts."""

from __future__ import annotations

import csv
import inspect
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dpzo.data.hf_tasks import HFTask
from dpzo.data.splits import Example, load_split, make_k_shot, read_split, sample_k_shot
from dpzo.data.task import CANDIDATE_SCORER, KINDS, PROMPT, PROMPT_SCORER, Task
from dpzo.data.tasks import (
    TASKS,
    TaskSpec,
    encode_prompt,
    get_task,
    make_cell_splits,
    parse_template,
    render_template,
)

SPECIAL = dict(cls="<s>", sep="</s>", mask="<mask>")


def test_sst2_template_renders_like_lmbff():
    text = render_template(TASKS["SST-2"].template, ["a gripping film"], **SPECIAL)
    assert text == "<s>a gripping film It was<mask>.</s>"


def test_trec_and_nli_templates_render_like_lmbff():
    assert (
        render_template(TASKS["trec"].template, ["Who wrote Hamlet?"], **SPECIAL) == "<s><mask>: Who wrote Hamlet?</s>"
    )
    nli = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
    assert (
        render_template(nli, ["A man sleeps.", "Nobody sleeps"], **SPECIAL)
        == "<s>A man sleeps?<mask>, nobody sleeps</s>"
    )


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


# ---------------------------------------------------------------------------------------------
# The LM-BFF task table: files, templates, label words, metrics
# ---------------------------------------------------------------------------------------------
LMBFF_TASKS = [
    "SST-2",
    "SST-5",
    "mr",
    "cr",
    "mpqa",
    "subj",
    "trec",
    "CoLA",
    "MNLI",
    "SNLI",
    "RTE",
    "QNLI",
    "MRPC",
    "QQP",
]


def _write_lmbff(root, spec, rows_by_split):
    """Write a task's two files in its LM-BFF layout from {split: [(label, texts), ...]}."""
    folder = root / "original" / spec.lmbff_dir
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        name = spec.train_file if split == "train" else spec.test_file
        lines = []
        if spec.file_format == "glue-tsv":
            header = ["index", *spec.text_columns, spec.label_column]
            lines.append("\t".join(header))
            lines += ["\t".join([str(i), *texts, label]) for i, (label, texts) in enumerate(rows)]
            (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        elif spec.file_format == "tsv-noheader":  # CoLA: source, label, original label, sentence
            lines = ["\t".join(["src", label, "*" if label == "0" else "", texts[0]]) for label, texts in rows]
            (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            import csv as _csv

            with open(folder / name, "w", newline="", encoding="utf-8") as fh:
                writer = _csv.writer(fh)
                for label, texts in rows:
                    writer.writerow([label, *texts])


@pytest.mark.parametrize("name", LMBFF_TASKS)
def test_every_lmbff_task_reads_from_its_layout(name, tmp_path):
    spec = TASKS[name]
    texts = [f"text {j}, with a comma" for j in range(len(spec.text_columns))]
    rows = [(label, texts) for label in spec.labels for _ in range(3)]
    _write_lmbff(tmp_path, spec, {"train": rows, "test": rows[:4]})
    train = read_split(spec, tmp_path, "train")
    assert len(train) == len(rows)
    assert [ex.label for ex in train] == [spec.labels.index(label) for label, _ in rows]
    assert train[0].texts == texts
    assert len(read_split(spec, tmp_path, "test")) == 4


def test_snli_rows_without_gold_label_are_dropped(tmp_path):
    spec = TASKS["SNLI"]
    rows = [("entailment", ["a.", "b"]), ("-", ["c.", "d"]), ("neutral", ["e.", "f"])]
    _write_lmbff(tmp_path, spec, {"train": rows, "test": rows})
    assert [ex.texts[0] for ex in read_split(spec, tmp_path, "train")] == ["a.", "e."]


RENDERED = {
    # LM-BFF templates rendered with RoBERTa's special tokens, as written in the LM-BFF paper.
    "SST-2": (["A fine film"], "<s>A fine film It was<mask>.</s>"),
    "SST-5": (["A fine film"], "<s>A fine film It was<mask>.</s>"),
    "subj": (["A fine film"], "<s>A fine film This is<mask>.</s>"),
    "CoLA": (["A fine film"], "<s>A fine film This is<mask>.</s>"),
    "trec": (["Who is it?"], "<s><mask>: Who is it?</s>"),
    "MNLI": (["A man sleeps.", "Nobody sleeps"], "<s>A man sleeps?<mask>, nobody sleeps</s>"),
    "RTE": (["A man sleeps.", "Nobody sleeps"], "<s>A man sleeps?<mask>, nobody sleeps</s>"),
    "QQP": (["Is it?", "Is it so?"], "<s>Is it?<mask>, is it so?</s>"),
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_lmbff_templates_render_literally(name):
    texts, expected = RENDERED[name]
    assert render_template(TASKS[name].template, texts, cls="<s>", sep="</s>", mask="<mask>") == expected


LABEL_WORDS = {
    "SST-5": ["terrible", "bad", "okay", "good", "great"],
    "SNLI": ["No", "Yes", "Maybe"],
    "QNLI": ["No", "Yes"],
    "MRPC": ["No", "Yes"],
    "CoLA": ["incorrect", "correct"],
    "subj": ["subjective", "objective"],
}


@pytest.mark.parametrize("name", sorted(LABEL_WORDS))
def test_label_words(name):
    assert list(TASKS[name].label_words.values()) == LABEL_WORDS[name]


def test_sentence_limits_cut_each_sentence_before_the_prompt(tokenizer):
    sentence = " ".join(["good"] * 30)
    full = encode_prompt("*cls**sent_0**mask**+sent_1*", [sentence, sentence], tokenizer, max_length=128, causal=False)
    cut = encode_prompt(
        "*cls**sent_0**mask**+sent_1*",
        [sentence, sentence],
        tokenizer,
        max_length=128,
        causal=False,
        first_sent_limit=5,
        other_sent_limit=3,
    )
    assert len(full.input_ids) == 1 + 30 + 1 + 30
    assert len(cut.input_ids) == 1 + 5 + 1 + 3 and cut.score_position == 6


def test_task_metrics_from_confusion_against_closed_forms():
    from dpzo.models.evaluate import score_from_confusion

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    confusion = torch.bincount(torch.tensor(y * 2 + p), minlength=4).view(2, 2)
    # Binary MCC is the Pearson correlation of the 0/1 labels and predictions.
    assert score_from_confusion("mcc", confusion) == pytest.approx(np.corrcoef(y, p)[0, 1])
    precision, recall = (y & p).sum() / p.sum(), (y & p).sum() / y.sum()
    assert score_from_confusion("f1", confusion) == pytest.approx(2 * precision * recall / (precision + recall))
    assert score_from_confusion("accuracy", confusion) == pytest.approx((y == p).mean())
    # Three classes by hand (Gorodkin's R_K): s = 10, c = 7, t = p = (3, 4, 3): (70 - 34) / (100 - 34).
    three = torch.tensor([[2, 1, 0], [0, 3, 1], [1, 0, 2]])
    assert score_from_confusion("mcc", three) == pytest.approx(36 / 66)
    assert score_from_confusion("mcc", torch.tensor([[5, 0], [5, 0]])) == 0.0  # undefined -> 0
    with pytest.raises(ValueError, match="unknown metric"):
        score_from_confusion("auc", three)


def test_config_schema_lists_every_task():
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    assert sorted(schema["properties"]["tasks"]["items"]["enum"]) == sorted(TASKS)


# ---------------------------------------------------------------------------------------------
# The Task protocol: both families answer for themselves, no caller tests the class
# ---------------------------------------------------------------------------------------------
ROOT = Path(__file__).parents[1]
#: what the pipeline asks of a task (docs/architecture.md names them)
PROTOCOL_MEMBERS = {
    "name",
    "demo",
    "metric",
    "max_length",
    "kind",
    "scorer",
    "labels",
    "num_classes",
    "label_words",
    "reference_name",
    "source_files",
    "input_problems",
    "source_hint",
    "method_problem",
    "largest_training_set",
    "label_counts",
    "make_splits",
}


def test_the_protocol_lists_what_the_pipeline_asks():
    assert {name for name in vars(Task) if not name.startswith("_")} == PROTOCOL_MEMBERS
    for name in PROTOCOL_MEMBERS:
        assert vars(Task)[name].__doc__, name


TASK_CLASSES = sorted({type(task) for task in TASKS.values()}, key=lambda c: c.__name__)


def test_the_task_classes_are_the_two_families():
    assert TASK_CLASSES == [HFTask, TaskSpec]


@pytest.mark.parametrize("cls", TASK_CLASSES, ids=lambda c: c.__name__)
def test_every_task_class_implements_the_protocol_with_its_signatures(cls):
    for name in PROTOCOL_MEMBERS:
        declared = vars(Task)[name]
        if isinstance(declared, property):
            continue  # a property or a dataclass field: isinstance below checks it is there
        assert inspect.signature(getattr(cls, name)) == inspect.signature(declared), (cls.__name__, name)
    examples = [task for task in TASKS.values() if isinstance(task, cls)]
    assert examples, cls
    for task in examples:
        assert isinstance(task, Task), task.name
        assert task.kind in KINDS and task.scorer in (PROMPT_SCORER, CANDIDATE_SCORER), task.name
        assert task.name in TASKS and TASKS[task.name] is task


def test_no_caller_tells_the_task_families_apart_by_class():
    """The pipeline, the workflow and the report ask the task (``dpzo.data.task.Task``)."""
    test = re.compile(r"isinstance\((?:[^()]|\([^()]*\))*\b(HFTask|TaskSpec)\b")
    files = [*(ROOT / "src" / "dpzo").rglob("*.py"), *(ROOT / "workflow").rglob("*.smk"), ROOT / "Snakefile"]
    files += list((ROOT / "workflow").rglob("*.py"))
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}" for m in test.finditer(text)]
    assert not found, found


def test_an_lmbff_task_answers_the_protocol(tmp_path):
    task = TASKS["SST-2"]
    assert (task.kind, task.scorer, task.reference_name) == (PROMPT, PROMPT_SCORER, "SST-2")
    assert (TASKS["trec"].reference_name, TASKS["demo-trec"].reference_name) == ("TREC", "TREC")
    assert task.label_words == {"0": "terrible", "1": "great"} and task.labels == ("0", "1")
    folder = f"{tmp_path}/original/SST-2"
    assert task.source_files(tmp_path) == [f"{folder}/train.tsv", f"{folder}/dev.tsv"]
    # nothing on disk yet: both files named, with the hint for copies that call the folder GLUE-SST-2
    (problem,) = task.input_problems(tmp_path)
    assert problem.startswith("task 'SST-2': ") and "train.tsv" in problem and "dev.tsv" in problem
    assert problem.endswith("not found (some copies name the folder GLUE-SST-2: rename it to SST-2)")
    hint = task.source_hint(tmp_path)
    assert "datasets.tar" in hint and f"data_dir (now {tmp_path})" in hint
    assert task.label_counts(tmp_path) is None
    demo = TASKS["demo-sst2"]  # written by the pipeline: never missing, never counted
    assert demo.demo and demo.input_problems(tmp_path) == [] and demo.label_counts(tmp_path) is None
    write_sst2(tmp_path)
    assert task.input_problems(tmp_path) == []
    assert task.label_counts(tmp_path) == {0: 20, 1: 30}
    assert all(task.method_problem(m) is None for m in ("zero-shot", "icl", "ft", "dp-sgd", "dp-zopo+dynamic"))
    assert task.largest_training_set(k=16, hf_datasets={"train": 5}) == 32  # k per class; hf_datasets is not its
    sizes = task.make_splits(tmp_path / "a", seed=13, k=4, data_dir=tmp_path, max_test=100)
    assert sizes == {"train": 8, "dev": 8, "test": 100}
    assert make_cell_splits("SST-2", tmp_path / "b", seed=13, k=4, data_dir=tmp_path, max_test=100) == sizes
    make_k_shot(task, tmp_path, tmp_path / "c", k=4, seed=13, max_test=100)
    for name in ("train", "dev", "test"):
        expected = (tmp_path / "c" / f"{name}.jsonl").read_bytes()
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == expected
        assert (tmp_path / "b" / f"{name}.jsonl").read_bytes() == expected
