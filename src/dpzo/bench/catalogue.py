"""The models ``dpzo bench`` measures: hard-coded transformers configs, random weights, fixed batches.

Nothing is downloaded: each model is built from its config on the device, in the weights'
dtype.  The full-size entries have the released models' shapes (``opt-125m`` and ``roberta-base``
are the CPU-sized ones, in float32); the ``tiny-*`` ones the same architectures at toy size, for CI.
A run is named by a model, optionally at a batch shape: ``opt-125m@8x64`` (:func:`split_run`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark: its transformers config and the default batch shape and dtype."""

    arch: str  # "roberta" (masked LM), "opt" or "llama" (causal LMs)
    config: dict
    dtype: str
    batch_size: int
    seq_len: int
    label_ids: tuple[int, ...] = (6587, 372)  # two label words (" terrible", " great" in RoBERTa's vocabulary)
    mask_token_id: int = 50264

    @property
    def family(self) -> str:
        """``mlm`` for RoBERTa, ``causal`` for OPT and Llama (the family :class:`PromptClassifier` expects)."""
        return "mlm" if self.arch == "roberta" else "causal"

    @property
    def max_seq_len(self) -> int:
        """Longest input the model's position embeddings allow."""
        # RoBERTa's positions start after the padding index
        offset = self.config["pad_token_id"] + 1 if self.arch == "roberta" else 0
        return self.config["max_position_embeddings"] - offset


_ROBERTA_SPECIAL = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
_OPT_SPECIAL = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2)


def _opt(
    hidden: int, layers: int, heads: int, *, dtype: str = "float16", batch_size: int = 16, seq_len: int = 256
) -> BenchModel:
    """An OPT architecture of the released sizes (ffn 4 x hidden, 2048 positions, tied head), by
    default fp16, 16 x 256."""
    config = dict(
        vocab_size=50272,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=4 * hidden,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        **_OPT_SPECIAL,
    )
    return BenchModel("opt", config, dtype, batch_size, seq_len)


def _roberta(hidden: int, layers: int, heads: int, *, batch_size: int, seq_len: int) -> BenchModel:
    """A RoBERTa architecture of the released sizes (intermediate 4 x hidden, 514 positions, tied
    MLM decoder), float32."""
    config = dict(
        vocab_size=50265,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        **_ROBERTA_SPECIAL,
    )
    return BenchModel("roberta", config, "float32", batch_size, seq_len)


def _llama2(hidden: int, ffn: int, layers: int) -> BenchModel:
    """A Llama-2 architecture of the released sizes (head dim 128, 4096 positions), bf16, 16 x 256."""
    config = dict(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return BenchModel("llama", config, "bfloat16", 16, 256, label_ids=(1781, 2107))


MODELS: dict[str, BenchModel] = {
    # roberta-large: 24 layers, 1024 wide, tied MLM decoder (355M parameters)
    "roberta-large": _roberta(1024, 24, 16, batch_size=64, seq_len=128),
    # facebook/opt-1.3b: 24 layers, 2048 wide, tied output embedding (1.3B parameters)
    "opt-1.3b": _opt(2048, 24, 32),
    # facebook/opt-2.7b: 32 layers, 2560 wide, tied output embedding (2.65B parameters)
    "opt-2.7b": _opt(2560, 32, 32),
    # facebook/opt-13b: 40 layers, 5120 wide (12.9B parameters): the large-model grid's smallest
    "opt-13b": _opt(5120, 40, 40),
    # facebook/opt-6.7b: 32 layers, 4096 wide (6.7B parameters): streamed against resident
    "opt-6.7b": _opt(4096, 32, 32),
    # facebook/opt-30b: 48 layers, 7168 wide (30B parameters, 60 GB in fp16): streamed against resident
    "opt-30b": _opt(7168, 48, 56),
    # facebook/opt-66b: 64 layers, 9216 wide (66B parameters, 132 GB in fp16): DP-ZO's largest
    "opt-66b": _opt(9216, 64, 72),
    # Llama-2 architectures: SwiGLU, untied head; 7B: 32 layers, 4096 wide (6.7B parameters),
    # 13B: 40 layers, 5120 wide (13.0B parameters)
    "llama-7b": _llama2(4096, 11008, 32),
    "llama-13b": _llama2(5120, 13824, 40),
    # CPU-sized released models, float32, for the CPU targets (dpzo.bench.targets.CPU_TARGETS):
    # facebook/opt-125m: 12 layers, 768 wide, ffn 3072, tied output embedding (125M parameters)
    "opt-125m": _opt(768, 12, 12, dtype="float32", batch_size=16, seq_len=128),
    # roberta-base: 12 layers, 768 wide, intermediate 3072, tied MLM decoder (125M parameters)
    "roberta-base": _roberta(768, 12, 12, batch_size=16, seq_len=128),
    # CPU-sized stand-ins with the same architectures, for CI
    "tiny-roberta": BenchModel(
        "roberta",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=130,
            type_vocab_size=1,
            **_ROBERTA_SPECIAL,
        ),
        "float32",
        8,
        32,
        label_ids=(11, 12),
        mask_token_id=4,
    ),
    "tiny-opt": BenchModel(
        "opt",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
            **_OPT_SPECIAL,
        ),
        "float32",
        8,
        32,
        label_ids=(11, 12),
    ),
    "tiny-llama": BenchModel(
        "llama",
        dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "float32",
        8,
        32,
        label_ids=(11, 12),
    ),
}


#: the paper's models, as ``dpzo plan --catalogue`` projects them
PAPER_MODELS = (
    "roberta-large",
    "opt-1.3b",
    "opt-2.7b",
    "opt-6.7b",
    "opt-13b",
    "opt-30b",
    "opt-66b",
    "llama-7b",
    "llama-13b",
)


def split_run(run: str) -> tuple[str, int | None, int | None]:
    """``name`` or ``name@BxS`` -> (the catalogue's model, batch size B or None, tokens S or None)."""
    name, at, shape = run.partition("@")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if not at:
        return name, None, None
    b, x, s = shape.partition("x")
    if not (x and b.isdigit() and s.isdigit() and int(b) > 0 and int(s) > 0):
        raise ValueError(f"{run!r}: expected a model or model@BxS (batch x tokens, e.g. {name}@8x64)")
    return name, int(b), int(s)


def run_name(name: str, batch_size: int, seq_len: int) -> str:
    """The run of model ``name`` at batch ``batch_size`` x ``seq_len`` (what :func:`split_run` reads)."""
    return f"{name}@{batch_size}x{seq_len}"


def model_config(spec: BenchModel) -> tuple[object, type]:
    """The transformers config of ``spec`` (sdpa attention) and the model class it builds."""
    import transformers

    if spec.arch == "roberta":
        config, cls = transformers.RobertaConfig(**spec.config), transformers.RobertaForMaskedLM
    elif spec.arch == "llama":
        config, cls = transformers.LlamaConfig(**spec.config), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.OPTConfig(**spec.config), transformers.OPTForCausalLM
    config._attn_implementation = "sdpa"
    return config, cls


def build_model(spec: BenchModel, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture with random weights, built directly on ``device``, in eval mode."""
    config, cls = model_config(spec)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the weights' dtype: no float32 copy of a 30B model
    try:
        with torch.device(device):  # initialise on the device: no host copy of a 2.7B model
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(spec: BenchModel, *, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    """A fixed batch of random tokens, scored at a <mask> (masked LM) or at the last token."""
    if not 2 <= seq_len <= spec.max_seq_len:
        raise ValueError(f"seq_len must be in [2, {spec.max_seq_len}] for this model, got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, spec.config["vocab_size"] - 1, (batch_size, seq_len), generator=gen)
    if spec.family == "mlm":
        pos = torch.full((batch_size,), min(20, seq_len - 2), dtype=torch.long)
        ids[torch.arange(batch_size), pos] = spec.mask_token_id
    else:
        pos = torch.full((batch_size,), seq_len - 1, dtype=torch.long)
    labels = torch.randint(0, len(spec.label_ids), (batch_size,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "score_pos": pos, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}
