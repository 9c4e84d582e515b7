"""Checks of the user's input files where they enter the pipeline: model directories and task data.

Light (no torch, no pandas) so that the Snakefile can run them before any job starts; the
loaders run them again (``models.load_model``, ``data.read_split``) for direct API use.
"""

from __future__ import annotations

import re
from pathlib import Path

from .tasks import TaskSpec

#: One of these holds the weights of a ``save_pretrained`` directory (sharded: the index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: One of these describes its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
# A Hugging Face hub id: "name" or "organisation/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelDirError(ValueError):
    """A model path that cannot be loaded (the message names the path and the fix)."""


def model_dir_problems(path: str | Path) -> list[str]:
    """What is wrong with a model path, or [] when it looks loadable.

    A path that does not exist is accepted only when it reads as a hub id ("name" or
    "org/name"); transformers then looks it up in its cache or on the hub.  An existing
    directory must hold a config.json, weights and tokenizer files.
    """
    p = Path(path).expanduser()
    fix = "point models.<key>.path at a directory written by save_pretrained (model and tokenizer)"
    if not p.exists():
        if _HUB_ID.match(str(path)):
            return []
        return [f"model directory {path} not found; {fix}"]
    if not p.is_dir():
        return [f"model path {path} is a file, not a directory; {fix}"]
    problems = []
    if not (p / "config.json").is_file():
        problems.append(f"model directory {path} has no config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        problems.append(f"model directory {path} has no weights (none of {', '.join(WEIGHT_FILES)})")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"model directory {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    if problems:
        problems[-1] += f"; it is incomplete: {fix} (model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
    return problems


def missing_task_file(task: TaskSpec, data_dir: str | Path, name: str) -> str:
    """The message for a task file that is not on disk: which file, and where the data comes from."""
    path = Path(data_dir) / "original" / task.lmbff_dir / name
    return (
        f"task {task.name}: {path} not found. Put the LM-BFF data (datasets.tar from the LM-BFF project, "
        f"folder original/{task.lmbff_dir}/) under data_dir={data_dir}, or set data_dir to where it is."
    )
