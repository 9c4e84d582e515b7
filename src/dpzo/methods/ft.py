"""Full fine-tuning with backprop (``dpzo.baselines.firstorder``): the non-private upper reference."""

from dpzo.methods.base import FirstOrderMethod


class FineTuning(FirstOrderMethod):
    name = "ft"


METHOD = FineTuning()
