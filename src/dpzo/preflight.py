"""Before any job: is every configured model and dataset on disk?

The pipeline never downloads (cluster nodes often have no network, and a half-downloaded
checkpoint inside a training job wastes a GPU allocation).  So a real run first checks every
model and task of the config and stops with one message that lists everything missing, the
exact id or file, and where to put it.  Demo models and tasks are built by the pipeline itself.
"""

from __future__ import annotations

from pathlib import Path

from .data import missing_files
from .inputs import WEIGHT_FILES, model_dir_problems
from .tasks import TASKS

LMBFF_URL = "https://nlp.cs.princeton.edu/projects/lm-bff/datasets.tar"


class MissingInputs(SystemExit):
    """Raised with the full list of what is missing; exits non-zero with that message."""


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def model_problem(key: str, path: str) -> str | None:
    """Why the model ``key`` at ``path`` (a directory or a Hugging Face id) cannot load, or None."""
    local = model_dir_problems(path)
    if local:
        return f"model '{key}' (models.{key}.path): " + "; ".join(local)
    if Path(path).expanduser().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json")
    weights = any(isinstance(try_to_load_from_cache(path, f), str) for f in WEIGHT_FILES)
    if isinstance(config, str) and weights:
        return None
    return (
        f"model '{key}': Hugging Face id '{path}' is not in the local cache {hub_cache_dir()}. On a machine with "
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
