"""DP prefix tuning: DP-SGD on trained virtual tokens only, the model frozen (``dpzo.baselines.firstorder``)."""

from dpzo.methods.dp_sgd import DPSGD


class DPPrefix(DPSGD):
    name = "dp-prefix"


METHOD = DPPrefix()
