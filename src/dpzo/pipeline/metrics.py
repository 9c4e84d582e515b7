"""A cell's ``metrics.json`` as a typed record (the JSON keys are those every table reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Measured on private batches, so not covered by the guarantee: kept out of what is published.
PRIVATE_DIAGNOSTICS = ("loss", "examples", "clipped_fraction")

HISTORY_NOTE = (
    "step, stage, lr, beta, mask_size: the public schedule; grad: the released scalar; test_step/test_loss: loss "
    "on a fixed part of the test split. All covered by the guarantee (functions of the released values and public "
    "data)."
)


@dataclass
class CellMetrics:
    """What one cell publishes (``metrics.json``), and apart from it what it measured on private
    batches (``private_diagnostics``: training loss, batch sizes, clipped fractions), which the
    caller writes to its own file.

    ``evaluation`` is the evaluator's result (accuracy, the task's metric and score, loss, n,
    confusion; F1/EM and predictions for generation); ``history`` the trainer's (its lists are
    the curves, its numbers the counts); ``privacy`` what the trainer recomputed from the noise it
    added.  Keys that only some cells have (``trainable_params`` and ``tuning`` for adapters,
    ``ranks`` for data-parallel runs, ``new_head`` for an accepted new output head) are written
    only when set.
    """

    cell: dict[str, Any]  # model, task, method, eps, seed
    evaluation: dict[str, Any]
    history: dict[str, Any]
    privacy: dict[str, Any]
    n_train: int
    n_params: int
    wall_seconds: float
    memory: dict[str, float]
    device: str
    torch_version: str
    versions: dict[str, Any]
    tuning: dict[str, Any] = field(default_factory=dict)  # {"trainable_params", "tuning"} for adapters
    ranks: int = 1
    new_head: dict[str, Any] | None = None
    #: the tracked cost of one inference forward and one step on a public batch (``pipeline.probe``)
    cost: dict[str, Any] = field(default_factory=dict)

    def _curves(self) -> dict[str, list]:
        return {k: v for k, v in self.history.items() if isinstance(v, list) and k != "resumed_from"}

    def to_json(self) -> dict[str, Any]:
        """``metrics.json``'s keys, in their order, with ``private_diagnostics`` for the caller to split off."""
        result, history, curves = self.evaluation, self.history, self._curves()
        metric = result.get("metric", "accuracy")
        return {
            **self.cell,
            # The task's own metric (accuracy; mcc or f1 for some LM-BFF tasks; f1 for generation).
            "metric": metric,
            "score": result["score"] if "score" in result else result[metric],
            "accuracy": result.get("accuracy"),
            **{k: result[k] for k in ("f1", "em", "predictions") if k in result},
            "test_loss": result["loss"],
            "test_n": result["n"],
            "confusion": result.get("confusion"),
            "n_train": self.n_train,
            "n_params": self.n_params,
            **self.tuning,
            "steps": history.get("steps_run", 0),
            "releases": history.get("releases", 0),
            "resumed_from": history.get("resumed_from", []),  # steps after which an interrupted run went on
            # what the trainer itself recomputed from the noise it added (not the ledger's claim)
            "privacy": self.privacy,
            **({"ranks": self.ranks} if self.ranks > 1 else {}),  # data-parallel replicas
            **({"new_head": self.new_head} if self.new_head is not None else {}),
            "ms_per_step": history.get("ms_per_step"),
            "train_seconds": history.get("train_seconds", 0.0),
            "wall_seconds": self.wall_seconds,
            "memory": self.memory,
            "cost": self.cost,
            "device": self.device,
            "torch": self.torch_version,
            "versions": self.versions,  # dpzo (and its commit), the libraries, Python, the device's name
            "history": {k: v for k, v in curves.items() if k not in PRIVATE_DIAGNOSTICS},
            "history_note": HISTORY_NOTE,
            "private_diagnostics": {k: v for k, v in curves.items() if k in PRIVATE_DIAGNOSTICS}
            | {"step": curves.get("step", [])},
        }
