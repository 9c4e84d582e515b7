"""Evaluation of a prompt classifier: accuracy of the argmax label word on a split."""

from __future__ import annotations

import torch

from .models import EncodedSet, PromptClassifier


@torch.no_grad()
def evaluate(clf: PromptClassifier, data: EncodedSet, *, batch_size: int = 128) -> dict:
    """Accuracy, mean loss and the confusion counts of ``clf`` on ``data`` (batched, no grad).

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
        "loss": total_loss / max(n, 1),
        "n": n,
        "confusion": confusion.tolist(),
    }
