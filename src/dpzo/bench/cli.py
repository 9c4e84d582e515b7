"""``dpzo bench``: its argument parser and handler (:func:`add_bench`, registered by :mod:`dpzo.cli`).

Torch and the benchmark's modules are imported inside the handler, so ``dpzo --help`` stays
instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dpzo.cliargs import EXIT_OK, fail, nonnegative_int, open_unit_interval, positive_int, print_json


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


#: what ``--quick`` runs: the issue's GPU check in a few minutes (the tiny stand-ins on the CPU)
QUICK_STEPS, QUICK_WARMUP = 10, 2


#: the CPU stand-ins of ``--quick`` (CI's models)
TINY_MODELS = ["tiny-roberta", "tiny-opt"]


def default_models(gpu: bool, *, quick: bool = False) -> list[str]:
    """The runs of a plain or ``--quick`` run: RoBERTa-large and OPT-2.7B on a GPU; on the CPU the
    CPU targets' runs (:func:`dpzo.bench.targets.cpu_runs`: opt-125m and roberta-base at each
    target's batch shape), or with ``--quick`` the tiny stand-ins."""
    if gpu:
        return ["roberta-large", "opt-2.7b"]
    if quick:
        return list(TINY_MODELS)
    from dpzo.bench.targets import cpu_runs  # lazy: loads torch

    return cpu_runs()


def default_methods(cpu_targets: bool) -> list[str]:
    """All three methods; in the CPU target run, the ones its targets read (dp-zoso)."""
    from dpzo.bench.targets import CPU_TARGET_METHODS
    from dpzo.bench.timing import METHODS

    return list(CPU_TARGET_METHODS if cpu_targets else METHODS)


def default_autocast(gpu: bool) -> list[str]:
    """dpzo's step on float32 weights without autocast, and with bf16 autocast on a GPU."""
    return ["none", "bf16"] if gpu else ["none"]


def quick_methods(methods: list[str]) -> list[str]:
    """``--quick`` times the private methods only (MeZO left out)."""
    return [m for m in methods if m != "mezo"] or methods


def add_bench(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time the zeroth-order step against the released code's style, side by side",
        description=(
            "Build models from their configs with random weights (no download), run the released "
            "code's style of DP-ZO step and dpzo's on the same batch, and print one JSON object with "
            "ms/step, the ratio to two forward passes, the speed-up and the peak GPU memory of each "
            "method (a readable table goes to stderr); on the CPU, also z alone (Philox against "
            "torch.randn per thread count). See docs/benchmarks.md."
        ),
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available; default)")
    p.add_argument(
        "--models",
        type=_names,
        default=None,
        help="comma-separated runs, each a model of the catalogue (roberta-large, opt-2.7b, opt-125m, "
        "roberta-base, tiny-roberta, tiny-opt, ...) or MODEL@BxS at batch B x S tokens (default: "
        "roberta-large,opt-2.7b on cuda; on cpu the CPU targets' runs opt-125m@8x64, opt-125m@16x128, "
        "roberta-base@8x64, roberta-base@16x128, or with --quick tiny-roberta,tiny-opt)",
    )
    p.add_argument(
        "--methods",
        type=_names,
        default=None,
        help="comma-separated, from dp-zoso, dp-zopo, mezo (default: all three; dp-zoso alone in the "
        "CPU target run, which is --device cpu without --models or --quick)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weight dtype (auto: float32 for RoBERTa, float16 for OPT)",
    )
    p.add_argument(
        "--autocast",
        type=_names,
        default=None,
        help="comma-separated, from none, bf16, fp16: autocast settings of dpzo's step on float32 "
        "weights (default: none,bf16 on cuda, none on cpu)",
    )
    p.add_argument(
        "--master",
        choices=("auto", "none", "float32", "both"),
        default="auto",
        help="how dpzo holds theta: in place (none), a float32 master copy, both; auto: in place, plus "
        "a float32 master for dp-zoso on 16-bit weights",
    )
    _add_run_options(p)
    p.set_defaults(handler=_cmd_bench)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """How each run goes: steps, batch, threads, z alone, the output file."""
    p.add_argument(
        "--steps", type=positive_int, default=None, help="timed steps per run (default 20 on cuda, 3 on cpu)"
    )
    p.add_argument(
        "--warmup", type=nonnegative_int, default=None, help="untimed steps first (default 3 on cuda, 1 on cpu)"
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: the model's: 64, 16, 8)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per example (default: 128, 256, 32)")
    p.add_argument(
        "--mask-ratio",
        type=open_unit_interval,
        default=0.01,
        help="dp-zopo's fraction of trained coordinates (default 0.01)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the issue's GPU check in a few minutes: roberta-large (fp32/TF32 and bf16 autocast) and "
        "opt-2.7b (fp16, in place and with the float32 master), dp-zoso and dp-zopo at 1 %%, 10 timed steps",
    )
    p.add_argument(
        "--offload",
        type=_names,
        default=["none"],
        help="comma-separated, from none, streamed: also time the methods with the blocks streamed from "
        "host memory (in place), after the resident runs (default: none)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch's intra-op threads for the model runs (default 1 on cpu, where the CPU targets are "
        "stated; as torch sets them on cuda)",
    )
    p.add_argument(
        "--z-numel",
        type=nonnegative_int,
        default=None,
        help="time z alone first: dpzo.zo.philox.normal_ against torch.randn filling a CPU float32 "
        "vector of this many coordinates, on 1 thread and on every core (default 33554432 in the CPU "
        "target run, else 0: not timed)",
    )
    p.add_argument(
        "--no-tf32", action="store_true", help="on cuda, run float32 matmuls in full float32 (default: TF32 allowed)"
    )
    p.add_argument("--out", default=None, help="also write the JSON to this file")


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch  # lazy: keeps `dpzo --help` fast

    from dpzo.bench import catalogue, run, targets, timing
    from dpzo.fileio import write_json_atomic

    try:
        device = torch.device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else "cpu"
            if args.device == "auto"
            else args.device
        )
    except RuntimeError:
        return fail("bench", f"argument --device: expected cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        return fail("bench", f"argument --device: expected cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("bench", "argument --device: CUDA is not available on this machine; use --device cpu")
    gpu = device.type == "cuda"
    cpu_targets = not gpu and not args.models and not args.quick  # the CPU target run
    args.methods = args.methods or default_methods(cpu_targets)
    if args.quick:  # what the command line leaves unset
        args.methods = quick_methods(args.methods)
        args.steps = args.steps or QUICK_STEPS
        args.warmup = QUICK_WARMUP if args.warmup is None else args.warmup
    models = args.models or default_models(gpu, quick=args.quick)
    checks = [
        ("--models", [label.partition("@")[0] for label in models], catalogue.MODELS),
        ("--methods", args.methods, timing.METHODS),
        ("--autocast", args.autocast or [], timing.AUTOCAST),
        ("--offload", args.offload, ("none", "streamed")),
    ]
    for flag, given, allowed in checks:
        unknown = [x for x in given if x not in allowed]
        if unknown:
            return fail("bench", f"argument {flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    for label in models:
        try:
            catalogue.split_run(label)
        except ValueError as err:
            return fail("bench", f"argument --models: {err}")
    if args.out is not None and os.path.isdir(args.out):
        return fail("bench", f"argument --out: {args.out!r} is a directory; give a file name such as bench.json")
    try:
        record = run.run_bench(
            models,
            device=device,
            tf32=not args.no_tf32,
            threads=args.threads or (None if gpu else targets.CPU_TARGET_THREADS),
            z_numel=args.z_numel if args.z_numel is not None else (timing.Z_NUMEL if cpu_targets else 0),
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            dtype=None if args.dtype == "auto" else args.dtype,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            methods=args.methods,
            autocast=args.autocast or default_autocast(gpu),
            master=args.master,
            steps=args.steps or (20 if gpu else 3),
            warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
            mask_ratio=args.mask_ratio,
            offload=args.offload,
        )
    except ValueError as err:  # e.g. a sequence longer than the model's positions
        return fail("bench", str(err))
    print("\n".join(targets.summary_lines(record)), file=sys.stderr)
    if args.out is not None:
        write_json_atomic(args.out, record)
    print_json(record)
    return EXIT_OK
