"""Before any job: is every configured model and dataset on disk, and can each model run?

The pipeline never downloads (cluster nodes often have no network, and a half-downloaded
checkpoint inside a training job wastes a GPU allocation).  So a real run first checks every
model and task of the config and stops with one message that lists everything missing, the
exact id or file, and where to put it.  Demo models and tasks are built by the pipeline itself.

A model that is present is also built from its config.json on the meta device (no weights,
``dpzo.models.meta``): its config must describe a model, the tokenizer's ids must fit its
embedding, and its checkpoint must hold the output head the prompts are scored with.  Otherwise
the train jobs would fail (or, without the head, score a random one) after Snakemake has already
deleted the outputs they replace.
"""

from __future__ import annotations

from pathlib import Path

from dpzo.data.inputs import WEIGHT_FILES, config_file_of, model_dir_problems, weights_problems
from dpzo.data.tasks import TASKS


class MissingInputs(SystemExit):
    """Raised with the full list of what is missing; exits non-zero with that message."""


def hub_cache_dir() -> str:
    """The local Hugging Face hub cache, where model ids are looked up."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def model_problem(key: str, path: str) -> str | None:
    """Why the model ``key`` at ``path`` (a directory or a Hugging Face id) cannot load, or None.

    Reads no tensors: the config must parse, the weights' headers read (``inputs``)."""
    local = model_dir_problems(path)
    if local:
        return f"model '{key}' (models.{key}.path): " + "; ".join(local)
    if Path(path).expanduser().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json")
    weights = [w for f in WEIGHT_FILES if isinstance(w := try_to_load_from_cache(path, f), str)]
    if isinstance(config, str) and weights:
        damaged = weights_problems(weights[0])
        return f"model '{key}' (Hugging Face id '{path}' in the cache): " + "; ".join(damaged) if damaged else None
    relative = (
        ""
        if Path(path).is_absolute()
        else (f"is not a directory (resolved against {Path.cwd()}: {Path(path).absolute()} does not exist) and ")
    )
    return (
        f"model '{key}': '{path}' {relative}is not a Hugging Face id in the local cache {hub_cache_dir()}. "
        f"For a hub id: on a machine with internet run `hf download {path}` and copy the cache to HF_HOME here; "
        f"for a local model: save it with save_pretrained to a directory and set models.{key}.path to it "
        "(relative paths are read from the folder snakemake runs in)"
    )


def load_tokenizer(key: str, path: str) -> tuple[object | None, str | None]:
    """The tokenizer of model ``key`` at ``path``, or None and why it does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True), None
    except Exception as err:  # transformers raises many types for a damaged tokenizer
        return None, (
            f"model '{key}' (models.{key}.path): its tokenizer does not load from {path} "
            f"({type(err).__name__}: {err}); save it again with tokenizer.save_pretrained"
        )


def label_word_problems(key: str, path: str, task_names: list[str], tokenizer=None) -> list[str]:
    """The model's tokenizer must load, and every label word of the LM-BFF tasks must be one
    token of it (the prompts score one token per label).  ``tokenizer``: already loaded."""
    from dpzo.data.tasks import label_word_ids

    if tokenizer is None:
        tokenizer, problem = load_tokenizer(key, path)
        if problem:
            return [problem]
    problems = []
    for name in task_names:
        task = TASKS[name]
        if not task.label_words:
            continue  # candidate tasks: whole continuations are scored, no label-word token
        try:
            label_word_ids(task, tokenizer)
        except ValueError as err:
            problems.append(f"model '{key}': {err}; pick another model or task")
    return problems


def build_problem(key: str, path: str, err: Exception) -> str:
    """The message for a config.json that parses but from which transformers builds no model."""
    where = config_file_of(path) or f"{path}/config.json"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"model '{key}' (models.{key}.path): {where} parses but does not describe a model transformers can "
        f"build ({type(err).__name__}: {first}); fix that value in config.json, or save the model again with "
        f"model.save_pretrained (its config.json then matches its weights)"
    )


def vocabulary_problems(key: str, path: str, model, tokenizer, task_names: list[str]) -> list[str]:
    """Every id the tokenizer can produce must have a row in the model's input embedding, and every
    label word a logit in its output head: an id past the embedding stops the train job with
    ``IndexError: index out of range in self``.  ``model``: built on the meta device (``meta_model``)."""
    from dpzo.data.tasks import label_word_ids

    config = model.config
    try:
        rows = int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):
        rows = int(getattr(config, "vocab_size", 0) or 0)
    if not rows:
        return []
    output = model.get_output_embeddings()
    logits = int(output.weight.shape[0]) if output is not None else rows
    largest = max(len(tokenizer) - 1, max(tokenizer.get_vocab().values(), default=-1))
    outside = []
    for name in task_names:
        task = TASKS[name]
        if not task.label_words:
            continue
        try:
            ids = label_word_ids(task, tokenizer)
        except ValueError:
            continue  # named by label_word_problems
        for word, i in zip(task.label_words.values(), ids, strict=True):
            if i >= min(rows, logits):
                outside.append(f"label word {word!r} of {name} (id {i})")
    for token, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=False):
        if i >= rows:
            outside.append(f"special token {token!r} (id {i})")
    if largest < rows and not outside:
        return []
    where = config_file_of(path) or f"{path}/config.json"
    sizes = (
        f"the tokenizer in {path} has ids up to {largest} ({len(tokenizer)} tokens, added tokens included) but "
        f"the model's input embedding has {rows} rows (vocab_size {getattr(config, 'vocab_size', '?')} in {where})"
    )
    if logits != rows:
        sizes += f" and its output head {logits} logits"
    return [
        f"model '{key}' (models.{key}.path): {sizes}, so a train job would stop with 'IndexError: index out "
        f"of range in self'" + (f"; out of range: {', '.join(outside)}" if outside else "") + ". The tokenizer "
        "and the weights do not belong together: put the tokenizer saved with these weights next to them "
        "(tokenizer.save_pretrained), or resize the model to the tokenizer "
        "(model.resize_token_embeddings(len(tokenizer))) and save it again"
    ]


#: Checkpoints that carry the head each family's prompts are scored with.
HEAD_EXAMPLES = {
    "mlm": "a masked-LM checkpoint saved with its MLM head, such as roberta-large or bert-base-uncased "
    "(AutoModelForMaskedLM.from_pretrained(...).save_pretrained(dir))",
    "causal": "a causal-LM checkpoint saved with its LM head, such as facebook/opt-1.3b "
    "(AutoModelForCausalLM.from_pretrained(...).save_pretrained(dir))",
}


def head_problems(key: str, path: str, model, family: str, *, allow_new_head: bool = False) -> list[str]:
    """A checkpoint without the output head the prompts score with (a base model such as a
    sentence-transformers ``BertModel``) would get that head initialised at random by
    ``from_pretrained``, and every cell would report the accuracy of a random head.  Refused unless
    ``models.<key>.allow_new_head`` is set.  ``model``: built on the meta device (``meta_model``)."""
    import sys

    from dpzo.data.inputs import weights_file_of
    from dpzo.models.meta import checkpoint_tensor_names, new_head_weights

    if allow_new_head:
        return []
    try:
        stored = checkpoint_tensor_names(path)
    except Exception as err:  # readable as an archive (model_problem) yet not listable here
        print(
            f"warning: model '{key}': the tensor names of {weights_file_of(path)} could not be read "
            f"({type(err).__name__}: {err}); its output head was not checked",
            file=sys.stderr,
        )
        return []
    missing = new_head_weights(model, family, stored) if stored is not None else []
    if not missing:
        return []
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    kind = "masked-LM prediction head" if family == "mlm" else "LM head"
    return [
        f"model '{key}' (models.{key}.path): {weights_file_of(path)} has no {kind} ({type(model).__name__} "
        f"needs {shown}); transformers would initialise it at random and every cell would score that random "
        f"head. Use {HEAD_EXAMPLES[family]}; or, to train a new head on purpose, set "
        f"models.{key}.allow_new_head: true (each cell's metrics.json then lists it under new_head)"
    ]


def model_checks(key: str, cfg: dict, task_names: list[str]) -> list[str]:
    """What stops model ``key`` (a ``path`` model whose files are present) from running its cells:
    tokenizer and label words, a config.json that builds no model, ids past the embedding, a
    missing output head.  The model is built once, on the meta device, for all of them."""
    from dpzo.models.meta import meta_model

    path = str(cfg["path"])
    tokenizer, problem = load_tokenizer(key, path)
    problems = [problem] if problem else label_word_problems(key, path, task_names, tokenizer=tokenizer)
    try:
        model, family = meta_model(path, cfg.get("family", "auto"))
    except Exception as err:  # transformers raises ValueError, KeyError, TypeError... for a bad config
        return [*problems, build_problem(key, path, err)]
    if tokenizer is not None:
        problems += vocabulary_problems(key, path, model, tokenizer, task_names)
    problems += head_problems(key, path, model, family, allow_new_head=bool(cfg.get("allow_new_head", False)))
    return problems


def public_tasks(config: dict) -> list[str]:
    """The tasks that methods with ``tune: {mode: public}`` choose their hyperparameters on."""
    blocks = [(params or {}).get("tune") or {} for params in config.get("methods", {}).values()]
    return [b["public_task"] for b in blocks if b.get("mode") == "public" and b.get("public_task")]


def k_shot_warnings(config: dict) -> list[str]:
    """LM-BFF tasks whose smallest class has fewer than k training examples: their k-shot set
    keeps every example of that class (as LM-BFF does) and has no dev examples of it."""
    k, out = int(config["k"]), []
    for name in config["tasks"]:
        task = TASKS[name]
        counts = task.label_counts(Path(config.get("data_dir", "data/lm-bff")))
        if counts is None:  # not drawn k per class (the MeZO tasks), or no file to read yet
            continue
        small = {label: c for label, c in sorted(counts.items()) if c < k}
        if small:
            train = {label: min(c, k) for label, c in sorted(counts.items())}
            out.append(
                f"task '{name}': k = {k} is larger than class(es) {small} (examples per label); the k-shot "
                f"training set has {train} examples per label (n = {sum(train.values())}, not {k * task.num_classes}) "
                "and no dev examples of those classes. q = B/n and delta = 1/n follow the real n."
            )
    return out


def task_problems(name: str, data_dir: str | Path, hf_cache_dir: str | Path | None = None) -> list[str]:
    """The missing files of a task (LM-BFF layout under ``data_dir``, or a Hugging Face
    dataset in the ``datasets`` cache), phrased for a person (``Task.input_problems``)."""
    return TASKS[name].input_problems(data_dir, hf_cache_dir)


def model_type_of(path: str) -> str | None:
    """The ``model_type`` of a model directory or cached hub id (its config.json), or None.

    Reads one JSON file (no torch, no transformers): the config check runs it at parse time, so
    that ``snakemake -n`` refuses what the model's architecture cannot serve."""
    import json

    config = config_file_of(path)
    if config is None:
        return None
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def architecture_problems(
    key: str, model_type: str | None, methods: list[str], method_params: dict | None = None
) -> list[str]:
    """The methods of model ``key`` that its architecture cannot serve, each named with the family
    and the fix.  ``method_params``: the config's ``methods`` blocks (a block's ``tuning`` counts)."""
    from dpzo.methods import base_method, get_method, hyperparameters_for

    if model_type is None:
        return []
    problems = []
    for method in methods:
        base = base_method(method)
        try:
            hp = hyperparameters_for(base, dict((method_params or {}).get(method) or {}))
        except (TypeError, ValueError):
            hp = None  # the config check names a bad block
        problem = get_method(base).architecture_problem(model_type, hp)
        if problem:
            problems.append(
                f"model '{key}' ({model_type}), method '{method}': {problem}. Remove {method} from this "
                "model's methods (models.<key>.grid.methods)"
            )
    return problems


def missing_inputs(config: dict) -> list[str]:
    """Every configured model and task that is not on disk (empty when the run can start)."""
    problems = []
    for key, cfg in config["models"].items():
        if "path" in cfg:
            problem = model_problem(key, str(cfg["path"]))
            if problem:
                problems.append(problem)
            else:
                tasks = cfg.get("grid", {}).get("tasks", config["tasks"])
                problems += model_checks(key, cfg, list(tasks))
                methods = cfg.get("grid", {}).get("methods", list(config["methods"]))
                problems += architecture_problems(
                    key, model_type_of(str(cfg["path"])), list(methods), config.get("methods", {})
                )
    data_dir = config.get("data_dir", "data/lm-bff")
    hf_cache_dir = config.get("hf_datasets", {}).get("cache_dir")
    tasks, hints = [], {}
    for name in dict.fromkeys([*config["tasks"], *public_tasks(config)]):
        found = task_problems(name, data_dir, hf_cache_dir)
        tasks += found
        if found and (hint := TASKS[name].source_hint(data_dir)):
            hints[hint] = None  # each source's hint once, after every task's own problems
    return problems + tasks + list(hints)


def memory_problems(config: dict) -> list[str]:
    """The models whose cells would not fit the ``max_memory`` they set, each with what would fit.

    Only a model with ``max_memory`` is projected (``dpzo.bench.plan``: one real step and one
    evaluation batch on fake tensors, seconds per billion parameters), so a config without one
    never imports torch here."""
    keys = [key for key, cfg in config["models"].items() if cfg.get("max_memory") and "path" in cfg]
    if not keys:
        return []
    from dpzo.bench import plan

    plans, _ = plan.config_plans(config, keys)
    problems = []
    for model in plans:
        caps = plan.gpu_caps(config["models"][model.key]["max_memory"])
        if caps:
            problem = plan.refusal(model, model.projection(), min(caps))
            problems += [problem] if problem else []
    return problems


def device_problem(device: str) -> str | None:
    """Why the config's torch ``device`` cannot run jobs on this machine, or None."""
    if device == "cpu":
        return None
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index < count:
            return None
        found = f"{count} CUDA device(s)" if count else "no CUDA device (or a torch build without CUDA)"
        return (
            f"config key 'device': {device!r} but this machine has {found}; set device: cpu, or run where "
            "the GPU is (on a cluster the check is left to the job's node)"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        return "config key 'device': 'mps' but this machine has no MPS device; set device: cpu"
    return None


def require_inputs(config: dict, *, local: bool = True) -> None:
    """Stop the run, before any job, when something configured is missing or cannot run here.

    ``local``: the jobs run on this machine (not submitted to a cluster), so the device is
    checked here too.  Warnings (k larger than a class) are printed and the run goes on.
    """
    import sys

    problems = missing_inputs(config)
    problems += [] if problems else memory_problems(config)  # projected only when the model is there
    device = device_problem(str(config.get("device", "cpu"))) if local else None
    if device:
        problems.append(device)
    if problems:
        raise MissingInputs(
            "missing or unusable inputs; nothing was run:\n  - "
            + "\n  - ".join(problems)
            + "\nThe pipeline never downloads: fetch what is missing first (see README, 'Real models and data')."
        )
    for warning in k_shot_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
