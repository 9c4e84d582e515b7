"""Evaluation of a prompt classifier: the argmax label word on a split, scored by the task's metric."""

from __future__ import annotations

import torch

from .models import EncodedSet, PromptClassifier


def score_from_confusion(metric: str, confusion: torch.Tensor) -> float:
    """The task metric from a [true, predicted] confusion matrix.

    ``mcc``: Matthews correlation (the multi-class form, equal to the binary one for two
    classes; 0 when a row or column sum makes it undefined).  ``f1``: F1 of class 1, the
    positive class of MRPC and QQP.  ``accuracy``: the diagonal fraction.
    """
    c = confusion.double()
    total = float(c.sum())
    if metric == "accuracy":
        return float(c.diag().sum()) / max(total, 1.0)
    if metric == "f1":
        tp, fp, fn = float(c[1, 1]), float(c[0, 1]), float(c[1, 0])
        return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    if metric == "mcc":
        true, pred = c.sum(dim=1), c.sum(dim=0)
        cov = float(c.diag().sum()) * total - float(true @ pred)
        denom = ((total**2 - float(pred @ pred)) * (total**2 - float(true @ true))) ** 0.5
        return cov / denom if denom > 0 else 0.0
    raise ValueError(f"unknown metric {metric!r}; use accuracy, f1 or mcc")


@torch.no_grad()
def evaluate(clf: PromptClassifier, data: EncodedSet, *, batch_size: int = 128) -> dict:
    """Accuracy, the task's metric, mean loss and the confusion counts (batched, no grad).

    Scorers of other task kinds (``candidates.CandidateScorer``) evaluate themselves.
    """
    if not isinstance(clf, PromptClassifier):
        return clf.evaluate(data, batch_size=batch_size)
    k = clf.task.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long)
    total_loss = 0.0
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(index, clf.device)
        logits = clf.label_logits(batch)
        total_loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        pred = logits.argmax(dim=1).cpu()
        confusion += torch.bincount(batch["labels"].cpu() * k + pred, minlength=k * k).view(k, k)
    n = int(confusion.sum())
    return {
        "accuracy": float(confusion.diag().sum()) / max(n, 1),
        "metric": clf.task.metric,
        "score": score_from_confusion(clf.task.metric, confusion),
        "loss": total_loss / max(n, 1),
        "n": n,
        "confusion": confusion.tolist(),
    }
