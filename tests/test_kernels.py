"""The fused Triton passes (``dpzo.zo.kernels``) under ``TRITON_INTERPRET=1`` on the CPU: the same
numbers as the torch passes over the counter-based z (``dpzo.zo.philox``), whatever the grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .zo_passes import assert_fused_training_follows_torch, assert_masked_pass_touches_only_the_mask, dense_pass_case

pytest.importorskip("triton")
# Triton chooses the interpreter when it is imported, and other libraries may import it first
# (torch, transformers): the kernel tests run in a fresh process with TRITON_INTERPRET=1.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in test_kernels_under_the_interpreter's process")
outside_interpreter = pytest.mark.skipif(INTERPRETED, reason="a guard: runs in the outer process")


def test_kernels_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this is that process")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "12 passed" in proc.stdout, proc.stdout[-2000:]


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("offset", [0, 2**32 - 100])
def test_dense_pass_equals_the_torch_pass(dtype, offset):
    from dpzo.zo import kernels

    base, seeds, coefs, out = dense_pass_case(kernels, dtype, offset)
    # in place (out is base), and the grid does not matter
    again = base.clone()
    kernels.BLOCK, old = 128, kernels.BLOCK
    try:
        kernels.dense_pass(again, again, seeds, coefs, offset=offset)
    finally:
        kernels.BLOCK = old
    assert torch.equal(again, out)


@in_interpreter
@pytest.mark.parametrize("scaled", [False, True])
def test_masked_pass_touches_only_the_mask(scaled):
    from dpzo.zo import kernels

    assert_masked_pass_touches_only_the_mask(kernels, scaled)


@in_interpreter
@pytest.mark.parametrize(
    "method,master_dtype",
    [("dp-zoso", torch.float64), ("dp-zoso", None), ("dp-zopo", torch.float64), ("dp-zopo", None)],
    ids=["dense-master", "dense-in-place", "masked-master", "masked-in-place"],
)
def test_training_with_the_fused_passes_equals_the_torch_passes(monkeypatch, method, master_dtype):
    """train_zo with every pass a fused kernel (forced on the CPU) follows the torch passes."""
    from dpzo.zo import kernels

    assert_fused_training_follows_torch(monkeypatch, kernels, "force", method, master_dtype)


@outside_interpreter
def test_each_launch_runs_on_the_gpu_of_its_tensors(monkeypatch):
    """Triton launches on the current device's current stream: a part on cuda:1 must make cuda:1
    current around its launch (and the fills of its terms), whatever device was current before.
    Fake cuda tensors stand in for the GPU; the kernels record the device current at launch."""
    from dpzo.zo import kernels
    from dpzo.zo.cost import fake_mode

    current: list[torch.device | None] = [None]
    launched = []

    class Device:  # torch.cuda.device's protocol: makes its device current inside the block
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}  # out, base, seeds, coefficients...
                launched.append((current[-1], devices))

            return launch

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(kernels, "_dense_pass", Kernel())
    monkeypatch.setattr(kernels, "_masked_pass", Kernel())
    with fake_mode():
        out = torch.zeros(3000, device="cuda:1")
        index = torch.arange(10, device="cuda:1")
        kernels.dense_pass(out, out, [1, 2], [0.5, torch.tensor(-1.0)], offset=0)
        kernels.masked_pass(out, out, index, [3], [0.25], offset=5)
    gpu1 = torch.device("cuda:1")
    assert launched == [(gpu1, {gpu1})] * 2  # the current device, and every tensor's
    assert current == [None]  # and the previous device is current again


@outside_interpreter
def test_a_triton_before_the_32_bit_philox_stream_is_refused():
    import triton

    from dpzo.zo import kernels

    for old in ("3.2.0", "3.3.1", "3.3.1+fb"):
        with pytest.raises(RuntimeError, match=r"triton>=3\.4.*DPZO_FUSED=0"):
            kernels.check_triton(old)
    for new in ("3.4.0", "3.5.0+git9c1b2a", "4.0.0"):
        kernels.check_triton(new)
    kernels.check_triton(triton.__version__)  # the installed one (the module imported)
