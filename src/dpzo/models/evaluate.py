"""Evaluation of a prompt classifier: the argmax label word on a split, scored by the task's metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpzo.models.classifier import EncodedSet, PromptClassifier


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


@dataclass(frozen=True)
class CurveSettings:
    """The training curve that is published: the mean loss on the first ``test_examples`` of the
    test split, at ``points`` evenly spaced steps (0: no curve).  It is a function of the
    released model iterates and of data that is not private, so the guarantee covers it; the
    training loss on the sampled batches is not, and is never published by default."""

    points: int = 12
    test_examples: int = 128

    def __post_init__(self) -> None:
        if self.points < 0 or self.test_examples < 1:
            raise ValueError(
                f"curve points must be >= 0 and test_examples >= 1; got {self.points}, {self.test_examples}"
            )

    def steps(self, total: int) -> list[int]:
        """The steps (1-based counts of steps done) at which the curve gets a point."""
        if total < 1 or self.points == 0:
            return []
        return sorted(
            {max(1, round(total * k / min(self.points, total))) for k in range(1, min(self.points, total) + 1)}
        )


class TestLossCurve:
    """Records the test-loss curve into a trainer's history (keys ``test_step``, ``test_loss``).

    Kept in the history, the points survive a checkpoint and resume with it.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, clf, test_set, *, steps: int, settings: CurveSettings, batch_size: int = 128):
        self.clf, self.test_set, self.batch_size = clf, test_set, int(batch_size)
        self.count = min(settings.test_examples, len(test_set))
        self.at = set(settings.steps(steps)) if self.count else set()

    @torch.no_grad()
    def value(self) -> float:
        """Mean per-example loss on the curve's test examples at the model's current weights."""
        total = 0.0
        for start in range(0, self.count, self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, self.count))
            total += float(self.clf.per_example_loss(self.test_set.batch(index, self.clf.device)).double().sum())
        return total / self.count

    def after_step(self, done: int, history: dict, prepare: Callable[[], None] | None = None) -> None:
        """Add a point after ``done`` steps when one is due; ``prepare`` first puts theta itself
        into the model (a zeroth-order trainer holds a perturbed copy between passes)."""
        if done not in self.at:
            return
        if prepare is not None:
            prepare()
        history.setdefault("test_step", []).append(done)
        history.setdefault("test_loss", []).append(self.value())
