"""Checks of the user's input files where they enter the pipeline: model directories and task data.

Light (no torch, no pandas) so that the Snakefile can run them before any job starts; the
loaders run them again (``models.load_model``, ``data.read_split``) for direct API use.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tasks read their files through splits, which imports this module
    from dpzo.data.tasks import TaskSpec

#: One of these holds the weights of a ``save_pretrained`` directory (sharded: the index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: One of these describes its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# A Hugging Face hub id: "name" or "organisation/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelDirError(ValueError):
    """A model path that cannot be loaded (the message names the path and the fix)."""


def model_dir_problems(path: str | Path) -> list[str]:
    """What is wrong with a model path, or [] when it looks loadable.

    A path that does not exist is accepted only when it reads as a hub id ("name" or
    "org/name"); transformers then looks it up in its cache.  An existing directory must hold a
    config.json that parses, weights whose headers read, and tokenizer files.
    """
    p = Path(path).expanduser()
    fix = "point models.<key>.path at a directory written by save_pretrained (model and tokenizer)"
    if not p.exists():
        if _HUB_ID.match(str(path)):
            return []
        return [f"model directory {path} not found (resolved against {Path.cwd()}: {p.absolute()}); {fix}"]
    if not p.is_dir():
        return [f"model path {path} is a file, not a directory; {fix}"]
    problems = []
    if not (p / "config.json").is_file():
        problems.append(f"model directory {path} has no config.json")
    else:
        problems += _json_problem(p / "config.json")
    weights = [p / f for f in WEIGHT_FILES if (p / f).is_file()]
    if not weights:
        problems.append(f"model directory {path} has no weights (none of {', '.join(WEIGHT_FILES)})")
    else:
        problems += weights_problems(weights[0])
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"model directory {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    if problems:
        problems[-1] += (
            f"; it is incomplete or damaged: {fix} (model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
        )
    return problems


def _json_problem(path: Path) -> list[str]:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        return [f"{path} is not valid JSON ({err})"]
    return []


def weights_problems(path: str | Path) -> list[str]:
    """Why a weights file's header cannot be read, or [] (the tensors themselves are not read).

    safetensors: the 8-byte header length, the JSON header, and a file long enough for every
    tensor it lists; a sharded index: its JSON and every shard it names; a PyTorch ``.bin``: a
    readable zip directory (``torch.save``'s format).
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            return [f"{path} is not a valid shard index ({type(err).__name__}: {err})"]
        out = []
        for shard in shards:
            out += (
                [f"{path.parent / shard} (a shard named by {path.name}) is missing"]
                if not (path.parent / shard).is_file()
                else weights_problems(path.parent / shard)
            )
        return out
    if path.suffix == ".safetensors":
        return _safetensors_problems(path)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return [f"{path} is not a readable PyTorch weights file ({err}); save the model again"]
    return []


def _safetensors_problems(path: Path) -> list[str]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + length > size:
                raise ValueError(f"the header says {length} bytes but the file has {size}")
            header = json.loads(fh.read(length))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return [f"{path} is not a readable safetensors file ({err}); it is damaged or cut short: save the model again"]
    if 8 + length + end > size:
        return [
            f"{path} is cut short: its tensors need {8 + length + end} bytes, the file has {size}; save or copy it again"
        ]
    return []


def config_file_of(path: str | Path) -> Path | None:
    """The config.json of a model directory or of a hub id in the local cache, or None."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local / "config.json" if (local / "config.json").is_file() else None
    cached = _cached(str(path), "config.json")
    return Path(cached) if cached else None


def weights_file_of(path: str | Path) -> Path | None:
    """The weights file transformers would read for a model directory or cached hub id (the
    first of ``WEIGHT_FILES`` present: safetensors before PyTorch, one file before a shard index)."""
    local = Path(path).expanduser()
    for name in WEIGHT_FILES:
        found = (local / name if (local / name).is_file() else None) if local.is_dir() else _cached(str(path), name)
        if found:
            return Path(found)
    return None


def _cached(repo: str, name: str) -> str | None:
    """A file of a hub id in the local Hugging Face cache (never downloaded), or None."""
    if not _HUB_ID.match(repo):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, name)
    except Exception:  # an id the hub library refuses is simply not in the cache
        return None
    return found if isinstance(found, str) else None


def tensor_names(path: str | Path) -> list[str] | None:
    """The tensor names a weights file stores, read from its header or shard index (no tensor is
    read); None for a PyTorch ``.bin``, whose names are inside a pickle (torch is needed)."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return sorted(json.loads(path.read_text(encoding="utf-8"))["weight_map"])
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        return sorted(k for k in json.loads(fh.read(length)) if k != "__metadata__")


def model_files_in(path: str | Path) -> list[str]:
    """The files of a model that decide what it computes (config, weights, tokenizer), when on
    disk: a directory's own, or a hub id's files in the local cache.  [] when missing."""
    p = Path(path).expanduser()
    names = ("config.json", *WEIGHT_FILES, *TOKENIZER_FILES)
    if p.is_dir():
        found = [p / name for name in names if (p / name).is_file()]
        for index in (p / f for f in WEIGHT_FILES if f.endswith(".index.json")):
            if index.is_file() and not _json_problem(index):
                found += [p / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        return [str(f) for f in dict.fromkeys(found) if f.is_file()]
    if not _HUB_ID.match(str(path)):
        return []
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    cached = [try_to_load_from_cache(str(path), name) for name in names]
    return [c for c in cached if isinstance(c, str)]


def missing_task_file(task: TaskSpec, data_dir: str | Path, name: str) -> str:
    """The message for a task file that is not on disk: which file, and where the data comes from."""
    path = Path(data_dir) / "original" / task.lmbff_dir / name
    return (
        f"task {task.name}: {path} not found. Put the LM-BFF data (datasets.tar from the LM-BFF project, "
        f"folder original/{task.lmbff_dir}/) under data_dir={data_dir}, or set data_dir to where it is."
    )
