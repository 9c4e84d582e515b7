"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from .tiny import word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """The unit-test models are tiny: intra-op threads only add synchronisation (and stall badly
    when the 2 cores are shared with other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
