"""In-context learning: labelled training examples in every test prompt (``dpzo.baselines.icl``).

No privacy claim (the demonstrations are training data, shown as they are).
"""

from dpzo.methods.base import TRAINER_ICL, Method
from dpzo.methods.hyperparameters import ICLHyperparameters


class ICL(Method):
    """In-context learning: training examples as demonstrations, nothing trained (no privacy claim)."""

    name = "icl"
    config_block = "icl"
    hyperparameters = ICLHyperparameters
    trainer = TRAINER_ICL


METHOD = ICL()
