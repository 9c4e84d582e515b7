"""The secret randomness of a private run: batches and noise from the OS, never from a config seed."""

from __future__ import annotations

import operator
import os
import secrets
import warnings
from typing import Any

import numpy as np

#: Environment variable holding an *insecure* integer seed for the privacy RNG (tests only).
INSECURE_SEED_ENV = "DPZO_INSECURE_TEST_NOISE_SEED"
#: What a figure drawn from results of that seed says: they claim no privacy.
TEST_NOISE_NOTICE = f"NOT PRIVATE: test noise ({INSECURE_SEED_ENV})"


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

    def uniform(self) -> float:
        """One draw uniform on [0, 1), e.g. to invert a distribution function (the number of
        candidate runs of a private selection)."""
        return float(self._generator.random())

    def integer(self, high: int) -> int:
        """One integer uniform on ``range(high)``, e.g. a candidate's point of a grid."""
        return int(self._generator.integers(operator.index(high)))

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
