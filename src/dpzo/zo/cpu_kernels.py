"""The zeroth-order passes compiled for the CPU: z drawn in registers, never stored.

The CPU counterpart of ``dpzo.zo.kernels`` (Triton): the same passes ``out = base + sum_k c_k
z(seed_k)``, dense or through sorted int64 mask indices with optional per-coordinate scales, and
the same stream: coordinate i of z(seed) is Philox4x32-10 on the counter (low and high 32 bits of
i, 0, 0) under the key (low and high 32 bits of the seed), the first two outputs as uniforms and
the first Box-Muller normal of the pair, in float32 (``dpzo.zo.philox``).  The integers are the
same bits as ``tl.randn``'s and the torch emulation's; ``log`` and ``cos`` are float32
polynomials (Cephes' ``logf`` and ``cosf``, written without branches so that they vectorise), so
z agrees with the other implementations to a few float32 ulp, as those agree with each other.

Why numba: it is a kept, pip-installable compiler that brings its own LLVM, so the passes compile
on a fresh machine without a C compiler (torch's inductor needs one on the CPU); it vectorises
the Philox rounds and the polynomials (0.8-1.0 x ``torch.randn``'s throughput on one thread,
about 15 x the int64 emulation's) and runs the passes on torch's thread count.  The compiled
code is cached beside this file (numba's ``cache=True``), so only a process that finds no cache
compiles (a few seconds).  Loaded only where used (``dpzo.zo.philox.compiled``): ``import dpzo``
does not import numba.

A pass sums the terms in float64 and rounds once to ``out``'s dtype (float32 or float64; other
dtypes run the torch passes).  Work is cut into one contiguous share per thread, and each
thread draws z in tiles of ``TILE`` coordinates that stay in its L1 cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba import njit, prange

from dpzo.zo import stream
from dpzo.zo.cost import is_fake

# numba's own thread pool, not its OpenMP layer: that one shares the OpenMP runtime torch uses
# (setting numba's thread count changed torch's) and is not safe across a fork.  Set before the
# first parallel launch; NUMBA_THREADING_LAYER still chooses another.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

#: coordinates drawn at a time by one thread (its scratch rows: the counters, two uniforms, z)
TILE = 512

_U64 = np.uint64
_MASK32 = _U64(stream.MASK32)
_ROUND_A, _ROUND_B = _U64(stream.ROUND_A), _U64(stream.ROUND_B)
_KEY_A, _KEY_B = _U64(stream.KEY_A), _U64(stream.KEY_B)
_F32 = np.float32
_I32 = np.int32
_SCALE = _F32(stream.UNIFORM_SCALE)
_MIN_UNIFORM = _F32(stream.MIN_UNIFORM)
_TWO_PI = _F32(stream.TWO_PI)


@njit(inline="always")
def _uniform(x):
    """A 32-bit draw as a float32 uniform in [0, 1), as Triton converts it (int32 bitcast, ~x for
    negatives, times 2**-31)."""
    folded = x if x < _U64(0x80000000) else _MASK32 - x
    return _F32(np.int64(folded)) * _SCALE


@njit(inline="always")
def _uniforms(counter, k0, k1):
    """The two uniforms of z at the 64-bit ``counter``: Philox4x32-10's first two outputs."""
    c0 = counter & _MASK32
    c1 = counter >> _U64(32)
    c2 = _U64(0)
    c3 = _U64(0)
    for _ in range(10):
        pb = c2 * _ROUND_B  # 32 x 32 -> 64-bit products: both halves are used
        pa = c0 * _ROUND_A
        c0 = ((pb >> _U64(32)) ^ c1 ^ k0) & _MASK32
        c2 = ((pa >> _U64(32)) ^ c3 ^ k1) & _MASK32
        c1 = pb & _MASK32
        c3 = pa & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return max(_uniform(c0), _MIN_UNIFORM), _uniform(c1)


@njit(inline="always")
def _log(m, e):
    """log(m 2**e) for the mantissa m in [0.5, 1) and the exponent e (float32; Cephes' logf)."""
    small = m < _F32(0.70710678118654752440)
    fe = e - (_F32(1.0) if small else _F32(0.0))
    x = (m + m if small else m) - _F32(1.0)
    z = x * x
    y = _F32(7.0376836292e-2)
    y = y * x + _F32(-1.1514610310e-1)
    y = y * x + _F32(1.1676998740e-1)
    y = y * x + _F32(-1.2420140846e-1)
    y = y * x + _F32(1.4249322787e-1)
    y = y * x + _F32(-1.6668057665e-1)
    y = y * x + _F32(2.0000714765e-1)
    y = y * x + _F32(-2.4999993993e-1)
    y = y * x + _F32(3.3333331174e-1)
    y = y * x * z
    y = y + _F32(-2.12194440e-4) * fe
    y = y - _F32(0.5) * z
    return (x + y) + _F32(0.693359375) * fe


@njit(inline="always")
def _cos(x):
    """cos(x) for 0 <= x < 8192 (float32; Cephes' cosf, quadrant chosen by selects)."""
    j = _I32(x * _F32(1.27323954473516))
    j = j + (j & _I32(1))
    y = _F32(j)
    octant = j & _I32(7)
    negate = (octant > _I32(3)) != ((octant & _I32(3)) > _I32(1))
    r = ((x - y * _F32(0.78515625)) - y * _F32(2.4187564849853515625e-4)) - y * _F32(3.77489497744594108e-8)
    z = r * r
    c = (
        ((_F32(2.443315711809948e-5) * z - _F32(1.388731625493765e-3)) * z + _F32(4.166664568298827e-2)) * z * z
        - _F32(0.5) * z
        + _F32(1.0)
    )
    s = ((_F32(-1.9515295891e-4) * z + _F32(8.3321608736e-3)) * z - _F32(1.6666654611e-1)) * z * r + r
    quadrant = octant & _I32(3)
    v = s if (quadrant == _I32(1) or quadrant == _I32(2)) else c
    return -v if negate else v


@njit(inline="always")
def _box_muller(z, u1, u2, m):
    """z[:m] from the uniforms u1 (clamped away from 0) and u2: cos(2 pi u2) sqrt(-2 log u1).

    u1's exponent and mantissa are read from its bits (``u1`` is overwritten); the three loops
    are each simple enough to vectorise."""
    bits = u1.view(np.int32)
    for j in range(m):
        b = bits[j]
        bits[j] = (b & _I32(0x007FFFFF)) | _I32(0x3F000000)  # the mantissa in [0.5, 1)
        z[j] = _F32(((b >> _I32(23)) & _I32(0xFF)) - _I32(126))  # the exponent, kept in z for now
    for j in range(m):
        radius = np.sqrt(_F32(-2.0) * _log(u1[j], z[j]))
        z[j] = _cos(u2[j] * _TWO_PI) * radius


@njit(inline="always")
def _draw(z, u1, u2, seed, counters, m):
    """z(seed) at counters[:m] into z[:m]."""
    k0 = seed & _MASK32
    k1 = seed >> _U64(32)
    for j in range(m):
        u1[j], u2[j] = _uniforms(counters[j], k0, k1)
    _box_muller(z, u1, u2, m)


@njit(inline="always")
def _sum_of_terms(total, scratch, seeds, coefs, m):
    """total[:m] = sum_k coefs[k] z(seeds[k]) at the scratch's counters, in float64."""
    counters, u1, u2, z = scratch
    for j in range(m):
        total[j] = 0.0
    for k in range(seeds.shape[0]):
        _draw(z, u1, u2, seeds[k], counters, m)
        c = coefs[k]
        for j in range(m):
            total[j] += c * np.float64(z[j])


@njit(inline="always")
def _scratch():
    """One thread's tile rows: the counters, the two uniforms, z."""
    return (
        np.empty(TILE, np.uint64),
        np.empty(TILE, np.float32),
        np.empty(TILE, np.float32),
        np.empty(TILE, np.float32),
    )


@njit(inline="always")
def _share(n, part, parts):
    """[lo, hi) of thread ``part``'s share of n coordinates (tile-aligned)."""
    tiles = (n + TILE - 1) // TILE
    return min(n, (tiles * part // parts) * TILE), min(n, (tiles * (part + 1) // parts) * TILE)


@njit(cache=True, parallel=True)
def _fill(out, seed, start, parts):
    n = out.shape[0]
    for part in prange(parts):
        lo, hi = _share(n, part, parts)
        counters, u1, u2, z = _scratch()
        for t in range(lo, hi, TILE):
            m = min(TILE, hi - t)
            for j in range(m):
                counters[j] = start + _U64(t + j)
            _draw(z, u1, u2, seed, counters, m)
            for j in range(m):
                out[t + j] = z[j]


@njit(cache=True, parallel=True)
def _dense(out, base, seeds, coefs, offset, parts):
    n = out.shape[0]
    for part in prange(parts):
        lo, hi = _share(n, part, parts)
        scratch = _scratch()
        total = np.empty(TILE, np.float64)
        for t in range(lo, hi, TILE):
            m = min(TILE, hi - t)
            for j in range(m):
                scratch[0][j] = offset + _U64(t + j)
            _sum_of_terms(total, scratch, seeds, coefs, m)
            for j in range(m):
                out[t + j] = np.float64(base[t + j]) + total[j]


@njit(cache=True, parallel=True)
def _masked(out, base, index, scales, scaled, seeds, coefs, offset, parts):
    n = index.shape[0]
    for part in prange(parts):
        lo, hi = _share(n, part, parts)
        scratch = _scratch()
        total = np.empty(TILE, np.float64)
        for t in range(lo, hi, TILE):
            m = min(TILE, hi - t)
            for j in range(m):
                scratch[0][j] = offset + _U64(index[t + j])
            _sum_of_terms(total, scratch, seeds, coefs, m)
            if scaled:
                for j in range(m):
                    total[j] *= np.float64(scales[t + j])
            for j in range(m):
                i = index[t + j]
                out[i] = np.float64(base[i]) + total[j]


def _threads() -> int:
    """Run on as many threads as torch does (``torch.set_num_threads``), up to numba's pool; the
    work is cut into that many shares."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _array(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (no copy): the passes write through it."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 1:
        raise ValueError(f"the compiled passes need contiguous 1-D CPU tensors, got {t.device} {tuple(t.shape)}")
    return t.detach().numpy()


def _terms(seeds: Sequence[int], coefs: Sequence[float | torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The seeds (uint64) and coefficients (float64) as host arrays.  A tensor coefficient is read
    through numpy: on the CPU reading it is no wait for a device, and the dispatcher (and so
    ``dpzo.zo.cost``) does not count it as one."""
    seeds_a = np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64)
    coefs_a = np.array(
        [c.detach().to("cpu", torch.float64).numpy() if isinstance(c, torch.Tensor) else float(c) for c in coefs],
        dtype=np.float64,
    ).reshape(-1)
    return seeds_a, coefs_a


def warm_up() -> None:
    """Compile the float32 fill (or load it from numba's cache) on host arrays, outside torch."""
    _fill(np.empty(TILE + 1, dtype=np.float32), _U64(0), _U64(0), 1)


def normal_(out: torch.Tensor, seed: int, start: int = 0) -> torch.Tensor:
    """Fill the 1-D float32/float64 CPU ``out`` with z(seed) at the flat indices [start, start + len(out))."""
    if out.numel() and not is_fake(out):
        _fill(_array(out), _U64(int(seed) & 0xFFFFFFFFFFFFFFFF), _U64(int(start)), _threads())
    return out


def dense_pass(
    out: torch.Tensor,
    base: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float | torch.Tensor],
    *,
    offset: int,
) -> None:
    """``out = base + sum_k coefs[k] z(seeds[k])`` at the global indices ``offset + arange(len(out))``."""
    if is_fake(out):  # values are placeholders there; the pass allocates nothing to count
        return
    if out.numel() == 0 or not seeds:
        if out.data_ptr() != base.data_ptr():
            out.copy_(base)
        return
    seeds_a, coefs_a = _terms(seeds, coefs)
    _dense(_array(out), _array(base), seeds_a, coefs_a, _U64(int(offset)), _threads())


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
    if is_fake(out) or index.numel() == 0 or not seeds:
        return
    seeds_a, coefs_a = _terms(seeds, coefs)
    index_a, scaled = _array(index), scales is not None
    scales_a = _array(scales) if scaled else np.zeros(1, dtype=np.float64)
    out_a, base_a = _array(out), _array(base)
    _masked(out_a, base_a, index_a, scales_a, scaled, seeds_a, coefs_a, _U64(int(offset)), _threads())
