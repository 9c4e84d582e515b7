"""Differential-privacy accounting and the secret randomness for DP zeroth-order training.

Mechanism being accounted
-------------------------
Every training step, for each of its ``P`` perturbation directions, releases one scalar::

    (sum_{i in B} clip(v_i, -C, C) + N(0, (sigma * C)^2)) / (q * n)

where ``B`` is a fresh Poisson-subsampled batch (each example included independently with
probability ``q``).  Under add/remove-one-example neighbouring the sum has sensitivity
``C``, so each release is a Poisson-subsampled Gaussian mechanism with noise multiplier
``sigma`` and rate ``q``.  Because every direction draws its own batch, ``T`` steps with
``P`` directions are ``T * P`` such releases, and the accountants below compose exactly
that: ``compositions = T * P`` copies of ``PoissonSampled(q, Gaussian(sigma))``.
Dividing by the *expected* batch size ``q * n`` (a public constant) is post-processing and
costs nothing.

Design notes
------------
* ``dp_accounting`` and ``prv_accountant`` take ~1 s to import, so they are imported
  lazily inside the functions that need them; importing this module stays cheap and never
  pulls in torch.
* All randomness that the privacy proof relies on (batch sampling and noise) comes from
  :class:`SecretRandom`, which is seeded from the OS, never from a config seed, and never
  shares state with numpy's or torch's global generators (those are seeded from configs
  for reproducibility, so an attacker who reads the config could replay them).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
import operator
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ACCOUNTANTS",
    "INSECURE_SEED_ENV",
    "SecretRandom",
    "accounting_record",
    "calibrate_sigma",
    "epsilon",
    "from_environment",
    "library_versions",
    "privatize_sum",
    "NoisySum",
]

#: Accountants understood by :func:`epsilon` and :func:`calibrate_sigma`.
ACCOUNTANTS: tuple[str, ...] = ("pld", "prv", "rdp")

#: Environment variable holding an *insecure* integer seed for the privacy RNG (tests only).
INSECURE_SEED_ENV = "DPZO_INSECURE_TEST_NOISE_SEED"

#: Default PLD discretization.  The PLD accountant is a pessimistic (valid) upper bound for
#: any discretization, but a coarse grid costs real noise on long runs (1e-3 instead of 1e-4
#: needs 3.4% more sigma at 1e5 compositions), while 1e-4 still calibrates in about 2 s.
DEFAULT_PLD_DISCRETIZATION = 1e-4

#: Calibration refuses to go beyond this noise multiplier (the target is then unreachable
#: for any useful training run).
MAX_SIGMA = 1e4

# PRV accountant error budget (fixed so that results are comparable across runs).
_PRV_EPS_ERROR = 0.1
_PRV_DELTA_ERROR_FRACTION = 1e-3  # delta_error = delta / 1000


# --------------------------------------------------------------------------------------
# input validation (messages name the argument and the allowed range)
# --------------------------------------------------------------------------------------


def _check_q(q: float) -> float:
    q = float(q)
    if not (0.0 < q <= 1.0):  # also rejects NaN
        raise ValueError(f"q (Poisson sampling rate) must satisfy 0 < q <= 1; got {q!r}")
    return q


def _check_compositions(compositions: int) -> int:
    try:
        c = operator.index(compositions)
    except TypeError:
        raise ValueError(
            f"compositions must be an integer >= 1; got {compositions!r}"
        ) from None
    if c < 1:
        raise ValueError(f"compositions must be an integer >= 1; got {c}")
    return c


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must satisfy 0 < delta < 1; got {delta!r}")
    return delta


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}; got {accountant!r}"
        )
    return accountant


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if math.isnan(sigma) or sigma < 0:
        raise ValueError(f"sigma (noise multiplier) must be >= 0 (inf allowed); got {sigma!r}")
    return sigma


def _check_pld_discretization(d: float) -> float:
    d = float(d)
    if not (0.0 < d < 1.0):
        raise ValueError(f"pld_discretization must satisfy 0 < pld_discretization < 1; got {d!r}")
    return d


# --------------------------------------------------------------------------------------
# epsilon for one noise multiplier
# --------------------------------------------------------------------------------------


def _dp_event(sigma: float, q: float, compositions: int) -> Any:
    from dp_accounting import dp_event

    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), compositions
    )


def _pld_accountant(pld_discretization: float) -> Any:
    from dp_accounting.pld import pld_privacy_accountant

    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=pld_discretization)


@contextlib.contextmanager
def _quiet_numpy() -> Iterator[None]:
    # prv_accountant evaluates exp() on a wide grid and overflows harmlessly to inf
    # (it then takes log of it); silence the resulting RuntimeWarnings.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        yield


def _epsilon_pld(sigma: float, q: float, compositions: int, delta: float, disc: float) -> float:
    accountant = _pld_accountant(disc)
    accountant.compose(_dp_event(sigma, q, compositions))
    return float(accountant.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # For small sigma, dp_accounting's RDP series for fractional orders close to 1 do not
    # converge and it logs a warning per order while *excluding* that order.  Excluding
    # orders can only make the bound larger (more conservative), so the messages are noise
    # (they would otherwise clutter the CLI's stderr during calibration).
    import logging

    log = logging.getLogger("absl")
    old_level = log.level
    log.setLevel(max(old_level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(old_level)


def _epsilon_rdp(sigma: float, q: float, compositions: int, delta: float) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    with _quiet_absl():
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(_dp_event(sigma, q, compositions))
        return float(accountant.get_epsilon(delta))


def _epsilon_prv(sigma: float, q: float, compositions: int, delta: float) -> float:
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    with _quiet_numpy():
        accountant = PRVAccountant(
            # prvs must be a *list* (one entry per mechanism type), same for compositions.
            prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)],
            max_self_compositions=[compositions],
            eps_error=_PRV_EPS_ERROR,
            delta_error=delta * _PRV_DELTA_ERROR_FRACTION,
        )
        _low, _estimate, upper = accountant.compute_epsilon(
            delta=delta, num_self_compositions=[compositions]
        )
    # The upper end of PRV's confidence interval is the conservative (reportable) value.
    return float(upper)


def epsilon(
    sigma: float,
    q: float,
    compositions: int,
    delta: float,
    accountant: str = "pld",
    *,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` of ``compositions`` Poisson-subsampled Gaussian releases.

    Args:
        sigma: noise multiplier (noise std on the clipped sum divided by the clip C).
            ``0`` means no noise (returns ``inf``); ``inf`` means no release (returns ``0.0``).
        q: Poisson sampling rate, ``0 < q <= 1``.
        compositions: number of releases, ``steps * directions`` (``>= 1``).
        delta: target delta, ``0 < delta < 1``.
        accountant: ``"pld"`` (dp_accounting privacy-loss distributions; tight and a
            pessimistic upper bound), ``"prv"`` (Microsoft prv_accountant; we return the upper
            end of its error interval) or ``"rdp"`` (dp_accounting Renyi DP; loosest).
        pld_discretization: value discretization interval of the PLD accountant.

    Returns:
        An upper bound on epsilon (add/remove-one-example neighbouring).
    """
    accountant = _check_accountant(accountant)
    q = _check_q(q)
    compositions = _check_compositions(compositions)
    delta = _check_delta(delta)
    sigma = _check_sigma(sigma)
    pld_discretization = _check_pld_discretization(pld_discretization)
    return _epsilon_unchecked(sigma, q, compositions, delta, accountant, pld_discretization)


def _epsilon_unchecked(
    sigma: float, q: float, compositions: int, delta: float, accountant: str, disc: float
) -> float:
    """:func:`epsilon` after validation (calibration calls this many times)."""
    if sigma == 0.0:
        return math.inf
    if math.isinf(sigma):
        return 0.0
    if accountant == "pld":
        return _epsilon_pld(sigma, q, compositions, delta, disc)
    if accountant == "prv":
        return _epsilon_prv(sigma, q, compositions, delta)
    return _epsilon_rdp(sigma, q, compositions, delta)


# --------------------------------------------------------------------------------------
# calibration: smallest sigma meeting a target epsilon
# --------------------------------------------------------------------------------------


def _unreachable(target: float, delta: float, q: float, compositions: int, accountant: str) -> ValueError:
    return ValueError(
        f"epsilon={target!r} at delta={delta!r} is unreachable with q={q!r} and "
        f"compositions={compositions} ({accountant} accountant): it would need a noise "
        f"multiplier above {MAX_SIGMA:g}. Increase epsilon or delta, or reduce the number of "
        "steps/directions or the sampling rate (batch_size/n)."
    )


def _find_bracket(
    eps_of: Callable[[float], float],
    target: float,
    start: float,
    factor: float,
    on_unreachable: Callable[[], ValueError],
) -> tuple[float, float]:
    """Return ``(lo, hi)`` with ``eps_of(lo) > target >= eps_of(hi)``, searching geometrically.

    Starts at ``start`` and multiplies/divides by ``factor``.  Epsilon is decreasing in
    sigma, so the search moves up while infeasible and down while feasible.
    """
    s = start
    if eps_of(s) <= target:
        hi = s
        while True:
            lo = hi / factor
            if eps_of(lo) > target:
                return lo, hi
            hi = lo
    lo = s
    while True:
        if lo >= MAX_SIGMA:
            raise on_unreachable()
        hi = min(lo * factor, MAX_SIGMA)
        if eps_of(hi) <= target:
            return lo, hi
        lo = hi


def _solve_log_sigma(
    eps_of: Callable[[float], float], target: float, lo: float, hi: float, rtol: float
) -> float:
    """Smallest feasible sigma in ``(lo, hi]`` to relative tolerance ``rtol``.

    Brent's method on ``log(sigma)`` (epsilon is close to a power law in sigma, so few
    evaluations are needed), followed by a step to the feasible side of the root so that
    the result is *verified* to satisfy ``eps_of(sigma) <= target``.
    """
    from scipy.optimize import brentq

    def gap(log_s: float) -> float:
        # Clip inf so Brent's interpolation stays finite; only the sign matters at the ends.
        return min(eps_of(math.exp(log_s)), 1e12) - target

    xtol = rtol / 2
    root = brentq(gap, math.log(lo), math.log(hi), xtol=xtol, rtol=4 * np.finfo(float).eps)
    # brentq guarantees a sign change within xtol of ``root``; the feasible side is above.
    candidate = root + xtol
    for _ in range(50):  # robust against tiny numerical non-monotonicity
        if candidate >= math.log(hi) or gap(candidate) <= 0:
            break
        candidate += xtol
    return float(min(math.exp(candidate), hi))


def calibrate_sigma(
    epsilon: float,
    delta: float,
    q: float,
    compositions: int,
    accountant: str = "pld",
    *,
    rtol: float = 1e-4,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """Smallest noise multiplier ``sigma`` with ``epsilon(sigma, ...) <= epsilon`` (to ``rtol``).

    The returned sigma is always feasible for the chosen accountant, and at most about
    ``(1 + rtol)`` times the exact smallest feasible value.

    Args:
        epsilon: target epsilon (``>= 0``); ``inf`` means non-private and returns ``0.0``.
        delta: target delta, ``0 < delta < 1``.
        q: Poisson sampling rate, ``0 < q <= 1``.
        compositions: ``steps * directions``.
        accountant: ``"pld"``, ``"prv"`` or ``"rdp"`` (see :func:`epsilon`).
        rtol: relative tolerance on sigma.
        pld_discretization: PLD value discretization (only used by ``"pld"``).

    Raises:
        ValueError: on invalid input, or if the target needs ``sigma > MAX_SIGMA``.
    """
    target = float(epsilon)
    if math.isnan(target) or target < 0:
        raise ValueError(f"epsilon (target) must be >= 0 (inf allowed); got {epsilon!r}")
    accountant = _check_accountant(accountant)
    q = _check_q(q)
    compositions = _check_compositions(compositions)
    delta = _check_delta(delta)
    pld_discretization = _check_pld_discretization(pld_discretization)
    rtol = float(rtol)
    if not (0.0 < rtol < 0.1):
        raise ValueError(f"rtol must satisfy 0 < rtol < 0.1; got {rtol!r}")
    if math.isinf(target):
        return 0.0

    def unreachable() -> ValueError:
        return _unreachable(target, delta, q, compositions, accountant)

    # Bracketing and Brent revisit points; cache them (PLD/PRV evaluations cost up to seconds).
    cache: dict[tuple[str, float], float] = {}

    def eps_with(name: str) -> Callable[[float], float]:
        def f(s: float) -> float:
            key = (name, s)
            if key not in cache:
                cache[key] = _epsilon_unchecked(s, q, compositions, delta, name, pld_discretization)
            return cache[key]

        return f

    eps_rdp = eps_with("rdp")

    # RDP is cheap (~20-50 ms per evaluation even at small sigma), so it locates the
    # solution first; PRV/PLD evaluations get expensive at small sigma and are only done
    # near the answer.
    if accountant == "rdp":
        lo, hi = _find_bracket(eps_rdp, target, 1.0, 2.0, unreachable)
        return _solve_log_sigma(eps_rdp, target, lo, hi, rtol)
    try:
        lo, hi = _find_bracket(eps_rdp, target, 1.0, 2.0, unreachable)
        rdp_guess = _solve_log_sigma(eps_rdp, target, lo, hi, 1e-2)
    except ValueError:
        # RDP cannot reach the target below MAX_SIGMA; the tighter accountant might.
        rdp_guess = MAX_SIGMA

    # RDP usually over-estimates epsilon by 5-15% in sigma, so sigma_rdp is (almost always)
    # feasible for PLD/PRV as well and the answer lies a little below it.
    eps_acc = eps_with(accountant)
    lo, hi = _find_bracket(eps_acc, target, rdp_guess, 1.2, unreachable)

    if accountant == "prv":
        return _solve_log_sigma(eps_acc, target, lo, hi, rtol)

    # PLD: dp_accounting's own calibrator (Brent, then a check/bisection that guarantees a
    # feasible result within ``tol`` of the optimum).  ``tol`` is absolute in sigma.
    from dp_accounting import mechanism_calibration

    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: _pld_accountant(pld_discretization),
        lambda s: _dp_event(s, q, compositions),
        target,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
        tol=rtol * lo,
    )
    return float(sigma)


def memoized(
    cache_dir: str | Path | None,
    key: dict[str, Any],
    compute: Callable[[], dict[str, Any]],
    verify: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """``compute()``, kept as JSON in ``cache_dir`` under a hash of ``key`` (None: no cache).

    ``key`` must name everything the result depends on, library versions included.  A lock
    per key makes concurrent jobs wait for the one computing it; the stored key is compared
    in full on reading, and the file is written atomically.  A stored value is used only when
    ``verify(value)`` holds (a cache is a file anyone can edit); an unreadable, foreign or
    unverified entry is logged, recomputed and replaced, never fatal.
    """
    if cache_dir is None:
        return compute()
    import fcntl
    import hashlib
    import json
    import logging

    from .fileio import write_json_atomic

    text = json.dumps(key, sort_keys=True)
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(text.encode()).hexdigest()[:32]
    path = folder / f"{name}.json"
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                same_key = json.dumps(stored.get("key"), sort_keys=True) == text
                if same_key and (verify is None or verify(stored["value"])):
                    return stored["value"]
                why = "it was made for another key" if not same_key else "its value does not verify"
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                why = f"it is unreadable ({type(err).__name__}: {err})"
            logging.getLogger(__name__).warning("recomputing the cached calibration %s: %s", path, why)
        value = compute()
        write_json_atomic(path, {"key": key, "value": value})
    return value


# --------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions of the accounting libraries (recorded next to every privacy claim)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in ("dp-accounting", "prv-accountant", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --------------------------------------------------------------------------------------
# secret randomness and the noisy release
# --------------------------------------------------------------------------------------


class SecretRandom:
    """The only source of randomness the privacy guarantee relies on.

    It draws Poisson batches and Gaussian noise.  Why a dedicated generator:

    * Global numpy/torch generators are seeded from configs for reproducibility; if they
      produced the noise, anyone who knows the config could subtract it.  So the default
      seed is 128 bits from the OS (``secrets``), held only inside the generator, never
      stored on this object, logged or derived from any config.
    * It never reads or advances numpy's or torch's global state, so model code that uses
      those (dropout, perturbation directions, data shuffling) cannot influence it.

    Instances refuse to be pickled or copied: two copies would emit identical "noise",
    which silently destroys the guarantee (e.g. in forked data-loader workers or when a
    checkpoint is resumed).  Resuming should create a fresh ``SecretRandom``.

    Args:
        insecure_test_seed: if given, the generator is seeded deterministically with it.
            For tests only: the noise is then predictable and ``is_secure`` is False.
    """

    __slots__ = ("_generator", "_secure")

    def __init__(self, insecure_test_seed: int | None = None) -> None:
        if insecure_test_seed is None:
            self._secure = True
            # PCG64DXSM: numpy's recommended bit generator for new code.  The seed goes
            # straight in and is not kept anywhere else.
            self._generator = np.random.Generator(np.random.PCG64DXSM(secrets.randbits(128)))
        else:
            seed = operator.index(insecure_test_seed)
            self._secure = False
            self._generator = np.random.Generator(np.random.PCG64DXSM(seed))

    @property
    def is_secure(self) -> bool:
        """True when seeded from the OS (read-only, so it cannot be faked after the fact)."""
        return self._secure

    @classmethod
    def from_environment(cls) -> SecretRandom:
        """Secure instance, unless ``$DPZO_INSECURE_TEST_NOISE_SEED`` holds an integer.

        The environment variable exists so end-to-end tests can be deterministic; it is
        never set by the pipeline, and a warning is emitted when it is used.
        """
        raw = os.environ.get(INSECURE_SEED_ENV, "").strip()
        if not raw:
            return cls()
        try:
            seed = int(raw)
        except ValueError:
            raise ValueError(
                f"{INSECURE_SEED_ENV} must be an integer (or unset for secure noise); got {raw!r}"
            ) from None
        warnings.warn(
            f"{INSECURE_SEED_ENV} is set: DP noise and batch sampling are deterministic and "
            "provide NO privacy. Use this only in tests.",
            RuntimeWarning,
            stacklevel=2,
        )
        return cls(insecure_test_seed=seed)

    def poisson_batch(self, n: int, q: float) -> np.ndarray:
        """Indices (sorted, int64) of a Poisson sample: each of ``range(n)`` kept w.p. ``q``.

        The batch size is random and may be 0; this is what the accountant assumes, so
        callers must not pad, truncate or resample it.
        """
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        q = float(q)
        if not (0.0 <= q <= 1.0):
            raise ValueError(f"q must satisfy 0 <= q <= 1; got {q!r}")
        # random() is uniform on [0, 1), so P(u < q) == q exactly (up to 2**-53).
        return np.flatnonzero(self._generator.random(n) < q).astype(np.int64, copy=False)

    def standard_normal(self) -> float:
        """One N(0, 1) draw."""
        return float(self._generator.standard_normal())

    def standard_normal_array(self, size: int) -> np.ndarray:
        """``size`` independent N(0, 1) draws (float64), e.g. DP-SGD's noise vector."""
        return self._generator.standard_normal(operator.index(size))

    def standard_laplace(self) -> float:
        """One Laplace(0, 1) draw (density exp(-|x|)/2), for the pure-DP Laplace mechanism."""
        return float(self._generator.laplace(0.0, 1.0))

    def insecure_state(self) -> dict:
        """The generator state of a test-seeded instance, so a resumed test run draws on exactly.

        Refused for secure instances: a secret state written into a checkpoint would let anyone
        who reads the file recompute the noise.  A resumed secure run draws fresh noise instead.
        """
        if self._secure:
            raise RuntimeError("the state of a secure SecretRandom is never exported; resume with a fresh one")
        return self._generator.bit_generator.state

    def restore_insecure_state(self, state: dict) -> None:
        """Continue a test-seeded stream from :meth:`insecure_state` (refused when secure)."""
        if self._secure:
            raise RuntimeError("a secure SecretRandom cannot be set to a stored state")
        self._generator.bit_generator.state = state

    def __repr__(self) -> str:  # never show generator state
        return f"SecretRandom(is_secure={self.is_secure})"

    def _refuse_copy(self, *_: Any) -> Any:
        raise TypeError(
            "SecretRandom must not be pickled or copied: copies would emit identical noise. "
            "Create a new SecretRandom() instead."
        )

    __reduce__ = __reduce_ex__ = __copy__ = __deepcopy__ = _refuse_copy


def from_environment() -> SecretRandom:
    """Module-level alias of :meth:`SecretRandom.from_environment`."""
    return SecretRandom.from_environment()


#: The noise source of a run whose secret randomness comes from the OS.
SECURE_NOISE = "secure"


def noise_source() -> str:
    """Where this process's secret randomness comes from: ``"secure"`` (the OS), or
    ``"insecure test seed <s>"`` when ``$DPZO_INSECURE_TEST_NOISE_SEED`` holds an integer.

    Recorded in every ledger and metrics file and part of a cell's identity: a cell computed
    with test noise claims nothing, and is recomputed by a run with secure noise.
    """
    raw = os.environ.get(INSECURE_SEED_ENV, "").strip()
    if not raw:
        return SECURE_NOISE
    try:
        return f"insecure test seed {int(raw)}"
    except ValueError:
        raise ValueError(f"{INSECURE_SEED_ENV} must be an integer (or unset for secure noise); got {raw!r}") from None


def privatize_sum(
    clipped_sum: float, sigma: float, clip: float, expected_batch_size: float, rng: SecretRandom
) -> float:
    """Gaussian mechanism on a clipped sum, normalised by the public expected batch size.

    Returns ``(clipped_sum + sigma * clip * z) / expected_batch_size`` with ``z ~ N(0, 1)``
    from ``rng``.  Dividing by the *expected* (not the realised) batch size keeps the
    realised size, which depends on the data, out of the release (the trainer's diagnostics
    count it, and are not covered by the guarantee).
    With ``sigma == 0`` (non-private runs) no noise is drawn.
    """
    sigma = _check_sigma(sigma)
    if math.isinf(sigma):
        raise ValueError("sigma must be finite in privatize_sum; got inf")
    clip = float(clip)
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a finite number > 0; got {clip!r}")
    expected_batch_size = float(expected_batch_size)
    if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
        raise ValueError(f"expected_batch_size must be a finite number > 0; got {expected_batch_size!r}")
    return NoisySum("gaussian", sigma * clip, expected_batch_size).release(clipped_sum, rng)


@dataclass(frozen=True)
class NoisySum:
    """The release of one query: (clipped sum + noise) / divisor, exactly as the ledger says.

    ``scale`` is the noise on the sum: the standard deviation (gaussian) or the Laplace scale
    b (laplace); ``divisor`` is the public expected batch size q*n.  Built from the ledger
    with :meth:`from_ledger`, so the trainer cannot add less noise than was accounted.
    """

    mechanism: str
    scale: float
    divisor: float

    def __post_init__(self) -> None:
        if self.mechanism not in ("gaussian", "laplace"):
            raise ValueError(f"mechanism must be 'gaussian' or 'laplace'; got {self.mechanism!r}")
        if not (self.scale >= 0 and math.isfinite(self.scale)):
            raise ValueError(f"noise scale must be finite and >= 0; got {self.scale!r}")
        if not (self.divisor > 0 and math.isfinite(self.divisor)):
            raise ValueError(f"divisor must be finite and > 0; got {self.divisor!r}")

    @classmethod
    def from_ledger(cls, ledger: dict[str, Any]) -> "NoisySum":
        mechanism = ledger.get("mechanism", "gaussian")
        scale = ledger["laplace_scale_on_sum"] if mechanism == "laplace" and ledger["private"] else ledger["noise_std_on_sum"]
        return cls(mechanism, float(scale or 0.0), float(ledger["expected_batch_size"]))

    def release(self, clipped_sum: Any, rng: SecretRandom) -> Any:
        """(clipped_sum + noise) / divisor, the noise drawn on the host from ``rng``.

        ``clipped_sum`` is a number, or a 0-d float64 tensor that stays on its device (so
        the trainer need not wait for the GPU); the arithmetic is float64 either way.
        """
        noisy = float(clipped_sum) if isinstance(clipped_sum, (int, float, np.floating, np.integer)) else clipped_sum
        if self.scale > 0:
            draw = rng.standard_normal() if self.mechanism == "gaussian" else rng.standard_laplace()
            noisy = noisy + self.scale * draw  # not +=: never modify a caller's tensor
        return noisy / self.divisor


# --------------------------------------------------------------------------------------
# the record written next to every run
# --------------------------------------------------------------------------------------


def _json_float(x: float) -> float | str:
    """JSON has no infinity; write it as the string "inf"."""
    return "inf" if math.isinf(x) else float(x)


def accounting_record(
    *,
    n: int,
    batch_size: int,
    steps: int,
    directions: int = 1,
    clip: float,
    epsilon_target: float,
    delta: float,
    accountant: str = "pld",
    sigma: float | None = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Calibrate (unless ``sigma`` is given) and describe the privacy of one training run.

    Args:
        n: number of training examples (``>= 1``).
        batch_size: expected batch size; ``q = batch_size / n`` (``1 <= batch_size <= n``).
        steps: training steps ``T``.
        directions: perturbation directions per step ``P`` (each draws its own batch).
        clip: clipping threshold C of per-example values (the sum's sensitivity); ``inf``
            (no clipping) only for non-private runs, recorded as ``"inf"``.
        epsilon_target: target epsilon; ``inf`` for a non-private run (sigma 0).
        delta: target delta.
        accountant: accountant used for calibration (``"pld"``, ``"prv"``, ``"rdp"``).
        sigma: use this noise multiplier instead of calibrating (``calibrated_with`` is
            then ``None``); ``epsilon_achieved`` shows what it buys.
        pld_discretization: PLD discretization for calibration and ``epsilon_achieved``.
        cache_dir: where to keep the calibrated sigma and the achieved epsilons, keyed by
            everything they depend on (:func:`memoized`): the cells of a grid share a few
            calibrations, which take up to tens of seconds each.

    Returns:
        A JSON-serialisable dict (infinities are the string ``"inf"``); see the keys below.
    """
    try:
        n = operator.index(n)
        batch_size = operator.index(batch_size)
        steps = operator.index(steps)
        directions = operator.index(directions)
    except TypeError as err:
        raise ValueError(f"n, batch_size, steps and directions must be integers ({err})") from None
    if n < 1:
        raise ValueError(f"n (number of training examples) must be >= 1; got {n}")
    if not (1 <= batch_size <= n):
        raise ValueError(f"batch_size must satisfy 1 <= batch_size <= n (n={n}); got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1; got {directions}")
    clip = float(clip)
    if not clip > 0:  # inf (no clipping) is allowed for non-private runs, checked below
        raise ValueError(f"clip must be > 0; got {clip!r}")
    eps_target = float(epsilon_target)
    if math.isnan(eps_target) or eps_target < 0:
        raise ValueError(f"epsilon_target must be >= 0 (inf allowed); got {epsilon_target!r}")
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    pld_discretization = _check_pld_discretization(pld_discretization)

    q = batch_size / n
    compositions = steps * directions
    calibrated_with = accountant if sigma is None else None
    if sigma is not None:
        sigma = _check_sigma(sigma)
        if math.isinf(sigma):
            raise ValueError("sigma must be finite; got inf")
    private = not math.isinf(eps_target) if sigma is None else sigma > 0
    if private and math.isinf(clip):
        raise ValueError("clip must be finite for a private run (sensitivity would be infinite); got inf")

    def calibrate_and_check() -> dict[str, Any]:
        s = sigma
        if s is None:
            s = calibrate_sigma(eps_target, delta, q, compositions, accountant, pld_discretization=pld_discretization)
        achieved: dict[str, float | str] = {}
        for name in ACCOUNTANTS:
            if s == 0:
                achieved[name] = "inf"
                continue
            try:
                achieved[name] = _json_float(epsilon(s, q, compositions, delta, name, pld_discretization=pld_discretization))
            except (RuntimeError, ValueError, FloatingPointError) as err:
                if name == calibrated_with:
                    raise
                # A cross-check that a library cannot evaluate (e.g. PRV's discretisation at very
                # small sigma) must not block the run; the calibrating accountant still holds.
                achieved[name] = f"not computed: {type(err).__name__}: {err}"
        return {"sigma": s, "epsilon_achieved": achieved}

    key = dict(epsilon_target=_json_float(eps_target), delta=delta, q=q, compositions=compositions,
               calibrated_with=calibrated_with, sigma=sigma, pld_discretization=pld_discretization,
               library_versions=library_versions())

    def certifies(cached: dict[str, Any]) -> bool:
        """A cached sigma is used only if it still buys the target (one accountant evaluation)."""
        if calibrated_with is None or not private:
            return True
        s = float(cached["sigma"])
        achieved = _epsilon_unchecked(s, q, compositions, delta, calibrated_with, pld_discretization)
        return s > 0 and achieved <= eps_target and cached["epsilon_achieved"].get(calibrated_with) == _json_float(achieved)

    numbers = memoized(cache_dir, key, calibrate_and_check, verify=certifies)
    sigma, achieved = float(numbers["sigma"]), numbers["epsilon_achieved"]

    return {
        "private": private,
        "epsilon_target": _json_float(eps_target),
        "delta": delta,
        "sigma": sigma,
        "noise_multiplier": sigma,
        "q": q,
        "n": n,
        "expected_batch_size": float(batch_size),
        "steps": steps,
        "directions": directions,
        "compositions": compositions,
        "clip": _json_float(clip),
        "sampler": "poisson",
        "neighbouring": "add/remove one example",
        "sensitivity": _json_float(clip),
        "mechanism": "gaussian",
        # The trainer adds exactly this: N(0, noise_std_on_sum^2) on each clipped sum.
        "noise_std_on_sum": sigma * clip if private else 0.0,
        "calibrated_with": calibrated_with,
        "pld_discretization": pld_discretization,
        "epsilon_achieved": achieved,
        "library_versions": library_versions(),
    }


# --------------------------------------------------------------------------------------
# other conventions: DPZero as published, and the pure-DP Laplace mechanism
# --------------------------------------------------------------------------------------


#: DPZero's published accounting is at delta = 1e-5 whatever the config says (their code's value).
DPZERO_DELTA = 1e-5


def opacus_noise_multiplier(epsilon: float, delta: float, q: float, steps: int) -> float:
    """DPZero's sigma: ``opacus.accountants.utils.get_noise_multiplier`` (RDP, Poisson add/remove)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp"))


def opacus_epsilon(sigma: float, delta: float, q: float, steps: int) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian releases with multiplier ``sigma``, by
    opacus' RDP accountant (the accountant DPZero's published numbers use)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(sigma), float(q), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


def dpzero_published_record(*, n: int, batch_size: int, steps: int, clip: float, epsilon_target: float, delta: float = DPZERO_DELTA) -> dict[str, Any]:
    """DPZero's own accounting (Zhang et al. 2024, their code): replace-one neighbours.

    sigma comes from opacus' RDP calibration for a sensitivity-1 add/remove query; the noise
    on the clipped sum is ``2 sigma C`` because replacing one example moves the sum by up to
    2C.  For comparison with the other methods, the record also gives the epsilon of the same
    noise under this project's convention (add/remove, sensitivity C: multiplier 2 sigma).
    """
    q = batch_size / n
    record = accounting_record(n=n, batch_size=batch_size, steps=steps, clip=clip, epsilon_target=epsilon_target, delta=delta, sigma=0.0)
    if math.isinf(float(epsilon_target)):
        return record | {"accounting": "dpzero-published"}
    sigma = opacus_noise_multiplier(float(epsilon_target), delta, q, steps)
    common = {name: _json_float(epsilon(2 * sigma, q, steps, delta, name)) for name in ACCOUNTANTS}
    return record | {
        "private": True,
        "accounting": "dpzero-published",
        "sigma": sigma,
        "noise_multiplier": sigma,
        "neighbouring": "replace one example (DPZero)",
        "sensitivity": 2 * clip,
        "noise_std_on_sum": 2 * sigma * clip,
        "calibrated_with": "opacus-rdp",
        "epsilon_achieved": {"opacus-rdp": float(epsilon_target)},
        "epsilon_add_remove": common,
        # DPZero's code divides B by the nominal k * classes; with fewer real examples (TREC's
        # rare class) that understates q, so the real training-set size is used here
        "sampling_rate_from": "the real training-set size n (DPZero's code: the nominal k x classes)",
        "library_versions": library_versions() | {"opacus": _version("opacus")},
    }


def laplace_step_epsilon(epsilon_total: float, q: float, compositions: int) -> tuple[float, float]:
    """Per-release epsilons of Poisson-subsampled Laplace releases composing to ``epsilon_total``.

    Basic composition of pure DP splits the budget evenly: eps_step = eps / T'.  Amplification
    by Poisson subsampling under add/remove (Li et al. 2012; Balle et al. 2018) turns an
    eps0-DP release into a log(1 + q (e^eps0 - 1))-DP one; inverting it gives the eps0 each
    unsampled release may spend.  Returns (eps_step, eps0).
    """
    eps_step = float(epsilon_total) / compositions
    eps0 = math.log1p(math.expm1(eps_step) / q)
    return eps_step, eps0


def laplace_epsilon(eps0: float, q: float, compositions: int) -> float:
    """Total pure-DP epsilon of ``compositions`` Poisson-subsampled eps0-DP releases."""
    return compositions * math.log1p(q * math.expm1(eps0))


def laplace_record(*, n: int, batch_size: int, steps: int, directions: int, clip: float, epsilon_target: float) -> dict[str, Any]:
    """Pure epsilon-DP accounting of the Laplace variant of DP-ZO (Tang et al. 2024)."""
    q = batch_size / n
    compositions = steps * directions
    record = accounting_record(n=n, batch_size=batch_size, steps=steps, directions=directions, clip=clip, epsilon_target=epsilon_target, delta=0.5, sigma=0.0)
    record.update(mechanism="laplace", delta=0.0, accounting="pure-dp: subsampling amplification + basic composition")
    if math.isinf(float(epsilon_target)):
        return record
    eps_step, eps0 = laplace_step_epsilon(float(epsilon_target), q, compositions)
    record.update(
        private=True,
        sigma=None,
        noise_multiplier=None,
        epsilon_per_release=eps_step,
        epsilon_unamplified=eps0,
        laplace_scale_on_sum=clip / eps0,
        noise_std_on_sum=math.sqrt(2) * clip / eps0,
        calibrated_with="laplace-basic-composition",
        epsilon_achieved={"pure": laplace_epsilon(eps0, q, compositions)},
    )
    return record


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def method_ledger(
    method: str,
    *,
    n: int,
    batch_size: int,
    steps: int,
    directions: int,
    clip: float,
    epsilon_target: float,
    delta: float,
    accountant: str = "pld",
    convention: str = "common",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The privacy ledger of one cell, for any method (``cache_dir``: see :func:`accounting_record`).

    ``convention="common"`` (default) accounts every method the same way: Poisson sampling,
    add/remove neighbours, ``accountant`` for sigma at ``delta``.  ``"published"`` uses each
    method's own published accounting where it differs (DPZero: opacus RDP, replace-one,
    delta = 1e-5).  The Laplace variant is pure epsilon-DP under either convention.
    """
    from .methods import ZO, base_method, is_private

    base = base_method(method)  # a variant ("dpzero+c50") is accounted like its method
    if convention not in ("common", "published"):
        raise ValueError(f"accounting convention must be 'common' or 'published'; got {convention!r}")
    common = dict(n=n, batch_size=batch_size, steps=steps, clip=clip, epsilon_target=epsilon_target)
    if not is_private(method):
        record = {"private": False, "epsilon_target": "inf", "n": n, "steps": steps,
                  "neighbouring": "none: this method makes no privacy claim"}
    elif ZO.get(base) is not None and ZO[base].mechanism == "laplace":
        record = laplace_record(directions=directions, **common)
    elif base == "dpzero" and convention == "published":
        if directions != 1:
            raise ValueError("DPZero's published accounting has one direction per step")
        record = dpzero_published_record(**common)
    else:
        record = accounting_record(directions=directions, delta=delta, accountant=accountant, cache_dir=cache_dir, **common)
        record["accounting"] = "common"
    record["method"] = method
    return record
