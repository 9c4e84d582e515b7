"""DP prefix tuning: DP-SGD on trained virtual tokens only, the model frozen (``dpzo.baselines.firstorder``)."""

from typing import Any

from dpzo.methods.dp_sgd import DPSGD


class DPPrefix(DPSGD):
    """DP-SGD on the prefix parameters only, the model frozen; accounted as DP-SGD."""

    name = "dp-prefix"
    #: the attention layouts the prefix is installed in (OPT k_proj/v_proj, RoBERTa key/value)
    model_types = ("opt", "roberta")

    def check(self, hp: Any) -> None:
        """The prefix is the whole of what it trains: a LoRA on top is refused."""
        if hp.tuning.kind != "full":
            raise ValueError("dp-prefix trains its own prefix only; tuning: lora belongs on dp-sgd or a ZO method")

    def architecture_problem(self, model_type: str) -> str | None:
        """The prefix extends the key/value sequence of OPT and RoBERTa attention only."""
        if model_type in self.model_types:
            return None
        return (
            f"dp-prefix installs its key/value prefix in OPT and RoBERTa attention layers; a {model_type!r} "
            "model has neither. Remove dp-prefix from this model's methods (models.<key>.grid.methods)"
        )


METHOD = DPPrefix()
