"""Command-line interface: ``dpzo <subcommand> ...`` (also ``python -m dpzo``).

Adding a subcommand: write ``_add_<name>(subparsers)`` that builds its parser and sets
``handler=<function taking the parsed args and returning an exit code>``, then append it
to ``_SUBCOMMANDS``.  Conventions: results go to stdout as one JSON object; errors go to
stderr as ``dpzo <name>: error: ...`` naming the offending argument, with exit code 2
(argparse's own code for usage errors) and nothing on stdout.

Heavy modules (dp_accounting, torch, ...) are imported inside handlers so ``dpzo --help``
stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dpzo.privacy.accountants import DEFAULT_PLD_DISCRETIZATION

EXIT_OK = 0
EXIT_USAGE = 2


# --------------------------------------------------------------------------------------
# argparse value types: each error names the expected range; argparse prefixes the flag
# --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _nonnegative_float_or_inf(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'inf', got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (or 'inf' for no privacy), got {text!r}")
    return value


def _positive_float_or_inf(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _open_unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not (0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(
            f"must satisfy 0 < value < 1, got {text!r} (delta is usually below 1/n, e.g. 1e-5)"
        )
    return value


def _fail(command: str, message: str) -> int:
    """Report a usage problem the way argparse does, without exiting the interpreter."""
    print(f"dpzo {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _print_json(obj: Any) -> None:
    # allow_nan=False: emit strict JSON (records spell infinity as "inf").
    print(json.dumps(obj, indent=2, allow_nan=False))


# --------------------------------------------------------------------------------------
# dpzo calibrate
# --------------------------------------------------------------------------------------


def _add_calibrate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="find the noise multiplier for a privacy budget and print the accounting record",
        description=(
            "Calibrate the smallest noise multiplier sigma such that T*P Poisson-subsampled "
            "Gaussian releases (q = batch-size/n) are (epsilon, delta)-DP under add/remove-one "
            "neighbouring. Prints one JSON object (the accounting record, incl. 'sigma')."
        ),
    )
    p.add_argument("--n", type=_positive_int, required=True, help="number of training examples")
    p.add_argument("--batch-size", type=_positive_int, required=True, help="expected (Poisson) batch size B; q = B/n")
    p.add_argument("--steps", type=_positive_int, required=True, help="training steps T")
    p.add_argument(
        "--epsilon", type=_nonnegative_float_or_inf, required=True, help="target epsilon ('inf': non-private, sigma 0)"
    )
    p.add_argument("--delta", type=_open_unit_interval, required=True, help="target delta, in (0, 1)")
    p.add_argument("--directions", type=_positive_int, default=1, help="perturbation directions per step P (default 1)")
    p.add_argument(
        "--clip",
        type=_positive_float_or_inf,
        default=1.0,
        help="clipping threshold C (default 1.0; sigma does not depend on it)",
    )
    p.add_argument(
        "--accountant",
        choices=("pld", "prv", "rdp"),
        default="pld",
        help="accountant used for calibration (default pld)",
    )
    p.add_argument(
        "--pld-discretization",
        type=_open_unit_interval,
        default=DEFAULT_PLD_DISCRETIZATION,
        help=f"PLD value discretization (default {DEFAULT_PLD_DISCRETIZATION:g}, the pipeline's; smaller is tighter and slower)",
    )
    p.set_defaults(handler=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.batch_size > args.n:
        return _fail(
            "calibrate",
            f"argument --batch-size: must not exceed --n ({args.n}), got {args.batch_size}; "
            "use a batch size no larger than the training set",
        )
    from dpzo.privacy import records

    try:
        record = records.accounting_record(
            n=args.n,
            batch_size=args.batch_size,
            steps=args.steps,
            directions=args.directions,
            clip=args.clip,
            epsilon_target=args.epsilon,
            delta=args.delta,
            accountant=args.accountant,
            pld_discretization=args.pld_discretization,
        )
    except ValueError as err:  # e.g. an unreachable target
        return _fail("calibrate", str(err))
    except (RuntimeError, FloatingPointError, OverflowError) as err:  # raised inside an accountant library
        return _fail(
            "calibrate",
            f"the {args.accountant} accountant failed at these settings ({type(err).__name__}: {err}); "
            "try another accountant ("
            + ("--accountant rdp" if args.accountant == "pld" else "--accountant pld, the pipeline's default")
            + ")",
        )
    _print_json(record)
    return EXIT_OK


# --------------------------------------------------------------------------------------
# dpzo audit
# --------------------------------------------------------------------------------------


def _trials(text: str) -> int:
    value = _positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"must be at least 16 (half of the runs carry the canary), got {value}")
    return value


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not (0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(f"must satisfy 0 < value < 1 (e.g. 0.95), got {text!r}")
    return value


def _add_audit(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "audit",
        help="measure an empirical lower bound on epsilon (canary + likelihood-ratio attack)",
        description=(
            "Run the zeroth-order trainer's release sequence many times with and without a canary "
            "and turn the success of a likelihood-ratio attack on the released scalars into an "
            "epsilon lower bound (Clopper-Pearson). Audit a cell's ledger (--ledger privacy.json) "
            "or the dp-zoso release that --n/--batch-size/--steps/--epsilon/--delta calibrate. "
            "Prints one JSON object; --out also writes it to a file."
        ),
    )
    p.add_argument("--ledger", help="a cell's privacy.json (results/runs/.../privacy.json)")
    p.add_argument("--n", type=_positive_int, help="number of training examples (without --ledger)")
    p.add_argument("--batch-size", type=_positive_int, help="expected (Poisson) batch size B (without --ledger)")
    p.add_argument("--steps", type=_positive_int, help="training steps T (without --ledger)")
    p.add_argument("--epsilon", type=_nonnegative_float_or_inf, help="claimed epsilon; 'inf' audits sigma = 0")
    p.add_argument("--delta", type=_open_unit_interval, help="delta of the claim (without --ledger)")
    p.add_argument("--directions", type=_positive_int, default=1, help="directions per step P (default 1)")
    p.add_argument("--trials", type=_trials, default=10000, help="runs, half with the canary (default 10000)")
    p.add_argument("--confidence", type=_confidence, default=0.95, help="confidence of the bound (default 0.95)")
    p.add_argument("--out", help="also write the record to this file (atomically)")
    p.set_defaults(handler=_cmd_audit)


_AUDIT_CLAIM = ("n", "batch_size", "steps", "epsilon", "delta")


def _audit_ledger(args: argparse.Namespace) -> dict | str:
    """The ledger to audit, or an error message naming the arguments to fix."""
    given = [f"--{name.replace('_', '-')}" for name in _AUDIT_CLAIM if getattr(args, name) is not None]
    if args.ledger is not None:
        if given:
            return f"argument --ledger: not allowed with {', '.join(given)} (the ledger already fixes them)"
        from pathlib import Path

        path = Path(args.ledger)
        if not path.is_file():
            return f"argument --ledger: {path} not found; give the privacy.json of a private zeroth-order cell"
        try:
            ledger = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"argument --ledger: {path} is not a JSON ledger ({err}); re-create it with the account rule"
        return ledger
    missing = [f"--{name.replace('_', '-')}" for name in _AUDIT_CLAIM if getattr(args, name) is None]
    if missing:
        return f"the following arguments are required without --ledger: {', '.join(missing)}"
    if args.batch_size > args.n:
        return f"argument --batch-size: must not exceed --n ({args.n}), got {args.batch_size}"
    from dpzo.privacy.records import method_ledger

    clip = 1.0  # the bound does not depend on C: everything scales with it
    try:
        return method_ledger(
            "dp-zoso",
            n=args.n,
            batch_size=args.batch_size,
            steps=args.steps,
            directions=args.directions,
            clip=clip,
            epsilon_target=args.epsilon,
            delta=args.delta,
        )
    except ValueError as err:  # e.g. an unreachable target
        return str(err)


def _cmd_audit(args: argparse.Namespace) -> int:
    ledger = _audit_ledger(args)
    if isinstance(ledger, str):
        return _fail("audit", ledger)
    from dpzo.privacy.audit import AuditError, audit

    try:
        record = audit(ledger, trials=args.trials, confidence=args.confidence)
    except AuditError as err:
        return _fail("audit", f"argument --ledger: {err}" if args.ledger else str(err))
    if args.out:
        from pathlib import Path

        from dpzo.fileio import write_json_atomic

        write_json_atomic(Path(args.out), record)
    _print_json(record)
    return EXIT_OK


# --------------------------------------------------------------------------------------
# dpzo bench
# --------------------------------------------------------------------------------------


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def _add_bench(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time the zeroth-order step against the released code's style, side by side",
        description=(
            "Build models from their configs with random weights (no download), run the released "
            "code's style of DP-ZO step and dpzo's on the same batch, and print one JSON object with "
            "ms/step, the ratio to two forward passes, the speed-up and the peak GPU memory of each "
            "method (a readable table goes to stderr). See docs/benchmarks.md."
        ),
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available; default)")
    p.add_argument(
        "--models",
        type=_names,
        default=None,
        help="comma-separated, from roberta-large, opt-2.7b, tiny-roberta, tiny-opt "
        "(default: the first two on cuda, the tiny ones on cpu)",
    )
    p.add_argument(
        "--methods",
        type=_names,
        default=["dp-zoso", "dp-zopo", "mezo"],
        help="comma-separated, from dp-zoso, dp-zopo, mezo (default: all three)",
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
    p.add_argument(
        "--steps", type=_positive_int, default=None, help="timed steps per run (default 20 on cuda, 3 on cpu)"
    )
    p.add_argument(
        "--warmup", type=_nonnegative_int, default=None, help="untimed steps first (default 3 on cuda, 1 on cpu)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, help="batch size (default: the model's: 64, 16, 8)"
    )
    p.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per example (default: 128, 256, 32)")
    p.add_argument(
        "--mask-ratio",
        type=_open_unit_interval,
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
        "--no-tf32", action="store_true", help="on cuda, run float32 matmuls in full float32 (default: TF32 allowed)"
    )
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch  # lazy: keeps `dpzo --help` fast

    from dpzo import bench
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
        return _fail("bench", f"argument --device: expected cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        return _fail("bench", f"argument --device: expected cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(
            "bench", "argument --device: CUDA is not available on this machine; use --device cpu (tiny models)"
        )
    gpu = device.type == "cuda"
    if args.quick:  # what the command line leaves unset
        args.models = args.models or (["roberta-large", "opt-2.7b"] if gpu else ["tiny-roberta", "tiny-opt"])
        args.methods = [m for m in args.methods if m != "mezo"] or args.methods
        args.steps, args.warmup = args.steps or 10, 2 if args.warmup is None else args.warmup
    models = args.models or (["roberta-large", "opt-2.7b"] if gpu else ["tiny-roberta", "tiny-opt"])
    checks = [
        ("--models", models, bench.MODELS),
        ("--methods", args.methods, bench.METHODS),
        ("--autocast", args.autocast or [], bench.AUTOCAST),
        ("--offload", args.offload, ("none", "streamed")),
    ]
    for flag, given, allowed in checks:
        unknown = [x for x in given if x not in allowed]
        if unknown:
            return _fail("bench", f"argument {flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    if args.out is not None and os.path.isdir(args.out):
        return _fail("bench", f"argument --out: {args.out!r} is a directory; give a file name such as bench.json")
    try:
        record = bench.run_bench(
            models,
            device=device,
            tf32=not args.no_tf32,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            dtype=None if args.dtype == "auto" else args.dtype,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            methods=args.methods,
            autocast=args.autocast or (["none", "bf16"] if gpu else ["none"]),
            master=args.master,
            steps=args.steps or (20 if gpu else 3),
            warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
            mask_ratio=args.mask_ratio,
            offload=args.offload,
        )
    except ValueError as err:  # e.g. a sequence longer than the model's positions
        return _fail("bench", str(err))
    print("\n".join(bench.summary_lines(record)), file=sys.stderr)
    if args.out is not None:
        write_json_atomic(args.out, record)
    _print_json(record)
    return EXIT_OK


# --------------------------------------------------------------------------------------
# dpzo accept-retry
# --------------------------------------------------------------------------------------


def _add_accept_retry(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "accept-retry",
        help="accept, on the record, a run of a private cell that its attempt log refuses",
        description=(
            "A private cell refuses to start again unchanged after a failure that depended on its data, and "
            "refuses an attempt log that was edited, cut short or deleted. This appends a signed acknowledgement "
            "(time, user, host, reason) to the cell's attempt log; the next run then starts, and its metrics.json "
            "and the privacy table show the acknowledgement. An unverifiable log is moved aside "
            "(attempts.rejected.<time>.jsonl) and a new one starts with the acknowledgement."
        ),
    )
    p.add_argument(
        "cell",
        help="the cell: results/runs/<model>/<task>/<method>/eps<e>/seed<s> (or its metrics.json), or its "
        "results/checkpoints/... folder",
    )
    p.add_argument("--reason", required=True, help="why the unaccounted run is accepted (published with the result)")
    p.set_defaults(handler=_cmd_accept_retry)


def _cmd_accept_retry(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dpzo.pipeline.cellguard import AttemptLog, NothingToAccept

    path = Path(args.cell)
    if path.name in ("metrics.json", "attempts.jsonl", "privacy.json"):
        path = path.parent
    parts = list(path.parts)
    if len(parts) < 6 or parts[-6] not in ("runs", "checkpoints"):
        return _fail(
            "accept-retry",
            f"argument cell: {args.cell!r} is not a cell folder; give results/runs/<model>/<task>/<method>/eps<e>/"
            "seed<s> (the folder of the cell's metrics.json) or its results/checkpoints/... folder",
        )
    parts[-6] = "checkpoints"  # the attempt log lives beside the cell's snapshot
    log = AttemptLog(Path(*parts) / "attempts.jsonl")
    try:
        record = log.accept(args.reason)
    except NothingToAccept as err:
        return _fail("accept-retry", str(err))
    except ValueError as err:
        return _fail("accept-retry", f"argument --reason: {err}")
    _print_json({"attempt_log": str(log.path), **record})
    return EXIT_OK


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------

_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_calibrate, _add_audit, _add_bench, _add_accept_retry]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of ``_SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(prog="dpzo", description="Differentially private zeroth-order fine-tuning tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    subparsers.metavar = "{" + ",".join(subparsers.choices) + "}"  # so a missing command lists them
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed help (code 0) or the usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
