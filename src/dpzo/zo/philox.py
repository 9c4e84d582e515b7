"""The perturbation direction z as a pure function of (seed, flat index): counter-based Philox.

Coordinate i of z(seed) is Triton's ``tl.randn(seed, i)``: Philox4x32 with 10 rounds on the
counter (low and high 32 bits of i, 0, 0) under the key (low and high 32 bits of the seed); the
first two 32-bit outputs become uniforms in [0, 1) (``uint_to_uniform_float``) and the first
Box-Muller normal of the pair is z_i, in float32.  Nothing depends on how the vector is cut
into blocks, on the launch grid or on the device: a part of a placed or streamed model, a
resumed run on another GPU type and the CPU draw the same z, up to an ulp of ``log``, ``cos``
and ``sqrt`` (the integer stream is exact everywhere).

:func:`torch_normal_` is the pure-torch implementation (any device, int64 arithmetic with
explicit 32-bit wrap-around, about 18 M normals/s on one CPU thread); ``dpzo.zo.cpu_kernels``
compiles the same stream for the CPU (about ``torch.randn``'s speed) and ``dpzo.zo.kernels``
computes it inside fused Triton kernels.  :func:`normal_` takes the compiled one for float32 and
float64 CPU tensors when it loads (:func:`compiled`), the torch one otherwise.
"""

from __future__ import annotations

import functools
import os
import types
import warnings

import torch

from dpzo.zo.cost import CostTracker, is_fake
from dpzo.zo.stream import KEY_A, KEY_B, MASK32, MIN_UNIFORM, ROUND_A, ROUND_B, ROUNDS, TWO_PI, UNIFORM_SCALE

#: coordinates computed at a time on the CPU (the temporaries stay in cache)
CPU_SLICE = 1 << 14
#: coordinates computed at a time on another device: enough to fill a GPU's kernels, few enough
#: that the int64 temporaries (about 80 bytes a coordinate: 20 MiB) stay near the size of a block
#: of z, not 20 times it (a whole 4M block at once took 320 MiB)
DEVICE_SLICE = 1 << 18


def philox_keys(seed: int) -> list[tuple[int, int]]:
    """The round keys of ``seed`` (key (low, high) 32 bits, bumped by the Weyl constants)."""
    seed = int(seed) & ((1 << 64) - 1)
    k0, k1 = seed & MASK32, seed >> 32
    keys = []
    for _ in range(ROUNDS):
        keys.append((k0, k1))
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return keys


def _to_uniform(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit draw (held in int64) as a float32 uniform in [0, 1), as Triton converts it."""
    folded = torch.where(x >= 1 << 31, MASK32 - x, x)  # int32 bitcast; negatives as ~x
    return folded.to(torch.float32).mul_(torch.tensor(UNIFORM_SCALE, dtype=torch.float32))


@torch.no_grad()
def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, keys: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Philox4x32 rounds on 32-bit counters held in int64 tensors (modified in place)."""
    pa, pb = torch.empty_like(c0), torch.empty_like(c0)
    for k0, k1 in keys:
        # 32 x 32 -> 64-bit products: int64 multiplication wraps modulo 2**64, which keeps both halves
        torch.mul(c2, ROUND_B, out=pb)
        torch.mul(c0, ROUND_A, out=pa)
        torch.bitwise_right_shift(pb, 32, out=c0).bitwise_and_(MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_right_shift(pa, 32, out=c2).bitwise_and_(MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        torch.bitwise_and(pb, MASK32, out=c1)
        torch.bitwise_and(pa, MASK32, out=c3)
    return c0, c1, c2, c3


@torch.no_grad()
def _slice(keys: list[tuple[int, int]], start: int, n: int, device: torch.device) -> torch.Tensor:
    """z at the flat indices [start, start + n), float32."""
    c0 = torch.arange(start, start + n, dtype=torch.int64, device=device)
    c1 = c0 >> 32
    c0.bitwise_and_(MASK32)
    x0, x1, _, _ = philox4x32(c0, c1, torch.zeros_like(c0), torch.zeros_like(c0), keys)
    u1 = _to_uniform(x0).clamp_(min=MIN_UNIFORM)
    u2 = _to_uniform(x1)
    radius = u1.log_().mul_(-2.0).sqrt_()
    return u2.mul_(TWO_PI).cos_().mul_(radius)


#: (slice length, device) -> bytes a slice's temporaries add at their peak, measured on fake tensors
_SLICE_PEAK: dict[tuple[int, str], int] = {}


def _fake_slice(keys: list[tuple[int, int]], start: int, n: int, device: torch.device) -> None:
    """A slice's memory without its values, for fake tensors (``dpzo plan``).

    Values are placeholders there and only memory counts.  Every slice allocates what the first
    does, and a slice is some 150 ops, each slow on fake tensors (a billion coordinates would take
    minutes), so the first slice of a length runs for real, its temporaries' peak is kept, and
    the later ones allocate that many bytes at once and free them."""
    where = (n, str(device))
    extra = _SLICE_PEAK.get(where)
    if extra is None:
        with CostTracker() as tracker:
            _slice(keys, start, n, device)
        _SLICE_PEAK[where] = max(tracker.finish().peak_bytes.values(), default=0)
    else:
        torch.empty(extra, dtype=torch.uint8, device=device)


#: the dtypes the compiled CPU passes fill and move (other dtypes run the torch ones)
COMPILED_DTYPES = (torch.float32, torch.float64)


@functools.cache
def _load_compiled() -> types.ModuleType | None:
    """``dpzo.zo.cpu_kernels``, compiled (or loaded from numba's cache) now; None, with a one-line
    warning, where it cannot load: then z is drawn by :func:`torch_normal_`."""
    try:
        from dpzo.zo import cpu_kernels

        cpu_kernels.warm_up()  # compiles (or loads the cache) now: a failure shows here
        return cpu_kernels
    except Exception as exc:  # numba missing, or no LLVM target for this CPU: the torch stream
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(
            f"dpzo: the compiled CPU passes cannot load ({type(exc).__name__}: {reason}); z is drawn in "
            "torch, about 15x slower (pip install numba to use them)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def compiled() -> types.ModuleType | None:
    """The compiled CPU passes (``dpzo.zo.cpu_kernels``) when they load and ``DPZO_FUSED`` is not
    ``0`` (which runs every pass and draw in torch); None otherwise."""
    if os.environ.get("DPZO_FUSED", "") == "0":
        return None
    return _load_compiled()


@torch.no_grad()
def normal_(out: torch.Tensor, seed: int, start: int = 0) -> torch.Tensor:
    """Fill the 1-D ``out`` with z(seed) at the flat indices [start, start + len(out)); returns it.

    Float32 and float64 CPU tensors are filled by the compiled stream when it loads
    (:func:`compiled`), everything else by :func:`torch_normal_`."""
    if out.dim() != 1:
        raise ValueError(f"out must be 1-D, got shape {tuple(out.shape)}")
    if out.device.type == "cpu" and out.dtype in COMPILED_DTYPES and out.is_contiguous():
        kernels = compiled()
        if kernels is not None:
            return kernels.normal_(out, seed, start)
    return torch_normal_(out, seed, start)


@torch.no_grad()
def torch_normal_(out: torch.Tensor, seed: int, start: int = 0) -> torch.Tensor:
    """:func:`normal_` in torch on any device: 32-bit arithmetic emulated on int64 tensors."""
    if out.dim() != 1:
        raise ValueError(f"out must be 1-D, got shape {tuple(out.shape)}")
    keys = philox_keys(seed)
    n = out.numel()
    step = CPU_SLICE if out.device.type == "cpu" else DEVICE_SLICE
    if is_fake(out):
        if n:
            _fake_slice(keys, int(start), min(step, n), out.device)
        return out
    for a in range(0, n, step):
        b = min(a + step, n)
        out[a:b] = _slice(keys, int(start) + a, b - a, out.device)
    return out
