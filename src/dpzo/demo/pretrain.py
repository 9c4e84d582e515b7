"""The demo's tokenizer and tiny models, pretrained with backprop and saved with ``save_pretrained``."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from dpzo.demo.corpus import ALL_LABEL_WORDS, NEGATIVE_VERDICTS, POSITIVE_VERDICTS, TYPE_WORDS

logger = logging.getLogger(__name__)


ARCHITECTURES = ("roberta", "opt")


# Real RoBERTa / OPT special-token ids: <s>=0, <pad>=1, </s>=2, <unk>=3.
SPECIAL_TOKENS = {
    "roberta": ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
    "opt": ("<s>", "<pad>", "</s>", "<unk>"),
}


BPE_VOCAB_SIZE = 2000  # keeps every label word a single token (checked at build time)


MAX_POSITIONS = 512  # room for the pipeline's longest prompts; costs only 64k parameters


MODEL_SIZE = {"hidden": 128, "layers": 2, "heads": 4, "ffn": 512}


# Untied input/output embeddings: with tied ones, predicting the words of a slot ("the plot
# is ___") pulls all its candidates' embeddings together, so the adjectives' *input*
# embeddings lose their polarity and the label word stays independent of the sentence for
# well over the time budget (measured: no sentiment at all after 1600-2000 steps).
TIE_EMBEDDINGS = False


DEFAULT_STEPS = {"roberta": 1600, "opt": 1200}


BATCH_SIZE = 64


# Post-LN RoBERTa is slow to start (or diverges) at rates that suit pre-LN OPT: at 1e-3 the
# sentiment shows after ~200 steps, at 2e-3 after 600 to 1500 depending on the seed.
LEARNING_RATE = {"roberta": 1e-3, "opt": 5e-3}


WARMUP_STEPS = 100


# Share of the steps over which the rate decays linearly to 0 after a constant phase (see
# _lr_factor); post-LN RoBERTa degrades when kept at its peak rate, so it decays throughout.
DECAY_FRACTION = {"roberta": 1.0, "opt": 0.3}


WEIGHT_DECAY = 0.01


LEADING_SPACE_RATE = 0.5  # see module docstring (LM-BFF's "<s><mask>:" TREC template)


# The MLM targets: the words that fill the prompts' slots (verdicts, answer types).
SLOT_WORDS = frozenset(POSITIVE_VERDICTS + NEGATIVE_VERDICTS + tuple(word for words in TYPE_WORDS for word in words))


def read_corpus(corpus_path: Path) -> list[str]:
    """The corpus's documents, one per non-blank line."""
    with open(corpus_path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def train_bpe(documents: Sequence[str], arch: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges trained on ``documents`` (deterministic)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        documents,
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS[arch]),
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def make_hf_tokenizer(arch: str, vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A transformers tokenizer built from vocab/merges *in memory*.

    transformers 5 trap: ``RobertaTokenizerFast(vocab_file=..., merges_file=...)`` silently
    ignores the files and yields a 5-token vocabulary, so we pass the dict and merge list;
    ``save_pretrained`` then writes a tokenizer.json that ``AutoTokenizer`` reloads as is.
    """
    if arch == "roberta":
        from tokenizers import AddedToken
        from transformers import RobertaTokenizer

        # As in roberta-base, "<mask>" swallows the space before it.
        mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
        tokenizer = RobertaTokenizer(vocab=dict(vocab), merges=list(merges), mask_token=mask)
    else:
        from transformers import GPT2Tokenizer

        # OPT's tokenizer is GPT-2's BPE with </s> as BOS prepended to every input.
        tokenizer = GPT2Tokenizer(
            vocab=dict(vocab),
            merges=list(merges),
            bos_token="</s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            add_bos_token=True,
        )
    tokenizer.model_max_length = MAX_POSITIONS
    return tokenizer


def single_token_id(tokenizer, word: str) -> int:
    """Id of ``word`` (with its leading space) if it is exactly one token, else ValueError."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"label word {word!r} is {len(ids)} tokens: {pieces}")
    return ids[0]


def make_model(arch: str, tokenizer) -> torch.nn.Module:
    """Randomly initialised tiny RoBERTa-MLM or OPT-CLM (seed torch before calling)."""
    size = MODEL_SIZE
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": TIE_EMBEDDINGS,
    }
    if arch == "roberta":
        from transformers import RobertaConfig, RobertaForMaskedLM

        config = RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=size["hidden"],
            num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"],
            intermediate_size=size["ffn"],
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            type_vocab_size=1,
            max_position_embeddings=MAX_POSITIONS + 2,  # RoBERTa offsets positions by pad+1
            **special,
        )
        return RobertaForMaskedLM(config)
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        ffn_dim=size["ffn"],
        word_embed_proj_dim=size["hidden"],
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        **special,
    )
    return OPTForCausalLM(config)


def encode_documents(
    tokenizer, documents: Sequence[str], arch: str, rng: random.Random
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per document and, per document, the token positions of its slot words."""
    texts = [(" " + doc if rng.random() < LEADING_SPACE_RATE else doc) for doc in documents]
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    all_ids, all_slots = [], []
    for i, text in enumerate(texts):
        ids = list(encoded["input_ids"][i])
        if arch == "opt":
            ids.append(tokenizer.eos_token_id)  # OPT separates documents with </s>
        words: dict[int, list[int]] = {}  # pre-tokenizer word -> its token positions
        for position, word_id in enumerate(encoded.word_ids(i)):
            if word_id is not None:
                words.setdefault(word_id, []).append(position)
        offsets = encoded["offset_mapping"][i]
        slots = [
            position
            for positions in words.values()
            if text[offsets[positions[0]][0] : offsets[positions[-1]][1]].strip() in SLOT_WORDS
            for position in positions
        ]
        all_ids.append(ids)
        all_slots.append(slots)
    return all_ids, all_slots


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    padded = [list(row) + [value] * (width - len(row)) for row in rows]
    return torch.tensor(padded, dtype=torch.long)


def _mlm_loss(model, batch_ids, batch_slots, tokenizer) -> torch.Tensor:
    """Slot-masked MLM loss; the LM head runs only at the masked positions (much faster)."""
    inputs = [list(ids) for ids in batch_ids]
    rows, cols, targets = [], [], []
    for row, slots in enumerate(batch_slots):
        for col in slots:
            rows.append(row)
            cols.append(col)
            targets.append(inputs[row][col])
            inputs[row][col] = tokenizer.mask_token_id
    input_ids = _pad(inputs, tokenizer.pad_token_id)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    hidden = model.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))


def _clm_loss(model, batch_ids, tokenizer) -> torch.Tensor:
    input_ids = _pad(batch_ids, tokenizer.pad_token_id)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def _lr_factor(step: int, total: int, decay_fraction: float) -> float:
    """Warm-up, constant, then linear decay to 0 over the last ``decay_fraction`` of the steps.

    A long constant phase matters: the sentence-dependence of the label words appears
    abruptly after a plateau, and a plain linear decay often lowers the rate too early.
    """
    warmup = min(WARMUP_STEPS, max(1, total // 10))
    decay_start = max(warmup, int(total * (1 - decay_fraction)))
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


def _length_bucketed_batches(
    lengths: Sequence[int], usable: Sequence[int], batch_size: int, rng: random.Random
) -> Iterator[list[int]]:
    """Endless shuffled batches of similar-length documents (halves the padding cost)."""
    window = batch_size * 50
    while True:
        order = list(usable)
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            starts = range(0, len(chunk) - batch_size + 1, batch_size)
            batches = [chunk[j : j + batch_size] for j in starts]
            rng.shuffle(batches)
            yield from batches


def pretrain(
    model, tokenizer, arch: str, ids: list[list[int]], slots: list[list[int]], steps: int, seed: int
) -> list[float]:
    """AdamW pretraining for ``steps`` batches; returns the per-step losses."""
    rng = random.Random(f"demo-pretrain-{arch}-{seed}")
    usable = [i for i in range(len(ids)) if arch == "opt" or slots[i]]  # MLM needs a target
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE[arch], weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, DECAY_FRACTION[arch]))
    batches = _length_bucketed_batches([len(row) for row in ids], usable, BATCH_SIZE, rng)
    model.train()
    losses = []
    for step in range(steps):
        batch = next(batches)
        if arch == "roberta":
            loss = _mlm_loss(model, [ids[i] for i in batch], [slots[i] for i in batch], tokenizer)
        else:
            loss = _clm_loss(model, [ids[i] for i in batch], tokenizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == steps:
            recent = losses[-50:]
            mean = sum(recent) / len(recent)
            logger.info("%s pretraining step %d/%d loss %.3f", arch, step + 1, steps, mean)
    model.eval()
    return losses


def build_demo_model(arch: str, corpus_path: Path, out_dir: Path, seed: int = 0, steps: int | None = None) -> dict:
    """Train tokenizer + tiny ``arch`` model on the corpus and save both into ``out_dir``.

    The directory is written under a temporary name next to ``out_dir`` and renamed at the
    end, so an interrupted build never leaves a loadable-looking half model. The caller
    chooses the thread count (``torch.set_num_threads``); the result is deterministic for a
    given seed, steps and thread count.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown demo architecture {arch!r}; expected one of {ARCHITECTURES}")
    steps = DEFAULT_STEPS[arch] if steps is None else steps
    out_dir = Path(out_dir)
    started = time.perf_counter()
    documents = read_corpus(corpus_path)
    vocab, merges = train_bpe(documents, arch)
    tokenizer = make_hf_tokenizer(arch, vocab, merges)
    label_ids = [single_token_id(tokenizer, word) for word in ALL_LABEL_WORDS]
    torch.manual_seed(seed)
    model = make_model(arch, tokenizer)
    ids, slots = encode_documents(tokenizer, documents, arch, random.Random(f"demo-encode-{seed}"))
    losses = pretrain(model, tokenizer, arch, ids, slots, steps, seed)
    stats = {
        "arch": arch,
        "seed": seed,
        "steps": steps,
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4) if losses else None,
        "seconds": round(time.perf_counter() - started, 2),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "label_token_ids": dict(zip(ALL_LABEL_WORDS, label_ids)),
        "threads": torch.get_num_threads(),
    }
    _save_atomically(model, tokenizer, stats, out_dir)
    logger.info("built demo %s model in %s: %s", arch, out_dir, stats)
    return stats


def _save_atomically(model, tokenizer, stats: dict, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "pretraining.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
