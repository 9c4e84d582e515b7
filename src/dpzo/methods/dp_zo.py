"""DP-ZO (Tang et al. 2024): the raw loss difference is clipped, noised, then divided by 2β.

Clipping l+ - l- instead of (l+ - l-) / (2β) makes the clip (C ~ 0.05) independent of β.  Two
variants: Gaussian noise ((ε, δ)-DP) and Laplace noise (pure ε-DP, accounted by the closed form
of ``dpzo.privacy.records.laplace_record``).
"""

from typing import Any

from dpzo.methods.base import PrivateZOMethod


class DPZOGauss(PrivateZOMethod):
    """DP-ZO with Gaussian noise: the raw loss difference ``2 β d`` is clipped, noised, then divided by ``2 β``."""

    name = "dp-zo-gauss"

    def clipped_value(self, d: Any, beta: float) -> Any:
        """The raw difference ``2 β d``: the clip does not depend on β."""
        return d * (2.0 * beta)

    def gradient_from(self, released: Any, beta: float) -> Any:
        """The public division by ``2 β``, after the noise."""
        return released / (2.0 * beta)


class DPZOLaplace(DPZOGauss):
    """DP-ZO with Laplace noise on the clipped sum (pure ε-DP)."""

    name = "dp-zo-laplace"
    mechanism = "laplace"


METHODS = (DPZOGauss(), DPZOLaplace())
