"""DP prefix tuning: DP-SGD on trained virtual tokens only, the model frozen (``dpzo.baselines.firstorder``)."""

from typing import Any

from dpzo.methods.dp_sgd import DPSGD
from dpzo.methods.hyperparameters import TuningSettings


class DPPrefix(DPSGD):
    """DP-SGD on the prefix parameters only, the model frozen; accounted as DP-SGD (the paper's
    "FT-prefix"; ``dp-sgd`` with ``tuning: prefix`` is the same mechanism)."""

    name = "dp-prefix"
    installs_prefix = True

    def check(self, hp: Any) -> None:
        """The prefix is the whole of what it trains: a LoRA on top is refused."""
        if hp.tuning.kind != "full":
            raise ValueError("dp-prefix trains its own prefix only; tuning belongs on dp-sgd or a ZO method")

    def architecture_problem(self, model_type: str, hp: Any = None) -> str | None:
        """The prefix extends the key/value sequence of the attention layers it knows."""
        return TuningSettings(kind="prefix").architecture_problem(model_type)


METHOD = DPPrefix()
