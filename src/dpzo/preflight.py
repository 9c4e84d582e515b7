"""Before any job: is every configured model and dataset on disk?

The pipeline never downloads (cluster nodes often have no network, and a half-downloaded
checkpoint inside a training job wastes a GPU allocation).  So a real run first checks every
model and task of the config and stops with one message that lists everything missing, the
exact id or file, and where to put it.  Demo models and tasks are built by the pipeline itself.
"""

from __future__ import annotations

from pathlib import Path

from .data import missing_files
from .tasks import TASKS

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "sentencepiece.bpe.model", "spiece.model")
LMBFF_URL = "https://nlp.cs.princeton.edu/projects/lm-bff/datasets.tar"


class MissingInputs(SystemExit):
    """Raised with the full list of what is missing; exits non-zero with that message."""


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _looks_like_path(name: str) -> bool:
    """A Hugging Face id is ``name`` or ``org/name``; anything else is meant as a directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def model_problem(key: str, path: str) -> str | None:
    """Why the model ``key`` at ``path`` (a directory or a Hugging Face id) cannot load, or None."""
    local = Path(path).expanduser()
    if local.is_dir():
        lacks = []
        if not (local / "config.json").is_file():
            lacks.append("config.json")
        if not any((local / f).is_file() for f in WEIGHT_FILES):
            lacks.append("weights (model.safetensors or pytorch_model.bin)")
        if not any((local / f).is_file() for f in TOKENIZER_FILES):
            lacks.append("tokenizer files")
        if lacks:
            return (
                f"model '{key}': directory {path} lacks {', '.join(lacks)}; save the model and its tokenizer "
                f"there with save_pretrained (models.{key}.path)"
            )
        return None
    if _looks_like_path(path):
        return f"model '{key}': directory {path} does not exist (models.{key}.path)"
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json")
    weights = any(isinstance(try_to_load_from_cache(path, f), str) for f in WEIGHT_FILES)
    if isinstance(config, str) and weights:
        return None
    return (
        f"model '{key}': Hugging Face id '{path}' is not in the local cache {hf_cache_dir()}. On a machine with "
        f"internet run `hf download {path}` and copy the cache to HF_HOME here, or save the model with "
        f"save_pretrained to a directory and set models.{key}.path to it"
    )


def task_problems(name: str, data_dir: str | Path, hf_cache_dir: str | Path | None = None) -> list[str]:
    """The missing files of a task (LM-BFF layout under ``data_dir``, or a Hugging Face
    dataset in the ``datasets`` cache), phrased for a person."""
    from .hf_tasks import HFTask

    task = TASKS[name]
    if isinstance(task, HFTask):
        from .hf_data import cache_location, fetch_command, is_cached

        if is_cached(task, hf_cache_dir):
            return []
        where = cache_location(hf_cache_dir)
        return [
            f"task '{name}': Hugging Face dataset {task.hf_id!r} is not in the datasets cache {where}; on a machine "
            f"with internet run `HF_DATASETS_CACHE={where} {fetch_command(task)}` and make that folder available "
            "here (or point hf_datasets.cache_dir at it)"
        ]
    if task.demo:
        return []
    missing = missing_files(task, Path(data_dir))
    if not missing:
        return []
    hint = " (some copies name the folder GLUE-SST-2: rename it to SST-2)" if name == "SST-2" else ""
    return [f"task '{name}': {', '.join(map(str, missing))} not found{hint}"]


def missing_inputs(config: dict) -> list[str]:
    """Every configured model and task that is not on disk (empty when the run can start)."""
    problems = []
    for key, cfg in config["models"].items():
        if "path" in cfg:
            problem = model_problem(key, str(cfg["path"]))
            if problem:
                problems.append(problem)
    from .hf_tasks import HFTask

    data_dir = config.get("data_dir", "data/lm-bff")
    hf_cache_dir = config.get("hf_datasets", {}).get("cache_dir")
    tasks, lmbff_missing = [], False
    for name in config["tasks"]:
        found = task_problems(name, data_dir, hf_cache_dir)
        tasks += found
        lmbff_missing |= bool(found) and not isinstance(TASKS[name], HFTask)
    if lmbff_missing:
        tasks.append(
            f"LM-BFF tasks: download {LMBFF_URL}, extract it and set data_dir (now {data_dir}) to the folder "
            "that holds original/<TASK>/"
        )
    return problems + tasks


def require_inputs(config: dict) -> None:
    """Stop the run, before any job, when something configured is missing."""
    problems = missing_inputs(config)
    if problems:
        raise MissingInputs(
            "missing inputs; nothing was run:\n  - " + "\n  - ".join(problems)
            + "\nThe pipeline never downloads: fetch these first (see README, 'Real models and data')."
        )
