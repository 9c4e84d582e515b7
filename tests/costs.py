"""Random real-architecture language models and their training step, for the cost budgets.

The budget tests (``tests/test_cost_*.py``) compare what a step costs with what inference
costs on the same batch, measured by ``dpzo.zo.cost``.  The models here are real architectures
(OPT, Llama, RoBERTa) with random weights, shaped so that the weights dominate the inference
peak, as they do for the paper's models; ``fake=True`` builds them under fake tensors, so a
model of any size (the paper's OPT-1.3B and up) costs no memory and seconds of time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import transformers

from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.cost import fake_mode

FAMILIES = ("opt", "llama", "roberta")


def random_lm(
    family: str,
    *,
    hidden: int = 256,
    layers: int = 4,
    vocab: int = 2048,
    dtype: torch.dtype = torch.float32,
    fake: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """A random ``family`` language model (causal for OPT and Llama, masked for RoBERTa) in eval
    mode; ``fake``: built under a fake-tensor mode (no memory)."""
    torch.manual_seed(seed)
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    heads = max(1, hidden // 64)
    if family == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            ffn_dim=4 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=512, **special,
        )  # fmt: skip
        cls = transformers.OPTForCausalLM
    elif family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), intermediate_size=3 * hidden,
            max_position_embeddings=512, **special,
        )  # fmt: skip
        cls = transformers.LlamaForCausalLM
    elif family == "roberta":
        cfg = transformers.RobertaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=514, type_vocab_size=1, **special,
        )  # fmt: skip
        cls = transformers.RobertaForMaskedLM
    else:
        raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a fake module's tensors cannot be swapped by .to
    try:
        with fake_mode() if fake else contextlib.nullcontext():
            return cls(cfg).eval()
    finally:
        torch.set_default_dtype(previous)


def batch(model: torch.nn.Module, b: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """B random sequences and B target tokens (on the model's device, in its fake mode if any)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = torch.randint(4, vocab, (b, length), generator=g)
    targets = torch.randint(4, vocab, (b,), generator=g)
    weight = next(model.parameters())
    mode = getattr(weight, "fake_mode", None)  # a fake model takes fake inputs of its own mode
    if mode is not None:
        with mode:
            return mode.from_tensor(tokens), mode.from_tensor(targets)
    return tokens.to(weight.device), targets.to(weight.device)


def per_example_loss(
    model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor
) -> Callable[[np.ndarray], torch.Tensor]:
    """The loss of examples ``index``: cross-entropy of the last position's logits (one forward)."""

    def loss(index: np.ndarray) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long, device=tokens.device)
        logits = model(input_ids=tokens[index]).logits[:, -1, :]
        return torch.nn.functional.cross_entropy(logits.float(), targets[index], reduction="none")

    return loss


def inference(loss: Callable[[np.ndarray], torch.Tensor], b: int) -> Callable[[], torch.Tensor]:
    """One inference forward of the B examples, without autograd: the peak a step is held to."""

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return loss(np.arange(b))

    return forward


def zo_steps(
    model: torch.nn.Module,
    loss: Callable[[np.ndarray], torch.Tensor],
    b: int,
    *,
    method: str = "dp-zoso",
    steps: int = 2,
    log_every: int | None = None,
    **train_kwargs,
) -> Callable[[], dict]:
    """``steps`` private steps of ``method`` at q = 1 (every batch is the B examples of the
    inference forward), one log window unless ``log_every`` says otherwise."""
    from dpzo.zo.loop import train_zo

    hp = ZOHyperparameters(steps=steps, batch_size=b, lr=1e-6, clip=1.0, log_every=log_every or steps)

    def run() -> dict:
        return train_zo(
            model,
            loss,
            b,
            hp,
            method=method,
            run_seed=13,
            noise=NoisySum("gaussian", 1.0, float(b)),
            secret=SecretRandom(insecure_test_seed=5),
            **{"master_dtype": None, **train_kwargs},
        )

    return run
