"""Fake Hugging Face datasets in the real layouts, put into a datasets cache the way a download does.

Each dataset is written as a local dataset repository named like the hub id (``super_glue/``
with one folder per configuration and a README declaring the configurations and splits, as
the hub's parquet exports do) and loaded once with ``datasets.load_dataset`` into a temporary
cache.  The cache then holds exactly what ``load_dataset('super_glue', 'rte')`` leaves behind
on a machine with internet, and the code under test reads it offline by the real id.

Also here: a tiny random-initialised OPT with a byte-level BPE tokenizer (OPT's tokenizer
family: spaces and newlines are bytes of the tokens), saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the man woman dog cat city river house car book film song team game water tree "
    "old new big small red quick happy sad runs sleeps reads plays wins loses sees finds"
).split()


def _sentence(rng: random.Random, n: int = 6) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _rows(dataset: str, config: str | None, split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{dataset}/{config}/{split}/{seed}")
    rows = []
    for i in range(n):
        s1, s2 = _sentence(rng), _sentence(rng, 4)
        s1 = f"{s1[:-1]} number {i}."  # every row's text is unique: splits can be compared by text
        if (dataset, config) == ("glue", "sst2"):
            rows.append({"sentence": s1 + " ", "label": i % 2, "idx": i})  # GLUE's trailing space
        elif config in ("rte", "cb"):
            rows.append({"premise": s1, "hypothesis": s2, "idx": i, "label": i % (2 if config == "rte" else 3)})
        elif dataset == "boolq":
            rows.append(
                {"question": f"is the {rng.choice(WORDS)} {rng.choice(WORDS)}", "answer": bool(i % 2), "passage": s1}
            )
        elif config == "wsc.fixed":
            rows.append(
                {
                    "text": s1,
                    "span1_index": 0,
                    "span2_index": 3,
                    "span1_text": "The dog",
                    "span2_text": "It",
                    "idx": i,
                    "label": i % 2,
                }
            )
        elif config == "wic":
            rows.append(
                {
                    "word": rng.choice(WORDS),
                    "sentence1": s1,
                    "sentence2": s2,
                    "start1": 0,
                    "start2": 0,
                    "end1": 1,
                    "end2": 1,
                    "idx": i,
                    "label": i % 2,
                }
            )
        elif config == "multirc":
            rows.append(
                {
                    "paragraph": s1,
                    "question": s2[:-1] + "?",
                    "answer": rng.choice(WORDS),
                    "idx": {"paragraph": i, "question": 0, "answer": 0},
                    "label": i % 2,
                }
            )
        elif config == "copa":
            rows.append(
                {
                    "premise": s1,
                    "choice1": _sentence(rng, 3),
                    "choice2": _sentence(rng, 5),
                    "question": ("cause", "effect")[i % 2],
                    "idx": i,
                    "label": (i // 2) % 2,
                }
            )
        elif config == "record":
            entities = sorted({rng.choice(["Paris", "Anna", "Red River", "Big Team", "Old Town"]) for _ in range(4)})
            rows.append(
                {
                    "passage": f"{s1}\n@highlight\n{s2}",
                    "query": f"@placeholder {rng.choice(WORDS)} the city.",
                    "entities": entities,
                    "entity_spans": {"text": entities, "start": [0] * len(entities), "end": [1] * len(entities)},
                    "answers": [entities[i % len(entities)]],
                    "idx": {"passage": i, "query": 0},
                }
            )
        elif dataset == "squad":
            answer = rng.choice(WORDS)
            rows.append(
                {
                    "id": str(i),
                    "title": "Topic",
                    "context": f"{s1} The answer is {answer}.",
                    "question": f"What is the answer {i}?",
                    "answers": {"text": [answer, f"the {answer}"], "answer_start": [0, 0]},
                }
            )
        elif dataset == "drop":
            rows.append(
                {
                    "section_id": "s",
                    "query_id": str(i),
                    "passage": f"{s1} {s2}",
                    "question": "How many?",
                    "answers_spans": {"spans": [str(i % 5)], "types": ["number"]},
                }
            )
        else:
            raise ValueError((dataset, config))
    return rows


# dataset id -> its configurations, named as on the hub (squad's only one is "plain_text")
DATASETS = {
    "glue": ["sst2"],
    "super_glue": ["rte", "cb", "wsc.fixed", "wic", "multirc", "copa", "record"],
    "boolq": ["default"],
    "squad": ["plain_text"],
    "drop": ["default"],
}


def write_repository(root: Path, dataset: str, sizes: dict[str, int], configs: list[str] | None = None) -> Path:
    """A local dataset repository ``root/<dataset>`` with JSON Lines files per config and split."""
    repo = root / dataset
    lines = ["---", "configs:"]
    for config in configs or DATASETS[dataset]:
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, n in sizes.items():
            path = repo / config / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            name = None if config in ("default", "plain_text") else config
            with open(path, "w", encoding="utf-8") as fh:
                for row in _rows(dataset, name, split, n, seed=0):
                    fh.write(json.dumps(row) + "\n")
            lines += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    lines.append("---")
    (repo / "README.md").write_text("\n".join(lines) + "\n")
    return repo


def fill_cache(
    cache_dir: Path, work: Path, sizes: dict[str, int], only: dict[str, list[str]] | None = None
) -> dict[str, Path]:
    """Put the fake datasets (``only``: dataset -> configs; default all) into ``cache_dir`` as a
    download would; returns each dataset's repository folder (its JSON Lines are the raw rows)."""
    import datasets

    repos = {}
    for dataset, configs in (only or DATASETS).items():
        repos[dataset] = repo = write_repository(work, dataset, sizes, configs)
        for config in configs:
            datasets.load_dataset(str(repo), config, cache_dir=str(cache_dir))
    return repos


def tiny_opt(out_dir: Path, texts: list[str], *, seed: int = 0, hidden: int = 32) -> Path:
    """A random-initialised tiny OPT and a BPE tokenizer trained on ``texts``, saved to out_dir."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from dpzo.demo.pretrain import make_hf_tokenizer, train_bpe

    vocab, merges = train_bpe(texts, "opt")
    tokenizer = make_hf_tokenizer("opt", vocab, merges)
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=2 * hidden,
        word_embed_proj_dim=hidden,
        max_position_embeddings=512,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = OPTForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def corpus() -> list[str]:
    """Texts in the fixtures' style (with the templates' words and newlines) to train the BPE on."""
    from dpzo.data.hf_tasks import MEZO_TASKS

    rng = random.Random(0)
    out = []
    for _ in range(200):
        out.append(f'{_sentence(rng)}\nDoes this mean that "{_sentence(rng, 3)}" is true? Yes or No?\nYes')
        out.append(f"Title: Topic\nContext: {_sentence(rng)}\nQuestion: What is it?\nAnswer: {rng.choice(WORDS)}\n")
    for task in MEZO_TASKS.values():
        out += [" ".join(task.candidates)] * 5
    return out
