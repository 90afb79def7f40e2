"""Quantization arithmetic shared by the algorithms: ranges, scales, zero points, STE functions."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SCALE_FLOOR",
    "affine_qparams",
    "affine_qparams_float",
    "binarize",
    "dorefa_levels_to_weight",
    "fake_quantize",
    "fake_quantize_clamped",
    "lsq_quantize",
    "lsq_quantize_clamped",
    "quant_range",
    "round_ste",
    "to_float32",
]

#: Smallest scale: float32 machine epsilon, so an all-zero tensor gives a finite scale, never 0/0.
SCALE_FLOOR = float(torch.finfo(torch.float32).eps)


def to_float32(value: float) -> float:
    """``value`` rounded to float32 precision, as a Python float (no tensor round trip)."""
    return float(np.float32(value))


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
    scale = to_float32(max(scale, SCALE_FLOOR))
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


class _LsqQuantize(torch.autograd.Function):
    """x_hat = round(clamp(x / s, qmin, qmax)) * s with LSQ's gradients, keeping only x and s.

    The autograd graph of that formula (``round_ste`` for the rounding) keeps x / s and the
    rounded codes, two tensors of x's size; this one recomputes them in backward from x, with
    the same operations, so values and gradients are those of the graph bit for bit:

    - x: (g * s) where qmin <= x / s <= qmax (else 0), then / s (the graph's mul, clamp and div
      backwards; (g * s) / s is not always g in float32);
    - s: sum(g * codes) + sum(-(g_v) * ((x / s) / s)), g_v the x gradient before its / s; each
      sum reduced to s's shape as autograd reduces a broadcast gradient.
    """

    @staticmethod
    def forward(ctx: object, x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
        ctx.qmin, ctx.qmax = qmin, qmax  # type: ignore[attr-defined]
        ctx.save_for_backward(x, step)  # type: ignore[attr-defined]
        return torch.div(x, step).clamp_(qmin, qmax).round_().mul_(step)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, step = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_step = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        grad_x, grad_step = _lsq_backward(
            x, step, grad, ctx.qmin, ctx.qmax, need_x, need_step  # type: ignore[attr-defined]
        )
        return grad_x, grad_step, None, None


def _lsq_backward(
    x: Tensor, step: Tensor, grad: Tensor, qmin: int, qmax: int, need_x: bool, need_step: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of x and the step of round(clamp(x / step, qmin, qmax)) * step, as its
    autograd graph computes them (see ``_LsqQuantize``)."""
    scaled = torch.div(x, step)
    inside = (scaled >= qmin).logical_and_(scaled <= qmax)
    grad_scaled = torch.where(inside, grad * step, 0.0)
    del inside
    grad_x = torch.div(grad_scaled, step) if need_x else None
    grad_step = None
    if need_step:
        # The division's gradient for s, -grad * ((x / s) / s), then the product's.
        from_div = torch.div(scaled, step).mul_(grad_scaled.neg_()).sum_to_size(step.shape)
        del grad_scaled
        codes = scaled.clamp_(qmin, qmax).round_()
        grad_step = codes.mul_(grad).sum_to_size(step.shape) + from_div
    return grad_x, grad_step


class _LsqQuantizeClamped(torch.autograd.Function):
    """``_LsqQuantize`` of ``hardtanh(x, low, high)`` (a ReLU, ReLU6 or Hardtanh folded in),
    keeping x, not the activation's output: the activation's gradient window low < x < high is
    applied in backward, as ``hardtanh_backward`` does, so values and gradients are those of
    the activation followed by ``_LsqQuantize`` bit for bit."""

    @staticmethod
    def forward(
        ctx: object, x: Tensor, step: Tensor, qmin: int, qmax: int, low: float, high: float
    ) -> Tensor:
        ctx.qmin, ctx.qmax, ctx.low, ctx.high = qmin, qmax, low, high  # type: ignore[attr-defined]
        ctx.save_for_backward(x, step)  # type: ignore[attr-defined]
        return F.hardtanh(x, low, high).div_(step).clamp_(qmin, qmax).round_().mul_(step)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, step = ctx.saved_tensors  # type: ignore[attr-defined]
        low, high = ctx.low, ctx.high  # type: ignore[attr-defined]
        need_x, need_step = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        grad_x, grad_step = _lsq_backward(
            F.hardtanh(x, low, high), step, grad, ctx.qmin, ctx.qmax,  # type: ignore[attr-defined]
            need_x, need_step,
        )
        if grad_x is not None:
            grad_x = torch.ops.aten.hardtanh_backward(grad_x, x, low, high)
        return grad_x, grad_step, None, None, None, None


def lsq_quantize_clamped(
    x: Tensor, step: Tensor, qmin: int, qmax: int, low: float, high: float
) -> Tensor:
    """``lsq_quantize(F.hardtanh(x, low, high), step, qmin, qmax)`` bit for bit, values and
    gradients, keeping x instead of the activation's output for backward."""
    return _LsqQuantizeClamped.apply(x, step, qmin, qmax, low, high)


def lsq_quantize(x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
    """LSQ's ``round(clamp(x / step, qmin, qmax)) * step`` (straight-through rounding), keeping
    only x and step for backward (see ``_LsqQuantize``)."""
    return _LsqQuantize.apply(x, step, qmin, qmax)


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


class _FakeQuantize(torch.autograd.Function):
    """x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s; the gradient passes where the
    rounded code is inside [qmin, qmax] (the straight-through estimator with clipping).

    The zero point moves into the clamp bounds (clamp(round(x / s), qmin - z, qmax - z)): the same
    integers, two passes fewer over the tensor. With a ``window`` (a, b) the input is first
    clamped to [a, b] (see :func:`fake_quantize_clamped`) and the gradient also needs a < x < b.
    """

    @staticmethod
    def forward(
        ctx: object,
        x: Tensor,
        scale: float | Tensor,
        inv_scale: float | Tensor,
        low: float | Tensor,
        high: float | Tensor,
        window: tuple[float, float] | None = None,
        passing: tuple[float, float] | None = None,
    ) -> Tensor:
        ctx.window = window  # type: ignore[attr-defined]
        ctx.passing = passing  # type: ignore[attr-defined]
        chunk = _chunk_size(x, scale)
        if chunk:
            out, inside = _fake_quantize_chunked(
                x, scale, inv_scale, low, high, chunk, mask=passing is None  # type: ignore[arg-type]
            )
            ctx.save_for_backward(inside, x if window is not None else None)  # type: ignore[attr-defined]
            return out
        codes = x.mul(inv_scale).round_()
        if passing is not None:
            # The gradient's mask is an open interval of x (see _passing_interval): no mask
            # tensor, and x is saved anyway for the window.
            ctx.save_for_backward(None, x)  # type: ignore[attr-defined]
            return codes.clamp_(low, high).mul_(scale)
        clamped = codes.clamp(low, high)
        # The mask overwrites the codes, as float 0/1: bool tensors are ~4x slower on the CPU.
        inside = torch.eq(clamped, codes, out=codes)
        ctx.save_for_backward(inside, x if window else None)  # type: ignore[attr-defined]
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:
        inside, x = ctx.saved_tensors  # type: ignore[attr-defined]
        passing = ctx.passing  # type: ignore[attr-defined]
        if passing is not None:
            return torch.ops.aten.hardtanh_backward(grad, x, *passing), *(None,) * 6
        grad = grad * inside
        window = ctx.window  # type: ignore[attr-defined]
        if window is not None:
            grad = torch.ops.aten.hardtanh_backward(grad, x, *window)
        return grad, *(None,) * 6


#: Elements of one chunk of the chunked fake quantization: a chunk and its output stay in the
#: cache between the passes (2 x 1 MiB at float32).
CHUNK_NUMEL = 1 << 18


def _chunk_size(x: Tensor, scale: float | Tensor) -> int:
    """Elements per chunk for ``_fake_quantize_chunked``, or 0 where it does not apply: tensor
    scales, tensors off the CPU or not contiguous, tensors of one chunk or less, and torch
    running more than one thread. There every chunk's pass would be a parallel region of its
    own: on a machine shared with other work each region waits for a descheduled thread, and
    a MobileNetV2 QAT step at two threads took twice the float step's CPU time in one such run
    (README, "Real networks")."""
    if isinstance(scale, Tensor) or x.device.type != "cpu" or not x.is_contiguous():
        return 0
    if torch.get_num_threads() != 1:
        return 0
    return CHUNK_NUMEL if x.numel() > CHUNK_NUMEL else 0


def _fake_quantize_chunked(
    x: Tensor, scale: float, inv_scale: float, low: float, high: float, chunk: int, *, mask: bool
) -> tuple[Tensor, Tensor | None]:
    """``_FakeQuantize.forward``'s passes (x * (1/s), round, clamp, * s, and the 0/1 mask when
    ``mask``) run chunk by chunk: each chunk is read from memory once and passed over in the
    cache, instead of four passes over the whole tensor (one thread only, see _chunk_size).
    The same operations on every element, so bit for bit the same values; one output tensor
    (and one mask) as before."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    inside = torch.empty_like(out) if mask else None
    flat_x, flat_out = x.reshape(-1), out.view(-1)
    flat_inside = inside.view(-1) if inside is not None else None
    for start in range(0, flat_x.numel(), chunk):
        part = flat_out[start:start + chunk]
        if flat_inside is None:
            torch.mul(flat_x[start:start + chunk], inv_scale, out=part).round_()
            part.clamp_(low, high).mul_(scale)
            continue
        codes = flat_inside[start:start + chunk]
        torch.mul(flat_x[start:start + chunk], inv_scale, out=codes).round_()
        torch.clamp(codes, low, high, out=part)
        torch.eq(part, codes, out=codes)
        part.mul_(scale)
    return out, inside


#: Float32 neighbours searched on each side of an estimated rounding boundary.
_BOUNDARY_ULPS = 16


def _float32_neighbours(value: float) -> np.ndarray:
    """The float32 values within _BOUNDARY_ULPS ulps of ``value`` (nonzero), ascending."""
    bits = np.array([value], dtype=np.float32).view(np.int32)[0]
    steps = np.arange(-_BOUNDARY_ULPS, _BOUNDARY_ULPS + 1, dtype=np.int32)
    # Same-sign float32 values are ordered like their bit patterns (reversed when negative).
    return np.sort((bits + steps).view(np.float32))


def _codes_of(x: np.ndarray, inv_scale: float) -> np.ndarray:
    # round-half-even of the float32 product: the arithmetic of _FakeQuantize.forward.
    return np.round(x * np.float32(inv_scale))


def _passing_interval(
    inv_scale: float, code_low: int, code_high: int, window: tuple[float, float]
) -> tuple[float, float] | None:
    """Open interval (a, b) of float32 x where the gradient of ``_FakeQuantize`` passes:
    ``window[0] < x < window[1]`` and ``code_low <= round(fl32(x * inv_scale)) <= code_high``.

    x -> round(fl32(x * inv_scale)) is monotone for inv_scale > 0, so the codes in range are
    exactly the x in [x_low, x_high]: the smallest float32 whose code reaches code_low and the
    largest whose code stays within code_high, found among the float32 neighbours of
    (code -+ 0.5) / inv_scale with the forward's own float32 arithmetic. None when a
    boundary is not among them (then the caller keeps an explicit mask).
    """
    below = _float32_neighbours((code_low - 0.5) / inv_scale)
    above = _float32_neighbours((code_high + 0.5) / inv_scale)
    if not (np.isfinite(below).all() and np.isfinite(above).all()):
        return None  # a boundary beyond float32's range
    reach, stay = _codes_of(below, inv_scale) >= code_low, _codes_of(above, inv_scale) <= code_high
    if reach[0] or not reach[-1] or not stay[0] or stay[-1]:
        return None
    x_low = below[np.argmax(reach)]  # the first that reaches code_low
    x_high = above[np.argmin(stay) - 1]  # the last that stays within code_high
    # hardtanh_backward passes a < x < b: step one float32 outwards from each boundary.
    low = max(window[0], float(np.nextafter(x_low, np.float32(-np.inf))))
    high = min(window[1], float(np.nextafter(x_high, np.float32(np.inf))))
    return low, high


#: Up to this many elements (and always off the CPU) torch's fused fake-quantization kernels are
#: the faster choice: one dispatch, backward in C++. Above it their CPU loop loses to the
#: vectorised arithmetic of ``_FakeQuantize``.
NATIVE_MAX_NUMEL = 16384


def _use_native(x: Tensor) -> bool:
    return x.dtype == torch.float32 and (x.device.type != "cpu" or x.numel() <= NATIVE_MAX_NUMEL)


def fake_quantize(
    x: Tensor, scale: float | Tensor, zero_point: int | Tensor, qmin: int, qmax: int,
    *, axis: int | None = None,
) -> Tensor:
    """Affine fake quantization, per tensor (Python ``scale``/``zero_point``, or 0-dim tensors)
    or per channel (1-dim tensors along ``axis``).

    Bit-identical to torch's ``fake_quantize_per_tensor_affine``/``..._per_channel_affine``
    (same float32 arithmetic: x * (1/s), round half to even, clamp, (q - z) * s), which it calls
    for small tensors and off the CPU; on larger CPU tensors its own arithmetic is several
    times faster than those kernels.
    """
    if isinstance(scale, Tensor):
        scale = scale.to(device=x.device, dtype=torch.float32)
        zero_point = zero_point.to(device=x.device, dtype=torch.int32)  # type: ignore[union-attr]
        if _use_native(x):
            if axis is None:
                return torch.fake_quantize_per_tensor_affine(
                    x, scale.reshape(()), zero_point.reshape(()), qmin, qmax
                )
            return torch.fake_quantize_per_channel_affine(
                x, scale.reshape(-1), zero_point.reshape(-1), axis, qmin, qmax
            )
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        scale = scale.reshape(shape)
        shift = zero_point.reshape(shape).float()
        return _FakeQuantize.apply(
            x, scale, torch.reciprocal(scale), qmin - shift, qmax - shift
        )
    if _use_native(x):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    inv_scale = float(np.float32(1.0) / np.float32(scale))
    return _FakeQuantize.apply(x, scale, inv_scale, qmin - zero_point, qmax - zero_point)


def fake_quantize_clamped(
    x: Tensor, low: float, high: float, scale: float, zero_point: int, qmin: int, qmax: int
) -> Tensor:
    """``fake_quantize(x.clamp(low, high), ...)`` bit for bit, values and gradients, with the
    clamp (a ReLU, ReLU6 or Hardtanh whose range holds 0) folded into the quantizer's own clamp:
    one pass over the tensor and one autograd node fewer on large CPU tensors.

    Rounding x / s is monotone, so round(clamp(x, a, b) / s) = clamp(round(x / s), round(a / s),
    round(b / s)); the activation's gradient window a < x < b is applied in backward.
    """
    if _use_native(x):
        return fake_quantize(F.hardtanh(x, low, high), scale, zero_point, qmin, qmax)
    inv_scale = float(np.float32(1.0) / np.float32(scale))
    code_low, code_high = qmin - zero_point, qmax - zero_point
    # The codes of the bounds as float32 computes them (a float32 product is exact in a double).
    if math.isfinite(low):
        code_low = max(code_low, round(to_float32(to_float32(low) * inv_scale)))
    if math.isfinite(high):
        code_high = min(code_high, round(to_float32(to_float32(high) * inv_scale)))
    window = (low, high)
    passing = _passing_interval(inv_scale, code_low, code_high, window)
    return _FakeQuantize.apply(x, scale, inv_scale, code_low, code_high, window, passing)
