"""Zero-shot: the pretrained model evaluated with the task's prompt, nothing trained."""

from dpzo.methods.base import TRAINER_NONE, Method


class ZeroShot(Method):
    """The pretrained model evaluated as it is: no hyperparameters, nothing trained."""

    name = "zero-shot"
    config_block = "none"
    trainer = TRAINER_NONE


METHOD = ZeroShot()
