"""Tensor quantizers: each one fake-quantizes one tensor role of a layer (weight, input, output).

Every tensor quantizer can also turn its fake-quantized output into integer codes and back
(``codes`` / :func:`decode`), bit-exactly, which is what the packed export stores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._math import (
    SCALE_FLOOR,
    affine_qparams,
    affine_qparams_float,
    binarize,
    dorefa_levels_to_weight,
    fake_quantize,
    fake_quantize_clamped,
    lsq_quantize,
    lsq_quantize_clamped,
    quant_range,
    round_ste,
    to_float32,
)

__all__ = [
    "SCHEMES",
    "AffineWeightQuant",
    "DoReFaWeightQuant",
    "EmaActivationQuant",
    "LsqQuant",
    "SignQuant",
    "TensorQuant",
    "decode",
]

SCHEMES = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
)


class TensorQuant(nn.Module):
    """Base class: ``forward(x, active)`` returns x fake-quantized (or x itself when inactive)."""

    bits: int
    #: How the codes map back to floats: "affine", "dorefa" or "sign" (see :func:`decode`).
    encoding: str = "affine"
    #: The layer and role this quantizer serves, for error messages ("conv1 (output)").
    owner: str = "a quantizer"

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        raise NotImplementedError

    def param_bytes(self) -> int:
        """Bytes of the parameters (scales, zero points) a deployed model stores for this tensor."""
        return 0

    def codes(self, x_hat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Integer codes 0..2^bits-1 of a fake-quantized tensor, and what :func:`decode` needs."""
        raise NotImplementedError

    def calibration(self, role: str) -> dict[str, Any]:
        """NNI-style calibration keys (``weight_bits``, ``tracked_min_output``...)."""
        return {f"{role}_bits": self.bits}

    def observe(self, x: Tensor) -> None:
        """Update the statistics from ``x`` without quantizing it (``Quantizer.calibrate``).

        Quantizers without statistics (weights, signs) ignore it."""

    def end_calibration(self) -> None:
        """Called once when a calibration ends: settle what the observed batches decided."""

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Per-channel statistics get their shape on the first batch: adopt the stored one.
        for name, buffer in self._buffers.items():
            key = prefix + name
            if buffer is not None and key in state_dict and state_dict[key].shape != buffer.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._after_load()

    def _after_load(self) -> None:
        """Refresh Python-side mirrors of buffers after a state_dict load."""

    @staticmethod
    def _host_math(x: Tensor) -> bool:
        """Per-tensor statistics as Python numbers: fastest on the CPU; on an accelerator the
        tensor path avoids a host synchronisation per tensor and step."""
        return x.device.type == "cpu"

    def _set_scheme(self, bits: int, scheme: str, dtype: str) -> None:
        """Bits, integer range and scheme flags of an affine quantizer."""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quant_scheme {scheme!r}")
        self.bits = bits
        self.qmin, self.qmax = quant_range(bits, dtype)
        self.per_channel = scheme.startswith("per_channel")
        self.symmetric = scheme.endswith("symmetric")


def _affine_codes(
    x_hat: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, axis: int | None
) -> tuple[Tensor, dict[str, Any]]:
    """Codes of an affine tensor; a ``None`` zero point means 0 and is not stored."""
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
    """Scale, zero point, axis and range of an affine activation quantizer, as deployed (per
    channel along dim 1)."""
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


class AffineWeightQuant(TensorQuant):
    """Scale and zero point from the current weight's min/max, recomputed on every forward.

    Used by QAT (any scheme and dtype) and by the naive quantizer (per-tensor symmetric int).
    Per-channel schemes use dim 0 (output channels of a Conv/Linear weight).
    """

    def __init__(self, bits: int, *, scheme: str, dtype: str, channels: int) -> None:
        super().__init__()
        self._set_scheme(bits, scheme, dtype)
        shape = (channels,) if self.per_channel else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        if not active:
            return x
        detached = x.detach()
        if self.per_channel:
            rmin, rmax = torch.aminmax(detached.reshape(x.shape[0], -1), dim=1)
            scale, zero_point = affine_qparams(rmin, rmax, self.qmin, self.qmax, self.symmetric)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
            return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, axis=0)
        rmin, rmax = torch.aminmax(detached)
        if not self._host_math(x):
            scale, zero_point = affine_qparams(rmin, rmax, self.qmin, self.qmax, self.symmetric)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
            return fake_quantize(x, scale, zero_point, self.qmin, self.qmax)
        s, z = affine_qparams_float(
            rmin.item(), rmax.item(), self.qmin, self.qmax, self.symmetric
        )
        self.scale.fill_(s)
        self.zero_point.fill_(z)
        return fake_quantize(x, s, z, self.qmin, self.qmax)

    def param_bytes(self) -> int:
        return 8 * self.scale.numel()  # float32 scale + int32 zero point per tensor/channel

    def codes(self, x_hat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return _affine_codes(
            x_hat, self.scale, self.zero_point, self.qmin, 0 if self.per_channel else None
        )

    def calibration(self, role: str) -> dict[str, Any]:
        return {
            f"{role}_bits": self.bits,
            f"{role}_scale": self.scale.tolist(),
            f"{role}_zero_point": self.zero_point.tolist(),
        }


class EmaActivationQuant(TensorQuant):
    """QAT activations: min/max tracked by an exponential moving average (decay 0.99).

    Initialised from the first training (or calibration) batch; the average keeps updating
    before ``quant_start_step`` and over calibration batches; eval mode never updates it. The
    range is kept as float32, in the buffers and in their Python mirrors alike. Per-channel
    schemes use dim 1.
    """

    def __init__(self, bits: int, *, scheme: str, dtype: str, decay: float = 0.99) -> None:
        super().__init__()
        self._set_scheme(bits, scheme, dtype)
        self.decay = decay
        self.register_buffer("tracked_min", torch.zeros(()))
        self.register_buffer("tracked_max", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self._observed = False
        self._min = self._max = 0.0

    def _after_load(self) -> None:
        self._observed = bool(self.observed)
        if not self.per_channel:
            self._min, self._max = float(self.tracked_min), float(self.tracked_max)

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        if not self.per_channel and self._host_math(x):
            rmin, rmax = torch.aminmax(x)
            self._observe(rmin.item(), rmax.item())
            return
        if self.per_channel:
            rmin, rmax = torch.aminmax(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1)
        else:
            rmin, rmax = torch.aminmax(x)
        if self._observed:
            rmin = self.decay * self.tracked_min + (1 - self.decay) * rmin
            rmax = self.decay * self.tracked_max + (1 - self.decay) * rmax
        self.tracked_min, self.tracked_max = rmin, rmax
        self._mark_observed()

    def observe(self, x: Tensor) -> None:
        self._update(x.detach())

    def _observe(self, rmin: float, rmax: float) -> None:
        """The host path's EMA update from one batch's min and max."""
        if self._observed:
            rmin = self.decay * self._min + (1 - self.decay) * rmin
            rmax = self.decay * self._max + (1 - self.decay) * rmax
        # The mirrors hold exactly the float32 the buffers store: a state dict load changes nothing.
        rmin, rmax = to_float32(rmin), to_float32(rmax)
        # Straight into __dict__: nn.Module.__setattr__ costs microseconds per call.
        self.__dict__.update(_min=rmin, _max=rmax)
        self.tracked_min.fill_(rmin)
        self.tracked_max.fill_(rmax)
        self._mark_observed()

    def _mark_observed(self) -> None:
        if not self._observed:
            self._observed = True
            self.observed.fill_(True)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Scale (float32) and zero point (int32) from the tracked range."""
        if self.per_channel or not self._host_math(self.tracked_min):
            return affine_qparams(
                self.tracked_min, self.tracked_max, self.qmin, self.qmax, self.symmetric
            )
        s, z = affine_qparams_float(self._min, self._max, self.qmin, self.qmax, self.symmetric)
        return torch.tensor(s), torch.tensor(z, dtype=torch.int32)

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        if self.training:
            self._update(x.detach())
        if not active or not self._observed:
            return x
        if self.per_channel or not self._host_math(x):
            scale, zero_point = self.qparams()
            axis = 1 if self.per_channel else None
            return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, axis=axis)
        s, z = affine_qparams_float(self._min, self._max, self.qmin, self.qmax, self.symmetric)
        return fake_quantize(x, s, z, self.qmin, self.qmax)

    def forward_clamped(self, x: Tensor, low: float, high: float, active: bool = True) -> Tensor:
        """``forward(x.clamp(low, high))`` bit for bit (values, statistics and gradients), the
        clamp folded into the quantization where the statistics are per tensor on the CPU.

        For a ReLU, ReLU6 or Hardtanh whose outputs this quantizes; ``low <= 0 <= high``, both
        float32 values. min and max of the clamped tensor are those of x, clamped.
        """
        if self.per_channel or not self._host_math(x):
            return self.forward(F.hardtanh(x, low, high), active)
        if self.training:
            rmin, rmax = torch.aminmax(x.detach())
            self._observe(min(max(rmin.item(), low), high), min(max(rmax.item(), low), high))
        if not active or not self._observed:
            return F.hardtanh(x, low, high)
        s, z = affine_qparams_float(self._min, self._max, self.qmin, self.qmax, self.symmetric)
        return fake_quantize_clamped(x, low, high, s, z, self.qmin, self.qmax)

    def param_bytes(self) -> int:
        return 8 * self.tracked_min.numel()

    def fixed_params(self) -> dict[str, Any]:
        """What a deployed model needs to reproduce this quantizer in eval mode."""
        return affine_fixed_params(self)

    def calibration(self, role: str) -> dict[str, Any]:
        return {
            f"{role}_bits": self.bits,
            f"tracked_min_{role}": self.tracked_min.tolist(),
            f"tracked_max_{role}": self.tracked_max.tolist(),
        }


class DoReFaWeightQuant(TensorQuant):
    """DoReFa-Net weights: t = tanh(w), u = t / (2 max|t|) + 1/2, w_q = 2 round(u n) / n - 1.

    n = 2^k - 1. The straight-through estimator covers only the rounding, so tanh's derivative
    counts (as in NNI 3.0; NNI 2.x passed the gradient straight through the whole chain).
    """

    encoding = "dorefa"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        if not active:
            return x
        t = torch.tanh(x)
        u = t / (2 * t.abs().max().clamp(min=SCALE_FLOOR)) + 0.5
        return dorefa_levels_to_weight(round_ste(u * (2**self.bits - 1)), self.bits)

    def codes(self, x_hat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        n = 2**self.bits - 1
        return torch.round((x_hat + 1.0) * (n / 2.0)).to(torch.int64), {}


class SignQuant(TensorQuant):
    """BNN: sign(x) with sign(0) = +1. ``window`` limits the gradient to |x| <= 1 (activations)."""

    encoding = "sign"

    def __init__(self, *, window: bool) -> None:
        super().__init__()
        self.bits = 1
        self.window = window

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        return binarize(x, window=self.window) if active else x

    def codes(self, x_hat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return (x_hat > 0).to(torch.int64), {}


class LsqQuant(TensorQuant):
    """Learned Step Size Quantization: x_hat = round(clamp(x / s, Qn, Qp)) * s with a learned s.

    Signed range Qn = -2^(b-1), Qp = 2^(b-1) - 1 (``dtype='int'``, NNI's choice for every tensor)
    or 0..2^b-1 (``dtype='uint'``, better after a ReLU). s starts at 2 mean|x| / sqrt(Qp): for
    weights at construction, for activations from the first training batch. The gradient reaching
    s is scaled by 1 / sqrt(numel(x) Qp).
    """

    def __init__(self, bits: int, *, dtype: str, init_from: Tensor | None = None) -> None:
        super().__init__()
        self.bits = bits
        if dtype == "uint":
            self.qmin, self.qmax = 0, 2**bits - 1
        else:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self._observed = False
        if init_from is not None:
            self._init_scale(init_from)

    def _after_load(self) -> None:
        self._observed = bool(self.observed)

    def observe(self, x: Tensor) -> None:
        # Calibration gives an activation's step size its start value; after that it is learned.
        if not self._observed:
            self._init_scale(x)

    @torch.no_grad()
    def _init_scale(self, x: Tensor) -> None:
        value = 2 * x.detach().abs().mean() / math.sqrt(self.qmax)
        self.scale.fill_(max(float(value), SCALE_FLOOR))
        self.observed.fill_(True)
        self._observed = True

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        if not self._observed:
            if not self.training:
                return x
            self._init_scale(x)
        if not active:
            return x
        # round_ste(torch.clamp(x / step, qmin, qmax)) * step, values and gradients bit for bit,
        # without keeping x / step and the codes for backward.
        return lsq_quantize(x, self._scaled_step(x), self.qmin, self.qmax)

    def _scaled_step(self, x: Tensor) -> Tensor:
        # Scale the step size's gradient by 1/sqrt(numel * Qp) without changing its value.
        grad_factor = 1.0 / math.sqrt(x.numel() * self.qmax)
        step = self._step_size()
        return (step - step * grad_factor).detach() + step * grad_factor

    def forward_clamped(self, x: Tensor, low: float, high: float, active: bool = True) -> Tensor:
        """``forward(F.hardtanh(x, low, high))`` bit for bit (values, start value, gradients),
        keeping x rather than the activation's output for backward: for a ReLU, ReLU6 or
        Hardtanh whose output this quantizes (``low <= 0 <= high``)."""
        if not self._observed:
            if not self.training:
                return F.hardtanh(x, low, high)
            self._init_scale(F.hardtanh(x.detach(), low, high))
        if not active:
            return F.hardtanh(x, low, high)
        return lsq_quantize_clamped(x, self._scaled_step(x), self.qmin, self.qmax, low, high)

    def param_bytes(self) -> int:
        return 4  # the learned float32 step size; the zero point is always 0

    def _step_size(self) -> Tensor:
        # |s|: an optimizer step that overshoots past zero must not freeze the step size (the
        # floor alone would block its gradient for good).
        return self.scale.abs().clamp(min=SCALE_FLOOR)

    def _scale_value(self) -> Tensor:
        return self._step_size().detach().reshape(())

    def codes(self, x_hat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return _affine_codes(
            x_hat, self._scale_value(), None, self.qmin, None
        )

    def fixed_params(self) -> dict[str, Any]:
        return {
            "scale": self._scale_value().reshape(1).float(),
            "axis": None,
            "qmin": self.qmin,
            "qmax": self.qmax,
        }

    def calibration(self, role: str) -> dict[str, Any]:
        return {f"{role}_bits": self.bits, f"{role}_scale": float(self._scale_value())}
