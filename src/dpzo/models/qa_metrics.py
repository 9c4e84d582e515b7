"""SQuAD-style answer metrics: normalized exact match and token F1, maximised over gold answers.

As in the SQuAD v1.1 evaluation script (and MeZO's ``metrics.py``, used for SQuAD and DROP):
normalisation lower-cases, removes ASCII punctuation, removes the articles a/an/the and
collapses whitespace; F1 is over the multiset of normalized tokens, 0 when nothing is shared.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-cased, no ASCII punctuation, no articles, whitespace collapsed."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """The best token F1 of ``prediction`` over ``golds``; raises ValueError when there is no gold answer."""
    if not golds:
        raise ValueError("F1 needs at least one gold answer")
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(g).split()) for g in golds)
