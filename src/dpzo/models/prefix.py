"""Prefix tuning (Li & Liang 2021, as MeZO's "prefix" baseline): trainable key/value vectors in front of
every self-attention layer's keys and values, the model's own weights untouched.

Used by ``tuning: prefix`` (any zeroth-order method, DP-SGD) and by ``dp-prefix``
(``dpzo.models.adapters``, ``dpzo.baselines.firstorder``).

Prefix implementation
---------------------
The prefix really extends the key/value sequence of every self-attention layer.  Each attention
module (``k_proj``/``v_proj`` with a ``head_dim``: OPT, Llama, Qwen2, Mistral, grouped key/value
heads included; ``key``/``value`` with an ``attention_head_size``: RoBERTa, BERT) gets a child
:class:`PrefixKV` holding ``key``/``value`` parameters of shape
``[heads, P, head_dim]``, and its attention call is routed (through transformers'
``AttentionInterface``) to :func:`_prefix_attention`, which concatenates the prefix in front of
the keys and values the layer computed and extends the attention mask with P always-visible
columns (for causal models, every query sees the whole prefix), then calls the model's own
attention implementation (``sdpa`` or ``eager``).  Positions of the real tokens are unchanged
(the prefix has no position), as in Li & Liang and MeZO.  The routing replaces the module's
``config`` attribute with a proxy whose ``_attn_implementation`` names the prefix function and
that forwards everything else to the model's config.

Why not ``peft``'s prefix tuning: peft passes the prefix as a key/value cache, so the model
counts the P virtual tokens as past positions and shifts the real tokens' positions by P (the
cache's length is where a model's positions start); MeZO's prefix (the published numbers), its
initialisation from real activations, and this one leave positions alone.  With the positions
shifted by hand and no padding, peft's prefix gives the same logits as this one for the same
values (OPT, and Llama with grouped key/value heads: ``tests/test_prefix.py``).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

#: Name under which the prefix attention function is registered in transformers' AttentionInterface.
PREFIX_ATTENTION = "dpzo_prefix"

#: Attention implementations the prefix can wrap (those taking an explicit additive/boolean mask).
_PREFIX_INNER = ("sdpa", "eager")


class PrefixKV(nn.Module):
    """Trainable key/value prefix of one self-attention layer, each ``[heads, P, head_dim]``."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        if key.shape != value.shape or key.dim() != 3:
            raise ValueError(
                f"prefix key/value must both be [heads, P, head_dim]; got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        self.key = nn.Parameter(key.detach().clone())
        self.value = nn.Parameter(value.detach().clone())

    @property
    def tokens(self) -> int:
        """Number of prefix positions P."""
        return int(self.key.shape[1])


class _PrefixAttentionConfig:
    """Stands in for an attention module's ``config``: routes its attention to the prefix function.

    Every other attribute is read from (and written to) the model's own config, so later changes
    to it (e.g. the attention implementation) are seen.
    """

    def __init__(self, config, eager_fn):
        object.__setattr__(self, "_dpzo_config", config)
        object.__setattr__(self, "_dpzo_eager", eager_fn)

    @property
    def _attn_implementation(self) -> str:
        return PREFIX_ATTENTION

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_dpzo_config"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_dpzo_config"), name, value)

    def __repr__(self) -> str:
        return (
            f"_PrefixAttentionConfig({object.__getattribute__(self, '_dpzo_config')._attn_implementation!r} + prefix)"
        )


def _extend_mask(
    mask: torch.Tensor | None, prefix: int, q_len: int, k_len: int, *, causal: bool, boolean: bool, dtype, device
) -> torch.Tensor | None:
    """The attention mask for ``[prefix; keys]``: P always-visible columns in front."""
    if mask is None:
        if not (causal and q_len > 1):
            return None  # no padding, bidirectional (or one query): everything is visible
        # Causal without a materialised mask (sdpa's is_causal shortcut): build it, aligned to
        # the last key as sdpa/flash do when k_len > q_len.
        visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)[None, None]
        mask = (
            visible
            if boolean
            else torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
        )
    if mask.shape[-1] != k_len:
        raise RuntimeError(f"prefix attention: mask covers {mask.shape[-1]} keys but the layer has {k_len}")
    if mask.dtype == torch.bool:
        front = torch.ones(*mask.shape[:-1], prefix, dtype=torch.bool, device=mask.device)
    else:
        front = torch.zeros(*mask.shape[:-1], prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=-1)


def _prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over ``[prefix; keys]`` and ``[prefix; values]``, then the model's own kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    prefix: PrefixKV = module.dpzo_prefix
    proxy = module.config
    impl = object.__getattribute__(proxy, "_dpzo_config")._attn_implementation
    if impl not in _PREFIX_INNER:
        raise NotImplementedError(f"prefix tuning supports attn_implementation {_PREFIX_INNER}, not {impl!r}")
    eager = object.__getattribute__(proxy, "_dpzo_eager")
    inner = eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)

    b, q_len, k_len, p = key.shape[0], query.shape[2], key.shape[2], prefix.tokens
    pk = prefix.key.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    pv = prefix.value.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    key = torch.cat([pk, key], dim=2)
    value = torch.cat([pv, value], dim=2)
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    attention_mask = _extend_mask(
        attention_mask, p, q_len, k_len, causal=causal, boolean=impl == "sdpa", dtype=query.dtype, device=query.device
    )
    return inner(module, query, key, value, attention_mask, **kwargs)


def _attention_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Linear, nn.Linear, int, int]]:
    """(name, module, key Linear, value Linear, key/value heads, head_dim) of every self-attention layer.

    The heads are the key projection's (``out_features // head_dim``): with grouped-query
    attention (Llama, Qwen2, Mistral) the prefix has the key/value heads, which the model's own
    attention function repeats for the query heads as it does the layer's keys.
    """
    layers = []
    for name, m in model.named_modules():
        if getattr(m, "config", None) is None:  # transformers' attention modules hold their config
            continue
        k, v = getattr(m, "k_proj", None), getattr(m, "v_proj", None)  # OPT, Llama, Qwen2, Mistral
        head_dim = getattr(m, "head_dim", None)
        if not (isinstance(k, nn.Linear) and isinstance(v, nn.Linear)):
            k, v = getattr(m, "key", None), getattr(m, "value", None)  # RoBERTa, BERT
            head_dim = getattr(m, "attention_head_size", None)
        if isinstance(k, nn.Linear) and isinstance(v, nn.Linear) and isinstance(head_dim, int) and head_dim > 0:
            layers.append((name, m, k, v, int(k.out_features) // head_dim, head_dim))
    return layers


def prefix_modules(model: nn.Module) -> list[PrefixKV]:
    """The :class:`PrefixKV` modules installed in ``model`` (empty when it has no prefix)."""
    return [m for m in model.modules() if isinstance(m, PrefixKV)]


@torch.no_grad()
def install_prefix(model: nn.Module, tokens: int, *, seed: int) -> dict[str, nn.Parameter]:
    """Install a ``tokens``-position key/value prefix in every self-attention layer of ``model``.

    The prefix is initialised with the key/value activations that each layer computes for
    ``tokens`` random vocabulary tokens (drawn with a public generator seeded by ``seed``), as
    MeZO's prefix baseline does.  Model weights are not touched (nor frozen: the caller decides).
    Returns the new parameters by their names in ``model``.
    """
    from transformers import AttentionInterface

    tokens = int(tokens)
    if tokens < 1:
        raise ValueError(f"prefix tokens must be >= 1; got {tokens}")
    if prefix_modules(model):
        raise RuntimeError("model already has a prefix installed")
    impl = model.config._attn_implementation
    if impl not in _PREFIX_INNER:
        raise NotImplementedError(f"prefix tuning supports attn_implementation {_PREFIX_INNER}, not {impl!r}")
    layers = _attention_layers(model)
    if not layers:
        raise NotImplementedError(
            f"no supported self-attention layers (k_proj/v_proj with head_dim, or key/value with "
            f"attention_head_size) in {type(model).__name__}"
        )
    for name, m, *_ in layers:
        if getattr(m, "is_cross_attention", False):
            raise NotImplementedError(f"{name} is a cross-attention layer; prefix tuning supports self-attention only")

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    ids = torch.randint(0, int(model.config.vocab_size), (1, tokens), generator=gen).to(device)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, (_, _, k_lin, v_lin, _, _) in enumerate(layers):
        hooks.append(k_lin.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(2 * i, out.detach())))
        hooks.append(
            v_lin.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(2 * i + 1, out.detach()))
        )
    was_training = model.training
    model.eval()  # no dropout in the initialising activations
    try:
        model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    AttentionInterface.register(PREFIX_ATTENTION, _prefix_attention)
    for i, (_, m, _, _, heads, head_dim) in enumerate(layers):
        k = captured[2 * i].reshape(tokens, heads, head_dim).transpose(0, 1)
        v = captured[2 * i + 1].reshape(tokens, heads, head_dim).transpose(0, 1)
        m.dpzo_prefix = PrefixKV(k, v)
        eager = getattr(sys.modules[type(m).__module__], "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(m).__module__} has no eager_attention_forward to fall back on")
        m.config = _PrefixAttentionConfig(m.config, eager)
    return {n: p for n, p in model.named_parameters() if ".dpzo_prefix." in n}


def remove_prefix(model: nn.Module) -> None:
    """Undo :func:`install_prefix` (the model then computes exactly as before)."""
    for _, m, *_ in _attention_layers(model):
        if "dpzo_prefix" in m._modules:  # the prefix is a registered child module
            del m.dpzo_prefix
        if isinstance(m.__dict__.get("config"), _PrefixAttentionConfig):
            m.config = object.__getattribute__(m.config, "_dpzo_config")
