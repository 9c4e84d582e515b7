"""The ranks' budget: at most one host synchronisation per release on the training path.

Each rank of a data-parallel run (``dpzo.zo.replicas``, gloo on the CPU, two processes started
as ``torchrun`` starts them) measures its own steps with ``dpzo.zo.cost.measure``: every read of
a tensor's value on the host (``.item()``, ``int(t)``), every value-dependent shape and every
blocking copy is counted, as it would make a GPU rank wait.  The batch travels over the CPU
side group without its size, the released vector has a size every rank knows, so a rank adds no
host synchronisation to what the single process does, whatever the method: one scalar release
per direction (DP-ZOSO, two directions), one vector release per step (DP-AggZO), a fixed-size
public batch (MeZO).

    python -m tests.test_cost_ranks <case> <out>

is one rank (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set); it writes
``<out>.rank<r>``: per method, the releases of its steps and what they cost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpzo.methods import get_method
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.cost import measure
from dpzo.zo.replicas import Replicas, SingleProcess
from dpzo.zo.step import batch_sampler, zo_step
from dpzo.zo.store import build_store

METHODS = ("dp-zoso", "dp-aggzo", "mezo")
N, BATCH, DIRECTIONS, STEPS = 40, 8, 2, 3


def step_costs(team: SingleProcess) -> dict[str, dict]:
    """Per method: the releases of ``STEPS`` steps on this rank and their measured cost."""
    from .test_zo import Quadratic, TwoTensorModel

    costs = {}
    for method in METHODS:
        spec = get_method(method)
        quad, model = Quadratic(n=N), TwoTensorModel()
        store = build_store(model, master_dtype=torch.float64, directions=DIRECTIONS)
        secret = SecretRandom(insecure_test_seed=5) if team.is_main else None
        sample = batch_sampler(spec, N, BATCH, secret=secret, public_rng=np.random.default_rng([13, 1]))
        noise = NoisySum("gaussian", 2.0, float(BATCH)) if spec.private else None

        def steps() -> list:
            return [
                zo_step(spec, store, quad.loss_fn(model), sample, [10 * s + p for p in range(DIRECTIONS)],
                        lr=1e-2, beta=1e-3, clip=3.0, noise=noise, secret=secret, team=team)
                for s in range(STEPS)
            ]  # fmt: skip

        cost, done = measure(steps, model)
        costs[method] = {
            "releases": sum(len(d.examples) for d in done),
            "host_syncs": cost.host_syncs,
            "sync_ops": dict(cost.sync_ops),
            "copied_bytes": cost.copied_bytes,
            "grads": [float(g) for d in done for g in d.grads],
        }
    return costs


def test_a_rank_adds_no_host_synchronisation_to_a_step(tmp_path):
    from .test_replicas import launch

    out = tmp_path / "cost"
    for proc in launch("steps", 2, out, worker="tests.test_cost_ranks"):
        assert proc.returncode == 0, proc.stderr[-4000:]
    one = step_costs(SingleProcess())
    for rank in range(2):
        ranked = json.loads(Path(f"{out}.rank{rank}").read_text())
        for method in METHODS:
            got, alone = ranked[method], one[method]
            assert got["releases"] == alone["releases"] == (STEPS if method == "dp-aggzo" else STEPS * DIRECTIONS)
            # the budget: at most one host synchronisation per release
            assert got["host_syncs"] <= got["releases"], (rank, method, got["sync_ops"])
            # and what the ranks add to the single process's step: nothing
            assert got["host_syncs"] == alone["host_syncs"], (rank, method, got["sync_ops"], alone["sync_ops"])
            assert got["copied_bytes"] == 0
            # the same releases as one process (the shares' forwards round alike here)
            assert got["grads"] == pytest.approx(alone["grads"], rel=0, abs=1e-12), (rank, method)


def test_a_gpu_group_gets_a_cpu_side_group_and_batches_cross_it_without_their_size(monkeypatch):
    """With NCCL as the main group (which only a GPU has: its backend name stands in here), the
    host's values travel over a gloo group of the same ranks; a Poisson batch crosses as a bitmap
    and comes back as the same sorted indices, a fixed-size batch in its draw order."""
    import torch.distributed as dist

    from dpzo.zo.replicas import BatchSampler

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        backend, created = dist.get_backend, []
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl" if group is None else backend(group))
        monkeypatch.setattr(dist, "new_group", lambda **kw: created.append(kw) or dist.group.WORLD)
        team = Replicas()
        assert created == [{"ranks": None, "backend": "gloo"}] and team.host_group is dist.group.WORLD
        poisson = np.array([0, 3, 8, 9, 15, 16, 39])
        index, size = team.draw(BatchSampler(lambda: poisson, N))
        assert index.tolist() == poisson.tolist() and size == 7
        assert team.draw(BatchSampler(lambda: np.array([], dtype=np.int64), N))[1] == 0  # an empty batch
        drawn = np.array([17, 2, 30, 5])
        index, size = team.draw(BatchSampler(lambda: drawn, N, size=4))
        assert index.tolist() == drawn.tolist() and size == 4
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    """One rank: its steps' costs, per method, written as JSON to ``<out>.rank<r>``."""
    _, out = argv
    torch.set_num_threads(1)
    team = Replicas.from_environment(timeout_s=60)
    try:
        Path(f"{out}.rank{team.rank}").write_text(json.dumps(step_costs(team)))
    finally:
        team.close()


if __name__ == "__main__":
    main(sys.argv[1:])
