"""DP prefix tuning: DP-SGD on trained virtual tokens only, the model frozen (``dpzo.baselines.firstorder``)."""

from dpzo.methods.dp_sgd import DPSGD


class DPPrefix(DPSGD):
    """DP-SGD on the prefix parameters only, the model frozen; accounted as DP-SGD."""

    name = "dp-prefix"


METHOD = DPPrefix()
