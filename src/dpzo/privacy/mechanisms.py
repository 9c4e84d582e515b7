"""The noise mechanisms: the noisy sum of clipped per-example values that every private release adds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpzo.privacy.accountants import check_sigma
from dpzo.privacy.secret import SecretRandom


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
    sigma = check_sigma(sigma)
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
    def from_ledger(cls, ledger: dict[str, Any]) -> NoisySum:
        """The release a ledger accounts: its mechanism, noise scale on the sum and expected batch size.

        A non-private ledger records no noise, so its release adds none.
        """
        mechanism = ledger.get("mechanism", "gaussian")
        scale = (
            ledger["laplace_scale_on_sum"]
            if mechanism == "laplace" and ledger["private"]
            else ledger["noise_std_on_sum"]
        )
        return cls(mechanism, float(scale or 0.0), float(ledger["expected_batch_size"]))

    def release(self, clipped_sum: Any, rng: SecretRandom) -> Any:
        """(clipped_sum + noise) / divisor, the noise drawn on the host from ``rng``.

        ``clipped_sum`` is a number, or a float64 tensor that stays on its device (so the
        trainer need not wait for the GPU); the arithmetic is float64 either way.  A tensor of
        K > 1 entries (a K-dimensional release, DP-AggZO) gets K independent draws:
        N(0, scale² I_K), whose L2 sensitivity is that of one scalar (the same PLD).
        """
        noisy = float(clipped_sum) if isinstance(clipped_sum, (int, float, np.floating, np.integer)) else clipped_sum
        if self.scale > 0:
            if getattr(noisy, "ndim", 0) > 0:
                if self.mechanism != "gaussian":
                    raise ValueError("a vector release is Gaussian (its L2 sensitivity is the clip); got laplace")
                draw = rng.standard_normal_array(noisy.numel())
                draw = noisy.new_tensor(draw)
            else:
                draw = rng.standard_normal() if self.mechanism == "gaussian" else rng.standard_laplace()
            noisy = noisy + self.scale * draw  # not +=: never modify a caller's tensor
        return noisy / self.divisor
