"""One rank of a data-parallel test run (``tests/test_replicas.py``), launched like torchrun does.

``python -m tests.replica_worker <case> <out.pt> [<checkpoint.pt>]`` with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; ``DIE_AFTER_LOSS_CALLS`` makes rank 1
exit abruptly (as a killed process does) after that many forward passes.
"""

from __future__ import annotations

import os
import sys

import torch

from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.checkpoint import CheckpointPolicy, TrainingCheckpoint
from dpzo.zo.loop import train_zo
from dpzo.zo.replicas import Replicas, SingleProcess

from .test_checkpoint import CASES, N, top_magnitude_masks
from .test_zo import Quadratic, TwoTensorModel

HF_CASE = "dp-zoso-roberta"


def _hf_problem():
    """A tiny random RoBERTa prompt classifier on padded sentences of several lengths (float64)."""
    from .tiny import examples, make_clf, word_tokenizer

    clf = make_clf(word_tokenizer(), "mlm")
    data = clf.encode(examples(24))
    hp = ZOHyperparameters(steps=6, batch_size=8, lr=1e-2, stages=2, stage_steps=3, clip=2.0, log_every=2)
    return clf.model, lambda index: clf.per_example_loss(data.batch(index, clf.device)), len(data), hp, None


def _quadratic_problem(method: str):
    quad, model = Quadratic(n=N), TwoTensorModel()
    masks = top_magnitude_masks(model) if method == "dp-zopo" else None
    return model, quad.loss_fn(model), N, ZOHyperparameters(**CASES[method]["hp"]), masks


def run_case(case: str, team: SingleProcess, checkpoint_path: str | None = None, die_after: int | None = None) -> dict:
    """Train ``case`` as rank ``team.rank``; returns the final weights and the history."""
    method = "dp-zoso" if case == HF_CASE else case
    model, loss, n, hp, masks = _hf_problem() if case == HF_CASE else _quadratic_problem(method)
    calls = []

    def counted(index):
        calls.append(len(index))
        if die_after is not None and len(calls) > die_after:
            os._exit(3)  # no clean-up, no goodbye: a rank that was killed
        return loss(index)

    private = method != "mezo"
    checkpoint = None
    if checkpoint_path:
        checkpoint = TrainingCheckpoint(CheckpointPolicy(checkpoint_path, every_steps=3, every_seconds=0), {"cell": 1})
    history = train_zo(
        model,
        counted,
        n,
        hp,
        method=method,
        run_seed=13,
        noise=NoisySum("gaussian", 2.0, hp.batch_size) if private else None,
        # only rank 0 holds the secret RNG (seeded: the test compares noise draw by draw)
        secret=SecretRandom(insecure_test_seed=5) if private and team.is_main else None,
        masks=masks,
        master_dtype=torch.float64,
        checkpoint=checkpoint,
        team=team,
    )
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"theta": theta, "history": history, "calls": len(calls), "examples_forwarded": sum(calls)}


def main() -> None:
    case, out = sys.argv[1], sys.argv[2]
    checkpoint_path = sys.argv[3] if len(sys.argv) > 3 else None
    team = Replicas.from_environment(timeout_s=60)
    die = os.environ.get("DIE_AFTER_LOSS_CALLS")
    try:
        result = run_case(case, team, checkpoint_path, int(die) if die and team.rank == 1 else None)
        torch.save(result, f"{out}.rank{team.rank}")
    finally:
        team.close()


if __name__ == "__main__":
    main()
