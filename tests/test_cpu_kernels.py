"""The compiled CPU passes (``dpzo.zo.cpu_kernels``): the same integers as the Philox emulation
bit for bit, z to a few ulp, the passes equal to a float64 reference, training with them equal to
the torch passes, and the torch path with a one-line warning where they cannot load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dpzo.zo import philox
from dpzo.zo.flat import FlatParameters, fused_passes

from .zo_passes import (
    Z_TOL,
    assert_fused_training_follows_torch,
    assert_masked_pass_touches_only_the_mask,
    dense_pass_case,
    reference,
)

numba = pytest.importorskip("numba")
cpu_kernels = pytest.importorskip("dpzo.zo.cpu_kernels")

SEEDS_AND_STARTS = [(0, 0), (123, 5), (2**62 + 12345, 2**32 - 700), (2**64 - 1, 2**40 + 3)]


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("DPZO_FUSED", raising=False)
    assert philox.compiled() is cpu_kernels, "the compiled passes must load in the test environment"


@numba.njit
def _uniforms_of(counters, seed, out):
    k0 = np.uint64(seed) & np.uint64(0xFFFFFFFF)
    k1 = np.uint64(seed) >> np.uint64(32)
    for j in range(counters.shape[0]):
        out[0, j], out[1, j] = cpu_kernels._uniforms(np.uint64(counters[j]), k0, k1)


@pytest.mark.parametrize("seed,start", SEEDS_AND_STARTS)
def test_the_uniforms_are_the_emulations_bit_for_bit(seed, start):
    """The Philox integers (and so the uniforms made of them) are exact, not approximations."""
    n = 4096
    counters = np.arange(start, start + n, dtype=np.uint64)
    compiled = np.empty((2, n), dtype=np.float32)
    _uniforms_of(counters, np.uint64(seed), compiled)
    c0 = torch.arange(start, start + n, dtype=torch.int64)
    c1 = c0 >> 32
    c0 = c0 & philox.MASK32
    x0, x1, _, _ = philox.philox4x32(c0, c1, torch.zeros_like(c0), torch.zeros_like(c0), philox.philox_keys(seed))
    u1 = philox._to_uniform(x0).clamp_(min=philox.MIN_UNIFORM)
    u2 = philox._to_uniform(x1)
    assert torch.equal(torch.from_numpy(compiled[0]), u1)
    assert torch.equal(torch.from_numpy(compiled[1]), u2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed,start", SEEDS_AND_STARTS)
def test_z_agrees_with_the_emulation_to_a_few_ulp(dtype, seed, start):
    n = 50_000
    compiled = cpu_kernels.normal_(torch.empty(n, dtype=dtype), seed, start)
    emulated = philox.torch_normal_(torch.empty(n, dtype=torch.float64), seed, start)
    torch.testing.assert_close(compiled.double(), emulated, rtol=1e-6, atol=1e-6)
    ulp = torch.finfo(torch.float32).eps * emulated.abs().clamp(min=1.0)
    assert float(((compiled.double() - emulated).abs() / ulp).max()) <= 4.0  # a few float32 ulp
    if dtype == torch.float64:  # float64 holds the float32 values exactly
        assert torch.equal(compiled, compiled.float().double())


def test_z_does_not_depend_on_threads_or_cuts():
    seed, n = 2**61 + 7, 100_003
    whole = cpu_kernels.normal_(torch.empty(n), seed, 11)
    for parts in (1, 2, 3, 7):  # the shares of the threads
        out = np.empty(n, dtype=np.float32)
        cpu_kernels._fill(out, np.uint64(seed), np.uint64(11), parts)
        assert torch.equal(torch.from_numpy(out), whole)
    assert torch.equal(cpu_kernels.normal_(torch.empty(333), seed, 11 + 5000), whole[5000:5333])
    assert torch.equal(philox.normal_(torch.empty(n), seed, 11), whole)  # the default on the CPU
    assert not torch.equal(cpu_kernels.normal_(torch.empty(n), seed + 1, 11), whole)


def test_the_passes_run_on_torchs_thread_count_and_leave_it_alone(monkeypatch):
    """One thread in torch is one thread in the passes; numba's own pool does not change torch's."""
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cpu_kernels.normal_(torch.empty(10_000), 1, 0)
            assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
            assert torch.get_num_threads() == threads
        assert numba.threading_layer() == "workqueue"
    finally:
        torch.set_num_threads(before)


def test_z_is_standard_normal():
    from scipy import stats

    z = cpu_kernels.normal_(torch.empty(400_000, dtype=torch.float64), 99, 0).numpy()
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0, 2**32 - 100])
def test_dense_pass_equals_the_reference(dtype, offset):
    base, seeds, coefs, out = dense_pass_case(cpu_kernels, dtype, offset)
    again = base.clone()  # in place (out is base)
    cpu_kernels.dense_pass(again, again, seeds, coefs, offset=offset)
    assert torch.equal(again, out)
    # a float32 part of a float64 master: the sum is float64 and rounded once
    wide = torch.empty(base.numel(), dtype=torch.float32)
    cpu_kernels.dense_pass(wide, base.double(), seeds, coefs, offset=offset)
    torch.testing.assert_close(wide.double(), reference(base, seeds, coefs, offset), **Z_TOL)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_pass_touches_only_the_mask(scaled, dtype):
    assert_masked_pass_touches_only_the_mask(cpu_kernels, scaled, dtype)


@pytest.mark.parametrize(
    "method,master_dtype",
    [("dp-zoso", torch.float64), ("dp-zoso", None), ("dp-zopo", torch.float64), ("dp-zopo", None)],
    ids=["dense-master", "dense-in-place", "masked-master", "masked-in-place"],
)
def test_training_with_the_compiled_passes_equals_the_torch_passes(monkeypatch, method, master_dtype):
    assert_fused_training_follows_torch(monkeypatch, cpu_kernels, "", method, master_dtype)


def test_the_cpu_runs_the_compiled_passes_where_they_apply(monkeypatch):
    assert fused_passes(torch.device("cpu"), (torch.float32, torch.float64)) is cpu_kernels
    assert fused_passes(torch.device("cpu"), (torch.bfloat16,)) is None  # 16-bit: the torch passes
    assert fused_passes(torch.device("mps"), (torch.float32,)) is None
    model = torch.nn.Linear(4, 3)
    assert FlatParameters(model, None)._passes.kernels is cpu_kernels
    monkeypatch.setenv("DPZO_FUSED", "0")
    assert fused_passes(torch.device("cpu"), (torch.float32,)) is None
    assert philox.compiled() is None
    assert not hasattr(FlatParameters(torch.nn.Linear(4, 3), None)._passes, "kernels")


def test_the_passes_count_nothing_on_fake_tensors():
    """``dpzo plan`` projects a CPU step on fake tensors: a compiled pass allocates no tensor."""
    from dpzo.zo.cost import fake_mode, measure

    with fake_mode():
        out = torch.empty(10_000)
        index = torch.arange(0, 10_000, 7)
        cost, _ = measure(
            lambda: (
                cpu_kernels.dense_pass(out, out, [1, 2], [0.5, 1.0], offset=0),
                cpu_kernels.masked_pass(out, out, index, [3], [0.25], offset=5),
                philox.normal_(out, 3, 0),
            ),
            out,
            index,
            fake=True,
        )
    assert cost.peak_bytes["cpu"] == out.nbytes + index.nbytes


def test_without_numba_the_torch_stream_runs_after_one_warning(tmp_path):
    """A machine where numba cannot load: one warning line, and z from the torch emulation."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["numba"] = None  # import numba fails
        import torch
        from dpzo.zo import philox
        from dpzo.zo.flat import FlatParameters
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z = philox.normal_(torch.empty(1000), 5, 0)
            z2 = philox.normal_(torch.empty(1000), 5, 0)
            flat = FlatParameters(torch.nn.Linear(4, 3), None)
        assert torch.equal(z, philox.torch_normal_(torch.empty(1000), 5, 0)) and torch.equal(z, z2)
        assert not hasattr(flat._passes, "kernels")
        print(len(caught), "|", caught[0].message)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DPZO_FUSED"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, message = proc.stdout.strip().split(" | ", 1)
    assert count == "1" and "\n" not in message
    assert "compiled CPU passes cannot load" in message and "pip install numba" in message
