"""Shared fixtures."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from .tiny import word_tokenizer

# This test session's installation key (and the records kept beside it), inherited by every
# Snakemake and job process the tests start: tests never touch the user's own key.
os.environ["DPZO_KEY_FILE"] = os.path.join(tempfile.mkdtemp(prefix="dpzo-test-key-"), "installation.key")


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny demo pipeline run once locally (3 cells); shared by the workflow, resume and
    SLURM tests, which compare against it or reuse its demo model and data.  Tests that change
    its config must only add cells (the 3 original ones stay as they are)."""
    import yaml

    from .pipeline import snakemake
    from .test_workflow import TINY

    workdir = tmp_path_factory.mktemp("pipeline")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    snakemake(workdir)
    return workdir
