"""A cell's privacy ledger: written before training, and verified against the cell before any step.

The ledger (``results/runs/<cell>/privacy.json``) is a file like any other: it can be edited,
copied from another cell, or left over from another configuration.  So the trainer does not
trust it.  :func:`verify_ledger` checks, before the first step, that

* it belongs to this very cell: model, task, method (with its variant), the ε of the cell's
  path, the config's δ, seed, mechanism, neighbouring relation, accounting convention, and
  whether the noise is secure;
* it accounts exactly what will run: n, T, P, B, C and q (:func:`check_counts`);
* its noise really certifies the cell's ε: the ε of the ledger's σ (or Laplace scale) is
  recomputed here with the accountant, from the run's own q and T·P, and must not exceed the
  target; a private cell with σ = 0 is refused.

A mismatch raises :class:`LedgerMismatch`, naming the file, the field, both values and the fix.
The noise the trainer adds comes from the verified ledger (:class:`VerifiedNoise`), so no code
path trains with less noise than was accounted.  After training, :func:`check_ledger_after`
compares what really ran (counted by the trainer) with the ledger once more.

No heavy imports: the accounting rule uses this module without torch.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpzo.fileio import write_json_atomic
from dpzo.integrity import canonical_digest
from dpzo.methods import base_method, get_method, hyperparameters_for, is_private
from dpzo.privacy.accountants import ACCOUNTANTS, certified_epsilon, laplace_epsilon
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.records import DPZERO_DELTA, method_ledger
from dpzo.privacy.secret import SECURE_NOISE, noise_source

#: A recomputed ε may exceed the target by this relative amount (floating-point reproducibility
#: of the same library call), no more.
EPSILON_RTOL = 1e-9


@dataclass(frozen=True)
class Cell:
    """One (model, task, method, ε, seed) cell of the grid, as its output path names it."""

    model: str
    task: str
    method: str
    eps: str  # the path component: "2", "0.5" or "inf"
    seed: int

    @property
    def epsilon(self) -> float:
        """The target ε as a number (inf for the path component ``inf``)."""
        return math.inf if self.eps == "inf" else float(self.eps)

    def as_dict(self) -> dict[str, Any]:
        """The cell as a JSON-ready dict."""
        return {"model": self.model, "task": self.task, "method": self.method, "eps": self.eps, "seed": int(self.seed)}


@dataclass(frozen=True)
class AccountingSettings:
    """How the config accounts every private cell: δ (a number or "1/n"), the accountant that
    calibrates σ, the convention (``common`` or ``published``) and the source of the secret
    noise (:func:`privacy.noise_source`; part of a cell's identity)."""

    delta: float | str
    accountant: str = "pld"
    convention: str = "common"
    noise: str = SECURE_NOISE


#: The noise source recorded for a cell that makes no privacy claim.
NO_NOISE = "none (no privacy claim)"


def cell_noise(method: str, source: str | None = None) -> str:
    """The noise source that belongs to a cell of ``method``: this process's
    (:func:`privacy.noise_source`, or ``source``) for a private method, :data:`NO_NOISE` otherwise."""
    if not is_private(method):
        return NO_NOISE
    return source if source is not None else noise_source()


class LedgerMismatch(ValueError):
    """The ledger does not belong to the cell, or does not certify its ε (nothing has trained)."""

    def __init__(self, path: str | Path | None, field: str, in_ledger: Any, expected: Any, fix: str | None = None):
        self.path, self.field, self.in_ledger, self.expected = path, field, in_ledger, expected
        where = f"privacy ledger {path}" if path else "privacy ledger"
        fix = fix or (
            f"delete {path or 'the ledger'} and run the cell again: the account rule then writes this cell's own ledger"
        )
        super().__init__(
            f"{where}: {field} is {in_ledger!r} in the ledger but {expected!r} for this cell; "
            f"nothing was trained. {fix}"
        )


def resolve_delta(delta: float | str, n: int) -> float:
    """``delta`` from the config: a number, or the string "1/n" (the official code's choice)."""
    if isinstance(delta, str):
        if delta.replace(" ", "") != "1/n":
            raise ValueError(f"delta must be a number or '1/n', got {delta!r}")
        return 1.0 / n
    return float(delta)


def count_examples(jsonl: str | Path) -> int:
    """n: the number of examples (non-empty lines) of a split file."""
    with open(jsonl, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _expected_delta(method: str, convention: str, delta: float | str, n: int) -> float:
    base = base_method(method)
    if get_method(base).mechanism == "laplace":
        return 0.0  # pure ε-DP
    if get_method(base).published_accounting == "dpzero" and convention == "published":
        return DPZERO_DELTA
    return resolve_delta(delta, n)


def cell_ledger(
    cell: Cell, hp: Any, *, n: int, settings: AccountingSettings, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """The ledger of ``cell``: calibrated noise for its method, hyperparameters ``hp`` and n.

    Besides what :func:`privacy.method_ledger` accounts, it records what the cell is (so the
    trainer can tell it from another cell's ledger), the config's convention and accountant,
    and where the trainer's secret noise will come from (``settings.noise``).
    """
    record = method_ledger(
        cell.method,
        n=n,
        batch_size=getattr(hp, "batch_size", 0) or n,
        steps=getattr(hp, "steps", 0),
        directions=getattr(hp, "directions", 1),
        clip=getattr(hp, "clip", math.inf),
        epsilon_target=cell.epsilon if is_private(cell.method) else math.inf,
        delta=resolve_delta(settings.delta, n),
        accountant=settings.accountant,
        convention=settings.convention,
        cache_dir=cache_dir,
    )
    return record | {
        "cell": cell.as_dict(),
        "convention": settings.convention,
        "accountant": settings.accountant,
        "noise": settings.noise,
    }


def write_cell_ledger(
    cell: Cell,
    method_params: dict,
    *,
    train_file: str | Path,
    settings: AccountingSettings,
    path: str | Path,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the cell's ledger (calibrated noise) to ``path``, before any training can start.

    ``settings.noise`` is the noise source the trainer must use, as the run that planned this
    cell saw it; ``cache_dir`` holds the calibrations shared by cells with the same accounting.
    """
    hp = hyperparameters_for(cell.method, dict(method_params))
    record = cell_ledger(cell, hp, n=count_examples(train_file), settings=settings, cache_dir=cache_dir)
    write_json_atomic(Path(path), record)
    logging.getLogger(__name__).info("ledger: %s", record)
    return record


def check_counts(ledger: dict, *, n: int, hp: Any, method: str, path: str | Path | None = None) -> None:
    """The ledger accounts exactly the run ``hp`` of ``method`` describes on ``n`` examples (n, T, P, B, C, q)."""
    expected = {
        "n": n,
        "steps": hp.steps,
        "directions": hp.directions,
        "compositions": get_method(base_method(method)).compositions(hp),
        "expected_batch_size": hp.batch_size,
        "clip": hp.clip,
        "q": hp.batch_size / n,
    }
    for key, value in expected.items():
        if key not in ledger or not math.isclose(_number(ledger[key]), float(value), rel_tol=1e-12):
            raise LedgerMismatch(path, key, ledger.get(key), value)


def _number(value: Any) -> float:
    try:
        return float(value)  # JSON spells infinity "inf"
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class VerifiedNoise:
    """What the trainer adds, taken from a verified ledger.

    ``release`` is the ZO release (None for non-private cells), ``sigma`` the noise multiplier
    of DP-SGD's noise vector, ``epsilon`` the ε recomputed from that noise (None when the cell
    claims nothing) and ``accountant`` what recomputed it.
    """

    release: NoisySum | None
    sigma: float
    epsilon: float | None
    accountant: str | None


def check_identity(ledger: Any, *, cell: Cell, settings: AccountingSettings, path: str | Path | None = None) -> None:
    """The ledger is this cell's: its cell, method, target ε, convention, accountant and noise source."""
    if not isinstance(ledger, dict):
        raise LedgerMismatch(path, "the ledger", type(ledger).__name__, "a JSON object")
    recorded = ledger.get("cell") or {}
    for key, value in cell.as_dict().items():
        if str(recorded.get(key)) != str(value):
            raise LedgerMismatch(path, f"cell.{key}", recorded.get(key), value)
    if ledger.get("method") != cell.method:
        raise LedgerMismatch(path, "method", ledger.get("method"), cell.method)
    target = cell.epsilon if is_private(cell.method) else math.inf
    if _number(ledger.get("epsilon_target")) != target:
        raise LedgerMismatch(
            path, "epsilon_target", ledger.get("epsilon_target"), "inf" if math.isinf(target) else target
        )
    for key in ("convention", "accountant", "noise"):
        if ledger.get(key) != getattr(settings, key):
            raise LedgerMismatch(path, key, ledger.get(key), getattr(settings, key))


def verify_ledger(
    ledger: dict, *, cell: Cell, hp: Any, n: int, settings: AccountingSettings, path: str | Path | None = None
) -> VerifiedNoise:
    """Refuse a ledger that is not this cell's, or whose noise does not certify its ε.

    ``hp`` are the cell's hyperparameters (None for zero-shot), ``n`` its real training-set size
    and ``settings`` the config's accounting (with this process's noise source).  Returns the
    noise to add.  Raises :class:`LedgerMismatch` before anything has trained.
    """
    check_identity(ledger, cell=cell, settings=settings, path=path)
    private = is_private(cell.method)
    target = cell.epsilon if private else math.inf
    if private:
        check_counts(ledger, n=n, hp=hp, method=cell.method, path=path)
    if math.isinf(target):  # no claim: no noise
        if ledger.get("private") is not False or _number(ledger.get("noise_std_on_sum") or 0.0) != 0.0:
            raise LedgerMismatch(path, "private", ledger.get("private"), False)
        release = NoisySum("gaussian", 0.0, float(hp.batch_size)) if private else None
        return VerifiedNoise(release, 0.0, None, None)
    if ledger.get("private") is not True:
        raise LedgerMismatch(path, "private", ledger.get("private"), True)
    delta = _expected_delta(cell.method, settings.convention, settings.delta, n)
    if not math.isclose(_number(ledger.get("delta")), delta, rel_tol=1e-12, abs_tol=0.0):
        raise LedgerMismatch(path, "delta", ledger.get("delta"), delta)
    base = base_method(cell.method)
    q, releases = hp.batch_size / n, get_method(base).compositions(hp)
    if get_method(base).mechanism == "laplace":
        return _verify_laplace(ledger, path, hp, q, releases, target)
    published_dpzero = get_method(base).published_accounting == "dpzero" and settings.convention == "published"
    return _verify_gaussian(
        ledger, path, hp, q, releases, target, delta, settings.accountant, published_dpzero=published_dpzero
    )


def _require(ledger: dict, path, key: str, expected: Any) -> None:
    if ledger.get(key) != expected:
        raise LedgerMismatch(path, key, ledger.get(key), expected)


def _certifies(path, achieved: float, target: float, what: str, *, exact: bool = True) -> None:
    if not achieved <= target * (1.0 + EPSILON_RTOL):
        raise LedgerMismatch(
            path,
            f"epsilon of its noise ({what})" if exact else "epsilon of its noise (already its first release alone)",
            achieved if exact else f"at least {achieved:.6g}",
            f"<= {target}",
            fix="its noise does not buy the cell's ε (an edited or foreign ledger); delete it and run the cell "
            "again so that the account rule calibrates this cell's noise",
        )


def _verify_gaussian(
    ledger, path, hp, q, releases, target, delta, accountant, *, published_dpzero: bool
) -> VerifiedNoise:
    _require(ledger, path, "mechanism", "gaussian")
    _require(ledger, path, "sampler", "poisson")
    sigma = _number(ledger.get("sigma"))
    if not (math.isfinite(sigma) and sigma > 0):
        raise LedgerMismatch(path, "sigma", ledger.get("sigma"), "a finite noise multiplier > 0 (a private cell)")
    if published_dpzero:
        _require(ledger, path, "accounting", "dpzero-published")
        _require(ledger, path, "neighbouring", "replace one example (DPZero)")
        # every release the trainer will make (T·P), whatever the account rule allowed: a ledger
        # claiming P > 1 under this convention is recomputed over all of them and refused
        noise_on_sum, used = 2.0 * sigma * hp.clip, "opacus-rdp"
    else:
        _require(ledger, path, "accounting", "common")
        _require(ledger, path, "neighbouring", "add/remove one example")
        _require(ledger, path, "calibrated_with", accountant)
        noise_on_sum, used = sigma * hp.clip, accountant
    if not math.isclose(_number(ledger.get("noise_std_on_sum")), noise_on_sum, rel_tol=1e-12):
        raise LedgerMismatch(path, "noise_std_on_sum", ledger.get("noise_std_on_sum"), noise_on_sum)
    # a cheap bound first: a σ absurd for the claim is refused in microseconds, not after the
    # accountant has spent minutes and gigabytes on it
    achieved, exact = certified_epsilon(sigma, q, releases, delta, used, target)
    _certifies(path, achieved, target, used, exact=exact)
    release = NoisySum("gaussian", noise_on_sum, float(hp.batch_size))
    return VerifiedNoise(release, sigma, achieved, used)


def _verify_laplace(ledger, path, hp, q, releases, target) -> VerifiedNoise:
    _require(ledger, path, "mechanism", "laplace")
    _require(ledger, path, "sampler", "poisson")
    scale = _number(ledger.get("laplace_scale_on_sum"))
    if not (math.isfinite(scale) and scale > 0):
        raise LedgerMismatch(
            path, "laplace_scale_on_sum", ledger.get("laplace_scale_on_sum"), "a finite Laplace scale > 0"
        )
    achieved = laplace_epsilon(hp.clip / scale, q, releases)
    _certifies(path, achieved, target, "pure DP, basic composition")
    return VerifiedNoise(NoisySum("laplace", scale, float(hp.batch_size)), 0.0, achieved, "laplace-basic-composition")


#: A realised number of sampled examples further than this many standard deviations from
#: q * n * releases means the sampler is not the accounted one (a false alarm has
#: probability below 1e-15).
SAMPLING_TOLERANCE_SD = 8.0


def check_ledger_after(ledger: dict, history: dict, noise: VerifiedNoise | None = None) -> None:
    """After training: what really ran (counted by the trainer) must be what the ledger accounted.

    Checks n, the sampling rate, the number of steps and of releases, the noise scale and the
    divisor actually used, and that the number of examples the sampler really drew is
    consistent with Poisson sampling at the accounted rate.  ``noise``: what the ledger's check
    said the trainer adds (a private selection's candidate with a searched clip C adds σ·C of its
    own); the ledger's noise on the sum when not given.
    """
    problems = []

    def compare(key: str, ran: float, accounted: float) -> None:
        if not math.isclose(float(ran), float(accounted), rel_tol=1e-9, abs_tol=0.0):
            problems.append(f"{key}: ran {ran}, accounted {accounted}")

    compare("n", history["n"], ledger["n"])
    compare("q", history["sampling_rate"], ledger["q"])
    compare("steps", history["steps_run"], ledger["steps"])
    compare("releases", history["releases"], ledger["compositions"])
    accounted_noise = noise.release.scale if noise is not None else ledger_noise_on_sum(ledger)
    compare("noise on each sum", history["noise_scale_on_sum"], accounted_noise)
    compare("divisor (expected batch size)", history["noise_divisor"], ledger["expected_batch_size"])
    n, q, releases = int(ledger["n"]), float(ledger["q"]), int(history["releases"])
    expected = q * n * releases
    sd = math.sqrt(n * releases * q * (1.0 - q))
    drawn = int(history["examples_sampled"])
    if abs(drawn - expected) > SAMPLING_TOLERANCE_SD * sd + 1.0:
        problems.append(
            f"examples sampled: {drawn} over {releases} releases, but Poisson sampling at q={q} "
            f"draws {expected:.1f} +- {sd:.1f}; the batches were not drawn at the accounted rate"
        )
    if problems:
        raise RuntimeError(
            "privacy ledger mismatch after training (the run does not match what was accounted; "
            "its metrics are not published): " + "; ".join(problems)
        )


def ledger_noise_on_sum(ledger: dict) -> float:
    """The noise scale on each clipped sum that the ledger accounted (std, or Laplace b)."""
    if not ledger.get("private"):
        return 0.0
    if ledger.get("mechanism") == "laplace":
        return float(ledger["laplace_scale_on_sum"])
    return float(ledger["noise_std_on_sum"])


def recomputed_epsilons(ledger: dict) -> dict[str, float | str]:
    """Every ε a private ledger states (``epsilon_achieved``), recomputed from its noise and counts
    (σ or the Laplace scale, q, T·P, δ) instead of read from the file: what the privacy table
    publishes.  Under the common convention: PLD, PRV and RDP; DPZero's published accounting:
    opacus' RDP; the Laplace variant: pure ε.  A value an accountant cannot evaluate at these
    settings is the reason, as text.  Empty for a ledger without a claim."""
    if not ledger.get("private"):
        return {}
    q, releases, delta = (
        _number(ledger.get("q")),
        int(_number(ledger.get("compositions"))),
        _number(ledger.get("delta")),
    )
    if ledger.get("mechanism") == "laplace":
        scale = _number(ledger.get("laplace_scale_on_sum"))
        return {"pure": laplace_epsilon(_number(ledger.get("clip")) / scale, q, releases)}
    sigma, target = _number(ledger.get("sigma")), _number(ledger.get("epsilon_target"))
    names = ("opacus-rdp",) if ledger.get("accounting") == "dpzero-published" else ACCOUNTANTS
    return {name: _epsilon_or_reason(sigma, q, releases, delta, name, target) for name in names}


@functools.cache
def _epsilon_or_reason(
    sigma: float, q: float, releases: int, delta: float, accountant: str, target: float
) -> float | str:
    """One recomputed ε (cached: the cells of a grid share a few ledgers' numbers)."""
    try:
        value, exact = certified_epsilon(sigma, q, releases, delta, accountant, target)
    except (RuntimeError, ValueError, FloatingPointError, OverflowError) as err:
        return f"not computed: {type(err).__name__}: {err}"
    return value if exact else f"at least {value:.6g} (its first release alone)"


def ledger_digest(ledger: dict) -> str:
    """SHA-256 of a ledger's canonical JSON: the trainer records the digest of the ledger it
    verified, so a ledger changed after training is not published as that cell's."""
    return canonical_digest(ledger)
