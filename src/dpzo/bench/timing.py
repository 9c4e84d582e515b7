"""One timed run of each kind: a forward, the official-style step, dpzo's step, the streamed step,
and z alone (:func:`time_z`: Philox's normals against ``torch.randn``'s, per thread count).

Every run shares a :class:`Setup` (one model on one device with its batch) and the step settings
below.  Each kind runs three times: a warm-up, a tracked run of :data:`TRACKED_STEPS` steps under
:func:`dpzo.zo.cost.measure` (the peak of live tensor bytes on the device, bytes copied between
host and device, host waits; on every device), and the timed run, without the tracker.  ``peak_mb``
is the CUDA allocator's peak on a GPU and the tracked peak elsewhere.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpzo.bench.catalogue import BenchModel
from dpzo.bench.official import official_style_train
from dpzo.masks.settings import Mask
from dpzo.methods import ZO, base_method
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.models.classifier import DTYPES, PromptClassifier, to_device
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.cost import measure
from dpzo.zo.loop import train_zo

METHODS = ("dp-zoso", "dp-zopo", "mezo")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Step settings of every run.  They do not change the cost of a step; the learning rate is
# small so that repeated runs leave the random weights where they were.
BETA = 1e-3
LR = 1e-6
CLIP = 1.0
SIGMA = 1.0  # noise multiplier: N(0, (sigma C)^2) on the clipped sum
LOG_EVERY = 10
#: steps of the tracked run: its host waits per step include the run's closing log line
TRACKED_STEPS = 2

#: z alone: coordinates of the float32 vector (2**25: 128 MiB, far beyond every cache) and the
#: timed fills per implementation and thread count, of which the fastest counts
Z_NUMEL = 1 << 25
Z_REPEATS = 3
#: coordinates of the untimed fill before each implementation's timed ones (a first call's setup)
Z_WARMUP_NUMEL = 1 << 16


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
def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS (macOS, Windows)
        return os.cpu_count() or 1


@contextlib.contextmanager
def num_threads(threads: int | None):
    """Torch's intra-op threads set to ``threads`` (None: left as they are), restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device, tracked: dict) -> float:
    """Peak allocated GPU memory since the last reset; elsewhere the tracked peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return tracked["tracked_peak_mb"]


def _tracked(setup: Setup, run: Callable[[int], Any], steps: int = TRACKED_STEPS) -> dict:
    """``run(steps)`` under :func:`dpzo.zo.cost.measure`, the weights and the batch counted as live:
    its peak on the setup's device, and the bytes copied and host waits per step.  A streamed
    store's host copies count as host memory (they are where the CPU is the only device)."""
    host = setup.streamed.host_tensors() if setup.streamed is not None else ()
    cost, _ = measure(lambda: run(steps), setup.model, setup.batch.values(), host=host)
    tracked = cost.per_step(setup.device, steps)
    return {"tracked_peak_mb": tracked.pop("peak_mb"), **tracked}


def _autocast(device: torch.device, name: str):
    dtype = AUTOCAST[name]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Setup:
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


def time_forward(setup: Setup, *, autocast: str, steps: int, warmup: int) -> tuple[float, float]:
    """(ms per batched forward of the per-example losses, peak MiB of inference)."""

    def forwards(n: int) -> None:
        with torch.no_grad(), _autocast(setup.device, autocast):
            for _ in range(n):
                setup.clf.per_example_loss(setup.batch)

    forwards(warmup)
    reset_peak(setup.device)
    tracked = _tracked(setup, forwards, 1)
    _sync(setup.device)
    started = time.perf_counter()
    forwards(steps)
    _sync(setup.device)
    return 1000.0 * (time.perf_counter() - started) / steps, _peak_mb(setup.device, tracked)


def time_official(setup: Setup, method: str, *, steps: int, warmup: int) -> dict:
    """The released code's style in the model's own dtype, without autocast (as it runs)."""

    def logits_and_labels(index):
        batch = rows(setup.batch, index)
        return setup.clf.label_logits(batch), batch["labels"]

    kw = dict(method=method, run_seed=0, masks=setup.masks(method), **setup.privacy(method))

    def run(n: int) -> dict:
        return official_style_train(
            setup.model, logits_and_labels, setup.batch_size, setup.hyperparameters(method, n), **kw
        )

    if warmup:
        run(warmup)
    reset_peak(setup.device)
    tracked = _tracked(setup, run)
    timed = run(steps)
    return {
        "method": method,
        "impl": "official-style",
        "autocast": "none",
        "master": None,
        "ms_per_step": timed["ms_per_step"],
        "peak_mb": _peak_mb(setup.device, tracked),
        **tracked,
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
    setup: Setup, method: str, *, autocast: str, master: str, steps: int, warmup: int, fused: bool = True
) -> dict:
    """:func:`dpzo.zo.loop.train_zo` on the same batch (a warm-up call, then a timed call).

    ``fused`` False times the block-buffer passes where the fused Triton ones are the default
    (``impl: dpzo-blocks``)."""
    ctx = lambda: _autocast(setup.device, autocast)  # noqa: E731

    def per_example_loss(index):
        with ctx():
            return setup.clf.per_example_loss(rows(setup.batch, index))

    kw = dict(
        method=method,
        run_seed=0,
        masks=setup.masks(method),
        master_dtype=None if master == "none" else DTYPES[master],
        **setup.privacy(method),
    )

    def run(n: int) -> dict:
        return train_zo(setup.model, per_example_loss, setup.batch_size, setup.hyperparameters(method, n), **kw)

    with _passes(fused):
        if warmup:
            run(warmup)
        reset_peak(setup.device)
        tracked = _tracked(setup, run)
        history = run(steps)
    return {
        "method": method,
        "impl": "dpzo" if fused else "dpzo-blocks",
        "autocast": autocast,
        "master": master,
        "ms_per_step": history["ms_per_step"],
        "peak_mb": _peak_mb(setup.device, tracked),
        **tracked,
    }


def stream(setup: Setup) -> dict:
    """Move the model's blocks to host memory for streamed runs (in place: ZO2's setting);
    returns the bytes the limit on the streamed peak is made of."""
    from dpzo.zo.store import build_store
    from dpzo.zo.streamed import find_blocks

    blocks = find_blocks(setup.model)
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    all_bytes = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    in_blocks = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    setup.model.to("cpu")
    reset_peak(setup.device)
    setup.streamed = build_store(setup.model, master_dtype=None, offload="streamed", device=setup.device)
    return {"block_bytes": block_bytes, "resident_bytes": all_bytes - in_blocks, "weight_bytes": all_bytes}


def time_streamed(setup: Setup, method: str, *, steps: int, warmup: int) -> dict:
    """:func:`dpzo.zo.loop.train_zo` on the streamed model (in place), on the same batch."""

    def per_example_loss(index):
        return setup.clf.per_example_loss(rows(setup.batch, index))

    kw = dict(method=method, run_seed=0, masks=setup.masks(method), master_dtype=None, **setup.privacy(method))

    def run(n: int) -> dict:
        hp = setup.hyperparameters(method, n)
        return train_zo(setup.model, per_example_loss, setup.batch_size, hp, store=setup.streamed, **kw)

    if warmup:
        run(warmup)
    reset_peak(setup.device)
    tracked = _tracked(setup, run)
    before = setup.streamed.uploads[0]
    history = run(steps)
    return {
        "method": method,
        "impl": "dpzo-streamed",
        "autocast": "none",
        "master": "none",
        "ms_per_step": history["ms_per_step"],
        "peak_mb": _peak_mb(setup.device, tracked),
        **tracked,
        "uploads_per_block": setup.streamed.uploads[0] - before,  # the steps, and the final flush
    }


def _philox_fill(out: torch.Tensor) -> None:
    from dpzo.zo import philox

    philox.normal_(out, 0, 0)


def _randn_fill(out: torch.Tensor) -> None:
    torch.randn(out.numel(), out=out)


#: z alone: the implementations :func:`time_z` compares, each filling a 1-D float32 CPU tensor
Z_FILLS: dict[str, Callable[[torch.Tensor], None]] = {"philox": _philox_fill, "randn": _randn_fill}


def normals_per_s(fill: Callable[[torch.Tensor], None], out: torch.Tensor, *, repeats: int) -> float:
    """Normals per second of ``fill(out)``: the fastest of ``repeats`` timed fills, after an untimed
    fill of a short prefix (a first call's setup is not timed)."""
    fill(out[:Z_WARMUP_NUMEL])
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fill(out)
        best = min(best, time.perf_counter() - started)
    return out.numel() / best


def time_z(numel: int, *, threads: Sequence[int], repeats: int) -> dict:
    """z alone on the CPU: ``dpzo.zo.philox.normal_`` (seed 0 from index 0) and ``torch.randn``
    filling the same float32 vector of ``numel`` coordinates, on each thread count, side by side."""
    out = torch.empty(numel, dtype=torch.float32)
    rows = []
    for t in threads:
        with num_threads(t):
            rows.append(
                {"threads": t}
                | {f"{k}_normals_per_s": normals_per_s(f, out, repeats=repeats) for k, f in Z_FILLS.items()}
            )
    return {"device": "cpu", "numel": numel, "dtype": "float32", "repeats": repeats, "rows": rows}
