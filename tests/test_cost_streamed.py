"""Budgets of the streamed store (blocks in host memory), measured by ``dpzo.zo.cost``.

On a machine whose only device is the CPU, the store's host copies (its block arenas and the
anchor's pieces, ``StreamedParameters.host_tensors``) are marked as host memory: copies to and
from them count as host <-> device, their bytes are kept under ``"host"``, and every other
storage plays the device (``"cpu"``).  A step here is :func:`dpzo.zo.step.zo_step` of DP-ZOSO at
q = 1 (the batch is the inference batch), so the costs are the step's alone.

The models are tiny (hidden 128), so their blocks fit in one z chunk, where a part keeps each
direction's z whole for its step by design; the paper's models are far above it (an OPT-1.3B
block holds 50 M coordinates, a chunk 4 M), so z is drawn chunk by chunk here too (``chunked``).
What only a GPU can show (the copies overlapping the compute on their streams, pinned memory)
is stated in docs/large-models.md; here the waits are counted where a GPU would make them.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from dpzo.methods import get_method
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo import flat as flat_module
from dpzo.zo import streamed as streamed_module
from dpzo.zo.cost import measure, tensors_of
from dpzo.zo.step import batch_sampler, zo_step
from dpzo.zo.streamed import StreamedParameters, host_arena

from . import costs

B, LENGTH = 4, 16


@pytest.fixture(autouse=True)
def chunked(monkeypatch, one_thread):
    monkeypatch.setattr(flat_module, "DIRECTION_CHUNK", 1 << 14)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Streamed:
    """A random ``family`` model, its inference peak (measured resident), then streamed;
    ``freeze``: the parameters whose name holds it are not trained (they travel with their block)."""

    def __init__(self, family: str, layers: int = 3, freeze: str | None = None):
        self.model = costs.random_lm(family, hidden=128, layers=layers, vocab=512)
        for name, p in self.model.named_parameters():
            p.requires_grad_(freeze is None or freeze not in name)
        tokens, targets = costs.batch(self.model, B, LENGTH)
        self.loss = costs.per_example_loss(self.model, tokens, targets)
        self.weights = nbytes(tensors_of(self.model))
        self.inference, _ = measure(costs.inference(self.loss, B), self.model)
        self.store = StreamedParameters(self.model, None, device="cpu")
        self.block_bytes = [nbytes(tensors_of(b)) for b in self.store.blocks]
        self.trained_block_bytes = [nbytes(p for p in b.parameters() if p.requires_grad) for b in self.store.blocks]
        self.resident = self.weights - sum(self.block_bytes)
        self.secret = SecretRandom(insecure_test_seed=5)
        self.spec = get_method("dp-zoso")
        self.sample = batch_sampler(self.spec, B, B, secret=self.secret, public_rng=np.random.default_rng(0))
        self.seed = 100
        self.fixed = dict(lr=1e-4, beta=1e-3, clip=1.0, noise=NoisySum("gaussian", 1.0, float(B)), secret=self.secret)

    def steps(self, k: int, *, lam: float = 0.0, anchor: torch.Tensor | None = None) -> list:
        results = []
        for _ in range(k):
            self.seed += 1
            step = zo_step(
                self.spec, self.store, self.loss, self.sample, [self.seed], lam=lam, anchor=anchor, **self.fixed
            )
            results.append(step)
        return results

    def measure_steps(self, k: int, **kwargs):
        return measure(lambda: self.steps(k, **kwargs), self.model, host=self.store.host_tensors())


@pytest.mark.parametrize("family, freeze", [("opt", None), ("llama", "norm")])
def test_every_block_is_uploaded_once_and_copied_home_once_per_step(family, freeze):
    s = Streamed(family, freeze=freeze)
    s.steps(1)  # from now on every step also applies the previous step's update at each upload
    k = 2
    cost, _ = s.measure_steps(k)
    assert cost.host_to_device_bytes == k * sum(s.block_bytes)
    # theta goes home, the frozen tensors do not: they never change
    assert cost.device_to_host_bytes == k * sum(s.trained_block_bytes)
    assert (sum(s.trained_block_bytes) < sum(s.block_bytes)) == (freeze is not None)
    assert s.store.copies.fetches == s.store.uploads == [k + 1] * len(s.block_bytes)
    assert s.store.copies.copies_home == [k + 1] * len(s.block_bytes)


@pytest.mark.parametrize("own", [True, False])
def test_the_anchor_travels_with_its_block_from_host_memory(own):
    """lambda > 0: each block's piece of the anchor is kept in host memory (pinned on a GPU) and
    uploaded with the block: the store's own snapshot is used as it is (its block pieces are
    views of it), another anchor (a resumed one) is copied once into an arena per block."""
    s = Streamed("opt")
    anchor = s.store.snapshot() if own else s.store.snapshot().clone()
    s.steps(1, lam=0.5, anchor=anchor)  # the anchor's pieces are made once, here
    pieces = s.store.host_tensors()[-len(s.block_bytes) :]
    assert all((p.untyped_storage().data_ptr() == anchor.untyped_storage().data_ptr()) == own for p in pieces)
    k = 2
    cost, _ = s.measure_steps(k, lam=0.5, anchor=anchor)
    assert cost.host_to_device_bytes == k * (sum(s.block_bytes) + sum(s.trained_block_bytes))
    assert cost.device_to_host_bytes == k * sum(s.trained_block_bytes)
    assert cost.peak_bytes.get("host", 0) == cost.start_bytes["host"]  # nothing new in host memory


def test_an_evaluation_forward_copies_nothing_home():
    s = Streamed("opt")
    s.steps(1)
    s.store.restore()
    cost, _ = measure(costs.inference(s.loss, B), s.model, host=s.store.host_tensors())
    assert cost.host_to_device_bytes == sum(s.block_bytes)
    assert cost.device_to_host_bytes == 0  # nothing changed on the device


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_step_peak_is_three_blocks_the_resident_modules_and_the_inference_activations(family):
    s = Streamed(family)
    cost, results = s.measure_steps(2)  # the results (with their losses) kept, as the monitor keeps them
    activations = s.inference.peak_bytes["cpu"] - s.weights
    budget = 3 * max(s.block_bytes) + s.resident + activations
    assert cost.peak_bytes["cpu"] <= budget, (cost.peak_bytes, budget)
    assert cost.peak_bytes["host"] == cost.start_bytes["host"]  # the blocks' host copies, and no more


def test_no_returned_loss_requires_grad():
    s = Streamed("llama", layers=2)
    index = np.arange(B)
    out = s.store.two_point_losses(s.loss, [(index, 3), (index[:2], 4)], 1e-3)
    for d, plus, minus in out:
        assert not (d.requires_grad or plus.requires_grad or minus.requires_grad)
        assert d.grad_fn is None and plus.grad_fn is None
    (result,) = s.steps(1)
    assert not any(t.requires_grad for t in (*result.losses, *result.differences))


def test_host_waits_per_step_do_not_grow_with_the_blocks():
    """No host synchronisation per block: the copies home run on their own stream (on a GPU) and
    the host waits for them only when it reads host memory (here: one restore)."""
    waits = {}
    for layers in (2, 3):
        s = Streamed("opt", layers=layers)
        before = s.store.copies.host_waits
        cost, _ = s.measure_steps(2)
        in_steps = cost.host_syncs + s.store.copies.host_waits - before
        s.store.restore()
        waits[layers] = (in_steps, s.store.copies.host_waits - before)
    assert waits[2] == waits[3], waits
    assert waits[3][0] <= 2  # per step at most one: none from the store (the release reads nothing)
    assert waits[3][1] == 1  # the restore waits once for every copy home, whatever the blocks


def test_block_0_is_fetched_when_the_step_starts():
    """Its copy overlaps the resident modules before it (the embeddings)."""
    s = Streamed("opt", layers=2)
    seen = []
    embed = s.model.get_input_embeddings()
    embed.register_forward_pre_hook(lambda *_: seen.append(0 in s.store._fetched))
    s.steps(1)
    assert seen and seen[0]


def test_a_block_lives_in_one_host_arena(monkeypatch):
    """One buffer per block, pinned in place on a GPU (``pin_memory`` per tensor rounds each
    one up to a power of two); on a CPU build ``pinned`` is ignored."""
    s = Streamed("llama", layers=2, freeze="norm")  # frozen tensors beside theta in each block
    for i, block in enumerate(s.store.blocks):
        storages = {t.untyped_storage().data_ptr() for t in tensors_of(block)}
        assert len(storages) == 1, i
        arena = next(iter(tensors_of(block))).untyped_storage()
        assert arena.nbytes() <= s.block_bytes[i] + 64 * len(list(tensors_of(block)))
    views = host_arena([torch.arange(3.0), torch.ones(2, 5, dtype=torch.float64)], pinned=True)
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()
    assert views[0].tolist() == [0.0, 1.0, 2.0] and views[1].sum() == 10
    assert views[0].is_pinned() == torch.cuda.is_available()
    # the guard: the arena is page-locked once, whole, only where CUDA is (and only if asked)
    locked = []
    monkeypatch.setattr(streamed_module, "page_lock", lambda buffer: locked.append(buffer.numel()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    host_arena([torch.zeros(3), torch.zeros(5, dtype=torch.float16)], pinned=True)
    host_arena([torch.zeros(3)], pinned=False)
    assert locked == [128]  # 12 bytes and 10 bytes, each aligned to 64


class FakeStream:
    """A CUDA stream's calls, logged: the GPU branch of ``BlockCopies`` run on the CPU."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.events = name, log, 0

    def record_event(self) -> str:
        self.events += 1
        event = f"{self.name}{self.events}"
        self.log.append((self.name, "records", event))
        return event

    def wait_event(self, event: str) -> None:
        self.log.append((self.name, "waits", event))

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append((self.name, "waits", other.name))

    def synchronize(self) -> None:
        self.log.append(("host", "waits", self.name))


def test_the_copy_streams_order_the_copies_and_the_host_never_waits_per_block(monkeypatch):
    """The event protocol of the copies on a GPU, with logged streams: uploads on one stream,
    copies home on another after the compute, each block's next upload after its copy home, the
    compute after each upload, the host only at a flush; every tensor owned by the streams that
    use it (``record_stream``)."""
    s = Streamed("opt", layers=2)
    log: list = []
    compute = FakeStream("compute", log)
    copies = s.store.copies
    copies._up, copies._home = FakeStream("up", log), FakeStream("home", log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    owners = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: owners.append(stream.name), raising=False)
    s.steps(1)
    first = list(log)
    homes = [e for who, what, e in first if who == "home" and what == "records"]
    assert len(homes) == 2 and not any(who == "host" for who, _, _ in first)
    log.clear()
    s.steps(1)
    up = [(what, e) for who, what, e in log if who == "up"]
    # block 0 fetched at the step start after its copy home, block 1 during block 0's compute
    assert up == [("waits", homes[0]), ("records", "up3"), ("waits", homes[1]), ("records", "up4")]
    assert [e for who, what, e in log if who == "compute" and what == "waits"] == ["up3", "up4"]
    assert [e for who, what, e in log if who == "home" and what == "waits"] == ["compute", "compute"]
    assert not any(who == "host" for who, _, _ in log)
    assert owners == ["compute", "home"] * 4  # each block's theta (one part) in each step: used, then sent home
    log.clear()
    s.store.restore()  # the last update: each block uploaded and sent home, then one host wait
    assert [entry for entry in log if entry[0] == "host"] == [("host", "waits", "home")]
    assert log[-1] == ("host", "waits", "home")
