"""Tiny random-init RoBERTa/OPT prompt classifiers over a word-level vocabulary, for unit tests."""

from __future__ import annotations

import dataclasses
import random

import torch
import transformers

from dpzo.data.splits import Example
from dpzo.data.tasks import TASKS
from dpzo.models.classifier import PromptClassifier

WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<mask>",
    "It",
    "was",
    ".",
    "good",
    "bad",
    "film",
    "movie",
    "very",
    "not",
    "a",
    "the",
    "plot",
    "acting",
    "fun",
    "dull",
    "terrible",
    "great",
]
FAMILIES = ["mlm", "causal"]


def make_clf(tokenizer, family, *, dtype=torch.float64, seed=0, attn="sdpa"):
    torch.manual_seed(seed)
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mlm":
        cfg = transformers.RobertaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
            type_vocab_size=1,
            **special,
        )
        model = transformers.RobertaForMaskedLM(cfg)
    else:
        cfg = transformers.OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=32,
            max_position_embeddings=40,
            word_embed_proj_dim=16,
            **special,
        )
        model = transformers.OPTForCausalLM(cfg)
    model.config._attn_implementation = attn
    model = model.to(dtype).eval()
    task = dataclasses.replace(TASKS["SST-2"], label_words={"0": "bad", "1": "good"})
    return PromptClassifier(model, tokenizer, family, task)


def tiny_llama(*, seed: int = 0, layers: int = 2, hidden: int = 32) -> transformers.LlamaForCausalLM:
    """A tiny random Llama causal LM in float64, with grouped-query attention (4 heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=40,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()


def examples(n=16, seed=0):
    """Separable: label 1 sentences contain 'fun', label 0 ones 'dull'; lengths vary (padding)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = i % 2
        filler = [rng.choice(["a", "the", "plot", "acting", "film", "very"]) for _ in range(rng.randint(1, 5))]
        out.append(Example(texts=[" ".join(filler + ["fun" if y else "dull"])], label=y))
    return out


def word_tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )
