"""The MeZO / DPZero tasks for causal LMs: templates, Hugging Face loading and sampling, candidate
scoring, greedy decoding, SQuAD metrics, and cells run through the DAG.

Oracles: MeZO's templates as literal strings; log-probabilities from a plain full-sequence
forward of the model (float64); a step-by-step greedy loop; F1 / EM computed by hand; MeZO's
sampling recipe (global numpy seed, permutation) applied to the raw fixture rows.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dpzo.data.hf_data import DatasetUnavailableError, convert_rows, load_hf_split, make_hf_splits
from dpzo.data.hf_tasks import MEZO_TASKS, method_problem, render_full, render_prompt
from dpzo.data.splits import Example, load_split, save_split
from dpzo.data.task import CANDIDATE_SCORER, CANDIDATES, GENERATION
from dpzo.data.tasks import TASKS, get_task
from dpzo.models.candidates import CandidateScorer, make_scorer
from dpzo.models.classifier import load_model
from dpzo.models.qa_metrics import exact_match, f1_score, normalize_answer

from . import hf_fixtures as fx
from .pipeline import ROOT
from .pipeline import snakemake as run_pipeline

SIZES = {"train": 40, "validation": 30}


@pytest.fixture(scope="module")
def offline():
    """No test touches the network: datasets reads only its cache, as with HF_DATASETS_OFFLINE=1."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, offline):
    root = tmp_path_factory.mktemp("hf")
    repos = fx.fill_cache(root / "cache", root / "repos", SIZES)
    return root / "cache", repos


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A random tiny OPT saved with save_pretrained and loaded back as a real id would be (float64)."""
    path = fx.tiny_opt(tmp_path_factory.mktemp("tiny-opt"), fx.corpus())
    model, tokenizer, family = load_model(str(path), dtype="float64")
    assert family == "causal"
    return model, tokenizer


# --------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------

PREMISE, HYPOTHESIS = "A man sleeps.", "Nobody sleeps"
RENDERED = [
    ("mezo-sst2", ["a gripping film "], "great", "a gripping film It was", "a gripping film It was great"),
    (
        "mezo-rte",
        [PREMISE, HYPOTHESIS],
        "No",
        'A man sleeps.\nDoes this mean that "Nobody sleeps" is true? Yes or No?\n',
        'A man sleeps.\nDoes this mean that "Nobody sleeps" is true? Yes or No?\nNo',
    ),
    (
        "mezo-cb",
        [PREMISE, HYPOTHESIS],
        "Maybe",
        'Suppose A man sleeps. Can we infer that "Nobody sleeps"? Yes, No, or Maybe?\n',
        'Suppose A man sleeps. Can we infer that "Nobody sleeps"? Yes, No, or Maybe?\nMaybe',
    ),
    (
        "mezo-boolq",
        ["Water boils at 100 C.", "does water boil"],
        "Yes",
        "Water boils at 100 C. Does water boil?\n",
        "Water boils at 100 C. Does water boil?\nYes",
    ),
    (
        "mezo-wsc",
        ["The dog chased the cat because it was hungry.", "The dog", "It"],
        "Yes",
        'The dog chased the cat because it was hungry.\nIn the previous sentence, does the pronoun "it" refer to '
        "The dog? Yes or No?\n",
        'The dog chased the cat because it was hungry.\nIn the previous sentence, does the pronoun "it" refer to '
        "The dog? Yes or No?\nYes",
    ),
    (
        "mezo-wic",
        ["bank", "He sat on the bank.", "The bank was closed."],
        "No",
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nHe sat on the bank.\n'
        "The bank was closed.\n",
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nHe sat on the bank.\n'
        "The bank was closed.\nNo",
    ),
    (
        "mezo-multirc",
        ["Anna ran home.", "Who ran?", "Anna"],
        "Yes",
        'Anna ran home.\nQuestion: Who ran?\nI found this answer "Anna". Is that correct? Yes or No?\n',
        'Anna ran home.\nQuestion: Who ran?\nI found this answer "Anna". Is that correct? Yes or No?\nYes',
    ),
    (
        "mezo-copa",
        ["The man broke his toe. ", "cause"],
        "He dropped a hammer on his foot.",
        "The man broke his toe because",
        "The man broke his toe because he dropped a hammer on his foot.",
    ),
    ("mezo-copa", ["The sun rose.", "effect"], "I woke up.", "The sun rose so", "The sun rose so I woke up."),
    (
        "mezo-record",
        ["Anna won.\n@highlight\nA big win", "@placeholder won the race."],
        "Anna",
        "Anna won.\n- A big win\n-",
        "Anna won.\n- A big win\n- Anna won the race.",
    ),
    (
        "mezo-squad",
        ["Topic", "Paris is big.", " What is big? "],
        "Paris",
        "Title: Topic\nContext: Paris is big.\nQuestion: What is big?\nAnswer:",
        "Title: Topic\nContext: Paris is big.\nQuestion: What is big?\nAnswer: Paris\n",
    ),
    (
        "mezo-drop",
        ["Two cats.", "How many cats?"],
        "2",
        "Passage: Two cats.\nQuestion: How many cats?\nAnswer:",
        "Passage: Two cats.\nQuestion: How many cats?\nAnswer: 2\n",
    ),
]


@pytest.mark.parametrize("name, texts, candidate, prompt, full", RENDERED)
def test_templates_render_like_mezo(name, texts, candidate, prompt, full):
    task = get_task(name)
    assert render_prompt(task, texts) == prompt
    assert render_full(task, texts, candidate) == full


def test_task_names_are_separate_from_lmbff_and_every_mezo_task_is_registered():
    assert {"SST-2", "trec"} <= set(TASKS) and set(MEZO_TASKS) <= set(TASKS)
    assert len(MEZO_TASKS) == 11 and all(n.startswith("mezo-") and n == n.lower() for n in MEZO_TASKS)
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert set(TASKS) == set(schema["properties"]["tasks"]["items"]["enum"])
    # MeZO's mezo.sh: classification off for COPA, ReCoRD, SQuAD, DROP; 100 dev for CB and COPA
    assert {n for n, t in MEZO_TASKS.items() if not t.train_as_classification} == {
        "mezo-copa",
        "mezo-record",
        "mezo-squad",
        "mezo-drop",
    }
    assert MEZO_TASKS["mezo-cb"].dev_size == MEZO_TASKS["mezo-copa"].dev_size == 100
    assert MEZO_TASKS["mezo-rte"].candidates == ("Yes", "No") and MEZO_TASKS["mezo-wic"].candidates == ("No", "Yes")


# --------------------------------------------------------------------------------------
# SQuAD metrics, by hand
# --------------------------------------------------------------------------------------


def test_squad_f1_and_exact_match_by_hand():
    assert normalize_answer("  An  apple,  THE pie. ") == "apple pie"
    # "cat sat" vs "cat sat on": 2 shared, P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert f1_score("the cat sat", ["a cat sat on"]) == pytest.approx(0.8)
    assert exact_match("the cat sat", ["a cat sat on"]) == 0.0
    # multiset overlap: "cat cat dog" vs "cat": 1 shared, P = 1/3, R = 1, F1 = 0.5
    assert f1_score("cat cat dog", ["cat"]) == pytest.approx(0.5)
    # maximum over the gold answers; punctuation, case and articles do not count
    assert f1_score("Paris", ["London", "paris!"]) == 1.0 and exact_match("Paris", ["London", "paris!"]) == 1.0
    assert exact_match("The Cat, sat!", ["cat sat"]) == 1.0
    assert f1_score("cats", ["cat"]) == 0.0 and f1_score("", ["cat"]) == 0.0
    # "the big red car" vs "big car": P = 2/3, R = 1 -> 0.8; vs "a car": P = 1/3, R = 1 -> 0.5; max 0.8
    assert f1_score("the big red car", ["a car", "big car"]) == pytest.approx(0.8)


# --------------------------------------------------------------------------------------
# Hugging Face layouts, loading, conversion and MeZO's sampling
# --------------------------------------------------------------------------------------


def raw_rows(repos, dataset, config, split):
    path = repos[dataset] / config / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_become_examples(hf_cache):
    cache, repos = hf_cache
    boolq = load_hf_split(get_task("mezo-boolq"), "train", cache_dir=cache)
    rows = raw_rows(repos, "boolq", "default", "train")
    examples = convert_rows(get_task("mezo-boolq"), boolq, range(4))
    assert [ex.texts for ex in examples] == [[r["passage"], r["question"]] for r in rows[:4]]
    assert [ex.label for ex in examples] == [0 if r["answer"] else 1 for r in rows[:4]]  # Yes, No
    record = convert_rows(
        get_task("mezo-record"), load_hf_split(get_task("mezo-record"), "validation", cache_dir=cache), [3]
    )[0]
    raw = raw_rows(repos, "super_glue", "record", "validation")[3]
    assert record.candidates == raw["entities"] and record.answers == raw["answers"]
    assert record.candidates[record.label] == raw["answers"][0]
    copa = convert_rows(get_task("mezo-copa"), load_hf_split(get_task("mezo-copa"), "train", cache_dir=cache), [2])[0]
    raw = raw_rows(repos, "super_glue", "copa", "train")[2]
    assert copa.candidates == [raw["choice1"], raw["choice2"]] and copa.label == raw["label"]
    assert copa.texts == [raw["premise"], raw["question"]]
    squad = convert_rows(get_task("mezo-squad"), load_hf_split(get_task("mezo-squad"), "train", cache_dir=cache), [0])[
        0
    ]
    assert squad.answers == raw_rows(repos, "squad", "plain_text", "train")[0]["answers"]["text"] and squad.label == 0
    drop = convert_rows(get_task("mezo-drop"), load_hf_split(get_task("mezo-drop"), "train", cache_dir=cache), [1])[0]
    assert drop.answers == raw_rows(repos, "drop", "default", "train")[1]["answers_spans"]["spans"]


def test_splits_follow_mezo_sampling_and_are_deterministic(hf_cache, tmp_path):
    cache, repos = hf_cache
    task = get_task("mezo-rte")
    sizes = make_hf_splits(task, tmp_path / "a", seed=29, num_train=20, num_dev=8, num_test=25, cache_dir=cache)
    assert sizes == {"train": 20, "dev": 8, "test": 25}
    # MeZO: np.random.seed(s); permutation(train)[:train+dev], dev = the last num_dev of those;
    # np.random.seed(s); permutation(validation)[:num_test]
    train_rows = raw_rows(repos, "super_glue", "rte", "train")
    valid_rows = raw_rows(repos, "super_glue", "rte", "validation")
    np.random.seed(29)
    drawn = np.random.permutation(len(train_rows))[:28]
    np.random.seed(29)
    test = np.random.permutation(len(valid_rows))[:25]
    for name, index, rows in (
        ("train", drawn[:20], train_rows),
        ("dev", drawn[20:], train_rows),
        ("test", test, valid_rows),
    ):
        got = load_split(tmp_path / "a" / f"{name}.jsonl")
        assert [ex.texts for ex in got] == [[rows[i]["premise"], rows[i]["hypothesis"]] for i in index]
        assert [ex.label for ex in got] == [rows[i]["label"] for i in index]
    make_hf_splits(task, tmp_path / "b", seed=29, num_train=20, num_dev=8, num_test=25, cache_dir=cache)
    make_hf_splits(task, tmp_path / "c", seed=83, num_train=20, num_dev=8, num_test=25, cache_dir=cache)
    for name in ("train", "dev", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_default_sizes_are_1000_500_1000(tmp_path, offline):
    fx.fill_cache(tmp_path / "cache", tmp_path / "repos", {"train": 1600, "validation": 1100}, only={"glue": ["sst2"]})
    sizes = make_hf_splits(get_task("mezo-sst2"), tmp_path / "out", seed=0, cache_dir=tmp_path / "cache")
    assert sizes == {"train": 1000, "dev": 500, "test": 1000}
    train = {ex.texts[0] for ex in load_split(tmp_path / "out" / "train.jsonl")}
    dev = {ex.texts[0] for ex in load_split(tmp_path / "out" / "dev.jsonl")}
    assert len(train) == 1000 and len(dev) == 500 and not train & dev


def test_small_datasets_keep_dev_and_train_what_is_left(hf_cache, tmp_path):
    cache, _ = hf_cache
    # 40 training rows, 30 drawn for dev: 10 left to train on (MeZO gives dev priority)
    assert make_hf_splits(get_task("mezo-cb"), tmp_path / "s", seed=0, num_dev=30, num_test=5, cache_dir=cache) == {
        "train": 10,
        "dev": 30,
        "test": 5,
    }
    with pytest.raises(ValueError, match=r"mezo-cb.*40 examples.*100 dev.*hf_datasets.dev"):
        make_hf_splits(get_task("mezo-cb"), tmp_path / "t", seed=0, num_test=5, cache_dir=cache)  # CB's dev = 100
    assert not (tmp_path / "t").exists()


def test_missing_dataset_names_the_id_the_cache_and_the_fetch_command(tmp_path, offline):
    with pytest.raises(DatasetUnavailableError) as err:
        make_hf_splits(get_task("mezo-rte"), tmp_path / "out", seed=0, cache_dir=tmp_path / "empty-cache")
    text = str(err.value)
    assert "mezo-rte" in text and "'super_glue/rte'" in text and str(tmp_path / "empty-cache") in text
    assert "datasets.load_dataset('super_glue', 'rte')" in text and "HF_DATASETS_OFFLINE=1" in text
    assert not (tmp_path / "out").exists()


def test_unexpected_columns_are_named(tmp_path, offline):
    repo = tmp_path / "repos" / "glue"
    (repo / "sst2").mkdir(parents=True)
    for split in ("train", "validation"):
        (repo / "sst2" / f"{split}.jsonl").write_text(json.dumps({"text": "fine", "label": 1}) + "\n")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: sst2\n  data_files:\n  - split: train\n    path: "
        "sst2/train.jsonl\n  - split: validation\n    path: sst2/validation.jsonl\n---\n"
    )
    import datasets

    datasets.load_dataset(str(repo), "sst2", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"mezo-sst2.*lacks column\(s\) \['sentence'\].*found \['text', 'label'\]"):
        make_hf_splits(
            get_task("mezo-sst2"),
            tmp_path / "out",
            seed=0,
            num_train=1,
            num_dev=0,
            num_test=1,
            cache_dir=tmp_path / "cache",
        )


def test_optional_example_fields_round_trip(tmp_path):
    examples = [Example(texts=["a"], label=1), Example(texts=["p", "q"], label=0, candidates=["x", "y"], answers=["x"])]
    save_split(tmp_path / "s.jsonl", examples)
    assert load_split(tmp_path / "s.jsonl") == examples
    assert json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0]) == {"texts": ["a"], "label": 1}


# --------------------------------------------------------------------------------------
# candidate scoring against a plain forward
# --------------------------------------------------------------------------------------


def reference_score(model, tokenizer, task, texts, candidate) -> float:
    """MeZO's score by hand: mean log-softmax of the candidate's tokens in one full forward."""
    bos = [tokenizer.bos_token_id]
    prompt = bos + tokenizer.encode(render_prompt(task, texts), add_special_tokens=False)
    full = bos + tokenizer.encode(render_full(task, texts, candidate), add_special_tokens=False)
    n = len(full) - len(prompt)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(np.mean([float(logp[t - 1, full[t]]) for t in range(len(full) - n, len(full))]))


def copa_examples():
    return [
        Example(
            texts=["The man broke his toe.", "cause"],
            label=0,
            candidates=["He dropped a hammer on his foot.", "He got a hole in his sock."],
        ),
        Example(texts=["The sun rose.", "effect"], label=1, candidates=["Dogs ran.", "I woke up early today."]),
    ]


def test_candidate_scores_equal_a_plain_forward(tiny):
    model, tokenizer = tiny
    for name, examples in (
        ("mezo-copa", copa_examples()),
        (
            "mezo-cb",
            [
                Example(texts=["A man sleeps.", "Nobody sleeps"], label=2),
                Example(texts=["The red car wins the big game today.", "It loses"], label=1),
            ],
        ),
        (
            "mezo-record",
            [
                Example(
                    texts=["Anna won.\n@highlight\nA big win", "@placeholder won the race."],
                    label=1,
                    candidates=["Paris", "Anna", "Red River"],
                    answers=["Anna"],
                )
            ],
        ),
    ):
        task = get_task(name)
        scorer = make_scorer(model, tokenizer, "causal", task)
        data = scorer.encode(examples)
        batch = data.batch(range(len(examples)), gold_only=False)  # padded: the examples differ in length
        with torch.no_grad():
            matrix = scorer.score_matrix(batch).double()
            loss = scorer.per_example_loss(data.batch(range(len(examples))))
        for b, ex in enumerate(examples):
            cands = ex.candidates or list(task.candidates)
            ref = torch.tensor(
                [reference_score(model, tokenizer, task, ex.texts, c) for c in cands], dtype=torch.float64
            )
            assert torch.allclose(matrix[b, : len(cands)], ref, atol=1e-5), name
            if task.train_as_classification:  # cross-entropy over the candidates' scores
                expected = -torch.log_softmax(ref, dim=0)[ex.label]
            else:  # teacher forcing: mean NLL of the gold candidate's tokens
                expected = -ref[ex.label]
            assert float(loss[b]) == pytest.approx(float(expected), abs=1e-5), name


def test_single_token_candidates_share_one_forward(tiny):
    model, tokenizer = tiny
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in ("Yes", "No"))
    scorer = CandidateScorer(model, tokenizer, get_task("mezo-rte"))
    ex = Example(texts=["A man sleeps.", "Nobody sleeps"], label=1)
    encoded = scorer.encode_example(ex)
    assert len(encoded.rows) == 1 and len(encoded.candidates) == 2  # one input: the prompt
    assert scorer.label_ids.tolist() == [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No")]
    with torch.no_grad():
        scores = scorer.score_matrix(scorer.encode([ex]).batch([0]))[0].double()
    ref = [reference_score(model, tokenizer, get_task("mezo-rte"), ex.texts, c) for c in ("Yes", "No")]
    assert scores.tolist() == pytest.approx(ref, abs=1e-5)


def test_evaluation_counts_every_correct_record_entity(tiny):
    model, tokenizer = tiny
    scorer = CandidateScorer(model, tokenizer, get_task("mezo-record"))
    texts = ["Anna won.\n@highlight\nA big win", "@placeholder won the race."]
    entities = ["Paris", "Anna", "Red River"]
    ref = [reference_score(model, tokenizer, scorer.task, texts, e) for e in entities]
    best = int(np.argmax(ref))
    right = Example(
        texts=texts, label=(best + 1) % 3, candidates=entities, answers=[entities[(best + 1) % 3], entities[best]]
    )
    wrong = Example(texts=texts, label=(best + 1) % 3, candidates=entities, answers=[entities[(best + 1) % 3]])
    result = scorer.evaluate(scorer.encode([right, wrong]), batch_size=2)
    assert result["accuracy"] == 0.5 and result["n"] == 2 and result["metric"] == "accuracy"
    # ReCoRD trains by teacher forcing: its test loss is the gold entity's mean NLL
    assert result["loss"] == pytest.approx(-ref[(best + 1) % 3], abs=1e-5)


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------


def greedy_by_hand(model, tokenizer, prompt: list[int], stops: list[int], max_new: int = 50) -> str:
    ids = list(prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            new.append(token)
            if token in stops:
                break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def test_greedy_generation_equals_a_step_by_step_loop(tiny):
    model, tokenizer = tiny
    scorer = CandidateScorer(model, tokenizer, get_task("mezo-squad"))
    examples = [
        Example(texts=["Topic", "Paris is big.", "What is big?"], label=0, answers=["Paris"]),
        Example(
            texts=["Topic", "The old red house by the river is small.", "What is small?"],
            label=0,
            answers=["the house"],
        ),
    ]
    data = scorer.encode(examples)
    prompts = [ex.prompt for ex in data.examples]
    assert len(prompts[0]) != len(prompts[1])  # left padding in the batch
    expected = [greedy_by_hand(model, tokenizer, p, scorer.stop_ids) for p in prompts]
    assert scorer.generate(prompts, batch_size=2) == expected
    result = scorer.evaluate(data, batch_size=2)
    assert result["metric"] == "f1" and result["predictions"] == expected
    assert result["f1"] == pytest.approx(np.mean([f1_score(p, ex.answers) for p, ex in zip(expected, examples)]))
    assert result["em"] == pytest.approx(np.mean([exact_match(p, ex.answers) for p, ex in zip(expected, examples)]))
    # test loss: teacher forcing on " Paris\n" (the first gold answer and the newline)
    ref = [reference_score(model, tokenizer, scorer.task, ex.texts, ex.answers[0]) for ex in examples]
    assert result["loss"] == pytest.approx(-np.mean(ref), abs=1e-5)


def test_generation_stops_at_a_newline(tiny):
    """A model whose every hidden state points at the newline token answers with nothing."""
    model, tokenizer = tiny
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    decoder = model.model.decoder
    saved = decoder.final_layer_norm.weight.clone(), decoder.final_layer_norm.bias.clone()
    try:
        with torch.no_grad():
            decoder.final_layer_norm.weight.zero_()
            decoder.final_layer_norm.bias.copy_(10 * model.get_output_embeddings().weight[newline])
        scorer = CandidateScorer(model, tokenizer, get_task("mezo-drop"))
        prompt = scorer.encode([Example(texts=["Two cats.", "How many?"], label=0, answers=["2"])]).examples[0].prompt
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=50,
            do_sample=False,
            eos_token_id=scorer.stop_ids,
            pad_token_id=scorer.pad_id,
        )
        assert out.shape[1] == len(prompt) + 1 and int(out[0, -1]) == newline
        assert scorer.generate([prompt]) == [""]
    finally:
        with torch.no_grad():
            decoder.final_layer_norm.weight.copy_(saved[0])
            decoder.final_layer_norm.bias.copy_(saved[1])


# --------------------------------------------------------------------------------------
# which methods run on which tasks
# --------------------------------------------------------------------------------------


def test_methods_a_mezo_task_cannot_run_are_named():
    assert method_problem(get_task("mezo-copa"), "dp-zoso") is None
    assert method_problem(get_task("mezo-rte"), "dp-zopo+dynamic") is None  # fixed single-token label words
    assert "fixed label words" in method_problem(get_task("mezo-squad"), "dp-zopo")
    assert "not implemented" in method_problem(get_task("mezo-rte"), "dp-sgd")
    assert "not implemented" in method_problem(get_task("mezo-rte"), "icl")


def test_a_mezo_task_answers_the_protocol(hf_cache, tmp_path, monkeypatch):
    """The members of ``dpzo.data.task.Task`` on a MeZO task (the LM-BFF side: test_tasks_data)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cache, _ = hf_cache
    task = get_task("mezo-rte")
    assert (task.kind, task.scorer, task.reference_name) == (CANDIDATES, CANDIDATE_SCORER, "mezo-rte")
    assert (get_task("mezo-squad").kind, get_task("mezo-copa").kind) == (GENERATION, CANDIDATES)
    assert get_task("mezo-boolq").reference_name == "BoolQ"  # as DPZero's OPT table names it
    assert task.label_words == {} and task.labels == ("Yes", "No") and not task.demo
    assert task.source_files(tmp_path) == [] and task.source_hint(tmp_path) is None
    assert task.label_counts(tmp_path) is None
    assert task.largest_training_set(k=16, hf_datasets={"train": 20}) == 20 and task.largest_training_set(k=16) == 1000
    assert task.method_problem("dpzero+opt") is None and task.method_problem("zero-shot") is None
    refused = task.method_problem("dp-sgd")
    assert refused == method_problem(task, "dp-sgd") and "not implemented" in refused
    (problem,) = task.input_problems(tmp_path, tmp_path / "empty")
    assert problem.startswith(
        f"task 'mezo-rte': Hugging Face dataset 'super_glue/rte' is not in the datasets cache {tmp_path / 'empty'}"
    )
    assert "datasets.load_dataset('super_glue', 'rte')" in problem
    (tmp_path / "empty" / "super_glue" / "rte").mkdir(parents=True)  # what load_dataset leaves behind
    assert task.input_problems(tmp_path, tmp_path / "empty") == []
    hf = {"train": 20, "dev": 8, "cache_dir": cache}
    sizes = task.make_splits(tmp_path / "a", seed=29, k=16, data_dir=tmp_path, max_test=25, hf_datasets=hf)
    assert sizes == {"train": 20, "dev": 8, "test": 25}
    make_hf_splits(task, tmp_path / "b", seed=29, num_train=20, num_dev=8, num_test=25, cache_dir=cache)
    for name in ("train", "dev", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()


def test_mezo_tasks_need_a_causal_lm(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="causal LM"):
        make_scorer(model, tokenizer, "mlm", get_task("mezo-rte"))


# --------------------------------------------------------------------------------------
# through the DAG
# --------------------------------------------------------------------------------------


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_pipeline(workdir, *args, check=check, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})


def test_dag_refuses_methods_a_mezo_task_cannot_run(tmp_path):
    config = {
        "models": {"m": {"path": "facebook/opt-1.3b"}},
        "tasks": ["mezo-squad"],
        "seeds": [0],
        "epsilons": ["2"],
        "methods": {
            "icl": {"demonstrations": 2},
            "dp-zopo": {"steps": 1, "batch_size": 1, "lr": 1.0, "clip": 1.0, "mask": {"ratio": 0.1}},
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "'icl' is not implemented for the MeZO task mezo-squad" in text
    assert "'dp-zopo' needs fixed label words" in text and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_candidate_and_generation_cells_run_through_the_dag(tmp_path, offline):
    """A tiny random OPT by path, the fake datasets in a cache: DP-ZOSO trains and evaluates."""
    fx.fill_cache(tmp_path / "cache", tmp_path / "repos", SIZES, only={"super_glue": ["copa"], "squad": ["plain_text"]})
    fx.tiny_opt(tmp_path / "tiny-opt", fx.corpus())
    config = {
        "models": {"tiny-opt": {"path": str(tmp_path / "tiny-opt")}},
        "tasks": ["mezo-copa", "mezo-squad"],
        "seeds": [0],
        "epsilons": ["8"],
        "max_test": 12,
        "eval_batch_size": 8,
        "hf_datasets": {"cache_dir": str(tmp_path / "cache"), "train": 24, "dev": 4},
        "methods": {"dp-zoso": {"steps": 3, "batch_size": 8, "lr": 1.0e-4, "clip": 5.0, "log_every": 1}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "results/tables/summary.csv")
    runs = tmp_path / "results" / "runs" / "tiny-opt"
    for task, metric in (("mezo-copa", "accuracy"), ("mezo-squad", "f1")):
        assert len(load_split(tmp_path / "results" / "data" / task / "k512-seed0" / "train.jsonl")) == 24
        metrics = json.loads((runs / task / "dp-zoso" / "eps8" / "seed0" / "metrics.json").read_text())
        ledger = json.loads((runs / task / "dp-zoso" / "eps8" / "seed0" / "privacy.json").read_text())
        assert ledger["n"] == metrics["n_train"] == 24 and metrics["releases"] == ledger["compositions"] == 3
        assert metrics["metric"] == metric and 0.0 <= metrics["score"] <= 1.0 and metrics["test_n"] == 12
        private = json.loads((runs / task / "dp-zoso" / "eps8" / "seed0" / "private_diagnostics.json").read_text())
        assert len(private["loss"]) == 3 and all(np.isfinite(private["loss"]))  # the trained loss, kept apart
        assert metrics["history"]["test_step"] == [1, 2, 3] and all(np.isfinite(metrics["history"]["test_loss"]))
    squad = json.loads((runs / "mezo-squad" / "dp-zoso" / "eps8" / "seed0" / "metrics.json").read_text())
    assert squad["accuracy"] is None and squad["score"] == squad["f1"] and 0.0 <= squad["em"] <= squad["f1"]
    summary = pd.read_csv(tmp_path / "results" / "tables" / "summary.csv", dtype={"eps": str})
    assert dict(zip(summary.task, summary.task_metric)) == {"mezo-copa": "accuracy", "mezo-squad": "f1"}
    row = summary[summary.task == "mezo-squad"].iloc[0]
    assert row["accuracy_mean"] == pytest.approx(100 * squad["f1"], abs=1e-3)
