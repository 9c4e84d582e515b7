"""Data-parallel zeroth-order training: R replicas of one model over ``torch.distributed``.

Every rank holds a whole replica (possibly placed over several devices) and the same public
direction stream; what is private stays with rank 0:

* **the batch**: rank 0 draws each batch (a Poisson batch from the secret RNG: exactly the
  draw a single process makes) and shares its indices over a CPU (gloo) side group, so the
  indices never pass through a GPU and no rank waits for one to read them; their size is not
  sent: a Poisson batch travels as a bitmap of the n examples (its indices are sorted), a
  fixed-size batch as its B indices.  Every rank takes its contiguous share;
* **the differences**: each rank computes the two-point differences of its share along the
  same z; the shares are all-gathered, in rank order, so every rank holds the batch's quotients
  in the order the single process computes them;
* **the release**: rank 0 alone runs the method's release (clip, sum, the ledger's noise from
  the secret RNG, / q n) on the whole batch and broadcasts the released scalar; every rank then
  applies the same update, so the replicas stay equal.

Gathering the B per-example quotients rather than all-reducing partial clipped sums costs the
same (one collective of a few hundred bytes) and keeps a single release function, run where the
secret lives, with the sum taken in the single process's order: the trajectory equals the
single-process one up to the per-example rounding of a smaller batched forward.  The sampler,
the noise and the number of releases are those the accountant assumed; the ranks change none
of them.

:class:`SingleProcess` is the same interface for one process (every call the identity), so the
step (:func:`dpzo.zo.step.zo_step`) reads the same either way.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class BatchSampler:
    """How a step draws a batch of ``range(n)``: calling it returns the indices.

    ``size``: the batch size when it is fixed (a public draw of B examples, in draw order);
    None for a Poisson batch, whose size is random and whose indices are sorted.  What a rank
    other than the drawing one needs to rebuild the batch without being told its size.
    """

    draw: Callable[[], np.ndarray]
    n: int
    size: int | None = None

    def __call__(self) -> np.ndarray:
        return self.draw()


class ReplicaLost(RuntimeError):
    """A rank stopped answering: the cell ends without outputs (its snapshot, if any, is kept)."""


class SingleProcess:
    """One process, no communication: the batch, the differences and the release are its own."""

    rank = 0
    world_size = 1
    is_main = True

    def draw(self, sample: BatchSampler) -> tuple[np.ndarray, int]:
        """The batch: (this rank's share of the indices, the whole batch's size)."""
        index = sample()
        return index, len(index)

    def gather(
        self, d_share: torch.Tensor, loss_sums: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch's differences and per-example ``l+ + l-``, from this rank's share."""
        return d_share, loss_sums

    def from_main(self, release: Callable[[], tuple[list[Any], Any]], count: int) -> tuple[list[Any], Any]:
        """(released scalars, clipped count), computed by the rank that holds the secret RNG;
        ``count``: how many scalars ``release()`` returns (one per direction of the group)."""
        return release()

    def agree(self, value: int) -> int:
        """A number every rank must agree on (a resumed step): checked across ranks, returned."""
        return value

    def broadcast_flag(self, value: bool | None) -> bool | None:
        """Rank 0's value of a flag (None, False or True), on every rank."""
        return value

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Leave the process group (nothing to leave in one process)."""


class Replicas(SingleProcess):
    """R processes of one ``torch.distributed`` group (gloo on CPU, NCCL on GPUs).

    ``device`` is where the collectives' tensors live: the CPU for gloo, this rank's GPU for
    NCCL.  What the host decides (the batch's indices, a flag, a resumed step) travels over a
    gloo group on the CPU instead (the group itself when it is gloo, a side group of the same
    ranks otherwise), so reading it never waits for a GPU.  Any failure of a collective (a rank
    that died, a lost connection, a timeout) is raised as :class:`ReplicaLost`, naming this rank.
    """

    def __init__(self, group: Any = None, device: str | torch.device = "cpu"):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.is_main = self.rank == 0
        self.device = torch.device(device)
        self.host_group = group
        if dist.get_backend(group) != dist.Backend.GLOO:  # every rank creates it, in the same order
            ranks = None if group is None else dist.get_process_group_ranks(group)
            self.host_group = dist.new_group(ranks=ranks, backend="gloo")

    @classmethod
    def from_environment(cls, device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> SingleProcess:
        """The replicas this process belongs to, from ``torchrun`` / ``srun`` variables.

        ``WORLD_SIZE`` (or SLURM's ``SLURM_NTASKS``) of 1 or unset: a :class:`SingleProcess`.
        Otherwise the default process group is initialised (``MASTER_ADDR``/``MASTER_PORT``
        as set by the launcher), NCCL when ``device`` is a GPU, gloo on the CPU.
        """
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return SingleProcess()
        device = torch.device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(device=device)

    # -- collectives, each failure named -------------------------------------------------------
    def _collective(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (RuntimeError, ConnectionError) as exc:  # gloo/NCCL report a lost peer as RuntimeError
            raise ReplicaLost(
                f"rank {self.rank} of {self.world_size}: another rank stopped answering while {what} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). The cell wrote no "
                "metrics; look at the failed rank's log, then run the cell again (it resumes from its "
                "last snapshot, if one was written)"
            ) from exc

    def _from_main_on_host(self, what: str, values: np.ndarray) -> np.ndarray:
        """Rank 0's ``values`` (a host array whose shape every rank knows), on every rank: sent
        over the CPU group and read through numpy, so no rank waits for a device."""
        shared = torch.from_numpy(np.ascontiguousarray(values))
        self._collective(what, lambda: self._dist.broadcast(shared, 0, group=self.host_group))
        return shared.numpy()

    def draw(self, sample: BatchSampler) -> tuple[np.ndarray, int]:
        """Rank 0 draws the batch; every rank gets its contiguous share (``np.array_split``).

        The size is never sent: a Poisson batch (sorted indices) travels as a bitmap of its n
        examples, a fixed-size one as its B indices in draw order."""
        drawn = sample() if self.is_main else None
        if sample.size is None:
            bits = np.zeros((sample.n + 7) // 8, dtype=np.uint8)
            if self.is_main:
                member = np.zeros(sample.n, dtype=bool)
                member[drawn] = True
                bits = np.packbits(member)
            bits = self._from_main_on_host("sharing a batch", bits)
            whole = np.flatnonzero(np.unpackbits(bits, count=sample.n)).astype(np.int64)
        else:
            whole = np.zeros(sample.size, dtype=np.int64) if drawn is None else np.asarray(drawn, dtype=np.int64)
            whole = self._from_main_on_host("sharing a batch", whole)
        return np.array_split(whole, self.world_size)[self.rank], len(whole)

    def gather(
        self, d_share: torch.Tensor, loss_sums: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's differences and ``l+ + l-``, in batch order, on every rank (float64).

        The shares are padded to one length for ``all_gather`` and cut back to their sizes.
        """
        sizes = [len(s) for s in np.array_split(np.arange(batch_size), self.world_size)]
        padded = torch.zeros(max(sizes), 2, dtype=torch.float64, device=self.device)
        padded[: d_share.numel(), 0] = d_share.to(self.device, torch.float64)
        padded[: d_share.numel(), 1] = loss_sums.to(self.device, torch.float64)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective("gathering the differences", lambda: self._dist.all_gather(parts, padded, group=self.group))
        whole = torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(d_share.device)
        return whole[:, 0].contiguous(), whole[:, 1].contiguous()

    def _scalar(self, value: Any) -> torch.Tensor:
        """A released value as a float64 scalar on the collectives' device; a number is written
        there by a fill, not copied from pageable host memory (which would wait for the stream)."""
        if isinstance(value, torch.Tensor):
            return value.to(self.device, torch.float64).reshape(())
        return torch.full((), float(value), dtype=torch.float64, device=self.device)

    def from_main(self, release: Callable[[], tuple[list[Any], Any]], count: int) -> tuple[list[Any], Any]:
        """Rank 0 releases (its secret RNG draws the noise); the others receive the same values.

        ``release()`` returns (the group's ``count`` released scalars, the clipped count); they
        travel as one vector of ``count + 1`` on the collectives' device, a size every rank knows.
        """
        if self.is_main:
            grads, clipped = release()
            packed = torch.stack([self._scalar(g) for g in [*grads, clipped]])
        else:
            packed = torch.empty(count + 1, dtype=torch.float64, device=self.device)
        self._collective("sharing the released value", lambda: self._dist.broadcast(packed, 0, group=self.group))
        if self.is_main:
            return grads, clipped
        return list(packed[:-1].clone().unbind()), packed[-1].long()

    def agree(self, value: int) -> int:
        """Every rank's ``value`` must be rank 0's (raises otherwise)."""
        mine = torch.tensor([int(value)], dtype=torch.long)
        values = [torch.empty_like(mine) for _ in range(self.world_size)]
        what = "comparing the ranks' state"
        self._collective(what, lambda: self._dist.all_gather(values, mine, group=self.host_group))
        seen = [int(v.numpy()[0]) for v in values]
        if len(set(seen)) != 1:
            raise ReplicaLost(f"rank {self.rank}: the ranks disagree ({seen}); they must start from one state")
        return seen[0]

    def broadcast_flag(self, value: bool | None) -> bool | None:
        """Rank 0's flag on every rank (None, False or True)."""
        code = self._from_main_on_host("sharing a setting", np.array([-1 if value is None else int(bool(value))]))
        return None if code[0] < 0 else bool(code[0])

    def barrier(self) -> None:
        """Wait for every rank."""
        self._collective("waiting for every rank", lambda: self._dist.barrier(group=self.group))

    def close(self) -> None:
        """Leave the process group before the process exits: a gloo group torn down by the
        interpreter's exit can abort the process (``terminate called without an active
        exception``), which the launcher would report as a failed rank."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
