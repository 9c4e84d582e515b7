"""Zero-shot: the pretrained model evaluated with the task's prompt, nothing trained."""

from dpzo.methods.base import Method


class ZeroShot(Method):
    name = "zero-shot"
    config_block = "none"


METHOD = ZeroShot()
