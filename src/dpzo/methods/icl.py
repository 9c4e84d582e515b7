"""In-context learning: labelled training examples in every test prompt (``dpzo.baselines.icl``).

No privacy claim (the demonstrations are training data, shown as they are).
"""

from dpzo.methods.base import Method
from dpzo.methods.hyperparameters import ICLHyperparameters


class ICL(Method):
    name = "icl"
    config_block = "icl"
    hyperparameters = ICLHyperparameters


METHOD = ICL()
