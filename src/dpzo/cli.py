"""Command-line interface: ``dpzo <subcommand> ...`` (also ``python -m dpzo``).

Adding a subcommand: write ``_add_<name>(subparsers)`` that builds its parser and sets
``handler=<function taking the parsed args and returning an exit code>``, then append it
to ``_SUBCOMMANDS`` (a subcommand that belongs to a package may live there, as
:func:`dpzo.bench.cli.add_bench` does).  Conventions (:mod:`dpzo.cliargs`, with the shared
argument types): results go to stdout as one JSON object; errors go to stderr as
``dpzo <name>: error: ...`` naming the offending argument, with exit code 2 (argparse's own
code for usage errors) and nothing on stdout.

Heavy modules (dp_accounting, torch, ...) are imported inside handlers so ``dpzo --help``
stays instant.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from dpzo.bench.cli import add_bench
from dpzo.cliargs import (
    EXIT_OK,
    EXIT_USAGE,
    fail,
    memory_size,
    nonnegative_float_or_inf,
    open_unit_interval,
    positive_float_or_inf,
    positive_int,
    print_json,
)
from dpzo.privacy.accountants import DEFAULT_PLD_DISCRETIZATION

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
    p.add_argument("--n", type=positive_int, required=True, help="number of training examples")
    p.add_argument("--batch-size", type=positive_int, required=True, help="expected (Poisson) batch size B; q = B/n")
    p.add_argument("--steps", type=positive_int, required=True, help="training steps T")
    p.add_argument(
        "--epsilon", type=nonnegative_float_or_inf, required=True, help="target epsilon ('inf': non-private, sigma 0)"
    )
    p.add_argument("--delta", type=open_unit_interval, required=True, help="target delta, in (0, 1)")
    p.add_argument("--directions", type=positive_int, default=1, help="perturbation directions per step P (default 1)")
    p.add_argument(
        "--clip",
        type=positive_float_or_inf,
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
        type=open_unit_interval,
        default=DEFAULT_PLD_DISCRETIZATION,
        help=f"PLD value discretization (default {DEFAULT_PLD_DISCRETIZATION:g}, the pipeline's; smaller is tighter and slower)",
    )
    p.set_defaults(handler=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.batch_size > args.n:
        return fail(
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
        return fail("calibrate", str(err))
    except (RuntimeError, FloatingPointError, OverflowError) as err:  # raised inside an accountant library
        return fail(
            "calibrate",
            f"the {args.accountant} accountant failed at these settings ({type(err).__name__}: {err}); "
            "try another accountant ("
            + ("--accountant rdp" if args.accountant == "pld" else "--accountant pld, the pipeline's default")
            + ")",
        )
    print_json(record)
    return EXIT_OK


# --------------------------------------------------------------------------------------
# dpzo audit
# --------------------------------------------------------------------------------------


def _trials(text: str) -> int:
    value = positive_int(text)
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
    p.add_argument("--n", type=positive_int, help="number of training examples (without --ledger)")
    p.add_argument("--batch-size", type=positive_int, help="expected (Poisson) batch size B (without --ledger)")
    p.add_argument("--steps", type=positive_int, help="training steps T (without --ledger)")
    p.add_argument("--epsilon", type=nonnegative_float_or_inf, help="claimed epsilon; 'inf' audits sigma = 0")
    p.add_argument("--delta", type=open_unit_interval, help="delta of the claim (without --ledger)")
    p.add_argument("--directions", type=positive_int, default=1, help="directions per step P (default 1)")
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
        return fail("audit", ledger)
    from dpzo.privacy.audit import AuditError, audit

    try:
        record = audit(ledger, trials=args.trials, confidence=args.confidence)
    except AuditError as err:
        return fail("audit", f"argument --ledger: {err}" if args.ledger else str(err))
    if args.out:
        from pathlib import Path

        from dpzo.fileio import write_json_atomic

        write_json_atomic(Path(args.out), record)
    print_json(record)
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
        return fail(
            "accept-retry",
            f"argument cell: {args.cell!r} is not a cell folder; give results/runs/<model>/<task>/<method>/eps<e>/"
            "seed<s> (the folder of the cell's metrics.json) or its results/checkpoints/... folder",
        )
    parts[-6] = "checkpoints"  # the attempt log lives beside the cell's snapshot
    log = AttemptLog(Path(*parts) / "attempts.jsonl")
    try:
        record = log.accept(args.reason)
    except NothingToAccept as err:
        return fail("accept-retry", str(err))
    except ValueError as err:
        return fail("accept-retry", f"argument --reason: {err}")
    print_json({"attempt_log": str(log.path), **record})
    return EXIT_OK


# --------------------------------------------------------------------------------------
# dpzo plan
# --------------------------------------------------------------------------------------


def _add_plan(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="will it fit? project each model's per-device peak of a step and of evaluation",
        description=(
            "Run one real training step (DP-ZOSO) and one inference batch of each model on fake tensors "
            "(no memory, seconds) and print the per-device peaks (dpzo.bench.plan). Models come from a "
            "pipeline config (their config.json, placement, offload, master, dtype, batch and length) or "
            "from the bench catalogue (--catalogue: the paper's models under every store)."
        ),
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--configfile", help="a pipeline config (config/*.yaml)")
    where.add_argument("--catalogue", action="store_true", help="the paper's models of the bench catalogue")
    p.add_argument("--models", type=_names, default=None, help="comma-separated model keys (default: all)")
    p.add_argument("--memory", type=memory_size, default=None, help="device memory (e.g. 80GiB): what would fit")
    p.add_argument("--table", action="store_true", help="print a markdown table instead of JSON")
    p.set_defaults(handler=_cmd_plan)


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _cmd_plan(args: argparse.Namespace) -> int:
    from dpzo.bench import plan

    if args.catalogue:
        unknown = [m for m in args.models or [] if m not in plan.catalogue_names()]
        if unknown:
            return fail("plan", f"argument --models: unknown {unknown}; choose from {plan.catalogue_names()}")
        rows, notes = plan.catalogue_rows(args.models, memory=args.memory), []
    else:
        import yaml

        try:
            with open(args.configfile, encoding="utf-8") as fh:
                config = yaml.safe_load(fh)
        except OSError as err:
            return fail("plan", f"argument --configfile: {err}")
        rows, notes = plan.config_rows(config, args.models, memory=args.memory)
    if args.table:
        print(plan.markdown(rows))
        for note in notes:
            print(f"- {note}")
    else:
        print_json({"rows": rows, "notes": notes})
    return EXIT_OK


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------

_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_calibrate, _add_audit, add_bench, _add_plan, _add_accept_retry]


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
