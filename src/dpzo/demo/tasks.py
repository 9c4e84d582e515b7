"""The demo's labelled tasks, written in LM-BFF's on-disk layouts (SST-2 tsv, TREC csv)."""

from __future__ import annotations

import csv
import logging
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from dpzo.demo.corpus import DEMO_TASKS, SST2_SIZES, TREC_CLASS_WEIGHTS, TREC_SIZES, graded_review, question
from dpzo.fileio import atomic_path

logger = logging.getLogger(__name__)


_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


_TYPE_PREFIX = re.compile(r"^\w+: ")


def corpus_sentences(corpus_path: Path) -> set[str]:
    """Every sentence of the corpus, with and without a leading ``Type:`` annotation.

    A task example is dropped when its text is one of these, so no test sentence (and its
    verdict) was seen verbatim in pretraining.
    """
    sentences: set[str] = set()
    with open(corpus_path, encoding="utf-8") as handle:
        for line in handle:
            for sentence in _SENTENCE_END.split(line.strip()):
                sentences.add(sentence)
                sentences.add(_TYPE_PREFIX.sub("", sentence))
    return sentences


def _draw_unique(draw: Callable[[int], str], labels: Sequence[int], exclude: set[str]) -> list[tuple[str, int]]:
    """One example per entry of ``labels``, with texts pairwise distinct and not in ``exclude``.

    Labels are fixed first and texts redrawn within the label, so dropping seen texts never
    changes the class balance.
    """
    seen = set(exclude)
    examples: list[tuple[str, int]] = []
    for label in labels:
        for _ in range(1000):  # bounded: a generator too small for the task fails loudly
            text = draw(label)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"could not draw an unseen example of class {label}")
        seen.add(text)
        examples.append((text, label))
    return examples


def _split(examples: list[tuple[str, int]], sizes: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split] = examples[start : start + size]
        start += size
    return splits


def _write_sst2(data_dir: Path, rng: random.Random, exclude: set[str]) -> None:
    out = data_dir / "original" / "SST-2"
    out.mkdir(parents=True, exist_ok=True)
    labels = [rng.randrange(2) for _ in range(sum(SST2_SIZES.values()))]
    examples = _draw_unique(lambda label: graded_review(rng, label)[0], labels, exclude)
    for split, rows in _split(examples, SST2_SIZES).items():
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
        with atomic_path(out / f"{split}.tsv") as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_trec(data_dir: Path, rng: random.Random, exclude: set[str]) -> None:
    out = data_dir / "original" / "trec"
    out.mkdir(parents=True, exist_ok=True)
    classes = range(len(TREC_CLASS_WEIGHTS))
    labels = rng.choices(classes, weights=TREC_CLASS_WEIGHTS, k=sum(TREC_SIZES.values()))
    examples = _draw_unique(lambda label: question(rng, label)[0], labels, exclude)
    for split, rows in _split(examples, TREC_SIZES).items():
        with atomic_path(out / f"{split}.csv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows((label, text) for text, label in rows)


def write_demo_task(task: str, data_dir: Path, corpus_path: Path, seed: int = 1) -> None:
    """Write ``task`` (``demo-sst2`` or ``demo-trec``) under ``data_dir`` in LM-BFF's layout.

    Examples come from the corpus generators with a different seed; texts that occur as a
    sentence of the pretraining corpus, or twice in the task, are dropped.
    """
    if task not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {task!r}; expected one of {DEMO_TASKS}")
    rng = random.Random(f"{task}-{seed}")
    exclude = corpus_sentences(corpus_path)
    writer = _write_sst2 if task == "demo-sst2" else _write_trec
    writer(Path(data_dir), rng, exclude)
    logger.info("wrote %s to %s", task, data_dir)


def write_demo_tasks(tasks: Sequence[str], outputs: Sequence[str | Path], corpus_path: Path, seed: int = 1) -> None:
    """Write every demo task of ``tasks`` where the rule's ``outputs`` are.

    The outputs follow LM-BFF's layout, ``<data_dir>/original/<TASK>/<file>``: the data root is
    three levels above any of them.
    """
    data_dir = Path(outputs[0]).parents[2]
    for task in tasks:
        write_demo_task(task, data_dir, Path(corpus_path), seed=seed)
