"""Integer codes of quantized tensors: the affine encoding, its inverse, and the QDQ form.

A tensor quantizer turns its fake-quantized output into codes (the packed export stores them)
and says how a QDQ runtime reproduces it (:class:`QdqForm`, what the ONNX export writes). This
module holds the plain data and arithmetic both sides share; it knows no quantizer class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._math import dorefa_levels_to_weight

__all__ = [
    "NoQdqFormError",
    "QdqForm",
    "affine_codes",
    "affine_fixed_params",
    "affine_weight_form",
    "decode",
    "fixed_activation_form",
]


class NoQdqFormError(ValueError):
    """A tensor quantizer with no exact QuantizeLinear/DequantizeLinear form (says why)."""


@dataclass(frozen=True)
class QdqForm:
    """A quantized tensor as a QDQ runtime holds it: ``(codes - zero_point) * scale``.

    ``scale`` (float32) and ``zero_point`` (int32) are 0-dim per tensor, or 1-dim along
    ``axis``; codes lie in ``qmin..qmax``. A weight's form carries its ``codes`` (int64, the
    weight's shape); an activation's has none: QuantizeLinear computes them at run time.
    """

    bits: int
    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    axis: int | None
    codes: Tensor | None = None


def affine_codes(
    x_hat: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, axis: int | None
) -> tuple[Tensor, dict[str, Any]]:
    """Codes 0.. of an affine tensor and what :func:`decode` needs; a ``None`` zero point means
    0 and is not stored."""
    shape = [1] * x_hat.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.reshape(shape) if axis is not None else scale
    q = torch.round(x_hat / s).to(torch.int64)
    meta: dict[str, Any] = {"scale": scale.detach().float().reshape(-1).clone(), "axis": axis,
                            "qmin": qmin}
    if zero_point is not None:
        q = q + (zero_point.reshape(shape) if axis is not None else zero_point).to(torch.int64)
        meta["zero_point"] = zero_point.detach().to(torch.int32).reshape(-1).clone()
    return q - qmin, meta


def affine_fixed_params(quant: Any) -> dict[str, Any]:
    """Scale, zero point, axis and range of an affine activation quantizer (one with
    ``qparams()``, ``per_channel``, ``qmin`` and ``qmax``), as deployed (per channel along
    dim 1)."""
    scale, zero_point = quant.qparams()
    return {
        "scale": scale.reshape(-1).float(),
        "zero_point": zero_point.reshape(-1).to(torch.int32),
        "axis": 1 if quant.per_channel else None,
        "qmin": quant.qmin,
        "qmax": quant.qmax,
    }


def decode(codes: Tensor, encoding: str, bits: int, meta: dict[str, Any]) -> Tensor:
    """Float tensor from integer codes 0..2^bits-1; bit-exact inverse of ``TensorQuant.codes``."""
    if encoding == "sign":
        return codes.to(torch.float32) * 2.0 - 1.0
    if encoding == "dorefa":
        return dorefa_levels_to_weight(codes.to(torch.float32), bits)
    q = codes.to(torch.int64) + meta["qmin"]
    scale, axis = meta["scale"], meta["axis"]
    zero_point = meta.get("zero_point", torch.zeros(1, dtype=torch.int32)).to(torch.int64)
    if axis is None:
        return (q - zero_point.reshape(())).to(torch.float32) * scale.reshape(())
    shape = [1] * codes.dim()
    shape[axis] = -1
    return (q - zero_point.reshape(shape)).to(torch.float32) * scale.reshape(shape)


def affine_weight_form(quant: Any, x_hat: Tensor) -> QdqForm:
    """The QDQ form of an affine weight quantizer's output (one with ``codes``, ``qmin`` and
    ``qmax``): its codes shifted back to qmin..qmax, checked to decode to ``x_hat`` exactly."""
    codes, meta = quant.codes(x_hat)
    if not torch.equal(decode(codes, quant.encoding, quant.bits, meta), x_hat):
        raise RuntimeError(f"{quant.owner}: integer codes do not reproduce the quantized weight")
    axis = meta["axis"]
    scale = meta["scale"] if axis is not None else meta["scale"].reshape(())
    zero_point = meta.get("zero_point", torch.zeros_like(meta["scale"], dtype=torch.int32))
    return QdqForm(
        quant.bits, scale, zero_point.reshape(scale.shape), quant.qmin, quant.qmax, axis,
        codes + meta["qmin"],
    )


def fixed_activation_form(quant: Any) -> QdqForm:
    """The QDQ form of an affine activation quantizer, from its ``fixed_params()``."""
    fixed = quant.fixed_params()
    axis = fixed["axis"]
    scale = fixed["scale"].float().reshape(-1 if axis is not None else ())
    zero_point = fixed.get("zero_point", torch.zeros_like(scale, dtype=torch.int32))
    return QdqForm(
        quant.bits, scale, zero_point.to(torch.int32).reshape(scale.shape), fixed["qmin"],
        fixed["qmax"], axis,
    )
