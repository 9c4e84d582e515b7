"""Fused Triton kernels of the zeroth-order passes: z drawn in registers, never stored.

Every pass over the weights is ``out = base + sum_k c_k z(seed_k)`` on a part's coordinates (a
perturbation ``work = master + s z``; in place, restore + update + next perturbation; the
update of a master copy), dense or through sorted int64 mask indices with optional
per-coordinate scales.  z(seed) at global flat index i is ``tl.randn(seed, i)``, the stream
``dpzo.zo.philox`` computes in torch: a kernel reads ``base`` and writes ``out`` once (the
block-buffer path also writes and reads z), and the terms are summed in float32 (float64 for a
float64 part) before one rounding to ``out``'s dtype, as the 16-bit in-place pass does.

The coefficients are read from a device tensor, so a released scalar that never went to the
host can be one.  Each launch runs with its tensors' GPU made the current device
(:func:`launch_device`): Triton launches on the current device's current stream, so a part on
``cuda:k`` of a placed model runs on GPU k, after the fills queued there.

The stream is Triton's since 3.4: before it (triton-lang/triton PR 6832), ``tl.randn`` with an
int64 offset ran Philox in 64-bit arithmetic, another stream than ``dpzo.zo.philox`` (and
slower); an older Triton is refused when this module is imported (:func:`check_triton`).
Imported only where used (``FlatParameters`` on a GPU with Triton, or the
tests under ``TRITON_INTERPRET=1``): ``import dpzo`` does not import Triton.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK = 1024

#: the first Triton whose ``tl.randn`` on int64 offsets is 32-bit Philox with the offset's halves
#: as two counter words: the stream ``dpzo.zo.philox`` computes and the tests pin
PHILOX_TRITON = (3, 4)


def check_triton(version: str) -> None:
    """Refuse a Triton whose ``tl.randn`` draws another z than :mod:`dpzo.zo.philox`."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < PHILOX_TRITON:
        wanted = ".".join(map(str, PHILOX_TRITON))
        raise RuntimeError(
            f"Triton {version} draws z with 64-bit Philox on int64 offsets, not the stream of "
            f"dpzo.zo.philox that every other pass uses: install triton>={wanted} (pip install "
            f"'triton>={wanted}'), or set DPZO_FUSED=0 to run the passes in torch"
        )


check_triton(triton.__version__)


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where a kernel on ``t`` is launched: ``t``'s GPU as the current device, so Triton uses
    that GPU and its current stream (the one the fills of its tensors were queued on); on the
    CPU (the interpreter) nothing to switch."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def _sum_of_terms(seeds_ptr, coefs_ptr, n_terms, index, ACC: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """sum_k coef_k z(seed_k) at the global indices ``index``, z drawn here (Philox, tl.randn)."""
    total = tl.zeros((BLOCK_SIZE,), dtype=ACC)
    for k in range(n_terms):
        seed = tl.load(seeds_ptr + k)
        coef = tl.load(coefs_ptr + k).to(ACC)
        total += coef * tl.randn(seed, index).to(ACC)
    return total


@triton.jit
def _dense_pass(
    out_ptr, base_ptr, seeds_ptr, coefs_ptr, n_terms, offset, n, ACC: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    inside = local < n
    acc = tl.load(base_ptr + local, mask=inside, other=0.0).to(ACC)
    total = _sum_of_terms(seeds_ptr, coefs_ptr, n_terms, offset + local, ACC, BLOCK_SIZE)
    tl.store(out_ptr + local, (acc + total).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _masked_pass(
    out_ptr,
    base_ptr,
    index_ptr,
    scales_ptr,
    seeds_ptr,
    coefs_ptr,
    n_terms,
    offset,
    n,
    SCALED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    inside = j < n
    index = tl.load(index_ptr + j, mask=inside, other=0)
    acc = tl.load(base_ptr + index, mask=inside, other=0.0).to(ACC)
    total = _sum_of_terms(seeds_ptr, coefs_ptr, n_terms, offset + index, ACC, BLOCK_SIZE)
    if SCALED:
        total = total * tl.load(scales_ptr + j, mask=inside, other=0.0).to(ACC)
    tl.store(out_ptr + index, (acc + total).to(out_ptr.dtype.element_ty), mask=inside)


def _terms(seeds: Sequence[int], coefs: Sequence[float | torch.Tensor], device: torch.device, dtype: torch.dtype):
    """The seeds and coefficients as device vectors, without a host-to-device copy (a copy from
    pageable memory would wait for the stream): numbers are written by fill kernels, released
    scalars are already on the device."""
    seeds_t = torch.stack([torch.full((), int(s), dtype=torch.int64, device=device) for s in seeds])
    coefs_t = torch.stack(
        [
            c.to(device=device, dtype=dtype).reshape(())
            if isinstance(c, torch.Tensor)
            else torch.full((), float(c), dtype=dtype, device=device)
            for c in coefs
        ]
    )
    return seeds_t, coefs_t


def _launch_terms(out: torch.Tensor, base: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float | torch.Tensor]):
    """(seeds, coefficients, accumulator type) of a pass: the sum is float64 when either side is
    float64 (a float64 master perturbing float32 weights), float32 otherwise."""
    wide = torch.float64 in (out.dtype, base.dtype)
    seeds_t, coefs_t = _terms(seeds, coefs, out.device, torch.float64 if wide else torch.float32)
    return seeds_t, coefs_t, tl.float64 if wide else tl.float32


def dense_pass(
    out: torch.Tensor,
    base: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float | torch.Tensor],
    *,
    offset: int,
) -> None:
    """``out = base + sum_k coefs[k] z(seeds[k])`` at the global indices ``offset + arange(len(out))``."""
    n = out.numel()
    if n == 0 or not seeds:
        if out.data_ptr() != base.data_ptr():
            out.copy_(base)
        return
    with launch_device(out):  # the fills of the terms too: queued on out's GPU and stream
        seeds_t, coefs_t, acc = _launch_terms(out, base, seeds, coefs)
        grid = (triton.cdiv(n, BLOCK),)
        _dense_pass[grid](out, base, seeds_t, coefs_t, len(seeds), int(offset), n, ACC=acc, BLOCK_SIZE=BLOCK)


def masked_pass(
    out: torch.Tensor,
    base: torch.Tensor,
    index: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float | torch.Tensor],
    *,
    offset: int,
    scales: torch.Tensor | None = None,
) -> None:
    """``out[index] = base[index] + scales * sum_k coefs[k] z(seeds[k])[index]`` (global indices
    ``offset + index``); coordinates outside ``index`` are not touched."""
    n = index.numel()
    if n == 0 or not seeds:
        return
    with launch_device(out):
        seeds_t, coefs_t, acc = _launch_terms(out, base, seeds, coefs)
        grid = (triton.cdiv(n, BLOCK),)
        _masked_pass[grid](
            out,
            base,
            index,
            index if scales is None else scales,
            seeds_t,
            coefs_t,
            len(seeds),
            int(offset),
            n,
            SCALED=scales is not None,
            ACC=acc,
            BLOCK_SIZE=BLOCK,
        )
