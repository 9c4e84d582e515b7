"""DP-ZOSO (Liu et al. 2024): DP zeroth-order with a stagewise schedule.

Poisson batches at rate q = B/n from the secret RNG, per-example clipping of the finite-difference
quotient, Gaussian noise on the sum, division by the expected batch size q n; the learning rate
and the ZO scale change per stage and a proximal term pulls toward the stage's starting point
(``dpzo.methods.hyperparameters.StageSchedule``).
"""

from dpzo.methods.base import PrivateZOMethod


class DPZOSO(PrivateZOMethod):
    """DP zeroth-order with a stagewise learning-rate / ZO-scale schedule and a proximal anchor."""

    name = "dp-zoso"
    config_block = "zo"
    staged = True


METHOD = DPZOSO()
