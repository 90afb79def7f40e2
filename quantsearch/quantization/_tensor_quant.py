"""Tensor quantizers: each one fake-quantizes one tensor role of a layer (weight, input, output).

Every tensor quantizer can also turn its fake-quantized output into integer codes and back
(``codes`` / :func:`~._codes.decode`), bit-exactly, which is what the packed export stores, and
says how a QDQ runtime reproduces it (``qdq_weight`` / ``qdq_activation``), which is what the
ONNX export writes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._codes import (
    NoQdqFormError,
    QdqForm,
    affine_codes,
    affine_fixed_params,
    affine_weight_form,
    fixed_activation_form,
)
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
    #: How the codes map back to floats: "affine", "dorefa" or "sign" (see :func:`~._codes.decode`).
    encoding: str = "affine"
    #: The layer and role this quantizer serves, for error messages ("conv1 (output)").
    owner: str = "a quantizer"

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        raise NotImplementedError

    def param_bytes(self) -> int:
        """Bytes of the parameters (scales, zero points) a deployed model stores for this tensor."""
        return 0

    def codes(self, x_hat: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Integer codes 0..2^bits-1 of a fake-quantized tensor, and what ``decode`` needs."""
        raise NotImplementedError

    def calibration(self, role: str) -> dict[str, Any]:
        """NNI-style calibration keys (``weight_bits``, ``tracked_min_output``...)."""
        return {f"{role}_bits": self.bits}

    def qdq_weight(self, x_hat: Tensor) -> QdqForm:
        """``x_hat`` (this quantizer's output for a weight) as integer codes, with the scale and
        zero point that DequantizeLinear maps back to it exactly. A quantizer without such a
        form keeps this default, which raises :class:`NoQdqFormError`."""
        raise NoQdqFormError(
            f"{type(self).__name__} has no QDQ form for a weight (it defines no qdq_weight)"
        )

    def qdq_activation(self) -> QdqForm | None:
        """The fixed QuantizeLinear/DequantizeLinear this quantizer applies to an input or output
        in eval mode; None when eval mode leaves the tensor in float (nothing observed yet). A
        quantizer without such a form keeps this default, which raises
        :class:`NoQdqFormError`."""
        raise NoQdqFormError(
            f"{type(self).__name__} has no QDQ form for an activation (it defines no "
            "qdq_activation)"
        )

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
        return affine_codes(
            x_hat, self.scale, self.zero_point, self.qmin, 0 if self.per_channel else None
        )

    def qdq_weight(self, x_hat: Tensor) -> QdqForm:
        return affine_weight_form(self, x_hat)

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

    def qdq_activation(self) -> QdqForm | None:
        return fixed_activation_form(self) if self._observed else None

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

    def qdq_weight(self, x_hat: Tensor) -> QdqForm:
        # Level k of n = 2^b - 1 is 2k/n - 1 = (2k - n) * (1/n): the odd integers -n..n with
        # scale 1/n and zero point 0 (zero point n/2 is not an integer).
        codes, _ = self.codes(x_hat)
        n = 2**self.bits - 1
        return QdqForm(
            self.bits, torch.tensor(1.0 / n), torch.tensor(0, dtype=torch.int32), -n, n, None,
            2 * codes - n,
        )


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

    def qdq_weight(self, x_hat: Tensor) -> QdqForm:
        # sign with sign(0) = +1 is already in the weight: codes -1 and +1, scale 1.
        codes, _ = self.codes(x_hat)
        return QdqForm(
            1, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), -1, 1, None, 2 * codes - 1
        )

    def qdq_activation(self) -> QdqForm | None:
        raise NoQdqFormError(
            "BNN's sign activation (+1 for x >= 0, -1 below) has no QDQ form: QuantizeLinear "
            "rounds x / scale to the nearest integer, so values near 0 become 0 whatever the "
            "scale and zero point; export BNN models that binarize weights only"
        )


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
        return affine_codes(x_hat, self._scale_value(), None, self.qmin, None)

    def qdq_weight(self, x_hat: Tensor) -> QdqForm:
        return affine_weight_form(self, x_hat)

    def qdq_activation(self) -> QdqForm | None:
        return fixed_activation_form(self) if self._observed else None

    def fixed_params(self) -> dict[str, Any]:
        return {
            "scale": self._scale_value().reshape(1).float(),
            "axis": None,
            "qmin": self.qmin,
            "qmax": self.qmax,
        }

    def calibration(self, role: str) -> dict[str, Any]:
        return {f"{role}_bits": self.bits, f"{role}_scale": float(self._scale_value())}
