"""Reading the MeZO / DPZero tasks from Hugging Face ``datasets`` and drawing their splits.

Loading: ``datasets.load_dataset(task.dataset, task.config, split=...)`` with the local cache
(``cache_dir``, else ``HF_DATASETS_CACHE`` / ``HF_HOME``).  With ``HF_DATASETS_OFFLINE=1`` the
cache alone is used, which is how a machine without internet reads data that another machine
downloaded (copy the cache folder, or share it).

Sampling (MeZO ``large_models``: ``Dataset.sample_train_sets`` / ``sample_subset`` and
``run.py``): with the data seed ``s``,

* ``np.random.seed(s); permutation(len(train split))``: its first ``num_train + num_dev``
  indices are drawn, the *last* ``num_dev`` of them are the dev set and the rest is the
  training set (so a small dataset loses training examples, never dev ones);
* ``np.random.seed(s); permutation(len(validation split))[:num_test]`` is the test set.

The test set therefore changes with the seed (unlike the LM-BFF protocol's fixed subsample).
Only the drawn rows are converted, so a row that cannot be used (a ReCoRD answer missing from
its entities, say) stops the run only when it is drawn, as in MeZO.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpzo.data.splits import Example, save_split

if TYPE_CHECKING:  # an HFTask reads and splits its data through this module: annotations only
    from dpzo.data.hf_tasks import HFTask

DEFAULT_TRAIN = 1000
DEFAULT_TEST = 1000


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is neither in the local cache nor downloadable from here."""


def cache_location(cache_dir: str | Path | None) -> str:
    """Where ``datasets`` looks for cached data: ``cache_dir``, else its configured default."""
    if cache_dir is not None:
        return str(cache_dir)
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def fetch_command(task: HFTask) -> str:
    """The command that puts the task's dataset in the cache on a machine with internet."""
    args = repr(task.dataset) if task.config is None else f"{task.dataset!r}, {task.config!r}"
    return f'python -c "import datasets; datasets.load_dataset({args})"'


def is_cached(task: HFTask, cache_dir: str | Path | None) -> bool:
    """Whether the task's dataset is in the ``datasets`` cache or the hub cache (no network).

    ``load_dataset`` leaves ``<cache>/<id with '/' as '___'>/<config>/`` behind; a hub download
    leaves ``<HF_HUB_CACHE>/datasets--<org>--<name>/``.  Either lets an offline run load it.
    """
    from huggingface_hub import constants

    processed = Path(cache_location(cache_dir)) / task.dataset.replace("/", "___")
    if task.config is not None:
        processed = processed / task.config
    raw = Path(constants.HF_HUB_CACHE) / f"datasets--{task.dataset.replace('/', '--')}"
    return processed.is_dir() or raw.is_dir()


def load_hf_split(task: HFTask, split: str, *, cache_dir: str | Path | None = None):
    """One split of the task's dataset as a ``datasets.Dataset``, or one clear error."""
    import datasets

    try:
        return datasets.load_dataset(
            task.dataset, task.config, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        where = cache_location(cache_dir)
        offline = (
            " (offline mode: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        )
        raise DatasetUnavailableError(
            f"task {task.name}: the Hugging Face dataset {task.hf_id!r} (split {split!r}) could not be "
            f"loaded from the datasets cache at {where}{offline}: {type(err).__name__}: {err}\n"
            f"Fix: on a machine with internet run\n    HF_DATASETS_CACHE={where} {fetch_command(task)}\n"
            f"and make that folder available here (same path, or point the config key "
            f"hf_datasets.cache_dir / HF_DATASETS_CACHE at it); then run with HF_DATASETS_OFFLINE=1."
        ) from err


# --------------------------------------------------------------------------------------
# rows -> examples
# --------------------------------------------------------------------------------------


def _texts(task: HFTask, row: dict) -> list[str]:
    return [str(row[f]) for f in task.fields]


def _label_row(task: HFTask, row: dict) -> Example:
    label = int(row["label"])
    if not 0 <= label < task.num_classes:
        raise ValueError(f"label {label} is not one of 0..{task.num_classes - 1} ({list(task.candidates)})")
    return Example(texts=_texts(task, row), label=label)


def _boolq_row(task: HFTask, row: dict) -> Example:
    # "boolq" has a boolean "answer"; super_glue/boolq has "label" (1 = true).
    truth = bool(row["answer"]) if "answer" in row else int(row["label"]) == 1
    return Example(texts=_texts(task, row), label=0 if truth else 1)  # candidates: Yes, No


def _copa_row(task: HFTask, row: dict) -> Example:
    label = int(row["label"])
    if label not in (0, 1):
        raise ValueError(f"COPA label must be 0 or 1, got {label}")
    return Example(texts=_texts(task, row), label=label, candidates=[row["choice1"], row["choice2"]])


def _record_row(task: HFTask, row: dict) -> Example:
    entities, answers = list(row["entities"]), list(row["answers"])
    missing = [a for a in answers if a not in entities]
    if not answers or missing:
        raise ValueError(f"ReCoRD answers {answers} must be non-empty and among the entities {entities}")
    # Trained on the first answer (as MeZO); every answer counts as correct in evaluation.
    return Example(texts=_texts(task, row), label=entities.index(answers[0]), candidates=entities, answers=answers)


def _qa_row(answers: list[str], task: HFTask, row: dict) -> Example:
    if not answers:
        raise ValueError("a QA example needs at least one gold answer")
    # label 0: the first gold answer is the teacher-forcing target (MeZO's answers[0]).
    return Example(texts=_texts(task, row), label=0, answers=[str(a) for a in answers])


def _squad_row(task: HFTask, row: dict) -> Example:
    return _qa_row(list(row["answers"]["text"]), task, row)


def _drop_row(task: HFTask, row: dict) -> Example:
    return _qa_row(list(row["answers_spans"]["spans"]), task, row)


ROW_CONVERTERS: dict[str, Callable[[HFTask, dict], Example]] = {
    "label": _label_row,
    "boolq": _boolq_row,
    "copa": _copa_row,
    "record": _record_row,
    "squad": _squad_row,
    "drop": _drop_row,
}
_EXTRA_COLUMNS = {
    "label": ("label",),
    "boolq": (),
    "copa": ("choice1", "choice2", "label"),
    "record": ("entities", "answers"),
    "squad": ("answers",),
    "drop": ("answers_spans",),
}


def check_columns(task: HFTask, columns: list[str]) -> None:
    """Fail with the expected and found columns when the dataset is not the one expected."""
    needed = [*task.fields, *_EXTRA_COLUMNS[task.row_format]]
    if task.row_format == "boolq" and "answer" not in columns:
        needed.append("label")
    absent = [c for c in needed if c not in columns]
    if absent:
        raise ValueError(
            f"task {task.name}: dataset {task.hf_id!r} lacks column(s) {absent}; found {columns}. "
            f"Is this the dataset MeZO uses?"
        )


def convert_rows(task: HFTask, dataset, indices) -> list[Example]:
    """The Examples of the rows ``indices`` of a ``datasets.Dataset`` (in that order)."""
    check_columns(task, list(dataset.column_names))
    convert = ROW_CONVERTERS[task.row_format]
    examples = []
    for i in indices:
        row = dataset[int(i)]
        try:
            examples.append(convert(task, row))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"task {task.name}: row {int(i)} of {task.hf_id!r}: {err}") from err
    return examples


# --------------------------------------------------------------------------------------
# MeZO sampling
# --------------------------------------------------------------------------------------


def mezo_indices(
    n_train_pool: int, n_test_pool: int, *, seed: int, num_train: int, num_dev: int, num_test: int
) -> dict[str, np.ndarray]:
    """Row indices of the train/dev/test splits (see the module docstring)."""
    if num_train < 1 or num_dev < 0 or num_test < 1:
        raise ValueError(f"split sizes must be train >= 1, dev >= 0, test >= 1; got {num_train}/{num_dev}/{num_test}")
    # np.random.seed(seed) followed by np.random.permutation draws exactly this permutation.
    drawn = np.random.RandomState(seed).permutation(n_train_pool)[: num_train + num_dev]
    n_train = len(drawn) - num_dev
    if n_train < 1:
        raise ValueError(
            f"the training split has {n_train_pool} examples: nothing is left to train on after "
            f"{num_dev} dev examples; lower hf_datasets.dev"
        )
    test = np.random.RandomState(seed).permutation(n_test_pool)[:num_test]
    return {"train": drawn[:n_train], "dev": drawn[n_train:], "test": test}


def make_hf_splits(
    task: HFTask,
    out_dir: Path,
    *,
    seed: int,
    num_train: int = DEFAULT_TRAIN,
    num_dev: int | None = None,
    num_test: int = DEFAULT_TEST,
    cache_dir: str | Path | None = None,
) -> dict[str, int]:
    """Load the task, draw MeZO's splits and write train/dev/test JSONL files into out_dir.

    ``num_dev`` None takes the task's MeZO value (500, or 100 for the small datasets).  Every
    file is converted before the first is written, so a failure leaves no split behind.
    """
    train_pool = load_hf_split(task, task.train_split, cache_dir=cache_dir)
    test_pool = load_hf_split(task, task.test_split, cache_dir=cache_dir)
    try:
        index = mezo_indices(
            len(train_pool),
            len(test_pool),
            seed=seed,
            num_train=num_train,
            num_dev=task.dev_size if num_dev is None else num_dev,
            num_test=num_test,
        )
    except ValueError as err:
        raise ValueError(f"task {task.name} ({task.hf_id}): {err}") from None
    splits = {
        "train": convert_rows(task, train_pool, index["train"]),
        "dev": convert_rows(task, train_pool, index["dev"]),
        "test": convert_rows(task, test_pool, index["test"]),
    }
    for name, examples in splits.items():
        save_split(Path(out_dir) / f"{name}.jsonl", examples)
    return {name: len(examples) for name, examples in splits.items()}
