"""Config validation with messages that name the key, the bad value and what is allowed.

Snakemake's own ``validate`` (which also fills in defaults) runs afterwards; this pass exists so
that a user sees every problem at once, phrased for a person, before any job starts.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """The config breaks the schema; the message lists every problem, each with its key."""

    pass


def _where(error) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "<top level>"


def _allowed_keys(schema: dict, root: dict) -> list[str]:
    """The keys a schema object allows, following local $refs (``#/$defs/...``)."""
    keys = list(schema.get("properties", {}))
    ref = schema.get("$ref", "")
    if ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part, {})
        keys += [k for k in _allowed_keys(target, root) if k not in keys]
    return keys


def _describe(error, root: dict) -> str:
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
        allowed = _allowed_keys(error.schema, root)
        patterns = [re.compile(p) for p in error.schema.get("patternProperties", {})]
        unknown = [k for k in error.instance if k not in allowed and not any(p.search(k) for p in patterns)]
        return f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(allowed)}"
    if error.validator == "type":
        what = f" ({error.schema['description']})" if "description" in error.schema else ""
        return f"{error.instance!r} has the wrong type: expected {error.validator_value}{what}"
    if error.validator == "enum":
        return f"{error.instance!r} is not allowed; allowed values: {', '.join(map(str, error.validator_value))}"
    if error.validator == "propertyNames":
        allowed = error.schema.get("propertyNames", {}).get("enum")
        if allowed:
            return f"unknown key {error.instance!r}... allowed keys: {', '.join(allowed)}"
    if error.validator == "pattern" and "description" in error.schema:
        return f"{error.instance!r} is not valid: expected {error.schema['description']}"
    if error.validator == "pattern":
        return f"{error.instance!r} does not match the required form {error.validator_value!r}"
    if error.validator in ("minimum", "maximum") and "maximum" in error.schema and "minimum" in error.schema:
        what = f" ({error.schema['description']})" if "description" in error.schema else ""
        return (
            f"{error.instance!r} is out of range: allowed {error.schema['minimum']} to {error.schema['maximum']}{what}"
        )
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        return "give exactly one of 'path' (a Hugging Face id or directory) or 'demo' (roberta|opt)"
    return error.message


def check_config(config: dict, schema_path: str | Path) -> None:
    """Raise ConfigError listing every schema violation of ``config``."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = _delta_problems(config)
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        if list(error.absolute_path)[:1] == ["delta"]:
            continue  # said once, in words, by _delta_problems
        # A bad method name shows up both as a propertyNames error; report the leaf cause.
        if error.validator == "propertyNames" and error.context:
            for sub in error.context:
                problems.append(f"config key '{_where(error)}': {_describe(sub, schema)}")
            continue
        problems.append(f"config key '{_where(error)}': {_describe(error, schema)}")
    if not problems:  # cross-references only make sense once every key has the right shape
        problems += _cross_reference_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _delta_problems(config: dict) -> list[str]:
    """``delta`` must be a number in (0, 1) or "1/n".  YAML 1.1 (PyYAML) reads ``1e-5`` without a
    dot as a string; such a string is turned into the number it spells, in ``config`` itself."""
    if "delta" not in config:
        return []
    delta = config["delta"]
    if isinstance(delta, str) and delta.replace(" ", "") != "1/n":
        try:
            delta = config["delta"] = float(delta)
        except ValueError:
            pass
    if isinstance(delta, str) and delta.replace(" ", "") == "1/n":
        return []
    if isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0.0 < float(delta) < 1.0:
        return []
    return [
        f"config key 'delta': {config['delta']!r} is not allowed: δ must be a number in (0, 1) (e.g. 1e-5) or \"1/n\""
    ]


GRID_AXES = ("tasks", "methods", "epsilons", "seeds")


def grid_cells(config: dict) -> list[dict]:
    """Every (model, task, method, eps, seed) cell of a validated config.

    The grid is the product of the config's models, tasks, methods, epsilons and seeds; private
    methods run at every epsilon, the others once at "inf".  A model's optional ``grid`` block
    narrows that product for the model (e.g. the OPT memory cells of the paper config run one
    task, one epsilon and one seed); every name it lists must be in the config's own lists.
    """
    from dpzo.methods import is_private

    problems = []
    for model, cfg in config["models"].items():
        for axis, values in cfg.get("grid", {}).items():
            unknown = [v for v in values if v not in config[axis]]
            if unknown:
                problems.append(
                    f"config key 'models.{model}.grid.{axis}': {unknown} not in the config's {axis} {list(config[axis])}"
                )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    cells = []
    for model, cfg in config["models"].items():
        only = cfg.get("grid", {})
        axes = {axis: [v for v in config[axis] if axis not in only or v in only[axis]] for axis in GRID_AXES}
        for task in axes["tasks"]:
            for method in axes["methods"]:
                for eps in axes["epsilons"] if is_private(method) else ["inf"]:
                    for seed in axes["seeds"]:
                        cells.append(dict(model=model, task=task, method=method, eps=eps, seed=seed))
    # Methods a task cannot run (the MeZO tasks: backprop, ICL) are refused before any job starts.
    from dpzo.data.tasks import TASKS

    pairs = dict.fromkeys((c["task"], c["method"]) for c in cells)
    problems = [p for task, method in pairs if (p := TASKS[task].method_problem(method))]
    problems += _batch_size_problems(config, pairs)
    problems += _architecture_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cells


def _architecture_problems(config: dict) -> list[str]:
    """The methods a model's architecture cannot serve (a key/value prefix on GPT-2 or DeBERTa-v2),
    refused at parse time, so that ``snakemake -n`` does not plan them, whenever the model's
    config.json can be read (a local directory, or a hub id in the local cache).  Reads the
    ``model_type`` only: no torch, no transformers.  Demo models are built by the pipeline and serve
    every method."""
    from dpzo.pipeline.preflight import architecture_problems, model_type_of

    problems = []
    for key, cfg in config["models"].items():
        if "path" not in cfg:
            continue
        model_type = model_type_of(str(cfg["path"]))
        methods = (cfg.get("grid") or {}).get("methods", list(config["methods"]))
        problems += architecture_problems(key, model_type, list(methods), config["methods"])
    return problems


def largest_training_set(config: dict, task_name: str) -> int:
    """The most training examples a task's k-shot sampling can give: k per class (LM-BFF; a
    class with fewer examples gives fewer), or ``hf_datasets.train`` (the MeZO tasks)."""
    from dpzo.data.tasks import TASKS

    return TASKS[task_name].largest_training_set(k=config.get("k"), hf_datasets=config.get("hf_datasets"))


def _batch_size_problems(config: dict, pairs) -> list[str]:
    """A batch larger than the training set can be neither Poisson-sampled at q = B/n <= 1 nor
    drawn without replacement: refused here, before a job would delete finished results."""
    problems = []
    for task, method in pairs:
        batch = (config["methods"].get(method) or {}).get("batch_size")
        if batch is None:
            continue
        n = largest_training_set(config, task)
        if int(batch) > n:
            problems.append(
                f"config key 'methods.{method}.batch_size': {batch} is larger than the training set of task "
                f"{task!r} (at most {n} examples with k = {config.get('k')}); use batch_size <= {n} or a larger k"
            )
    return problems


def _cross_reference_problems(config: dict) -> list[str]:
    """Keys that must name something defined elsewhere in the config (the schema cannot say so)."""
    audit = config.get("audit") or {}
    problems = []
    for key, pool, what in (
        ("model", config["models"], "models"),
        ("task", config["tasks"], "tasks"),
        ("method", config["methods"], "methods"),
    ):
        if key in audit and audit[key] not in pool:
            problems.append(
                f"config key 'audit.{key}': {audit[key]!r} is not one of `{what}` ({', '.join(map(str, pool))}); "
                f"add it to `{what}` or pick one of those"
            )
    problems += _hyperparameter_problems(config["methods"])
    problems += _tune_problems(config["methods"])
    problems += _published_accounting_problems(config)
    problems += _placement_problems(config)
    problems += _offload_problems(config)
    return problems


def _offload_problems(config: dict) -> list[str]:
    """What a streamed model (``offload: streamed``) cannot run: backprop, other placements,
    several ranks, masks rescored from weights that live in host memory."""
    from dpzo.methods import TRAINER_FIRST_ORDER, get_method

    problems = []
    for key, cfg in config["models"].items():
        if cfg.get("offload", "none") != "streamed":
            continue
        where = f"config key 'models.{key}.offload': streamed"
        for other in ("placement", "max_memory"):
            if cfg.get(other):
                problems.append(f"{where} moves the blocks itself; remove 'models.{key}.{other}'")
        if cfg.get("ranks", 1) > 1 or cfg.get("gpus_per_rank", 1) > 1:
            problems.append(f"{where} runs one process on one device; set ranks and gpus_per_rank to 1")
        for method in (cfg.get("grid") or {}).get("methods", list(config["methods"])):
            block = config["methods"].get(method) or {}
            if get_method(method).trainer == TRAINER_FIRST_ORDER:
                problems.append(
                    f"{where} serves forward-only methods; {method} backpropagates: remove it from "
                    f"models.{key}.grid.methods or the offload"
                )
            elif (block.get("mask") or {}).get("strategy") == "dynamic":
                problems.append(
                    f"{where}: {method} rescores its mask from the weights at each stage (strategy: dynamic), "
                    "which live in host memory; use strategy static or incremental"
                )
    return problems


def _published_accounting_problems(config: dict) -> list[str]:
    """``accounting: published`` accounts a DPZero-accounted method as DPZero's paper does, one
    direction per step; with more the ``account`` job could only stop, so it is refused here."""
    from dpzo.methods import base_method, get_method

    if config.get("accounting", "common") != "published":
        return []
    problems = []
    for method, params in config["methods"].items():
        directions = (params or {}).get("directions", 1)
        if get_method(base_method(method)).published_accounting == "dpzero" and directions != 1:
            problems.append(
                f"config key 'methods.{method}.directions': {directions} with 'accounting': published; DPZero's "
                f"published accounting (opacus RDP, replace-one) covers one direction per step. Set "
                f"methods.{method}.directions: 1 (or remove it), or set accounting: common (which accounts "
                "T x P releases)"
            )
    return problems


#: devices of a device map that accelerate offloads (the module's weights on ``meta``, brought
#: back by hooks at each forward) when a GPU is the main device: no store can hold those
OFFLOADED_DEVICES = ("cpu", "disk", "meta")


def _placement_problems(config: dict) -> list[str]:
    """A replica on several GPUs must be placed over them (otherwise it would use one), and a
    placement must keep every module on a GPU (host memory is ``offload: streamed``'s)."""
    problems = [
        f"config key 'models.{key}.gpus_per_rank': {cfg['gpus_per_rank']} GPUs per replica need "
        f"'models.{key}.placement' (auto or balanced) to spread the model over them; add it, or set gpus_per_rank: 1"
        for key, cfg in config["models"].items()
        if cfg.get("gpus_per_rank", 1) > 1 and not cfg.get("placement")
    ]
    for key, cfg in config["models"].items():
        placement = cfg.get("placement")
        offloaded = {
            **{f"placement.{m}": d for m, d in (placement.items() if isinstance(placement, dict) else ())},
            **{f"max_memory.{d}": d for d in (cfg.get("max_memory") or {})},
        }
        for where, device in offloaded.items():
            if str(device).lower() in OFFLOADED_DEVICES:
                problems.append(
                    f"config key 'models.{key}.{where}': {device!r} would make accelerate offload modules "
                    "(their weights on meta, reloaded at each forward), which training cannot hold; put every "
                    f"module on a GPU, or keep the model in host memory with 'models.{key}.offload: streamed' "
                    "(and no placement or max_memory)"
                )
    return problems


def _tune_problems(methods: dict) -> list[str]:
    """What each method's ``tune`` block cannot do (``dpzo.pipeline.tuning.tune_problems``)."""
    from dpzo.pipeline.tuning import tune_problems

    return [problem for method, params in methods.items() for problem in tune_problems(method, dict(params or {}))]


def _hyperparameter_problems(methods: dict) -> list[str]:
    """What each method's own hyperparameter classes refuse (e.g. stages that never start,
    stagewise settings on a constant-schedule method), found before any job starts."""
    import math

    from dpzo.methods import hyperparameters_for, is_private
    from dpzo.methods.hyperparameters import ZOHyperparameters

    problems = []
    for method, params in methods.items():
        try:
            hp = hyperparameters_for(method, dict(params or {}))
            if isinstance(hp, ZOHyperparameters):
                hp.schedule()
        except ValueError as err:
            problems.append(f"config key 'methods.{method}': {err}")
            continue
        if is_private(method) and math.isinf(float(getattr(hp, "clip", 0.0))):
            problems.append(
                f"config key 'methods.{method}.clip': a private method needs a finite clip C (the sensitivity of "
                "each release); set e.g. clip: 10.0"
            )
    return problems
