"""The model a checkpoint describes, built without its weights (on the meta device).

Before any job, each configured model is built from its config.json alone, as the class that
:func:`dpzo.models.classifier.load_model` would load (a masked or a causal LM), on the meta
device: no memory and no tensor read.  That is enough to see what would otherwise surface inside
a train job, after Snakemake has deleted its finished outputs: a config.json that parses but
describes no buildable model, an input embedding smaller than the tokenizer, and a checkpoint
without the output head the prompts are scored with (which transformers would initialise at
random, giving meaningless accuracies; :func:`new_head_weights`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dpzo.data.inputs import tensor_names, weights_file_of


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


def head_weight_names(model: torch.nn.Module, family: str) -> list[str]:
    """The state-dict names of the output head the prompts are scored with: the whole prediction
    head of a masked LM (BERT's ``cls.predictions.*``, RoBERTa's ``lm_head.*``), the LM head of a
    causal one (``classifier.output_head``, the module the train job applies)."""
    from dpzo.models.classifier import output_head

    head = output_head(model, family)
    prefix = next(name for name, module in model.named_modules() if module is head)
    return [name for name in model.state_dict(keep_vars=True) if name.startswith(prefix + ".")]


def _aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """For each state-dict name, every name of the same tensor: a head weight tied to the input
    embeddings (or a bias tied to another) is loaded from whichever of its names is stored."""
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), set()).add(name)
    out = {name: names for names in by_tensor.values() for name in names}
    # transformers >= 5 also declares the ties it makes at load time (target -> source)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if isinstance(target, str) and isinstance(source, str):
            joined = out.get(target, {target}) | out.get(source, {source})
            for name in joined:
                out[name] = joined
    return out


def _legacy_name(name: str) -> str:
    """transformers 4's renaming of old LayerNorm names (``gamma``/``beta``) on load."""
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))


def _renamer(model: torch.nn.Module):
    """How transformers renames a checkpoint's tensor names when loading ``model`` (legacy
    ``LayerNorm.gamma``/``beta``, per-architecture mappings): its own code where it has it
    (transformers >= 5), else the legacy LayerNorm names.  A renaming that fails keeps the legacy
    one, so that a change in transformers' internals never stops a run here."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except Exception:  # an older (or newer) transformers without these internals
        return _legacy_name

    def rename(name: str) -> str:
        try:
            return rename_source_key(name, renamings, converters)[0]
        except Exception:
            return _legacy_name(name)

    return rename


def checkpoint_tensor_names(path: str | Path) -> list[str] | None:
    """The tensor names stored in the checkpoint at ``path`` (safetensors headers, a shard index, or
    the pickle of a PyTorch ``.bin`` opened with ``mmap`` on the meta device: no tensor is read), or
    None when no weights file is found."""
    weights = weights_file_of(path)
    if weights is None:
        return None
    names = tensor_names(weights)
    if names is None:
        state = torch.load(weights, map_location="meta", weights_only=True, mmap=True)
        names = sorted(state)
    return names


def new_head_weights(model: torch.nn.Module, family: str, stored: list[str]) -> list[str]:
    """The output-head weights of ``model`` that a checkpoint storing the tensors ``stored`` lacks,
    i.e. that ``from_pretrained`` would initialise at random ([] when the head is all there).

    A name counts as stored when transformers would load it: after its renaming, with or without
    the base model's prefix (a checkpoint saved from ``BertModel`` stores ``embeddings.*``, not
    ``bert.embeddings.*``), or through a weight it is tied to (the decoder tied to the input
    embeddings is stored once, under the embeddings' name).
    """
    rename = _renamer(model)
    present = {rename(name) for name in stored}
    prefix = getattr(model, "base_model_prefix", "") + "."

    def is_stored(name: str) -> bool:
        return name in present or (prefix != "." and name.startswith(prefix) and name[len(prefix) :] in present)

    # names transformers itself expects to be absent and never reports (transformers 4 lists some)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    aliases = _aliases(model)
    return [
        name
        for name in head_weight_names(model, family)
        if not any(map(is_stored, aliases.get(name, {name}))) and not any(p.search(name) for p in ignored)
    ]


def missing_head_weights(path: str | Path, family: str = "auto") -> list[str]:
    """The output-head weights that loading the checkpoint at ``path`` as ``family`` initialises at
    random ([] when it holds its head, or when no weights file is found)."""
    stored = checkpoint_tensor_names(path)
    if stored is None:
        return []
    model, family = meta_model(path, family)
    return new_head_weights(model, family, stored)


def new_head_record(model_path: str, family: str, model_key: str) -> dict:
    """What a cell of a model with ``allow_new_head`` says about its head: the head weights the
    checkpoint lacked, which ``from_pretrained`` initialised at random (none: the head was there)."""
    initialised = missing_head_weights(model_path, family)
    return {
        "initialised": initialised,
        "note": f"models.{model_key}.allow_new_head: the listed output-head weights were not in the checkpoint "
        "and started from a random initialisation"
        if initialised
        else "the checkpoint held the whole output head",
    }
