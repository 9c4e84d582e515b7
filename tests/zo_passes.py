"""What the fused passes are checked against, shared by the Triton kernels' tests and the compiled
CPU passes' tests: a float64 reference pass, and a whole ``train_zo`` run against the torch passes."""

from __future__ import annotations

import torch

from dpzo.zo import philox

# z from another float32 log/cos than torch's (numpy's in Triton's interpreter, the compiled
# polynomials) agrees to a few ulp
Z_TOL = dict(rtol=2e-6, atol=2e-6)


def reference(base, seeds, coefs, offset, index=None, scales=None):
    """``base + sum_k coefs[k] z(seeds[k])`` (on ``index``, times ``scales``) in float64, z drawn
    by the torch emulation of the stream."""
    total = torch.zeros(base.numel(), dtype=torch.float64)
    for seed, coef in zip(seeds, coefs):
        total += float(coef) * philox.torch_normal_(torch.empty(base.numel(), dtype=torch.float64), seed, offset)
    out = base.double().clone()
    if index is None:
        return out + total
    moved = total[index] * (1.0 if scales is None else scales.double())
    out[index] += moved
    return out


def dense_pass_case(kernels, dtype, offset):
    """One dense pass of ``kernels`` on a base of ``dtype``, three terms (one a tensor), checked
    against :func:`reference`; returns (base, seeds, coefficients, the pass's output)."""
    base = torch.randn(3000, generator=torch.Generator().manual_seed(1)).to(dtype)
    seeds, coefs = [11, 2**62 + 5, 7], [0.5, torch.tensor(-1.25), 2.0]
    out = torch.empty_like(base)
    kernels.dense_pass(out, base, seeds, coefs, offset=offset)
    tol = dict(rtol=1e-3, atol=1e-2) if dtype == torch.float16 else Z_TOL
    torch.testing.assert_close(out.double(), reference(base, seeds, coefs, offset), **tol)
    return base, seeds, coefs, out


def assert_masked_pass_touches_only_the_mask(kernels, scaled, dtype=torch.float64):
    """A masked pass of ``kernels``, in place, with or without scales: the reference on the mask,
    every other coordinate untouched."""
    n = 2000
    base = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(dtype)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:300].sort().values
    scales = torch.linspace(1.2, 0.8, 300, dtype=dtype) if scaled else None
    seeds, coefs = [5, 6], [0.1, torch.tensor(-0.3, dtype=torch.float64)]
    out = base.clone()
    kernels.masked_pass(out, out, index, seeds, coefs, offset=17, scales=scales)
    torch.testing.assert_close(out.double(), reference(base, seeds, coefs, 17, index, scales), **Z_TOL)
    outside = torch.ones(n, dtype=torch.bool)
    outside[index] = False
    assert torch.equal(out[outside], base[outside])


def assert_fused_training_follows_torch(monkeypatch, kernels, fused_env, method, master_dtype):
    """train_zo with every pass one of ``kernels`` (``DPZO_FUSED=fused_env``) follows the torch
    passes (``DPZO_FUSED=0``): a quadratic, two stages, two directions, a proximal pull, and for
    DP-ZOPO a scaled mask."""
    from dpzo.masks.settings import Mask, MaskSettings
    from dpzo.methods.hyperparameters import ZOHyperparameters
    from dpzo.privacy.mechanisms import NoisySum
    from dpzo.privacy.secret import SecretRandom
    from dpzo.zo.loop import train_zo

    from .test_zo import Quadratic, TwoTensorModel

    mask = None
    if method == "dp-zopo":
        mask = MaskSettings(scorer="magnitude", ratio=0.5, mode="rank", rank_update=True)
    hp = ZOHyperparameters(
        steps=6, batch_size=8, lr=1e-2, stages=2, stage_steps=2, lam=0.2, clip=3.0, directions=2, log_every=2, mask=mask
    )
    index = torch.tensor([0, 2, 3, 5, 8])
    calls = []
    for name in ("dense_pass", "masked_pass"):
        inner = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, inner=inner, **k: calls.append(1) or inner(*a, **k))
    results = []
    for fused in ("0", fused_env):
        monkeypatch.setenv("DPZO_FUSED", fused)
        quad, model = Quadratic(n=40), TwoTensorModel()
        history = train_zo(
            model,
            quad.loss_fn(model),
            40,
            hp,
            method=method,
            run_seed=3,
            noise=NoisySum("gaussian", 1.5, 8.0),
            secret=SecretRandom(insecure_test_seed=9),
            master_dtype=master_dtype,
            masks=(lambda stage: Mask(index, 10, scales=torch.linspace(1.2, 0.8, 5))) if mask else None,
        )
        results.append((model.theta().detach().clone(), history["loss"]))
        assert bool(calls) == (fused == fused_env)  # every pass of the fused run was a kernel
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(results[1][1]), torch.tensor(results[0][1]), rtol=1e-5, atol=1e-6)
    assert float((results[0][0] - TwoTensorModel().theta().detach()).abs().max()) > 1e-3
