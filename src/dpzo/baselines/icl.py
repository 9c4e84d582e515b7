"""In-context learning: k labelled demonstrations in the prompt, no training.

The demonstrations are drawn from the cell's k-shot training split with its seed, balanced
over classes, and the same set is used for every test example (as MeZO's ICL baseline).

* causal LMs (MeZO style): ``<bos> demo_1 label_1 \\n\\n ... demo_k label_k \\n\\n query``;
  the query's last token scores the label words.
* masked LMs (LM-BFF demonstrations): ``query-with-<mask> demo_1-with-label ... </s>``: each
  demonstration is the template with ``<mask>`` replaced by its label word.

ICL puts private training examples verbatim into every prompt, so it makes no privacy claim.
Demonstrations that do not fit in ``max_length`` are dropped (the query is never truncated
for them).
"""

from __future__ import annotations

import numpy as np

from dpzo.data.splits import Example
from dpzo.data.tasks import EncodedPrompt, encode_prompt, label_word_ids
from dpzo.models.classifier import EncodedSet, PromptClassifier, pad_token_id, stack_prompts, template_for

SEPARATOR = "\n\n"


def choose_demonstrations(train: list[Example], k: int, num_classes: int, seed: int) -> list[Example]:
    """k demonstrations, round-robin over classes in a seeded random order, then shuffled."""
    rng = np.random.default_rng([int(seed), 7])
    by_class = [[ex for ex in train if ex.label == c] for c in range(num_classes)]
    for pool in by_class:
        rng.shuffle(pool)
    chosen: list[Example] = []
    depth = 0
    while len(chosen) < k and any(depth < len(pool) for pool in by_class):
        for pool in by_class:
            if depth < len(pool) and len(chosen) < k:
                chosen.append(pool[depth])
        depth += 1
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


def _demonstration_ids(clf: PromptClassifier, demo: Example, label_ids: list[int]) -> list[int]:
    tok = clf.tokenizer
    causal = clf.family == "causal"
    prompt = encode_prompt(
        template_for(clf.task, clf.family),
        demo.texts,
        tok,
        max_length=clf.max_length,
        causal=causal,
        **clf.task.sent_limits,
    )
    ids = list(prompt.input_ids)
    first_special = tok.bos_token_id if causal else tok.cls_token_id
    if ids and ids[0] == first_special:
        ids = ids[1:]  # one <bos>/<s> for the whole prompt
    if causal:
        return ids + [label_ids[demo.label]] + tok.encode(SEPARATOR, add_special_tokens=False)
    mask_at = prompt.score_position - (1 if prompt.input_ids[0] == first_special else 0)
    ids[mask_at] = label_ids[demo.label]
    return ids


def encode_with_demonstrations(clf: PromptClassifier, queries: list[Example], demos: list[Example]) -> EncodedSet:
    """Tokenize each query with the demonstrations around it (see the module docstring)."""
    tok = clf.tokenizer
    causal = clf.family == "causal"
    label_ids = label_word_ids(clf.task, tok)
    demo_ids = [_demonstration_ids(clf, d, label_ids) for d in demos]
    prompts = []
    for query in queries:
        q = encode_prompt(
            template_for(clf.task, clf.family),
            query.texts,
            tok,
            max_length=clf.max_length,
            causal=causal,
            **clf.task.sent_limits,
        )
        budget = clf.max_length - len(q.input_ids)
        kept = []
        for ids in demo_ids:
            if len(ids) <= budget:
                kept.append(ids)
                budget -= len(ids)
        context = [t for ids in kept for t in ids]
        if causal:
            n_bos = 1 if q.input_ids and q.input_ids[0] == tok.bos_token_id else 0
            ids = q.input_ids[:n_bos] + context + q.input_ids[n_bos:]
            prompts.append(EncodedPrompt(ids, len(ids) - 1))
        else:
            prompts.append(EncodedPrompt(q.input_ids + context, q.score_position))
    return stack_prompts(prompts, [ex.label for ex in queries], pad_token_id(tok))
