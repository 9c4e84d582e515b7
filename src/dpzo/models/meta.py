"""The model a checkpoint describes, built without its weights (on the meta device).

Before any job, each configured model is built from its config.json alone, as the class that
:func:`dpzo.models.classifier.load_model` would load (a masked or a causal LM), on the meta
device: no memory and no tensor read.  That is enough to see what would otherwise surface inside
a train job, after Snakemake has deleted its finished outputs: a config.json that parses but
describes no buildable model, and an input embedding smaller than the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch


def model_class(config, family: str = "auto") -> tuple[type, str]:
    """The Auto class ``load_model`` loads a checkpoint of ``config`` with, and the family it decides
    (``family``: ``auto``, ``mlm`` or ``causal``, as ``models.<key>.family``)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from dpzo.models.classifier import detect_family

    if family == "auto":
        family = detect_family(config)
    return (AutoModelForMaskedLM if family == "mlm" else AutoModelForCausalLM), family


def meta_model(path: str | Path, family: str = "auto") -> tuple[torch.nn.Module, str]:
    """The model of the checkpoint at ``path`` (a directory or a cached hub id) built from its config
    on the meta device, and its family.  Raises what transformers raises for a config that does not
    describe a model (e.g. a hidden size that the attention heads do not divide)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls, family = model_class(config, family)
    with torch.device("meta"):
        model = cls.from_config(config)
    return model, family
