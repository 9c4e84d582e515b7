"""The smallest zeroth-order scale the weights' precision can resolve."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from dpzo.zo.store import ParameterStore

#: The smallest ZO scale accepted, in units in the last place of the typical trainable weight
#: in the precision the forward pass sees: below about 4 ulp, theta +- beta z rounds back to
#: theta for most coordinates and the finite difference is rounding noise.
MIN_BETA_ULPS = 4.0


#: float32 matmuls under TF32 round their inputs to a 10-bit mantissa, like float16.
_TF32_EPS = 2.0**-10


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """float32 matmuls and convolutions on CUDA in TF32 (``enabled``) or in full float32, inside
    the block; the previous settings after it.

    The config's ``tf32`` (cells) and ``dpzo bench --no-tf32`` both go through here, so a cell
    runs the matmuls the bench timed.  The switches are CUDA's alone (a CPU run computes the same
    numbers either way), and the beta floor reads them (:func:`compute_epsilon`)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    previous = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = previous


def compute_epsilon(dtype: torch.dtype, device: torch.device) -> float:
    """Relative precision of the weights as the forward pass uses them (TF32 counts as 10 bits)."""
    eps = torch.finfo(dtype).eps
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float32 and device.type == "cuda" and tf32:
        return max(eps, _TF32_EPS)
    return eps


@torch.no_grad()
def smallest_resolvable_beta(store: ParameterStore, *, sample: int = 1 << 20) -> float:
    """``MIN_BETA_ULPS`` ulp of the median |theta| (over an evenly strided sample of the
    trainable coordinates) in the precision the forward pass computes with.

    The sample is at most ``sample`` coordinates and at most 1/64 of them (at least 64 Ki): on
    the CPU it is read where the weights live, so its copies stay a small part of a run's memory."""
    stride = max(1, store.numel // min(sample, max(1 << 16, store.numel // 64)))
    # a placed model's parts (one per device) are sampled alike, each where it lives; theta is
    # read from the master (a streamed block's working weights exist only while it is uploaded)
    typical = float(store.strided_theta(stride).abs().median())
    if typical == 0.0:
        return 0.0
    ulp = 2.0 ** math.floor(math.log2(typical)) * compute_epsilon(store.work_dtype, store.device)
    return MIN_BETA_ULPS * ulp


def check_zo_scale(store: ParameterStore, beta: float) -> None:
    """Refuse a ZO scale that the weights' precision cannot represent (e.g. beta = 1e-6 on
    float16 weights, or on float32 with TF32 matmuls: the perturbation rounds away)."""
    floor = smallest_resolvable_beta(store)
    if beta < floor:
        raise ValueError(
            f"ZO scale beta={beta:g} is below {MIN_BETA_ULPS:g} ulp of the typical weight in "
            f"{store.work_dtype} ({floor:.3g}): theta +- beta z rounds back to theta and the finite "
            f"differences are rounding noise. Use beta >= {floor:.2g} (MeZO and DPZero use 1e-3 "
            "with 16-bit weights), or float32 weights without TF32 for a smaller beta."
        )
