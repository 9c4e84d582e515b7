"""MeZO (Malladi et al. 2023): the non-private zeroth-order reference.

A fixed-size batch drawn uniformly without replacement each step (public seed), the mean of the
raw per-example differences, a constant learning rate and ZO scale.  No privacy claim.
"""

from dpzo.methods.base import ZOMethod


class MeZO(ZOMethod):
    """Non-private zeroth-order fine-tuning: the mean of the (clipped) per-example quotients, no noise."""

    name = "mezo"


METHOD = MeZO()
