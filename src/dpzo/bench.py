"""``dpzo bench``: the zeroth-order step against the released code's style, side by side.

For each model (built from its config with random weights: nothing is downloaded) and one
fixed batch on one device, it measures

* ``forward``: one batched forward of the per-example prompt loss (a ZO step needs two);
* ``official-style``: the step as the released DP-ZOSO / DPZero / MeZO code runs it
  (:func:`dpzo.zo.official.official_style_train`): z regenerated per tensor after
  ``torch.manual_seed`` for each of the four passes over the weights (+beta, -2 beta, +beta,
  update), the per-example losses pulled out of the batch one ``.item()`` at a time, clip,
  noise and sum in Python, in the model's dtype without autocast;
* ``dpzo``: :func:`dpzo.zo.loop.train_zo` itself, the code every training cell runs;

for the methods ``dp-zoso``, ``dp-zopo`` (a random mask of ``mask_ratio`` of the coordinates)
and ``mezo``, and reports milliseconds per step, the ratio to two forwards, the speed-up over
the official style and the peak GPU memory over the inference peak.

Both compute the same mathematics (see :mod:`dpzo.zo.official`), so only the mechanics differ.

With ``offload`` including ``streamed``, the model is then moved to host memory and the same
methods run streamed (``dpzo.zo.streamed``: blocks uploaded once per step, in place), reported
as ``impl: dpzo-streamed`` beside the resident in-place run: the step-time ratio and the peak
GPU memory against 3 blocks + the resident modules + the activations.

Every batch is the same: n equals the batch size, so Poisson sampling at q = 1 takes every
example each step (and MeZO's sampling without replacement a permutation of them).
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpzo.masks.prune import Mask
from dpzo.methods import ZO, base_method
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.models.classifier import DTYPES, PromptClassifier, to_device
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.flat import fused_passes
from dpzo.zo.loop import train_zo
from dpzo.zo.official import official_style_train
from dpzo.zo.store import build_store

METHODS = ("dp-zoso", "dp-zopo", "mezo")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Step settings of every run.  They do not change the cost of a step; the learning rate is
# small so that repeated runs leave the random weights where they were.
BETA = 1e-3
LR = 1e-6
CLIP = 1.0
SIGMA = 1.0  # noise multiplier: N(0, (sigma C)^2) on the clipped sum
LOG_EVERY = 10

# The targets, each (label, quantity, comparison, limit).  They are stated for the
# full-size models at their default shapes and dtypes on an H100.
TARGETS: dict[str, list[tuple[str, str, str, float]]] = {
    "roberta-large": [
        ("dp-zoso step / two forwards (fp32)", "ratio_fp32", "<=", 1.15),
        ("dp-zoso speed-up over the official style (fp32)", "speedup_fp32", ">=", 2.5),
        ("dp-zoso speed-up over the official style (fp32), bf16 autocast", "speedup_bf16", ">=", 3.5),
        ("peak memory / inference peak, dp-zoso (lambda = 0)", "memory_dense", "<=", 1.05),
        ("peak memory / inference peak, dp-zopo (1 %)", "memory_masked", "<=", 1.10),
        ("SST-2-sized cell, 6000 steps at B = 64 (minutes of steps)", "sst2_minutes", "<=", 8.0),
    ],
    "opt-6.7b": [
        ("streamed / resident dp-zoso step time (in place)", "streamed_ratio", "<=", 1.3),
        ("streamed peak / (3 blocks + resident modules + activations)", "streamed_memory", "<=", 1.0),
    ],
    "opt-30b": [
        ("streamed / resident dp-zoso step time (in place)", "streamed_ratio", "<=", 1.3),
        ("streamed peak / (3 blocks + resident modules + activations)", "streamed_memory", "<=", 1.0),
    ],
    "opt-2.7b": [
        ("dp-zoso speed-up over the official style (fp16)", "speedup_fp32", ">=", 2.0),
        ("peak memory / inference peak, dp-zoso (lambda = 0)", "memory_dense", "<=", 1.05),
        ("peak memory / inference peak, dp-zopo (1 %)", "memory_masked", "<=", 1.10),
    ],
}


# --------------------------------------------------------------------------------------------
# Models: hard-coded configs, random weights
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark: its transformers config and the default batch shape and dtype."""

    arch: str  # "roberta" (masked LM), "opt" or "llama" (causal LMs)
    config: dict
    dtype: str
    batch_size: int
    seq_len: int
    label_ids: tuple[int, ...] = (6587, 372)  # two label words (" terrible", " great" in RoBERTa's vocabulary)
    mask_token_id: int = 50264

    @property
    def family(self) -> str:
        """``mlm`` for RoBERTa, ``causal`` for OPT and Llama (the family :class:`PromptClassifier` expects)."""
        return "mlm" if self.arch == "roberta" else "causal"

    @property
    def max_seq_len(self) -> int:
        """Longest input the model's position embeddings allow."""
        # RoBERTa's positions start after the padding index
        offset = self.config["pad_token_id"] + 1 if self.arch == "roberta" else 0
        return self.config["max_position_embeddings"] - offset


_ROBERTA_SPECIAL = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
_OPT_SPECIAL = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2)


def _opt(hidden: int, layers: int, heads: int) -> BenchModel:
    """An OPT architecture of the released sizes (ffn 4 x hidden, 2048 positions), fp16, 16 x 256."""
    config = dict(
        vocab_size=50272,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        **_OPT_SPECIAL,
    )
    return BenchModel("opt", config, "float16", 16, 256)


MODELS: dict[str, BenchModel] = {
    # roberta-large: 24 layers, 1024 wide, tied MLM decoder (355M parameters)
    "roberta-large": BenchModel(
        "roberta",
        dict(
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            **_ROBERTA_SPECIAL,
        ),
        "float32",
        64,
        128,
    ),
    # facebook/opt-2.7b: 32 layers, 2560 wide, tied output embedding (2.65B parameters)
    "opt-2.7b": _opt(2560, 32, 32),
    # facebook/opt-13b: 40 layers, 5120 wide (12.9B parameters): the large-model grid's smallest
    "opt-13b": _opt(5120, 40, 40),
    # facebook/opt-6.7b: 32 layers, 4096 wide (6.7B parameters): streamed against resident
    "opt-6.7b": _opt(4096, 32, 32),
    # facebook/opt-30b: 48 layers, 7168 wide (30B parameters, 60 GB in fp16): streamed against resident
    "opt-30b": _opt(7168, 48, 56),
    # a Llama-2-7B architecture: 32 layers, 4096 wide, SwiGLU 11008, untied head (6.7B parameters)
    "llama-7b": BenchModel(
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "bfloat16",
        16,
        256,
        label_ids=(1781, 2107),
    ),
    # CPU-sized stand-ins with the same architectures, for CI
    "tiny-roberta": BenchModel(
        "roberta",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=130,
            type_vocab_size=1,
            **_ROBERTA_SPECIAL,
        ),
        "float32",
        8,
        32,
        label_ids=(11, 12),
        mask_token_id=4,
    ),
    "tiny-opt": BenchModel(
        "opt",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
            **_OPT_SPECIAL,
        ),
        "float32",
        8,
        32,
        label_ids=(11, 12),
    ),
    "tiny-llama": BenchModel(
        "llama",
        dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "float32",
        8,
        32,
        label_ids=(11, 12),
    ),
}


def build_model(spec: BenchModel, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture with random weights, built directly on ``device``, in eval mode."""
    import transformers

    if spec.arch == "roberta":
        config, cls = transformers.RobertaConfig(**spec.config), transformers.RobertaForMaskedLM
    elif spec.arch == "llama":
        config, cls = transformers.LlamaConfig(**spec.config), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.OPTConfig(**spec.config), transformers.OPTForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the weights' dtype: no float32 copy of a 30B model
    try:
        with torch.device(device):  # initialise on the device: no host copy of a 2.7B model
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(spec: BenchModel, *, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    """A fixed batch of random tokens, scored at a <mask> (masked LM) or at the last token."""
    if not 2 <= seq_len <= spec.max_seq_len:
        raise ValueError(f"seq_len must be in [2, {spec.max_seq_len}] for this model, got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, spec.config["vocab_size"] - 1, (batch_size, seq_len), generator=gen)
    if spec.family == "mlm":
        pos = torch.full((batch_size,), min(20, seq_len - 2), dtype=torch.long)
        ids[torch.arange(batch_size), pos] = spec.mask_token_id
    else:
        pos = torch.full((batch_size,), seq_len - 1, dtype=torch.long)
    labels = torch.randint(0, len(spec.label_ids), (batch_size,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "score_pos": pos, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def rows(batch: dict, index: Sequence[int] | np.ndarray) -> dict:
    """The examples ``index`` of a batch held on the device (the index goes up without a sync)."""
    device = batch["labels"].device
    idx = to_device(torch.as_tensor(np.asarray(index), dtype=torch.long), device)
    return {k: v.index_select(0, idx) for k, v in batch.items()}


def random_mask(numel: int, ratio: float, *, device: torch.device, seed: int = 0) -> Mask:
    """Each coordinate kept with probability ``ratio`` (built in blocks: no numel-sized temporaries)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    parts, block = [], 1 << 24
    for start in range(0, numel, block):
        keep = torch.rand(min(block, numel - start), generator=gen, device=device) < ratio
        parts.append(keep.nonzero().squeeze(1) + start)
    indices = torch.cat(parts)
    if indices.numel() == 0:
        indices = torch.zeros(1, dtype=torch.long, device=device)
    return Mask(indices=indices, numel=numel, meta={"ratio": ratio, "kind": "random"})


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset (None on CPU: no per-run peak there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _autocast(device: torch.device, name: str):
    dtype = AUTOCAST[name]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class _Setup:
    """One model on one device with its batch; what every measurement of that model shares."""

    name: str
    spec: BenchModel
    model: torch.nn.Module
    clf: PromptClassifier
    batch: dict
    device: torch.device
    dtype: torch.dtype
    mask: Mask | None = None
    numel: int = 0
    extra: dict = field(default_factory=dict)
    streamed: Any = None  # the streamed store once the blocks went to host memory

    @property
    def batch_size(self) -> int:
        return int(self.batch["labels"].numel())

    def hyperparameters(self, method: str, steps: int) -> ZOHyperparameters:
        private = ZO[base_method(method)].private
        return ZOHyperparameters(
            steps=steps,
            batch_size=self.batch_size,
            lr=LR,
            beta_start=BETA,
            beta_end=BETA,
            clip=CLIP if private else math.inf,
            log_every=LOG_EVERY,
        )

    def privacy(self, method: str) -> dict:
        if not ZO[base_method(method)].private:
            return {}
        return {"noise": NoisySum("gaussian", SIGMA * CLIP, float(self.batch_size)), "secret": SecretRandom()}

    def masks(self, method: str) -> Callable[[int], Mask] | None:
        return (lambda stage: self.mask) if ZO[base_method(method)].masked else None


def time_forward(setup: _Setup, *, autocast: str, steps: int, warmup: int) -> tuple[float, float | None]:
    """(ms per batched forward of the per-example losses, peak MiB of inference)."""
    _reset_peak(setup.device)
    with torch.no_grad(), _autocast(setup.device, autocast):
        for _ in range(warmup):
            setup.clf.per_example_loss(setup.batch)
        _sync(setup.device)
        started = time.perf_counter()
        for _ in range(steps):
            setup.clf.per_example_loss(setup.batch)
        _sync(setup.device)
    return 1000.0 * (time.perf_counter() - started) / steps, _peak_mb(setup.device)


def time_official(setup: _Setup, method: str, *, steps: int, warmup: int) -> dict:
    """The released code's style in the model's own dtype, without autocast (as it runs)."""

    def logits_and_labels(index):
        batch = rows(setup.batch, index)
        return setup.clf.label_logits(batch), batch["labels"]

    _reset_peak(setup.device)
    kw = dict(method=method, run_seed=0, masks=setup.masks(method), **setup.privacy(method))
    if warmup:
        official_style_train(
            setup.model, logits_and_labels, setup.batch_size, setup.hyperparameters(method, warmup), **kw
        )
    timed = official_style_train(
        setup.model, logits_and_labels, setup.batch_size, setup.hyperparameters(method, steps), **kw
    )
    return {
        "method": method,
        "impl": "official-style",
        "autocast": "none",
        "master": None,
        "ms_per_step": timed["ms_per_step"],
        "peak_mb": _peak_mb(setup.device),
    }


@contextlib.contextmanager
def _passes(fused: bool):
    """The block-buffer passes (``fused`` False: ``DPZO_FUSED=0``) or the default ones."""
    import os

    previous = os.environ.get("DPZO_FUSED")
    if not fused:
        os.environ["DPZO_FUSED"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DPZO_FUSED", None)
        else:
            os.environ["DPZO_FUSED"] = previous


def time_dpzo(
    setup: _Setup, method: str, *, autocast: str, master: str, steps: int, warmup: int, fused: bool = True
) -> dict:
    """:func:`dpzo.zo.loop.train_zo` on the same batch (a warm-up call, then a timed call).

    ``fused`` False times the block-buffer passes where the fused Triton ones are the default
    (``impl: dpzo-blocks``)."""
    ctx = lambda: _autocast(setup.device, autocast)  # noqa: E731

    def per_example_loss(index):
        with ctx():
            return setup.clf.per_example_loss(rows(setup.batch, index))

    _reset_peak(setup.device)
    kw = dict(
        method=method,
        run_seed=0,
        masks=setup.masks(method),
        master_dtype=None if master == "none" else DTYPES[master],
        **setup.privacy(method),
    )
    with _passes(fused):
        if warmup:
            train_zo(setup.model, per_example_loss, setup.batch_size, setup.hyperparameters(method, warmup), **kw)
        history = train_zo(setup.model, per_example_loss, setup.batch_size, setup.hyperparameters(method, steps), **kw)
    return {
        "method": method,
        "impl": "dpzo" if fused else "dpzo-blocks",
        "autocast": autocast,
        "master": master,
        "ms_per_step": history["ms_per_step"],
        "peak_mb": _peak_mb(setup.device),
    }


def stream(setup: _Setup) -> dict:
    """Move the model's blocks to host memory for streamed runs (in place: ZO2's setting);
    returns the bytes the limit on the streamed peak is made of."""
    from dpzo.zo.streamed import find_blocks

    blocks = find_blocks(setup.model)
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    all_bytes = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    in_blocks = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    setup.model.to("cpu")
    _reset_peak(setup.device)
    setup.streamed = build_store(setup.model, master_dtype=None, offload="streamed", device=setup.device)
    return {"block_bytes": block_bytes, "resident_bytes": all_bytes - in_blocks, "weight_bytes": all_bytes}


def time_streamed(setup: _Setup, method: str, *, steps: int, warmup: int) -> dict:
    """:func:`dpzo.zo.loop.train_zo` on the streamed model (in place), on the same batch."""

    def per_example_loss(index):
        return setup.clf.per_example_loss(rows(setup.batch, index))

    _reset_peak(setup.device)
    kw = dict(method=method, run_seed=0, masks=setup.masks(method), master_dtype=None, **setup.privacy(method))
    if warmup:
        train_zo(
            setup.model,
            per_example_loss,
            setup.batch_size,
            setup.hyperparameters(method, warmup),
            store=setup.streamed,
            **kw,
        )
    before = setup.streamed.uploads[0]
    history = train_zo(
        setup.model,
        per_example_loss,
        setup.batch_size,
        setup.hyperparameters(method, steps),
        store=setup.streamed,
        **kw,
    )
    return {
        "method": method,
        "impl": "dpzo-streamed",
        "autocast": "none",
        "master": "none",
        "ms_per_step": history["ms_per_step"],
        "peak_mb": _peak_mb(setup.device),
        "uploads_per_block": setup.streamed.uploads[0] - before,  # the steps, and the final flush
    }


def _masters(method: str, master: str, dtype: torch.dtype) -> list[str]:
    """Which ways of holding theta to time: in place always; a float32 master where the weights
    are 16-bit (there it is what precision asks for), for dp-zoso."""
    if master == "auto":
        return ["none"] + (["float32"] if method == "dp-zoso" and dtype in (torch.float16, torch.bfloat16) else [])
    return ["none", "float32"] if master == "both" else [master]


def _annotate(runs: list[dict], forward_ms: dict, inference_mb: dict) -> None:
    """Ratio to two forwards (same autocast), speed-up over the official style (same method),
    peak over the inference peak (same autocast)."""
    official = {r["method"]: r["ms_per_step"] for r in runs if r["impl"] == "official-style"}
    resident = {
        r["method"]: r["ms_per_step"]
        for r in runs
        if r["impl"] == "dpzo" and r["autocast"] == "none" and r["master"] == "none"
    }
    for r in runs:
        if r["impl"] == "dpzo-streamed":
            r["streamed_over_resident"] = r["ms_per_step"] / resident[r["method"]] if r["method"] in resident else None
        r["ratio_to_two_forwards"] = r["ms_per_step"] / (2.0 * forward_ms[r["autocast"]])
        r["speedup_vs_official"] = official[r["method"]] / r["ms_per_step"] if r["method"] in official else None
        base = inference_mb.get(r["autocast"])
        r["peak_over_inference"] = r["peak_mb"] / base if r["peak_mb"] is not None and base else None


def _pick(runs: list[dict], **match) -> dict | None:
    for r in runs:
        if r["impl"] == "dpzo" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def evaluate_targets(name: str, record: dict) -> list[dict]:
    """The issue's targets for this model, from the runs of this record (None: not measured)."""
    runs = record["runs"]
    fp = _pick(runs, method="dp-zoso", autocast="none", master="none")
    bf = _pick(runs, method="dp-zoso", autocast="bf16", master="none")
    masked = _pick(runs, method="dp-zopo", autocast="none", master="none")
    streamed = next((r for r in runs if r["impl"] == "dpzo-streamed" and r["method"] == "dp-zoso"), None)
    limit_mb = record.get("streamed_limit_mb")
    dense_runs = [r for r in runs if r["impl"] == "dpzo" and r["method"] == "dp-zoso"]
    fastest = min(dense_runs, key=lambda r: r["ms_per_step"]) if dense_runs else None
    values = {
        "ratio_fp32": fp and fp["ratio_to_two_forwards"],
        "speedup_fp32": fp and fp["speedup_vs_official"],
        "speedup_bf16": bf and bf["speedup_vs_official"],
        "memory_dense": fp and fp["peak_over_inference"],
        "memory_masked": masked and masked["peak_over_inference"],
        "streamed_ratio": streamed and streamed["streamed_over_resident"],
        "streamed_memory": streamed and streamed["peak_mb"] and limit_mb and streamed["peak_mb"] / limit_mb,
        "sst2_minutes": fastest and (fastest["ms_per_step"] * 6000 / 60000.0 if record["batch_size"] == 64 else None),
    }
    out = []
    for label, key, op, limit in TARGETS.get(name, []):
        value = values[key]
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"target": label, "value": value, "limit": f"{op} {limit}", "met": met})
    return out


def bench_model(
    name: str,
    *,
    device: torch.device,
    dtype: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    methods: Sequence[str] = METHODS,
    autocast: Sequence[str] = ("none",),
    master: str = "auto",
    steps: int = 20,
    warmup: int = 3,
    mask_ratio: float = 0.01,
    offload: Sequence[str] = ("none",),
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Measure one model; returns its record (see :func:`run_bench`)."""
    spec = MODELS[name]
    torch_dtype = DTYPES[dtype or spec.dtype]
    b, s = batch_size or spec.batch_size, seq_len or spec.seq_len
    batch = make_batch(spec, batch_size=b, seq_len=s, device=device)
    model = build_model(spec, device=device, dtype=torch_dtype)
    clf = PromptClassifier(model, None, spec.family, None, label_ids=spec.label_ids)
    # Flatten once, in place: every later store adopts this buffer instead of copying the
    # weights (which would also put a second copy into the peak).
    numel = build_store(model, master_dtype=None).numel
    setup = _Setup(name, spec, model, clf, batch, device, torch_dtype, numel=numel)
    if "dp-zopo" in methods:
        setup.mask = random_mask(numel, mask_ratio, device=device)
    # autocast to a 16-bit type changes nothing for weights that are already 16-bit
    autocasts = [a for a in autocast if a == "none" or torch_dtype == torch.float32]
    forward_ms, inference_mb = {}, {}
    for ac in autocasts:
        forward_ms[ac], inference_mb[ac] = time_forward(setup, autocast=ac, steps=steps, warmup=warmup)
        progress(f"{name}: forward ({ac}) {forward_ms[ac]:.2f} ms")
    runs = []
    for method in methods:
        runs.append(time_official(setup, method, steps=steps, warmup=warmup))
        progress(f"{name}: {method} official-style {runs[-1]['ms_per_step']:.2f} ms/step")
        for ac in autocasts:
            for m in _masters(method, master, torch_dtype):
                runs.append(time_dpzo(setup, method, autocast=ac, master=m, steps=steps, warmup=warmup))
                progress(f"{name}: {method} dpzo (autocast {ac}, master {m}) {runs[-1]['ms_per_step']:.2f} ms/step")
                if fused_passes(device):  # the fused kernels are the default here: the block-buffer row beside them
                    runs.append(
                        time_dpzo(setup, method, autocast=ac, master=m, steps=steps, warmup=warmup, fused=False)
                    )
                    progress(f"{name}: {method} dpzo-blocks (autocast {ac}, master {m}) {runs[-1]['ms_per_step']:.2f}")
    sizes = None
    if "streamed" in offload:  # last: it moves the blocks to host memory
        sizes = stream(setup)
        for method in methods:
            runs.append(time_streamed(setup, method, steps=steps, warmup=warmup))
            progress(f"{name}: {method} dpzo streamed (in place) {runs[-1]['ms_per_step']:.2f} ms/step")
    _annotate(runs, forward_ms, inference_mb)
    record = {
        "family": spec.family,
        "parameters": numel,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "batch_size": b,
        "seq_len": s,
        "mask_ratio": mask_ratio if setup.mask is not None else None,
        "mask_size": len(setup.mask) if setup.mask is not None else None,
        "forward_ms": forward_ms,
        "inference_peak_mb": inference_mb,
        "runs": runs,
    }
    if sizes is not None and inference_mb.get("none"):
        # activations of the inference peak (the peak less the weights), then 3 blocks and the
        # resident modules: what the streamed peak may hold
        activations = inference_mb["none"] - sizes["weight_bytes"] / 2**20
        record["streamed_limit_mb"] = (3 * sizes["block_bytes"] + sizes["resident_bytes"]) / 2**20 + activations
        record["block_mb"] = sizes["block_bytes"] / 2**20
    defaults = b == spec.batch_size and s == spec.seq_len and torch_dtype == DTYPES[spec.dtype]
    record["targets"] = evaluate_targets(name, record) if device.type == "cuda" and defaults else []
    del setup, clf, model
    _reset_peak(device)
    return record


def _device_record(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_mb": props.total_memory / 2**20,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return {"type": device.type, "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def run_bench(
    models: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    tf32: bool = True,
    progress: Callable[[str], None] = lambda line: None,
    **settings: Any,
) -> dict:
    """Benchmark ``models``; returns the JSON record.

    ``settings`` are those of :func:`bench_model`.  On CUDA, TF32 matmuls are allowed unless
    ``tf32`` is False (the anchor measurements used TF32).
    """
    import transformers

    device = torch.device(device)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        record = {
            "benchmark": "dpzo bench",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv[1:],
            "device": _device_record(device),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "settings": {
                "beta": BETA,
                "lr": LR,
                "clip": CLIP,
                "sigma": SIGMA,
                "log_every": LOG_EVERY,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
            },
            "models": {},
        }
        for name in models:
            record["models"][name] = bench_model(name, device=device, progress=progress, **settings)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    return record


def summary_lines(record: dict) -> list[str]:
    """A plain-text table of the record, for people."""
    lines = [f"device: {record['device']['name']} ({record['device']['type']})"]
    for name, m in record["models"].items():
        lines.append(
            f"\n{name}: {m['parameters'] / 1e6:.1f}M parameters, {m['dtype']}, batch {m['batch_size']} x {m['seq_len']}"
        )
        for ac, ms in m["forward_ms"].items():
            mem = m["inference_peak_mb"][ac]
            lines.append(f"  forward (autocast {ac}): {ms:.2f} ms" + (f", inference peak {mem:.0f} MiB" if mem else ""))
        lines.append(
            f"  {'method':<8} {'impl':<15} {'autocast':<8} {'master':<8} {'ms/step':>9} {'/2 fwd':>7} {'speed-up':>9} {'peak/inf':>9}"
        )
        for r in m["runs"]:
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            lines.append(
                f"  {r['method']:<8} {r['impl']:<15} {r['autocast']:<8} {str(r['master'] or '-'):<8} "
                f"{r['ms_per_step']:>9.2f} {r['ratio_to_two_forwards']:>7.2f} {fmt(r['speedup_vs_official'], '>8.2f')}x "
                f"{fmt(r['peak_over_inference'], '>9.3f')}"
            )
        for t in m["targets"]:
            status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            value = "-" if t["value"] is None else f"{t['value']:.3f}"
            lines.append(f"  target: {t['target']}: {value} ({t['limit']}) {status}")
    return lines
