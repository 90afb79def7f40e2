"""The deploy side of the ONNX export: a compressed model as torch modules with fixed integers.

In a copy of the model every :class:`QuantWrapper` becomes a :class:`_DeployedLayer` whose
weight is integer codes with their scale and zero point (BatchNorm folded in, as in eval mode)
and whose quantized inputs and outputs pass through a marker. Each tensor quantizer says its
own integer form (``TensorQuant.qdq_weight`` / ``qdq_activation``); this module only builds the
modules. The two markers are torch custom ops that the exporter writes as placeholder nodes,
which ``_onnx_graph`` replaces with standard operators.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._codes import NoQdqFormError, QdqForm
from ._wrapper import QuantWrapper, wrappers_of

__all__ = ["OnnxExportError", "deployed_copy", "register_ops"]


class OnnxExportError(ValueError):
    """A model, or one of its quantizers, that has no exact ONNX QDQ form (the message says why)."""


def _along(values: Tensor, axis: int | None, rank: int) -> Tensor:
    """A per-tensor (0-dim) or per-channel (1-dim) parameter shaped to broadcast along ``axis``."""
    if axis is None:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def _dequantize(
    codes: Tensor, scale: Tensor, zero_point: Tensor, name: str, bits: int, qmin: int, qmax: int,
    axis: int | None,
) -> Tensor:
    """DequantizeLinear's arithmetic: (codes - zero_point) * scale."""
    rank = codes.dim()
    shifted = (codes.to(torch.int64) - _along(zero_point, axis, rank).to(torch.int64)).float()
    return shifted * _along(scale, axis, rank)


def _fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, low: Tensor, high: Tensor, name: str,
    bits: int, qmin: int, qmax: int, axis: int | None,
) -> Tensor:
    """QuantizeLinear then DequantizeLinear, as ONNX computes them (x / scale, half to even)."""
    s, z = _along(scale, axis, x.dim()), _along(zero_point, axis, x.dim()).float()
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


@functools.cache
def register_ops() -> None:
    """The two markers as torch custom ops, registered on the first export (not at import:
    registering costs tens of milliseconds)."""
    dequantize = torch.library.custom_op(
        "quantsearch_onnx::dequantize", _dequantize, mutates_args=()
    )
    dequantize.register_fake(
        lambda codes, *_args: torch.empty_like(codes, dtype=torch.float32)
    )
    fake_quantize = torch.library.custom_op(
        "quantsearch_onnx::fake_quantize", _fake_quantize, mutates_args=()
    )
    fake_quantize.register_fake(lambda x, *_args: torch.empty_like(x))


class _WeightCodes(nn.Module):
    """A quantized weight as integer codes, scale and zero point."""

    def __init__(
        self, name: str, bits: int, q: Tensor, scale: Tensor, zero_point: Tensor,
        qmin: int, qmax: int, axis: int | None,
    ) -> None:
        super().__init__()
        self.name, self.bits, self.qmin, self.qmax, self.axis = name, bits, qmin, qmax, axis
        self.register_buffer("codes", q.to(torch.int32))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.to(torch.int32))

    def forward(self) -> Tensor:
        return torch.ops.quantsearch_onnx.dequantize(
            self.codes, self.scale, self.zero_point, self.name, self.bits, self.qmin, self.qmax,
            self.axis,
        )


class _ActivationQDQ(nn.Module):
    """An activation's fixed quantization: scale, zero point, integer range and its float bounds."""

    def __init__(
        self, name: str, bits: int, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
        axis: int | None,
    ) -> None:
        super().__init__()
        self.name, self.bits, self.qmin, self.qmax, self.axis = name, bits, qmin, qmax, axis
        scale = scale.float().reshape(-1 if axis is not None else ())
        zero_point = zero_point.to(torch.int32).reshape(scale.shape)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        # The float values of codes qmin and qmax: the bounds of Min/Max before QuantizeLinear.
        self.register_buffer("low", (qmin - zero_point).float() * scale)
        self.register_buffer("high", (qmax - zero_point).float() * scale)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantsearch_onnx.fake_quantize(
            x, self.scale, self.zero_point, _along(self.low, self.axis, x.dim()),
            _along(self.high, self.axis, x.dim()), self.name, self.bits, self.qmin, self.qmax,
            self.axis,
        )


class _Deployed(nn.Module):
    """A deployed layer in place of the wrapped module: attributes it lacks are the module's."""

    def __getattr__(self, name: str) -> Any:
        # What the model around the layer reads from it (a TransformerEncoderLayer reads its
        # attention's batch_first), as QuantWrapper does.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(super().__getattr__("module"), name)


class _DeployedLayer(_Deployed):
    """A quantized layer in eval mode with fixed integers: what the ONNX graph computes."""

    def __init__(
        self,
        wrapper: QuantWrapper,
        weight: _WeightCodes | None,
        input_qdq: _ActivationQDQ | None,
        output_qdq: _ActivationQDQ | None,
    ) -> None:
        super().__init__()
        self.module = wrapper.module
        self.kind = wrapper._kind
        self.weight = weight
        self.input_qdq = input_qdq
        self.output_qdq = output_qdq
        self.folded = wrapper.bn is not None
        if self.folded:
            self.register_buffer("folded_bias", wrapper.deployed_bias())
        # onnxruntime 1.32 quantizes a conv's bias to int32 at input scale x weight scale, which
        # is wrong for a per-channel input scale: such a conv adds its bias after it instead.
        self.bias_apart = (
            self.kind == "conv" and input_qdq is not None and input_qdq.axis is not None
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        if self.weight is None:
            out = self.module(x, *args, **kwargs)
        else:
            weight = self.weight()
            bias = self.folded_bias if self.folded else getattr(self.module, "bias", None)
            if self.kind == "conv" and self.bias_apart and bias is not None:
                out = self.module._conv_forward(x, weight, None)
                out = out + bias.reshape((-1,) + (1,) * (out.dim() - 2))
            elif self.kind == "conv":
                out = self.module._conv_forward(x, weight, bias)
            elif self.kind == "linear":
                out = F.linear(x, weight, bias)
            else:
                out = torch.func.functional_call(
                    self.module, {"weight": weight}, (x, *args), kwargs
                )
        if self.output_qdq is not None:
            out = self.output_qdq(out)
        return out


class _DeployedAttention(_Deployed):
    """A quantized ``nn.MultiheadAttention``: query, key and value through one input QDQ (a
    tensor passed twice is quantized once), the packed in_proj and out_proj weights as codes,
    the attention output through the output QDQ."""

    def __init__(
        self,
        wrapper: QuantWrapper,
        weights: dict[str, _WeightCodes],
        input_qdq: _ActivationQDQ | None,
        output_qdq: _ActivationQDQ | None,
    ) -> None:
        super().__init__()
        self.module = wrapper.module
        self.keys = list(weights)
        self.codes = nn.ModuleList(weights.values())
        self.input_qdq = input_qdq
        self.output_qdq = output_qdq

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = list(args)
        if self.input_qdq is not None:
            done: dict[int, Tensor] = {}
            for i, value in enumerate(tensors[:3]):
                if isinstance(value, Tensor):
                    if id(value) not in done:
                        done[id(value)] = self.input_qdq(value)
                    tensors[i] = done[id(value)]
        weights = {key: codes() for key, codes in zip(self.keys, self.codes, strict=True)}
        out = torch.func.functional_call(self.module, weights, tuple(tensors), kwargs)
        if self.output_qdq is not None:
            out = (self.output_qdq(out[0]), *out[1:])
        return out


def _weight_codes(name: str, form: QdqForm) -> _WeightCodes:
    if form.codes is None:
        raise RuntimeError(f"{name}: the weight's QDQ form carries no codes")
    return _WeightCodes(
        name, form.bits, form.codes, form.scale, form.zero_point, form.qmin, form.qmax, form.axis
    )


def _activation_qdq(name: str, form: QdqForm) -> _ActivationQDQ:
    return _ActivationQDQ(
        name, form.bits, form.scale, form.zero_point, form.qmin, form.qmax, form.axis
    )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


@torch.no_grad()
def deployed_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A CPU copy of ``model`` in eval mode with every quantized layer deployed; the names of the
    roles left in float. All refusals are raised together, one line each
    (:class:`OnnxExportError`)."""
    deployed = copy.deepcopy(model).cpu().eval()
    refusals: list[str] = []
    unquantized: list[str] = []
    paths = {m.name: path for path, m in deployed.named_modules() if isinstance(m, QuantWrapper)}
    for name, wrapper in wrappers_of(deployed).items():
        qdqs: dict[str, _ActivationQDQ | None] = {}
        tensor = f"{name}.weight"
        try:
            weights: dict[str, _WeightCodes] = {}
            quants = wrapper.param_quants()
            for key, quantized in wrapper.quantized_params().items():
                tensor = f"{name}.{key}"
                weights[key] = _weight_codes(tensor, quants[key].qdq_weight(quantized))
            for role in ("input", "output"):
                quant = getattr(wrapper, f"{role}_quant")
                if quant is None:
                    continue
                tensor = f"{name}.{role}"
                activation = quant.qdq_activation()
                if activation is None:
                    unquantized.append(tensor)
                qdqs[role] = None if activation is None else _activation_qdq(tensor, activation)
        except (NoQdqFormError, OnnxExportError) as error:
            refusals.append(f"{tensor}: {error}")
            continue
        layer: nn.Module = (
            _DeployedAttention(wrapper, weights, qdqs.get("input"), qdqs.get("output"))
            if wrapper._kind == "attention"
            else _DeployedLayer(wrapper, weights.get("weight"), qdqs.get("input"),
                                qdqs.get("output"))
        )
        _set_module(deployed, paths[name], layer)
    if refusals:
        raise OnnxExportError("cannot export to ONNX QDQ:\n  " + "\n  ".join(refusals))
    return deployed, unquantized
