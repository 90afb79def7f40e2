"""Post-training quantization: observers calibrated on data, no training needed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._algorithms import _DTYPES, _WEIGHTED, _channels
from ._base import Example, Quantizer
from ._codes import QdqForm, affine_fixed_params, fixed_activation_form
from ._config import AlgorithmRules, LayerConfig, one_of, per_quant_type
from ._equalize import EqualizeResult
from ._math import affine_qparams, affine_qparams_float, fake_quantize
from ._observers import (
    HISTOGRAM_BINS,
    OBSERVERS,
    channel_rows,
    histogram_add,
    histogram_start,
    mse_range,
    percentile_range,
    weight_range,
)
from ._ptq_fit import FitRecord
from ._ptq_methods import (
    METHOD_EXAMPLES,
    METHOD_OPTIONS,
    Recording,
    equalize_model,
    recording_needed,
)
from ._registry import register_quantizer
from ._tensor_quant import SCHEMES, AffineWeightQuant, TensorQuant

__all__ = ["NotCalibratedError", "PtqActivationQuant", "PtqQuantizer", "PtqWeightQuant"]


class NotCalibratedError(RuntimeError):
    """A post-training quantizer was asked to quantize before it observed any data."""


class PtqWeightQuant(AffineWeightQuant):
    """A weight's range from its observer: min/max, percentile or MSE (see ``_observers``).

    Computed from the current weight on every training forward; in eval mode it is computed
    again only when the weight changed (a percentile or MSE search costs more than a forward).
    Per-channel schemes use dim 0.

    A learned rounding (AdaRound, GPTQ: ``set_rounding``) is stored as an integer offset per
    weight from round-to-nearest on the fitted grid, ``rounding_offset``; eval forwards of the
    weight it was fitted on give ``s * clamp(round(w / s) + offset, qmin - z, qmax - z)``: grid
    values, so codes, packed and ONNX exports carry the learned integers unchanged. A training
    forward with autograd on drops it (the weight is about to change) and rounds to nearest.
    """

    def __init__(
        self, bits: int, *, scheme: str, dtype: str, channels: int, observer: str,
        percentile: float,
    ) -> None:
        super().__init__(bits, scheme=scheme, dtype=dtype, channels=channels)
        self.observer = observer
        self.percentile = percentile
        self.rounding = "nearest"
        self._source: Tensor | None = None
        # Empty until a fit: offsets from nearest rounding (int16: GPTQ may move a few levels).
        self.register_buffer("rounding_offset", torch.zeros(0, dtype=torch.int16))
        # The bias correction this layer's bias holds (so a new calibration replaces it).
        self.register_buffer("bias_shift", torch.zeros(0))
        self._rounded = False

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A checkpoint written before learned rounding existed holds neither buffer: nearest.
        for name in ("rounding_offset", "bias_shift"):
            buffer = self._buffers[name]
            if buffer is not None:
                state_dict.setdefault(prefix + name, buffer.new_zeros(0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _after_load(self) -> None:
        self.__dict__["_source"] = None
        self._rounded = self.rounding_offset.numel() > 0
        if not self._rounded:
            self.rounding = "nearest"

    def extra_repr(self) -> str:
        rounding = f", rounding={self.rounding}" if self._rounded else ""
        return f"bits={self.bits}, observer={self.observer}{rounding}"

    @torch.no_grad()
    def set_rounding(self, offset: Tensor, rounding: str) -> None:
        """Keep ``offset`` (integers, the weight's shape) from nearest rounding on the current
        scale and zero point: ``rounding`` (its name) then applies in eval mode."""
        if offset.numel() and float(offset.abs().max()) > torch.iinfo(torch.int16).max:
            raise ValueError(f"{self.owner}: a rounding offset does not fit int16")
        self.rounding_offset = offset.round().to(torch.int16)
        self.rounding = rounding
        self._rounded = True

    def clear_rounding(self) -> None:
        """Back to round-to-nearest."""
        self.rounding_offset = torch.zeros(0, dtype=torch.int16, device=self.scale.device)
        self.rounding = "nearest"
        self._rounded = False

    def _rounded_forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1) if self.per_channel else ()
        scale = self.scale.reshape(shape)
        shift = self.zero_point.reshape(shape).float()
        base = torch.round(x.detach() * torch.reciprocal(scale))  # as the fit computed it
        q = torch.clamp(base + self.rounding_offset, self.qmin - shift, self.qmax - shift)
        # x - x.detach() is exactly 0: the value is q * s bit for bit, the gradient passes.
        return q * scale + (x - x.detach())

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        if self._rounded:
            if self.training and torch.is_grad_enabled():
                self.clear_rounding()  # a training step is about to change the weight
            elif active and x.shape == self.rounding_offset.shape:
                return self._rounded_forward(x)
        if self.observer == "minmax" or not active:
            return super().forward(x, active)
        detached = x.detach()
        source = self._source
        if self.training or source is None or source.shape != detached.shape or not (
            torch.equal(source, detached)
        ):
            lo, hi = weight_range(
                detached, 0 if self.per_channel else None, self.observer, self.percentile,
                self.qmin, self.qmax, self.symmetric,
            )
            scale, zero_point = affine_qparams(
                lo.float(), hi.float(), self.qmin, self.qmax, self.symmetric
            )
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
            self.__dict__["_source"] = None if self.training else detached.clone()
        if self.per_channel:
            return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, axis=0)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def calibration(self, role: str) -> dict[str, Any]:
        extra = {f"{role}_rounding": self.rounding} if self._rounded else {}
        return {**super().calibration(role), f"{role}_observer": self.observer, **extra}


class PtqActivationQuant(TensorQuant):
    """An input's or output's range from its observer, over every batch it has seen.

    ``minmax``: the smallest and largest value observed. ``percentile``: the (100 - p)-th and
    p-th percentiles of all observed values. ``mse``: the clipping range with the least expected
    squared quantization error. Percentile and MSE read a histogram of 2048 bins per channel.
    Observes during ``Quantizer.calibrate()`` and in training mode (then quantizes with the
    range so far); eval mode never updates it, and raises :class:`NotCalibratedError` when
    nothing was observed. Per-channel schemes use dim 1.
    """

    def __init__(
        self, bits: int, *, scheme: str, dtype: str, observer: str, percentile: float
    ) -> None:
        super().__init__()
        self._set_scheme(bits, scheme, dtype)
        self.observer = observer
        self.percentile = percentile
        shape: tuple[int, ...] = (0,) if self.per_channel else ()
        for name in ("data_min", "data_max", "range_min", "range_max"):
            self.register_buffer(name, torch.zeros(shape))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        if observer != "minmax":
            rows = 0 if self.per_channel else 1
            self.register_buffer(
                "hist", torch.zeros(rows, HISTOGRAM_BINS, dtype=torch.float64)
            )
            self.register_buffer("hist_low", torch.zeros(rows, dtype=torch.float64))
            self.register_buffer("hist_width", torch.zeros(rows, dtype=torch.float64))
        self._observed = False
        self._dirty = False
        self._host: tuple[float, int] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, observer={self.observer}"

    # -- statistics -------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        rows = channel_rows(x.detach(), 1 if self.per_channel else None)
        lo, hi = torch.aminmax(rows, dim=1)
        lo, hi = lo.float(), hi.float()
        if not self.per_channel:
            lo, hi = lo.reshape(()), hi.reshape(())
        if self._observed:
            lo, hi = torch.minimum(self.data_min, lo), torch.maximum(self.data_max, hi)
        self.data_min, self.data_max = lo, hi
        if self.observer != "minmax":
            if self._observed:
                counts, low, width = histogram_add(self.hist, self.hist_low, self.hist_width, rows)
            else:
                counts, low, width = histogram_start(rows, HISTOGRAM_BINS)
            self.hist, self.hist_low, self.hist_width = counts, low, width
        if not self._observed:
            self._observed = True
            self.observed.fill_(True)
        self._dirty = True

    @torch.no_grad()
    def _settle(self) -> None:
        """The range the observer chooses from what it has seen."""
        if self.observer == "minmax":
            lo, hi = self.data_min.double(), self.data_max.double()
        elif self.observer == "percentile":
            lo, hi = percentile_range(
                self.hist, self.hist_low, self.hist_width, self.percentile,
                self.data_min, self.data_max,
            )
        else:
            lo, hi = mse_range(
                self.hist, self.hist_low, self.hist_width, self.data_min, self.data_max,
                self.qmin, self.qmax, self.symmetric,
            )
        self.range_min = lo.float().reshape(self.data_min.shape)
        self.range_max = hi.float().reshape(self.data_max.shape)
        self._dirty = False
        self._mirror()

    def _mirror(self) -> None:
        # Per-tensor qparams as Python numbers, derived from the float32 buffers only.
        self._host = (
            None
            if self.per_channel or not self._observed
            else affine_qparams_float(
                float(self.range_min), float(self.range_max), self.qmin, self.qmax,
                self.symmetric,
            )
        )

    def end_calibration(self) -> None:
        if self._dirty:
            self._settle()

    def _after_load(self) -> None:
        self._observed = bool(self.observed)
        self._dirty = False
        self._mirror()

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if self._dirty:
            self._settle()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # -- quantization -----------------------------------------------------------------
    def _require_observed(self) -> None:
        if not self._observed:
            raise NotCalibratedError(
                f"{self.owner}: the post-training quantizer has observed no data; run batches "
                "through the model inside `with quantizer.calibrate():` (or train it) first"
            )

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Scale (float32) and zero point (int32) from the settled range."""
        self._require_observed()
        if self._dirty:
            self._settle()
        if self._host is not None:
            scale, zero_point = self._host
            return torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32)
        return affine_qparams(
            self.range_min, self.range_max, self.qmin, self.qmax, self.symmetric
        )

    def forward(self, x: Tensor, active: bool = True) -> Tensor:
        if self.training:
            self.observe(x)
            self._settle()
        if not active:
            return x
        self._require_observed()
        if self._dirty:
            self._settle()
        if self._host is not None and x.device.type == "cpu":
            scale, zero_point = self._host
            return fake_quantize(x, scale, zero_point, self.qmin, self.qmax)
        scale, zero_point = self.qparams()
        axis = 1 if self.per_channel else None
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, axis=axis)

    def param_bytes(self) -> int:
        return 8 * max(self.range_min.numel(), 1)

    def fixed_params(self) -> dict[str, Any]:
        """What a deployed model needs to reproduce this quantizer in eval mode."""
        return affine_fixed_params(self)

    def qdq_activation(self) -> QdqForm | None:
        return fixed_activation_form(self) if self._observed else None

    def calibration(self, role: str) -> dict[str, Any]:
        if self._dirty:
            self._settle()
        return {
            f"{role}_bits": self.bits,
            f"tracked_min_{role}": self.range_min.tolist(),
            f"tracked_max_{role}": self.range_max.tolist(),
            f"{role}_observer": self.observer,
        }


def _percentile_value(value: Any) -> str | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if number and 50 < value <= 100 else "expected a number in (50, 100]"


def _check_entry(
    given: Mapping[str, Any], entry: Mapping[str, Any]
) -> tuple[str, str] | None:
    chosen = sorted({per_quant_type(entry, "observer", t) for t in entry["quant_types"]})
    if "percentile" in given and "percentile" not in chosen:
        return "percentile", f"only used with observer 'percentile' (this entry's: {chosen})"
    return None


@register_quantizer("ptq")
class PtqQuantizer(Quantizer):
    """Post-training quantization of weights, inputs and outputs, 2..16 bits.

    Compress, run a few batches through the model inside ``with quantizer.calibrate():``, then
    evaluate: no training. Options per entry: ``quant_scheme`` (default ``per_tensor_affine``),
    ``quant_dtype`` (default ``uint``; ``int`` is the restricted symmetric range, as in QAT),
    ``observer`` (``minmax``, the default; ``percentile``; ``mse``; or a dict per quant type,
    ``{"weight": "mse", "output": "percentile"}``) and ``percentile`` (default 99.99, in
    (50, 100]; only with the percentile observer). BatchNorm is folded into the conv before it
    when a ``dummy_input`` is given, as in QAT. Weights need no data: their ranges come from the
    weights themselves. Evaluating an activation quantizer that has observed nothing raises
    :class:`NotCalibratedError`. Training also works (observers keep observing, gradients pass
    straight through), as a QAT with these observers.

    Beyond round-to-nearest, per entry (weights of Conv1d, Conv2d and Linear layers, grouped
    and depthwise included; other layers keep nearest rounding): ``rounding`` (``nearest``, the
    default; ``adaround``; ``gptq``) is fitted on the calibration batches when ``calibrate()``
    ends, on the grid the weight observer chose, with ``adaround_iters`` (default 500) and
    ``gptq_damp`` (default 0.01); ``bias_correction: true`` then adds the mean output change
    over those batches to the layer's bias (or its folded BatchNorm's; a layer with neither is
    left alone); ``fit_inputs: quantized`` fits both on the inputs the quantized model gives
    each layer (the layers before it fitted first; the default ``float`` fits on the float
    model's), against the float layer's output; ``equalize: true`` applies cross-layer
    equalization and high-bias absorption to the float model in ``compress()``, between layers
    that both ask for it (see ``_equalize``). ``fit_records`` and ``equalization`` say what
    they did.
    """

    rules = AlgorithmRules(
        name="PtqQuantizer",
        quant_types=("weight", "input", "output"),
        min_bits=2,
        max_bits=16,
        options={
            "quant_scheme": ("per_tensor_affine", one_of(SCHEMES)),
            "quant_dtype": ("uint", one_of(_DTYPES)),
            "observer": ("minmax", one_of(OBSERVERS)),
            "percentile": (99.99, _percentile_value),
            **METHOD_OPTIONS,
        },
        entry_check=_check_entry,
        trains=False,
        affine=True,
        per_type=("quant_scheme", "quant_dtype", "observer"),
    )
    folds_batch_norm = True
    examples = (
        Example(
            "w8a8-minmax",
            [
                {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
                {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
            ],
            {"conv1": {"weight": 8}, "conv2": {"weight": 8}, "fc": {"weight": 8},
             "relu1": {"output": 8}, "relu2": {"output": 8}},
        ),
        Example(
            "w4a6-per-channel-percentile",
            [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 6},
              "op_types": ["Conv2d", "Linear"], "quant_scheme": "per_channel_symmetric",
              "quant_dtype": "int", "observer": "percentile", "percentile": 99.0}],
            {name: {"weight": 4} for name in _WEIGHTED},
        ),
        Example(
            "w3a4-mse",
            [
                {"quant_types": ["weight"], "quant_bits": 3, "op_types": ["Conv2d", "Linear"],
                 "observer": "mse", "quant_scheme": "per_tensor_symmetric", "quant_dtype": "int"},
                {"quant_types": ["output"], "quant_bits": 4, "op_types": ["ReLU6"],
                 "observer": "mse"},
            ],
            {"conv1": {"weight": 3}, "conv2": {"weight": 3}, "fc": {"weight": 3},
             "relu1": {"output": 4}, "relu2": {"output": 4}},
        ),
        Example(
            "mixed-observers",
            [{"quant_types": ["weight", "output"], "quant_bits": {"weight": 5, "output": 7},
              "op_types": ["Conv2d", "Linear"],
              "observer": {"weight": "mse", "output": "percentile"}}],
            {name: {"weight": 5, "output": 7} for name in _WEIGHTED},
        ),
        *METHOD_EXAMPLES,
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Per fitted layer, what the last calibration's rounding and bias correction did.
        self.fit_records: dict[str, FitRecord] = {}
        #: The pairs cross-layer equalization rescaled, or None without ``equalize``.
        self.equalization: EqualizeResult | None = None

    def compress(self) -> nn.Module:
        if not self._compressed:
            # On the float model, before BatchNorm pairs are found and layers wrapped.
            self.equalization = equalize_model(self.bound_model, self.layers)
        return super().compress()

    @contextlib.contextmanager
    def calibrate(self) -> Iterator[nn.Module]:
        """``Quantizer.calibrate``; on leaving without an error, layers with a learned
        ``rounding`` or ``bias_correction`` are fitted on the inputs they saw inside."""
        recording = (
            Recording(self.bound_model, self._wrappers(), self.layers)
            if recording_needed(self.layers) else None
        )
        if recording is not None:
            recording.start()
        try:
            with super().calibrate() as calibrating:
                yield calibrating
        finally:
            if recording is not None:
                recording.stop()
        if recording is not None:
            self.fit_records = recording.finish()

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        percentile = float(layer.options["percentile"])
        quants: dict[str, TensorQuant] = {}
        for quant_type in layer.quant_types:
            bits = layer.bits[quant_type]
            scheme, dtype, observer = (
                per_quant_type(layer.options, key, quant_type)
                for key in ("quant_scheme", "quant_dtype", "observer")
            )
            if quant_type == "weight":
                quants["weight"] = PtqWeightQuant(
                    bits, scheme=scheme, dtype=dtype, channels=_channels(module),
                    observer=observer, percentile=percentile,
                )
            else:
                quants[quant_type] = PtqActivationQuant(
                    bits, scheme=scheme, dtype=dtype, observer=observer, percentile=percentile
                )
        return quants
