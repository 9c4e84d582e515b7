"""DPZero (Zhang et al. 2024): DP zeroth-order with a constant schedule.

The release is DP-ZOSO's (clip the quotient, Gaussian noise on the sum).  Its published
accounting differs: opacus RDP, replace-one neighbours, δ = 1e-5 (``accounting: published``;
``dpzo.privacy.records.dpzero_published_record``).
"""

from dpzo.methods.base import PrivateZOMethod


class DPZero(PrivateZOMethod):
    """DP zeroth-order with a constant schedule; ``accounting: published`` accounts it as its paper does."""

    name = "dpzero"
    published_accounting = "dpzero"


METHOD = DPZero()
