"""Reading tasks in the LM-BFF on-disk layout and drawing the k-shot splits.

Layout (the LM-BFF ``datasets.tar``): ``<data_dir>/original/<TASK>/`` holds either GLUE-style
TSV files with a header (SST-2, MNLI, SNLI, RTE, QNLI, MRPC, QQP: ``train.tsv`` and ``dev.tsv``,
MNLI ``dev_matched.tsv``), GLUE CoLA's header-less TSV, or header-less CSV files whose first
column is the label (TREC, SST-5, MR, CR, MPQA, SUBJ: ``train.csv``, ``test.csv``).  The GLUE
dev set is the test set (LM-BFF); the k-shot dev split is carved from the training file.

k-shot protocol (LM-BFF ``generate_k_shot_data.py``): shuffle the training file with the data
seed, take the first k examples of each class as train and the next k as dev; the test set is
the task's test file, subsampled to ``max_test`` examples with a fixed seed (MeZO's
``k-shot-1k-test``), so the test set is the same for every data seed.

A task draws its own splits (``Task.make_splits``, ``dpzo.data.tasks.make_cell_splits``): the
LM-BFF tasks with :func:`make_k_shot`, the MeZO tasks with ``dpzo.data.hf_data.make_hf_splits``.
This module imports neither the tasks nor ``hf_data`` (which imports it for :class:`Example`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpzo.data.inputs import missing_task_file
from dpzo.fileio import write_jsonl_atomic

if TYPE_CHECKING:  # tasks.py reads and splits through this module: it is imported only for annotations
    from dpzo.data.tasks import TaskSpec

TEST_SUBSAMPLE_SEED = 42


@dataclass
class Example:
    """One example of a split: its text columns, its gold label and, for MeZO tasks, candidates and answers."""

    texts: list[str]
    label: int  # index into task.labels (or into ``candidates``; the teacher-forced answer)
    candidates: list[str] | None = None  # per-example candidates (COPA choices, ReCoRD entities)
    answers: list[str] | None = None  # gold answers (QA; ReCoRD's correct entities)


def _task_dir(task: TaskSpec, data_dir: Path) -> Path:
    return Path(data_dir) / "original" / task.lmbff_dir


def missing_files(task: TaskSpec, data_dir: Path) -> list[Path]:
    """The files of a task that are not on disk (empty list when the task is readable)."""
    d = _task_dir(task, data_dir)
    return [d / f for f in (task.train_file, task.test_file) if not (d / f).is_file()]


def _layout(task: TaskSpec) -> str:
    """The expected file layout, in words, for error messages."""
    if task.file_format == "glue-tsv":
        return f"a tab-separated file with a header line naming the columns {', '.join([*task.text_columns, task.label_column])}"
    if task.file_format == "tsv-noheader":
        return (
            f"a header-less tab-separated file with the label in column {task.label_column} and the text in "
            f"column(s) {', '.join(task.text_columns)} (counted from 0)"
        )
    return f"a header-less CSV file whose rows are: label, {', '.join(task.text_columns)}"


def _read_text(path: Path, task: TaskSpec) -> str:
    """The file's text, refusing files that are not UTF-8 or hold no data."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}). Convert it to UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.name}.utf8` and replace the file."
        ) from None
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {_layout(task)}. Restore it from the LM-BFF data.")
    return text


def _parse(task: TaskSpec, path: Path, text: str) -> tuple[list[list[str]], list[str]]:
    """(texts per example, raw labels) from the file's text, checking the columns."""
    import pandas as pd  # only the raw task files need it: a cell reads its splits as JSON lines

    try:
        if task.file_format == "csv":
            frame = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False)
        else:
            header = 0 if task.file_format == "glue-tsv" else None
            frame = pd.read_csv(
                io.StringIO(text), sep="\t", header=header, quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False
            )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path} could not be parsed ({str(err).strip()}); expected {_layout(task)}.") from None
    if task.file_format == "glue-tsv":
        needed = [*task.text_columns, task.label_column]
        absent = [c for c in needed if c not in frame.columns]
        if absent:
            raise ValueError(
                f"{path}: missing column(s) {absent}; found {list(frame.columns)}. Expected {_layout(task)}."
            )
        return frame[list(task.text_columns)].values.tolist(), frame[task.label_column].tolist()
    if task.file_format == "tsv-noheader":
        text_columns, label_column = [int(c) for c in task.text_columns], int(task.label_column)
    else:
        text_columns, label_column = list(range(1, 1 + len(task.text_columns))), 0
    if frame.shape[1] <= max(*text_columns, label_column):
        raise ValueError(
            f"{path}: expected at least {max(*text_columns, label_column) + 1} column(s), got {frame.shape[1]}. "
            f"Expected {_layout(task)}."
        )
    return frame[text_columns].values.tolist(), frame[label_column].tolist()


def read_split(task: TaskSpec, data_dir: Path, which: str) -> list[Example]:
    """Read the train or test file of a task into examples, checking encoding, columns and labels.

    Every problem is a ``ValueError`` (``FileNotFoundError`` for a missing file) naming the file
    and what to do about it.
    """
    if task.file_format not in ("glue-tsv", "tsv-noheader", "csv"):
        raise ValueError(f"task {task.name}: unknown file_format {task.file_format!r}")
    path = _task_dir(task, data_dir) / (task.train_file if which == "train" else task.test_file)
    if not path.is_file():
        raise FileNotFoundError(missing_task_file(task, data_dir, path.name))
    texts, raw_labels = _parse(task, path, _read_text(path, task))
    index = {label: i for i, label in enumerate(task.labels)}
    examples = []
    for row, (text, label) in enumerate(zip(texts, raw_labels)):
        label = str(label).strip()
        if label in task.unlabelled:
            continue
        if label not in index:
            raise ValueError(
                f"{path}, row {row + 1}: label {label!r} is not one of {list(task.labels)} "
                f"(the labels of task {task.name}); fix the row or check that this is the {task.name} file"
            )
        examples.append(Example(texts=[str(t) for t in text], label=index[label]))
    if not examples:
        raise ValueError(
            f"{path} has no examples; expected {_layout(task)}, one example per row. Restore it from the LM-BFF data."
        )
    return examples


def sample_k_shot(
    train: list[Example], test: list[Example], *, k: int, seed: int, num_classes: int, max_test: int = 1000
) -> dict[str, list[Example]]:
    """LM-BFF k-shot split: first k per class (after a seeded shuffle) as train, next k as dev."""
    order = np.random.RandomState(seed).permutation(len(train))
    picked: dict[str, list[Example]] = {"train": [], "dev": []}
    counts = [0] * num_classes
    for i in order:
        ex = train[i]
        c = counts[ex.label]
        if c < k:
            picked["train"].append(ex)
        elif c < 2 * k:
            picked["dev"].append(ex)
        counts[ex.label] = c + 1
    if len(test) > max_test:
        keep = np.random.RandomState(TEST_SUBSAMPLE_SEED).permutation(len(test))[:max_test]
        test = [test[i] for i in sorted(keep)]
    picked["test"] = list(test)
    return picked


def _row(ex: Example) -> dict:
    row = {"texts": ex.texts, "label": ex.label}
    # the optional fields only when set, so LM-BFF splits keep their two-field rows
    row.update({k: v for k, v in (("candidates", ex.candidates), ("answers", ex.answers)) if v is not None})
    return row


def save_split(path: Path, examples: list[Example]) -> None:
    """Write ``examples`` to ``path`` as JSON lines, atomically (fields that are None are left out)."""
    write_jsonl_atomic(path, [_row(ex) for ex in examples])


def load_split(path: Path) -> list[Example]:
    """Read a split written by :func:`save_split`."""
    with open(path, encoding="utf-8") as fh:
        return [Example(**json.loads(line)) for line in fh if line.strip()]


def make_k_shot(task: TaskSpec, data_dir: Path, out_dir: Path, *, k: int, seed: int, max_test: int = 1000) -> dict:
    """Read a task, draw its k-shot split and write train/dev/test JSONL files into out_dir."""
    train = read_split(task, data_dir, "train")
    test = read_split(task, data_dir, "test")
    splits = sample_k_shot(train, test, k=k, seed=seed, num_classes=task.num_classes, max_test=max_test)
    for name, examples in splits.items():
        save_split(Path(out_dir) / f"{name}.jsonl", examples)
    return {name: len(examples) for name, examples in splits.items()}
