"""What a cell's step costs, measured on a public batch once the cell has been evaluated.

The paper's memory figure compares methods by the memory of one training step against that of
inference.  A cell measures both with :func:`dpzo.zo.cost.measure` (the peak of live tensor
bytes on its device, the bytes copied between host and device and the host waits of a step),
not the process's resident set size, which on the demo is the interpreter and its libraries.

A private step cannot be measured for publication: its shape is private (the Poisson batch
size and the longest example of the batch are functions of the secret sampling and of the
data), and a peak of memory reveals a shape.  So the probe runs after evaluation, when the
cell's results are fixed, one step of the cell's own method on its own store, masks and
settings, on a public batch: the first B test examples (evaluated and published anyway; taken
round again when there are fewer), B the expected batch size q n, every example in the step
(q = 1), its noise from a fresh secret RNG; and one inference forward of the same batch.  The
weights the probe moves are not used after it.  Nothing private enters it, so it spends no
privacy and its numbers may be published (``cost`` in ``metrics.json``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpzo.methods import TRAINER_FIRST_ORDER, TRAINER_ZO, base_method, get_method
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.cost import MiB, measure

if TYPE_CHECKING:  # annotations only: the cell builds these
    from collections.abc import Callable

    from dpzo.masks.settings import Mask
    from dpzo.pipeline.cell import CellRun, PreparedCell, VerifiedCell

__all__ = ["cell_cost", "probe_rows"]

log = logging.getLogger(__name__)

#: steps of the probe: one, and its closing log line (the host waits of a log window included)
PROBE_STEPS = 1


def probe_rows(n_test: int, b: int) -> np.ndarray:
    """The test examples of the probe batch: the first ``b``, taken round again when there are fewer."""
    if n_test < 1:
        raise ValueError("the cost probe needs at least one test example")
    return np.arange(b) % n_test


def _host(prepared: PreparedCell) -> list[torch.Tensor]:
    """A streamed store's home copies: host memory, kept apart from the device's peak."""
    from dpzo.zo.streamed import StreamedParameters

    return prepared.store.host_tensors() if isinstance(prepared.store, StreamedParameters) else []


def _zo_step(run: CellRun, verified: VerifiedCell, prepared: PreparedCell, probe: Any, masks: Any) -> Any:
    from dpzo.privacy.mechanisms import NoisySum
    from dpzo.zo.loop import train_zo

    # one step of the first stage: its schedule and its mask
    hp = dataclasses.replace(
        verified.hp, steps=PROBE_STEPS, batch_size=len(probe), log_every=PROBE_STEPS, stages=1, stage_steps=None
    )
    noise = verified.noise.release if verified.private else None
    clf = prepared.clf

    def step() -> dict:
        return train_zo(
            prepared.model,
            lambda index: clf.per_example_loss(probe.batch(index, clf.device)),
            len(probe),
            hp,
            method=run.cell.method,
            run_seed=run.cell.seed,
            noise=noise if noise is None else NoisySum(noise.mechanism, noise.scale, float(len(probe))),
            secret=SecretRandom() if verified.private else None,
            masks=masks,
            master_dtype=None if run.master == "none" else torch.float32,
            store=prepared.store,
        )

    return step


def _first_order_step(run: CellRun, verified: VerifiedCell, prepared: PreparedCell, probe: Any, masks: Any) -> Any:
    from dpzo.baselines.firstorder import train_first_order
    from dpzo.models.prefix import remove_prefix

    hp = dataclasses.replace(verified.hp, steps=PROBE_STEPS, batch_size=len(probe), log_every=PROBE_STEPS)

    def step() -> dict:
        if get_method(base_method(run.cell.method)).installs_prefix:
            remove_prefix(prepared.model)  # the step installs a fresh prefix, as training did
        return train_first_order(
            prepared.clf,
            probe,
            hp,
            method=base_method(run.cell.method),
            run_seed=run.cell.seed,
            sigma=verified.noise.sigma if verified.private else 0.0,
            secret=SecretRandom() if verified.private else None,
        )

    return step


#: how a trainer's step is probed; trainers that do not train (zero-shot, ICL) probe inference only
STEP_PROBES = {TRAINER_ZO: _zo_step, TRAINER_FIRST_ORDER: _first_order_step}


def cell_cost(
    run: CellRun, verified: VerifiedCell, prepared: PreparedCell, masks: Callable[[int], Mask] | None = None
) -> dict[str, Any]:
    """The probe (module docstring): the tracked peaks of one inference forward and of one
    step of the cell's method on a public batch of the expected batch size, their ratio, and the
    step's copies and host waits.  ``masks``: a masked method's masks, as its training had them.
    Runs after evaluation: it moves the weights."""
    clf, device = prepared.clf, prepared.clf.device
    make_step = STEP_PROBES.get(get_method(base_method(run.cell.method)).trainer)
    expected = verified.hp.batch_size if make_step is not None else run.eval_batch_size
    probe = prepared.test_set.subset(probe_rows(len(prepared.test_set), expected))
    host = _host(prepared)
    alive = (prepared.model, host)
    log.info("cost probe (not training): one inference forward and one step on %d public test examples", len(probe))

    def inference() -> torch.Tensor:
        with torch.no_grad():
            return clf.per_example_loss(probe.batch(np.arange(len(probe)), device))

    inference_cost, _ = measure(inference, *alive, host=host)
    out = {
        "probe": {"examples": "test", "batch_size": len(probe), "steps": PROBE_STEPS},
        "device": str(device),
        "weights_mb": round(sum(p.numel() * p.element_size() for p in prepared.model.parameters()) / MiB, 3),
        "inference": inference_cost.per_step(device),
    }
    if make_step is not None:
        step_cost, _ = measure(make_step(run, verified, prepared, probe, masks), *alive, host=host)
        out["step"] = step_cost.per_step(device, PROBE_STEPS)
        out["step_over_inference"] = round(step_cost.peak_mb(device) / max(inference_cost.peak_mb(device), 1e-9), 4)
    return out
