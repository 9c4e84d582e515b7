"""Full fine-tuning with backprop (``dpzo.baselines.firstorder``): the non-private upper reference."""

from dpzo.methods.base import FirstOrderMethod


class FineTuning(FirstOrderMethod):
    """Non-private fine-tuning of every trainable weight with backprop (no privacy claim)."""

    name = "ft"


METHOD = FineTuning()
