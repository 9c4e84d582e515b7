"""Loading language models and scoring prompts: label-word logits and per-example losses.

Both families go through ``from_pretrained``, so the embedded demo models and real checkpoints
(``roberta-large``, ``facebook/opt-2.7b``) share one code path.

* ``mlm``: the hidden state at ``<mask>`` goes through the MLM head; the K label-word logits are
  the classifier (LM-BFF).
* ``causal``: the hidden state at the last prompt token goes through the LM head; the K label
  words are scored as the next token (MeZO's scoring for single-token candidates, done with one
  forward per example instead of one per candidate).

The head is applied only to the scored rows, so no ``B x S x V`` logits tensor is ever built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dpzo.data.inputs import ModelDirError, model_dir_problems
from dpzo.data.splits import Example
from dpzo.data.tasks import EncodedPrompt, TaskSpec, encode_prompt, label_word_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def detect_family(config) -> str:
    """'mlm' or 'causal' from a transformers config (its architectures, else its model type)."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForMaskedLM"):
            return "mlm"
        if arch.endswith("ForCausalLM"):
            return "causal"
    if getattr(config, "model_type", "") in {"roberta", "bert", "xlm-roberta", "deberta-v2", "electra"}:
        return "mlm"
    return "causal"


def load_model(
    path: str | Path,
    *,
    family: str = "auto",
    dtype: str = "float32",
    device: str = "cpu",
    placement: str | dict | None = None,
    max_memory: dict | None = None,
):
    """Load tokenizer and model with the Auto classes; returns (model, tokenizer, family).

    ``path`` is a directory or a Hugging Face id already in the local cache: nothing is ever
    downloaded here (see :mod:`dpzo.pipeline.preflight`).  Raises :class:`ModelDirError` for a missing or
    incomplete model directory, or an id that is not in the cache, before anything is trained.

    ``placement`` spreads the model over the visible devices with accelerate's device map
    instead of moving it to ``device``: ``"auto"`` (fill the GPUs in order), ``"balanced"``
    (even shares), or ``{module name: device}`` with GPUs only (a ``cpu``/``disk`` module would be
    offloaded by accelerate, which training refuses); ``max_memory`` caps each GPU
    (``{0: "70GiB", 1: "70GiB"}``).  Training then keeps one flat buffer per device
    (``dpzo.zo.placed``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    problems = model_dir_problems(path)
    if problems:
        raise ModelDirError("; ".join(problems))
    offline = dict(local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(path, **offline)
        if family == "auto":
            family = detect_family(config)
        cls = AutoModelForMaskedLM if family == "mlm" else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(path, **offline)
        placed = {} if placement is None else {"device_map": placement, "max_memory": max_memory}
        model = cls.from_pretrained(path, dtype=DTYPES[dtype], **placed, **offline)
    except OSError as err:  # transformers' "not found in the cache" errors
        raise ModelDirError(
            f"model {path} could not be loaded ({str(err).splitlines()[0]}); give a directory written by "
            "save_pretrained, or a hub id that is in the local Hugging Face cache (nothing is downloaded)"
        ) from None
    if placement is None:
        model.to(device)
    # Zeroth-order training runs in eval mode: dropout would make the two perturbed losses
    # differ by more than the perturbation itself.
    model.eval()
    return model, tokenizer, family


def output_head(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """The module that turns the base model's last hidden states into vocabulary logits.

    Found through transformers' own API, for any family: the output embeddings
    (``get_output_embeddings``) for a causal LM (its final norm is part of the base model); for
    a masked LM the whole prediction head around them (transform, norm, decoder: RoBERTa's
    ``lm_head``, BERT's and DeBERTa-v2's ``cls``), the child of the model that holds them.
    """
    out = model.get_output_embeddings()
    if out is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None): a language "
            "model with a vocabulary head is needed (a *ForMaskedLM or *ForCausalLM class)"
        )
    if family == "causal":
        return out
    base = model.base_model
    for child in model.children():
        if child is not base and any(m is out for m in child.modules()):
            return child
    return out


@dataclass
class EncodedSet:
    """A tokenized split: ragged ids stored as a padded tensor plus lengths, ready to batch."""

    input_ids: torch.Tensor  # [N, S_max] right-padded
    lengths: torch.Tensor  # [N]
    score_pos: torch.Tensor  # [N]
    labels: torch.Tensor  # [N]
    pad_id: int

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, rows: Sequence[int] | np.ndarray) -> EncodedSet:
        """The examples ``rows`` (repeats allowed), as a set of their own."""
        index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[index],
            lengths=self.lengths[index],
            score_pos=self.score_pos[index],
            labels=self.labels[index],
        )

    def batch(self, index: torch.Tensor | Sequence[int], device: str | torch.device = "cpu") -> dict:
        """The examples ``index`` on ``device``, cut to their longest: ``input_ids``, ``attention_mask``,
        ``score_pos`` and ``labels``."""
        index = torch.as_tensor(index, dtype=torch.long)
        width = int(self.lengths[index].max()) if index.numel() else 1
        ids = self.input_ids[index, :width]
        mask = (torch.arange(width)[None, :] < self.lengths[index][:, None]).long()
        return {
            "input_ids": to_device(ids, device),
            "attention_mask": to_device(mask, device),
            "score_pos": to_device(self.score_pos[index], device),
            "labels": to_device(self.labels[index], device),
        }


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the GPU.

    A plain ``.to("cuda")`` from pageable memory synchronises the stream, i.e. waits for every
    kernel queued so far; from pinned memory the copy is queued like a kernel.  The caching
    host allocator keeps the pinned buffer alive until the copy has run.
    """
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def stack_prompts(prompts: list[EncodedPrompt], labels: list[int], pad_id: int) -> EncodedSet:
    """Right-pad tokenized prompts into one tensor."""
    width = max((len(e.input_ids) for e in prompts), default=1)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, e in enumerate(prompts):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
    return EncodedSet(
        input_ids=ids,
        lengths=torch.tensor([len(e.input_ids) for e in prompts], dtype=torch.long),
        score_pos=torch.tensor([e.score_position for e in prompts], dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        pad_id=pad_id,
    )


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id (0 when it has none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def template_for(task: TaskSpec, family: str) -> str:
    """The task's prompt template for a model family (``causal`` or ``mlm``)."""
    return task.causal_template if family == "causal" else task.template


def encode_examples(examples: list[Example], task: TaskSpec, tokenizer, *, family: str, max_length: int) -> EncodedSet:
    """Tokenize every example once with the task's template for this model family."""
    causal = family == "causal"
    template = template_for(task, family)
    encoded = [
        encode_prompt(template, ex.texts, tokenizer, max_length=max_length, causal=causal, **task.sent_limits)
        for ex in examples
    ]
    return stack_prompts(encoded, [ex.label for ex in examples], pad_token_id(tokenizer))


class PromptClassifier:
    """A language model used as a K-way classifier through its label-word logits."""

    def __init__(
        self,
        model,
        tokenizer,
        family: str,
        task: TaskSpec | None,
        *,
        max_length: int | None = None,
        label_ids: Sequence[int] | None = None,
    ):
        """``label_ids`` overrides the task's label words (then tokenizer and task may be None:
        scoring already tokenized batches, as ``dpzo bench`` does)."""
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.task = task
        self.max_length = max_length or (task.max_length if task is not None else None)
        self.device = next(model.parameters()).device
        ids = list(label_ids) if label_ids is not None else label_word_ids(task, tokenizer)
        self.label_ids = torch.tensor(ids, device=self.device)
        self.head = output_head(model, family)

    def encode(self, examples: list[Example]) -> EncodedSet:
        """Tokenize ``examples`` with the task's template for this model's family."""
        return encode_examples(examples, self.task, self.tokenizer, family=self.family, max_length=self.max_length)

    def label_logits(self, batch: dict) -> torch.Tensor:
        """[B, K] label-word logits in float32 (float64 for a float64 model) from one batched forward.

        Differentiable (first-order baselines backpropagate through it); zeroth-order code and
        evaluation call it under ``torch.no_grad``.
        """
        hidden = self.model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["score_pos"].to(hidden.device)]
        # a placed model's last layer and head may sit on other devices than its inputs: the
        # few scored rows go to the head, the logits come back (no-ops on one device)
        head_device = next(self.head.parameters()).device
        label_ids, rows = self.label_ids.to(head_device), rows.to(head_device)
        # The head runs as a module on the scored rows only (one per example), so that a streamed
        # model (``dpzo.zo.streamed``) can perturb it per group of rows.
        logits = self.head(rows)[:, label_ids.to(rows.device)]
        logits = logits.to(self.device)
        # 16-bit logits go to float32 for the loss; a float64 model keeps float64 (the
        # reference tests compare trajectories to 1e-12).
        return logits if logits.dtype == torch.float64 else logits.float()

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        """[B] cross-entropy over the K label words (float32, or float64 for a float64 model), no reduction."""
        return F.cross_entropy(self.label_logits(batch), batch["labels"], reduction="none")
