"""The released code's zeroth-order step, rewritten as a reference: its mechanics, this project's mechanism.

The released DP-ZOSO / DPZero / MeZO code perturbs and updates the weights in a Python loop
over the parameter tensors, four times a step (+beta, -2 beta, +beta to restore, then the
update), re-seeding every generator of the process with ``torch.manual_seed`` and drawing z per
tensor into fresh temporaries (``p.data += s * z * eps``), and pulls the per-example losses out
of the batch one ``.item()`` at a time before clipping and summing them in Python
(implementations.md §1, §2).

:func:`official_style_train` keeps those mechanics and computes this project's mathematics:
Poisson batches from the secret generator, noise on the clipped sum divided by the expected
batch size, the stagewise schedule, a real proximal anchor not multiplied by z, and a correct
masked write (the released ``param[idx].data += ...`` changes a copy).  Two uses:

* ``dpzo bench`` times it (with :class:`OfficialZ`, z as the released code draws it) against
  :func:`dpzo.zo.loop.train_zo`;
* with :class:`FlatZ` (z as :mod:`dpzo.zo` defines it) it is an independent implementation of
  the trajectory ``train_zo`` must reproduce; the tests compare the two to 1e-12 in float64.

It is a reference, not part of the trainer: nothing under :mod:`dpzo.zo` imports it, which is
why it lives with the benchmark.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dpzo.masks.settings import Mask
from dpzo.methods import ZO, base_method
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.flat import direction_seed, gaussian_direction


class OfficialZ:
    """z as the released code draws it: ``torch.manual_seed(seed)`` (every generator of the
    process), then ``torch.normal`` per tensor, in the parameter's dtype."""

    def start(self, seed: int) -> None:
        """Re-seed every generator of the process with ``seed``, as the released code does."""
        torch.manual_seed(seed)

    def dense(self, offset: int, p: torch.Tensor) -> torch.Tensor:
        """A fresh N(0, 1) draw shaped like ``p`` (``offset`` unused: the draws follow the tensors' order)."""
        return torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)

    def masked(self, offset: int, local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A fresh N(0, 1) draw for the masked coordinates ``local`` of ``p`` (``offset`` unused)."""
        return torch.normal(mean=0, std=1, size=(local.numel(),), device=p.device, dtype=p.dtype)


class FlatZ:
    """z as :mod:`dpzo.zo` defines it (coordinate i of ``gaussian_direction(seed)``), served per
    tensor: the official style with this z computes the same trajectory as ``train_zo``."""

    def __init__(self, numel: int, *, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = numel, dtype, device
        self._seed: int | None = None
        self._z: torch.Tensor | None = None

    def start(self, seed: int) -> None:
        """Draw z for ``seed``, kept while the seed stays the same."""
        if seed != self._seed:
            self._seed, self._z = seed, gaussian_direction(seed, self.numel, dtype=self.dtype, device=self.device)

    def dense(self, offset: int, p: torch.Tensor) -> torch.Tensor:
        """The coordinates of z that belong to ``p`` (starting at flat ``offset``), shaped like ``p``."""
        return self._z[offset : offset + p.numel()].view(p.shape)

    def masked(self, offset: int, local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The coordinates of z at the masked local indices ``local`` of ``p``."""
        return self._z[offset + local]


class OfficialStyleZO:
    """Perturbation and update the way the released code does them: a Python loop over the
    parameter tensors, z regenerated for each of the four passes, out-of-place temporaries
    (``p.data += s * z * eps``).

    Masked coordinates are written with a correct indexed update (the released
    ``param[idx].data += ...`` changes a copy and so never moves the model).
    """

    def __init__(self, model: torch.nn.Module, z: OfficialZ | FlatZ):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.offsets = np.cumsum([0] + [p.numel() for _, p in self.params[:-1]]).tolist()
        self.z = z
        self.local: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] | None = None

    def set_mask(
        self,
        indices: torch.Tensor | None,
        perturb_scales: torch.Tensor | None = None,
        update_scales: torch.Tensor | None = None,
    ) -> None:
        """Split flat mask indices into per-tensor local indices (and scales)."""
        if indices is None:
            self.local = None
            return
        idx = indices.cpu()
        self.local = []
        for (_, p), off in zip(self.params, self.offsets):
            lo, hi = torch.searchsorted(idx, torch.tensor([off, off + p.numel()])).tolist()
            scale = [None if s is None else s[lo:hi].to(p.device) for s in (perturb_scales, update_scales)]
            self.local.append(((idx[lo:hi] - off).to(p.device), scale[0], scale[1]))

    @torch.no_grad()
    def perturb(self, seed: int, scaling_factor: float, eps: float) -> None:
        """theta += scaling_factor * eps * z(seed), tensor by tensor."""
        self.z.start(seed)
        for i, ((_, p), off) in enumerate(zip(self.params, self.offsets)):
            if self.local is None:
                z = self.z.dense(off, p)
                p.data += scaling_factor * z * eps
            else:
                local, scales, _ = self.local[i]
                z = self.z.masked(off, local, p)
                if scales is not None:
                    z = z * scales
                flat = p.data.view(-1)
                flat[local] += scaling_factor * z * eps

    @torch.no_grad()
    def update(
        self, seeds: Sequence[int], grads: Sequence[float], *, lr: float, lam: float = 0.0, anchor: dict | None = None
    ) -> None:
        """theta -= lr * (mean_p g_p z_p + lam (theta - anchor)), tensor by tensor."""
        if lam:
            for i, (name, p) in enumerate(self.params):
                if self.local is None:
                    p.data -= lr * lam * (p.data - anchor[name])
                else:
                    local = self.local[i][0]
                    flat, ref = p.data.view(-1), anchor[name].view(-1)
                    flat[local] -= lr * lam * (flat[local] - ref[local])
        for seed, g in zip(seeds, grads):
            self.z.start(seed)
            for i, ((_, p), off) in enumerate(zip(self.params, self.offsets)):
                if self.local is None:
                    z = self.z.dense(off, p)
                    p.data -= lr * g * z / len(seeds)
                else:
                    local, _, scales = self.local[i]
                    z = self.z.masked(off, local, p)
                    if scales is not None:
                        z = z * scales
                    flat = p.data.view(-1)
                    flat[local] -= lr * g * z / len(seeds)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every trained tensor by name (the proximal anchor of a stage)."""
        return {name: p.detach().clone() for name, p in self.params}


def _losses_one_by_one(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per-example cross-entropy the released way: one small kernel and one .item() per example."""
    return [F.cross_entropy(logits[i], labels[i]).item() for i in range(labels.numel())]


def official_style_train(
    model: torch.nn.Module,
    logits_and_labels: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
    n: int,
    hp: ZOHyperparameters,
    *,
    method: str,
    run_seed: int,
    noise: NoisySum | None = None,
    secret: SecretRandom | None = None,
    masks: Callable[[int], Mask] | None = None,
    z: OfficialZ | FlatZ | None = None,
) -> dict:
    """``hp.steps`` steps of ``method`` in the released code's style; the same batches, seeds,
    schedule and releases as :func:`dpzo.zo.loop.train_zo` (so with :class:`FlatZ` the same result).

    ``logits_and_labels(index)`` returns the [b, K] label-word logits and the labels of the
    examples ``index`` at the current weights.  Returns the timing.
    """
    spec = ZO[base_method(method)]
    private = spec.private
    if private and (noise is None or secret is None):
        raise ValueError("a private method needs the ledger's noise and the secret RNG")
    q = hp.batch_size / n
    public_rng = np.random.default_rng([int(run_seed), 1])
    schedule = hp.schedule()
    starts = set(schedule.stage_starts())
    zo = OfficialStyleZO(model, z or OfficialZ())
    device = zo.params[0][1].device
    anchor = None
    started = time.perf_counter()
    for step in range(hp.steps):
        stage = schedule.stage_of(step)
        lr, beta = schedule.lr_at(stage), schedule.beta_at(stage)
        if step in starts:
            if masks is not None:
                mask = masks(stage)
                rank_update = hp.mask is not None and hp.mask.rank_update
                zo.set_mask(mask.indices, mask.scales, mask.scales if rank_update else None)
            if hp.lam:
                anchor = zo.snapshot()
        seeds, grads = [], []
        # every batch of the step before any noise, as dpzo's trainer draws them (one draw per
        # direction: the released code has one direction per step, where the orders agree)
        batches = [
            secret.poisson_batch(n, q) if private else public_rng.choice(n, size=hp.batch_size, replace=False)
            for _ in range(hp.directions)
        ]
        for p, index in enumerate(batches):
            seed = direction_seed(run_seed, step, p)
            if private or not math.isinf(hp.clip):
                values = []
                if len(index):
                    zo.perturb(seed, 1, beta)
                    logits, labels = logits_and_labels(index)
                    loss1 = _losses_one_by_one(logits, labels)
                    zo.perturb(seed, -2, beta)
                    logits, labels = logits_and_labels(index)
                    loss2 = _losses_one_by_one(logits, labels)
                    zo.perturb(seed, 1, beta)
                    values = [(a - b) / (2 * beta) for a, b in zip(loss1, loss2)]
                    if private:  # what the method clips: the quotient, or the raw difference (Tang et al.)
                        values = [float(spec.clipped_value(v, beta)) for v in values]
                clipped = [v / max(1.0, abs(v) / hp.clip) for v in values]
                if private:
                    g = spec.gradient_from(noise.release(sum(clipped), secret), beta)
                else:
                    g = sum(clipped) / len(clipped)
            else:  # MeZO: batch-mean losses, one .item() per forward
                zo.perturb(seed, 1, beta)
                loss1 = F.cross_entropy(*logits_and_labels(index)).item()
                zo.perturb(seed, -2, beta)
                loss2 = F.cross_entropy(*logits_and_labels(index)).item()
                zo.perturb(seed, 1, beta)
                g = (loss1 - loss2) / (2 * beta)
            seeds.append(seed)
            grads.append(g)
        zo.update(seeds, grads, lr=lr, lam=hp.lam, anchor=anchor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    return {"train_seconds": elapsed, "ms_per_step": 1000.0 * elapsed / max(hp.steps, 1)}
