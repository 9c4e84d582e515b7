"""A model's grid of runs, z alone, and the JSON record of a benchmark (:func:`run_bench`)."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dpzo.bench.catalogue import MODELS, build_model, make_batch, run_name, split_run
from dpzo.bench.targets import annotate, annotate_z, evaluate_targets, evaluate_z_targets, targets_for
from dpzo.bench.timing import (
    BETA,
    CLIP,
    LOG_EVERY,
    LR,
    METHODS,
    SIGMA,
    Z_REPEATS,
    Setup,
    available_cores,
    num_threads,
    random_mask,
    reset_peak,
    stream,
    time_dpzo,
    time_forward,
    time_official,
    time_streamed,
    time_z,
)
from dpzo.models.classifier import DTYPES, PromptClassifier
from dpzo.zo.flat import fused_passes
from dpzo.zo.precision import tf32_matmuls
from dpzo.zo.store import build_store


def _masters(method: str, master: str, dtype: torch.dtype) -> list[str]:
    """Which ways of holding theta to time: in place always; a float32 master where the weights
    are 16-bit (there it is what precision asks for), for dp-zoso."""
    if master == "auto":
        return ["none"] + (["float32"] if method == "dp-zoso" and dtype in (torch.float16, torch.bfloat16) else [])
    return ["none", "float32"] if master == "both" else [master]


def _prepare(
    name: str, *, device: torch.device, dtype: torch.dtype, batch_size: int, seq_len: int, mask: float | None
) -> Setup:
    """The model built on ``device`` with its batch, flattened once; a random mask of ratio ``mask``."""
    spec = MODELS[name]
    batch = make_batch(spec, batch_size=batch_size, seq_len=seq_len, device=device)
    model = build_model(spec, device=device, dtype=dtype)
    clf = PromptClassifier(model, None, spec.family, None, label_ids=spec.label_ids)
    # Flatten once, in place: every later store adopts this buffer instead of copying
    # the weights (which would also put a second copy into the peak).
    numel = build_store(model, master_dtype=None).numel
    # named by its run (model@BxS): what the progress lines say
    setup = Setup(run_name(name, batch_size, seq_len), spec, model, clf, batch, device, dtype, numel=numel)
    if mask is not None:
        setup.mask = random_mask(numel, mask, device=device)
    return setup


def _resident_runs(
    setup: Setup,
    methods: Sequence[str],
    autocasts: Sequence[str],
    *,
    master: str,
    steps: int,
    warmup: int,
    progress: Callable[[str], None],
) -> list[dict]:
    """Per method: the official style, then dpzo's step per autocast and way of holding theta
    (and, where the fused Triton kernels are the default, the block-buffer passes beside them)."""
    name, runs = setup.name, []
    for method in methods:
        runs.append(time_official(setup, method, steps=steps, warmup=warmup))
        progress(f"{name}: {method} official-style {runs[-1]['ms_per_step']:.2f} ms/step")
        for ac in autocasts:
            for m in _masters(method, master, setup.dtype):
                runs.append(time_dpzo(setup, method, autocast=ac, master=m, steps=steps, warmup=warmup))
                progress(f"{name}: {method} dpzo (autocast {ac}, master {m}) {runs[-1]['ms_per_step']:.2f} ms/step")
                if setup.device.type == "cuda" and fused_passes(setup.device):
                    # the Triton kernels are the default here: the block-buffer row beside them (on
                    # the CPU the torch passes are the emulated z, 15x slower: z alone shows that)
                    runs.append(
                        time_dpzo(setup, method, autocast=ac, master=m, steps=steps, warmup=warmup, fused=False)
                    )
                    progress(f"{name}: {method} dpzo-blocks (autocast {ac}, master {m}) {runs[-1]['ms_per_step']:.2f}")
    return runs


def _streamed_runs(
    setup: Setup, methods: Sequence[str], *, steps: int, warmup: int, progress: Callable[[str], None]
) -> tuple[list[dict], dict]:
    """The blocks moved to host memory (so: after every resident run), then each method streamed;
    also the sizes the streamed peak is compared with."""
    sizes = stream(setup)
    runs = []
    for method in methods:
        runs.append(time_streamed(setup, method, steps=steps, warmup=warmup))
        progress(f"{setup.name}: {method} dpzo streamed (in place) {runs[-1]['ms_per_step']:.2f} ms/step")
    return runs, sizes


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
    mask = mask_ratio if "dp-zopo" in methods else None
    setup = _prepare(name, device=device, dtype=torch_dtype, batch_size=b, seq_len=s, mask=mask)
    # autocast to a 16-bit type changes nothing for weights that are already 16-bit
    autocasts = [a for a in autocast if a == "none" or torch_dtype == torch.float32]
    forward_ms, inference_mb = {}, {}
    for ac in autocasts:
        forward_ms[ac], inference_mb[ac] = time_forward(setup, autocast=ac, steps=steps, warmup=warmup)
        progress(f"{setup.name}: forward ({ac}) {forward_ms[ac]:.2f} ms")
    runs = _resident_runs(setup, methods, autocasts, master=master, steps=steps, warmup=warmup, progress=progress)
    sizes = None
    if "streamed" in offload:  # last: it moves the blocks to host memory
        streamed, sizes = _streamed_runs(setup, methods, steps=steps, warmup=warmup, progress=progress)
        runs += streamed
    annotate(runs, forward_ms, inference_mb)
    record = {
        "family": spec.family,
        "parameters": setup.numel,
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
    if device.type == "cpu":
        record["threads"] = torch.get_num_threads()
    table = targets_for(
        name,
        device_type=device.type,
        shape=(b, s),
        default_shape=(b, s) == (spec.batch_size, spec.seq_len),
        default_dtype=torch_dtype == DTYPES[spec.dtype],
        threads=torch.get_num_threads(),
    )
    record["targets"] = evaluate_targets(table, record)
    del setup  # the model and its classifier with it, before the peak is reset
    reset_peak(device)
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


def z_alone(numel: int, *, repeats: int = Z_REPEATS, progress: Callable[[str], None] = lambda line: None) -> dict:
    """z alone on the CPU (:func:`dpzo.bench.timing.time_z`) on one thread and on every core this
    process may use, with its ratios and target."""
    z = time_z(numel, threads=sorted({1, available_cores()}), repeats=repeats)
    annotate_z(z)
    z["targets"] = evaluate_z_targets(z)
    for r in z["rows"]:
        progress(f"z alone, {r['threads']} thread(s): philox/randn {r['philox_over_randn']:.3f}")
    return z


def run_bench(
    models: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    tf32: bool = True,
    threads: int | None = None,
    z_numel: int = 0,
    z_repeats: int = Z_REPEATS,
    progress: Callable[[str], None] = lambda line: None,
    **settings: Any,
) -> dict:
    """Benchmark ``models``; returns the JSON record.

    Each of ``models`` is a run: a model of the catalogue, or ``name@BxS`` for that model at batch
    B x S tokens (which takes precedence over ``batch_size`` and ``seq_len``); the record's
    ``models`` is keyed by run.  ``settings`` are those of :func:`bench_model`.  On CUDA, TF32
    matmuls are allowed unless ``tf32`` is False (the anchor measurements used TF32): the switch
    of a cell's config ``tf32`` (:func:`dpzo.zo.precision.tf32_matmuls`), with the same default.
    ``threads`` sets torch's intra-op threads for the model runs (None: as they are).  With
    ``z_numel`` > 0, z alone is timed first on a CPU vector of that many coordinates
    (:func:`z_alone`; ``z_throughput`` in the record, else None).
    """
    import transformers

    device = torch.device(device)
    runs = {run: split_run(run) for run in models}  # ValueError on an unknown model or shape
    z = z_alone(z_numel, repeats=z_repeats, progress=progress) if z_numel > 0 else None
    with tf32_matmuls(tf32), num_threads(threads):  # what a cell's config `tf32` switches (same default)
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
                "tf32": bool(tf32),
                "threads": threads,
                "z_numel": z_numel,
                "z_repeats": z_repeats,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
            },
            "z_throughput": z,
            "models": {},
        }
        for run, (name, b, s) in runs.items():
            shape = {"batch_size": b, "seq_len": s} if b is not None else {}
            record["models"][run] = bench_model(name, device=device, progress=progress, **(settings | shape))
    return record
