"""``dpzo plan``: will it fit?  The per-device peak of a training step and of evaluation, projected
before any job by running the real code on fake tensors.

A model is built from its ``config.json`` (or the bench catalogue's config for the paper's
models) under a fake-tensor mode (``dpzo.zo.cost.fake_mode``): its tensors have shapes, dtypes
and devices but no memory, so an OPT-66B costs seconds and no RAM.  The store is built as a cell
builds it (``dpzo.zo.store.build_store``), and one step of the real trainer
(``dpzo.zo.loop.train_zo``, DP-ZOSO's release) and one inference batch run under
``dpzo.zo.cost.measure``, which counts every live storage per device with its peak.  Memory is a
property of the tensors a program keeps alive, so the CPU's numbers are the device's: the
projection runs on the CPU device and is reported as the compute device's peak.

* ``resident``: the whole model on the compute device, trained in place or with a master copy;
* ``streamed``: the blocks in host memory, each uploaded once per step (``offload: streamed``);
  the compute device's peak, the host copies reported apart (``host_mb``);
* ``placed``: the model spread over N devices.  This CPU-only torch cannot run a placed model
  across several (fake) devices, so its per-device peak is derived from the measured resident
  step: the step's peak minus theta's bytes (weights and master), plus the largest device's
  share of theta (the blocks cut evenly).  The activations and z buffers of the whole step stay
  on every device: an upper bound that leans to refusing.

Masked methods (DP-ZOPO) hold their mask's indices besides (8 bytes per trained coordinate);
the dense step projected here is every zeroth-order method's otherwise.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch

from dpzo.cliargs import memory_bytes
from dpzo.zo.cost import MiB, fake_mode, is_fake, measure, tensors_of

#: the stores a projection can be asked for
STORES = ("resident", "streamed", "placed")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Setting:
    """What a cell's memory depends on: the store, theta's holding, the batch and the length."""

    store: str = "resident"  # one of STORES
    master: str = "none"  # "float32": a master copy of theta; "none": in place
    batch: int = 16
    length: int = 256
    eval_batch: int | None = None  # None: the training batch
    devices: int = 1  # placed: over this many devices

    @property
    def master_dtype(self) -> torch.dtype | None:
        return None if self.master == "none" else _DTYPES[self.master]


@dataclass
class Projection:
    """One model under one setting: the projected peaks per device, bytes (``dpzo plan``'s row)."""

    model: str
    dtype: str
    parameters: int
    setting: Setting
    step_bytes: int  # the compute device's (per device when placed) peak of one training step
    eval_bytes: int  # ... of one inference batch
    host_bytes: int = 0  # streamed: the blocks' home copies in host memory
    seconds: float = 0.0  # wall time of the projection
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """JSON-ready: sizes in MiB."""
        s = self.setting
        return {
            "model": self.model,
            "parameters": self.parameters,
            "store": s.store if s.store != "placed" else f"placed/{s.devices}",
            "theta": "in place" if s.master == "none" else f"master {s.master}",
            "dtype": self.dtype,
            "batch": f"{s.batch} x {s.length}",
            "step_mb": round(self.step_bytes / MiB, 1),
            "eval_mb": round(self.eval_bytes / MiB, 1),
            "host_mb": round(self.host_bytes / MiB, 1),
            "seconds": round(self.seconds, 2),
        }


# -- the model, fake ------------------------------------------------------------------------
def fake_model(config: Any, dtype: torch.dtype, family: str = "auto") -> torch.nn.Module:
    """The model ``config`` (a transformers config) describes, with fake weights in ``dtype``, in
    eval mode (built in its dtype: a fake module's tensors cannot be swapped by ``.to``)."""
    from dpzo.models.meta import model_class

    cls, _ = model_class(config, family)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with fake_mode():
            return cls.from_config(config).eval()
    finally:
        torch.set_default_dtype(previous)


def _inputs(model: torch.nn.Module, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` sequences of ``length`` tokens and one target token each, in the model's fake mode
    when it has one (random tokens: a forward's memory does not depend on them)."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    tokens = torch.randint(4, vocab, (batch, length), generator=g)
    targets = torch.randint(4, vocab, (batch,), generator=g)
    weight = next(model.parameters())
    if not is_fake(weight):
        return tokens, targets
    mode = weight.fake_mode  # a fake model takes fake inputs of its own mode
    with mode:
        return mode.from_tensor(tokens), mode.from_tensor(targets)


def example_losses(
    model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor
) -> Callable[[np.ndarray], torch.Tensor]:
    """The per-example loss a step computes: cross-entropy of the last position's logits (one
    batched forward over the whole vocabulary's logits, as a prompt's label words are scored)."""

    def loss(index: np.ndarray) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long, device=tokens.device)
        logits = model(input_ids=tokens[index]).logits[:, -1, :]
        return torch.nn.functional.cross_entropy(logits.float(), targets[index], reduction="none")

    return loss


# -- one projection ---------------------------------------------------------------------------
def _one_step(model: torch.nn.Module, loss: Callable, batch: int, store: Any) -> Callable[[], dict]:
    """One step of DP-ZOSO through the real trainer, every example in its batch (q = 1)."""
    from dpzo.methods.hyperparameters import ZOHyperparameters
    from dpzo.privacy.mechanisms import NoisySum
    from dpzo.privacy.secret import SecretRandom
    from dpzo.zo.loop import train_zo

    hp = ZOHyperparameters(steps=1, batch_size=batch, lr=1e-6, clip=1.0, log_every=1)
    noise = NoisySum("gaussian", 1.0, float(batch))
    return lambda: train_zo(
        model, loss, batch, hp, method="dp-zoso", run_seed=13, noise=noise,
        secret=SecretRandom(), store=store,
    )  # fmt: skip


def _store_tensors(model: torch.nn.Module, store: Any, streamed: bool) -> tuple[list, list]:
    """(the tensors alive on the compute device, those in host memory) once the store is built."""
    if not streamed:
        return [*tensors_of(model), store.master], []
    from dpzo.zo.streamed import StreamedParameters

    store = cast(StreamedParameters, store)
    parts = store.placed.parts
    trained = {id(p) for part in parts for _, p in part.params}
    in_blocks = {id(p) for block in store.blocks for p in block.parameters()}
    # the blocks' frozen tensors and theta at home; not the trained parameters, which between
    # uploads view theta in place, or a placeholder that dies at the next upload with a master copy
    frozen = [t for t in tensors_of(store.blocks) if id(t) not in trained]
    home = [*frozen, *(part.master for part in parts if id(part.params[0][1]) in in_blocks)]
    return [*tensors_of(model), *(part.master for part in parts)], home


def project(model: torch.nn.Module, setting: Setting, *, name: str = "", fake: bool = True) -> Projection:
    """The peaks of one training step and one inference batch of ``model`` under ``setting``
    (the model is changed: its store is built on it).  ``fake=False`` measures the same on real
    tensors (the projection's validation)."""
    from dpzo.zo.store import build_store

    started = time.perf_counter()
    weights = next(model.parameters())
    parameters = sum(p.numel() for p in model.parameters())
    tokens, targets = _inputs(model, setting.batch, setting.length)
    loss = example_losses(model, tokens, targets)
    streamed = setting.store == "streamed"
    with weights.fake_mode if is_fake(weights) else contextlib.nullcontext():  # its buffers fake too
        store = build_store(
            model, master_dtype=setting.master_dtype, offload="streamed" if streamed else "none", device=weights.device
        )
    device_alive, home = _store_tensors(model, store, streamed)
    step, _ = measure(_one_step(model, loss, setting.batch, store), device_alive, tokens, targets, fake=fake, host=home)
    eval_tokens, _ = _inputs(model, setting.eval_batch or setting.batch, setting.length)

    def evaluate() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=eval_tokens).logits[:, -1, :]

    store.restore()
    inference, _ = measure(evaluate, device_alive, eval_tokens, fake=fake, host=home)
    device = str(weights.device)
    projection = Projection(
        model=name or type(model).__name__,
        dtype=str(weights.dtype).removeprefix("torch."),
        parameters=parameters,
        setting=setting,
        step_bytes=step.peak_bytes.get(device, 0),
        eval_bytes=inference.peak_bytes.get(device, 0),
        host_bytes=step.peak_bytes.get("host", 0),
    )
    theta = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage()._cdata: t for t in device_alive}.values())
    projection.extra["theta_bytes"] = theta - sum(t.untyped_storage().nbytes() for t in model.buffers())
    projection.seconds = time.perf_counter() - started
    return projection


def placed_over(resident: Projection, devices: int) -> Projection:
    """The per-device peak of ``resident``'s model placed over ``devices`` devices (module doc:
    derived from the measured resident step, theta cut evenly, the rest on every device)."""
    theta = resident.extra["theta_bytes"]
    share = math.ceil(theta / devices)
    return replace(
        resident,
        setting=replace(resident.setting, store="placed", devices=devices),
        step_bytes=resident.step_bytes - theta + share,
        eval_bytes=resident.eval_bytes - theta + share,
        extra=dict(resident.extra),
    )


# -- a config's models -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPlan:
    """One model of a config (or of the catalogue) and the setting its cells run with."""

    key: str
    config: Any  # a transformers config
    dtype: str
    family: str
    setting: Setting

    def projection(self, setting: Setting | None = None) -> Projection:
        """The projection under ``setting`` (default: the model's own), on a fresh fake model."""
        setting = setting or self.setting
        model = fake_model(self.config, _DTYPES[self.dtype], self.family)
        if setting.store == "placed":
            return placed_over(project(model, replace(setting, store="resident"), name=self.key), setting.devices)
        return project(model, setting, name=self.key)


def gpu_caps(max_memory: dict | None) -> list[int]:
    """The byte caps of the accelerators in a ``max_memory`` map (its ``cpu`` and ``disk`` entries aside)."""
    return [memory_bytes(v) for k, v in (max_memory or {}).items() if str(k) not in ("cpu", "disk")]


def config_plans(config: dict, keys: list[str] | None = None) -> tuple[list[ModelPlan], list[str]]:
    """The plans of a pipeline config's models (``keys``: only those), and why a model has none
    (a demo model is built by the pipeline; a path must hold, or be a cached id of, a config.json)."""
    from transformers import AutoConfig

    from dpzo.data.tasks import TASKS
    from dpzo.methods import TRAINER_ZO, base_method, get_method

    plans, skipped = [], []
    for key, cfg in config["models"].items():
        if keys and key not in keys:
            continue
        if "path" not in cfg:
            skipped.append(f"{key}: a demo model (built by the pipeline), not projected")
            continue
        grid = cfg.get("grid") or {}
        methods = [
            m for m in grid.get("methods", list(config["methods"])) if get_method(base_method(m)).trainer == TRAINER_ZO
        ]
        if not methods:
            skipped.append(f"{key}: no zeroth-order method")
            continue
        batch = max(int((config["methods"].get(m) or {}).get("batch_size", 16)) for m in methods)
        length = max(TASKS[t].max_length for t in grid.get("tasks", config["tasks"]))
        caps = gpu_caps(cfg.get("max_memory"))
        store = "streamed" if cfg.get("offload") == "streamed" else "placed" if cfg.get("placement") else "resident"
        setting = Setting(
            store=store,
            master=str(cfg.get("master", "float32")),
            batch=batch,
            length=length,
            eval_batch=int(config.get("eval_batch_size", 256)),
            devices=max(len(caps), 1) if store == "placed" else 1,
        )
        try:
            hf_config = AutoConfig.from_pretrained(str(cfg["path"]), local_files_only=True)
        except (OSError, ValueError) as err:
            hf_config = _catalogue_config(str(cfg["path"]))
            if hf_config is None:
                skipped.append(f"{key}: no config.json at {cfg['path']} ({str(err).splitlines()[0]})")
                continue
            skipped.append(f"{key}: {cfg['path']} not on disk; projected with the catalogue's architecture")
        plans.append(ModelPlan(key, hf_config, str(cfg.get("dtype", "float32")), cfg.get("family", "auto"), setting))
    return plans, skipped


def _catalogue_config(path: str) -> Any | None:
    """The catalogue's config of a paper model named by its hub id (``facebook/opt-1.3b``,
    ``meta-llama/Llama-2-7b-hf``), or None."""
    from dpzo.bench.catalogue import MODELS, model_config

    name = path.rstrip("/").rsplit("/", 1)[-1].lower().replace("llama-2-", "llama-").removesuffix("-hf")
    return model_config(MODELS[name])[0] if name in MODELS else None


def catalogue_plans(names: list[str] | None = None) -> list[ModelPlan]:
    """The paper's models of the bench catalogue, each at its default batch, in its dtype."""
    from dpzo.bench.catalogue import MODELS, PAPER_MODELS, model_config

    plans = []
    for name in names or PAPER_MODELS:
        spec = MODELS[name]
        config, _ = model_config(spec)
        setting = Setting(batch=spec.batch_size, length=spec.seq_len)
        plans.append(ModelPlan(name, config, spec.dtype, spec.family, setting))
    return plans


# -- will it fit? ------------------------------------------------------------------------------
def peak(projection: Projection) -> int:
    """The larger of the step's and the evaluation's per-device peaks."""
    return max(projection.step_bytes, projection.eval_bytes)


def what_fits(plan: ModelPlan, cap: int, resident: Projection | None = None, max_devices: int = 16) -> list[str]:
    """The choices that would fit ``cap`` bytes per device, each projected: streamed, in place
    (no master copy), placement over the fewest devices, the largest halved batch (training and
    evaluation)."""
    gib = 2**30
    s = plan.setting
    found = []
    if s.store != "streamed" and peak(streamed := plan.projection(replace(s, store="streamed"))) <= cap:
        found.append(f"offload: streamed ({peak(streamed) / gib:.1f} GiB)")
    if s.master != "none" and peak(in_place := plan.projection(replace(s, master="none"))) <= cap:
        found.append(f"master: none ({peak(in_place) / gib:.1f} GiB)")
    resident = resident or plan.projection(replace(s, store="resident"))
    for n in range(2, max_devices + 1):
        if peak(placed := placed_over(resident, n)) <= cap:
            found.append(f"placement over {n} GPUs ({peak(placed) / gib:.1f} GiB each)")
            break
    batch, eval_batch = s.batch, s.eval_batch or s.batch
    while batch > 1 or eval_batch > 1:
        batch, eval_batch = max(batch // 2, 1), max(eval_batch // 2, 1)
        smaller = plan.projection(replace(s, batch=batch, eval_batch=eval_batch))
        if peak(smaller) <= cap:
            found.append(f"batch_size {batch} and eval_batch_size {eval_batch} ({peak(smaller) / gib:.1f} GiB)")
            break
    return found


def refusal(plan: ModelPlan, projection: Projection, cap: int) -> str | None:
    """Why ``plan``'s cells cannot run on devices of ``cap`` bytes, with what would fit; None: they fit."""
    if peak(projection) <= cap:
        return None
    gib = 2**30
    fits = what_fits(plan, cap, projection if plan.setting.store == "resident" else None)
    row = projection.row()
    return (
        f"model '{plan.key}': one step projects to {projection.step_bytes / gib:.1f} GiB and evaluation to "
        f"{projection.eval_bytes / gib:.1f} GiB per device ({row['store']}, {row['theta']}, {row['dtype']}, "
        f"batch {row['batch']}), over the {cap / gib:.1f} GiB of max_memory; "
        + (f"would fit: {'; '.join(fits)}" if fits else "no single change fits (dpzo plan)")
    )


# -- the command's rows -------------------------------------------------------------------------
def catalogue_names() -> list[str]:
    """The catalogue models ``dpzo plan --catalogue`` knows."""
    from dpzo.bench.catalogue import MODELS

    return sorted(MODELS)


#: what ``--catalogue`` projects per model: (store, master)
CATALOGUE_SETTINGS = (("resident", "none"), ("resident", "float32"), ("streamed", "none"), ("streamed", "float32"))


def _with_fit(projection: Projection, memory: int | None, plan: ModelPlan | None = None) -> dict[str, Any]:
    row = projection.row()
    if memory is not None:
        row["fits"] = peak(projection) <= memory
        if plan is not None and not row["fits"]:
            row["would_fit"] = what_fits(plan, memory)
    return row


def catalogue_rows(names: list[str] | None = None, *, memory: int | None = None) -> list[dict[str, Any]]:
    """Each catalogue model (default: the paper's) resident and streamed, in place and with a
    master copy, and placed over the fewest GPUs of ``memory`` (default 80 GB) its resident step needs."""
    rows = []
    cap = memory or memory_bytes("80GB")
    for plan in catalogue_plans(names):
        resident = None
        for store, master in CATALOGUE_SETTINGS:
            projection = plan.projection(replace(plan.setting, store=store, master=master))
            rows.append(_with_fit(projection, memory))
            if (store, master) == ("resident", "none"):
                resident = projection
        if resident is not None and peak(resident) > cap:
            n = next((n for n in range(2, 65) if peak(placed_over(resident, n)) <= cap), None)
            if n is not None:
                rows.append(_with_fit(placed_over(resident, n), memory))
    return rows


def config_rows(
    config: dict, keys: list[str] | None = None, *, memory: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each model of a pipeline config under its own setting (``memory``, else its ``max_memory``,
    says whether it fits and what would); and the notes on the models not projected."""
    plans, notes = config_plans(config, keys)
    rows = []
    for plan in plans:
        caps = gpu_caps(config["models"][plan.key].get("max_memory"))
        cap = memory if memory is not None else (min(caps) if caps else None)
        rows.append(_with_fit(plan.projection(), cap, plan))
    return rows, notes


_COLUMNS = ("model", "store", "theta", "dtype", "batch", "step_mb", "eval_mb", "host_mb", "seconds")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (peaks in GiB)."""
    head = ["model", "store", "theta", "dtype", "batch x length", "step GiB", "eval GiB", "host GiB", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row[c]) if not c.endswith("_mb") else f"{row[c] / 1024:.2f}" for c in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
