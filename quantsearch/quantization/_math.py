"""Quantization arithmetic shared by the algorithms: ranges, scales, zero points, STE functions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "SCALE_FLOOR",
    "affine_qparams",
    "affine_qparams_float",
    "binarize",
    "dorefa_levels_to_weight",
    "quant_range",
    "round_ste",
]

#: Smallest scale: float32 machine epsilon, so an all-zero tensor gives a finite scale, never 0/0.
SCALE_FLOOR = float(torch.finfo(torch.float32).eps)


def quant_range(bits: int, dtype: str) -> tuple[int, int]:
    """Integer range of a ``bits`` wide code.

    ``uint``: 0..2^b-1. ``int``: the restricted symmetric range -(2^(b-1)-1)..2^(b-1)-1
    (-127..127 at 8 bits), so that zero sits exactly in the middle, as in NNI's QAT.
    """
    if dtype == "uint":
        return 0, 2**bits - 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def _symmetric_zero_point(qmin: int, qmax: int) -> int:
    # int: 0; uint: the middle of the range (128 at 8 bits, as in NNI 3.0).
    return 0 if qmin < 0 else (qmin + qmax + 1) // 2


def affine_qparams_float(
    rmin: float, rmax: float, qmin: int, qmax: int, symmetric: bool
) -> tuple[float, int]:
    """Per-tensor scale and zero point as Python numbers (the fast path on CPU).

    The range is widened to contain 0, and the scale is rounded to float32 because that is the
    precision the fake-quantization kernels compute in: stored and used scales stay identical.
    """
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    if symmetric:
        scale = max(-rmin, rmax) / ((qmax - qmin) / 2)
        zero_point = _symmetric_zero_point(qmin, qmax)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
    scale = float(torch.tensor(max(scale, SCALE_FLOOR), dtype=torch.float32))
    if not symmetric:
        zero_point = min(max(qmin - round(rmin / scale), qmin), qmax)
    return scale, zero_point


def affine_qparams(
    rmin: Tensor, rmax: Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) tensors, per tensor (0-dim) or per channel (1-dim)."""
    zero = torch.zeros((), dtype=rmin.dtype, device=rmin.device)
    rmin, rmax = torch.minimum(rmin, zero), torch.maximum(rmax, zero)
    if symmetric:
        scale = torch.maximum(-rmin, rmax) / ((qmax - qmin) / 2)
        scale = scale.float().clamp(min=SCALE_FLOOR)
        zero_point = torch.full_like(scale, _symmetric_zero_point(qmin, qmax), dtype=torch.int32)
    else:
        scale = ((rmax - rmin) / (qmax - qmin)).float().clamp(min=SCALE_FLOOR)
        zero_point = (qmin - torch.round(rmin / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity gradient."""
    return _RoundSTE.apply(x)


class _Binarize(torch.autograd.Function):
    """sign(x) with sign(0) = +1; the gradient passes unchanged or only where |x| <= 1."""

    @staticmethod
    def forward(ctx: object, x: Tensor, window: bool) -> Tensor:
        ctx.window = window  # type: ignore[attr-defined]
        if window:
            ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        if not ctx.window:  # type: ignore[attr-defined]
            return grad, None
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * (x.abs() <= 1).to(grad.dtype), None


def binarize(x: Tensor, *, window: bool) -> Tensor:
    """BNN's sign: weights pass the gradient unchanged (window=False), activations through the
    hardtanh window |x| <= 1 (window=True)."""
    return _Binarize.apply(x, window)


def dorefa_levels_to_weight(levels: Tensor, bits: int) -> Tensor:
    """DoReFa's dequantization: integer level 0..2^k-1 -> weight in [-1, 1]."""
    n = 2**bits - 1
    return levels * (2.0 / n) - 1.0
