"""ONNX export: a compressed model as a QDQ graph that onnxruntime runs.

How it works: in a copy of the model every :class:`QuantWrapper` becomes a deployed layer whose
weight is integer codes with their scale and zero point (BatchNorm folded in, as in eval mode)
and whose quantized inputs and outputs pass through a marker. The two markers are torch custom
ops; ``torch.onnx.export`` (the torch.export-based exporter) writes them as placeholder nodes of
a private domain, and a pass over the ONNX graph replaces each one with standard operators:

* a weight: its codes as an initializer of the narrowest ONNX integer type that holds them,
  then ``DequantizeLinear`` (per tensor, or per output channel with ``axis=0``);
* an activation: ``QuantizeLinear`` then ``DequantizeLinear`` with the trial's scale and zero
  point, in an 8-bit (or 16-bit) type, after Min/Max bounds when the quantizer's integer range
  is narrower than the type's (QuantizeLinear saturates to the type's range only).

onnx and onnxscript are imported only inside :func:`export_onnx` (the ``quantsearch[onnx]``
extra); importing this module needs torch alone.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import wrappers_of
from ._tensor_quant import (
    AffineWeightQuant,
    DoReFaWeightQuant,
    LsqQuant,
    SignQuant,
    TensorQuant,
    decode,
)
from ._wrapper import QuantWrapper

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "OnnxExport",
    "OnnxExportError",
    "OnnxTensor",
    "export_onnx",
]

#: Opset 25 has int2/uint2 QuantizeLinear/DequantizeLinear; 21 has int4/uint4 and int16/uint16.
DEFAULT_OPSET = 25
MIN_OPSET = 21
_EXTRA_HINT = "install the ONNX extra: pip install 'quantsearch[onnx]'"
_DOMAIN = "quantsearch.export"  # placeholder nodes only; none is left in a written model


class OnnxExportError(ValueError):
    """A model, or one of its quantizers, that has no exact ONNX QDQ form (the message says why)."""


@dataclass(frozen=True)
class OnnxTensor:
    """How one quantized tensor is written to the ONNX file."""

    name: str
    """The layer's qualified name and the role, e.g. ``conv1.weight``, ``relu1.output``."""
    bits: int
    """The quantizer's bit width."""
    onnx_type: str
    """The integer type of the codes in the file: ``int2``, ``uint4``, ``int8``, ..."""
    qmin: int
    qmax: int
    per_channel: bool
    clipped: bool
    """An activation whose range [qmin, qmax] is narrower than its ONNX type's: Min and Max
    before QuantizeLinear keep the codes inside it."""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    file_bytes: int
    size_bytes: int
    """``model_size_bytes`` of the exported model: its weights at their bits."""
    opset: int
    tensors: tuple[OnnxTensor, ...]
    unquantized: tuple[str, ...]
    """Quantized roles that never saw a training batch: eval mode passes them through in float,
    and so does the ONNX model."""

    def types(self) -> dict[str, str]:
        """Tensor name -> ONNX integer type of its codes."""
        return {t.name: t.onnx_type for t in self.tensors}


# -- markers: torch custom ops that become placeholder nodes ----------------------------------


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
def _register_ops() -> None:
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


class _DeployedLayer(nn.Module):
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


# -- from quantizers to deployed layers --------------------------------------------------------


def _weight_codes(name: str, quant: TensorQuant, x_hat: Tensor) -> _WeightCodes:
    """The integer form of a quantized weight; raises OnnxExportError when there is none."""
    codes, meta = quant.codes(x_hat)
    if isinstance(quant, AffineWeightQuant | LsqQuant):
        if not torch.equal(decode(codes, quant.encoding, quant.bits, meta), x_hat):
            raise RuntimeError(f"{name}: integer codes do not reproduce the quantized weight")
        zero_point = meta.get("zero_point", torch.zeros_like(meta["scale"], dtype=torch.int32))
        axis = meta["axis"]
        scale = meta["scale"] if axis is not None else meta["scale"].reshape(())
        return _WeightCodes(
            name, quant.bits, codes + meta["qmin"], scale, zero_point.reshape(scale.shape),
            quant.qmin, quant.qmax, axis,
        )
    if isinstance(quant, DoReFaWeightQuant):
        # Level k of n = 2^b - 1 is 2k/n - 1 = (2k - n) * (1/n): the odd integers -n..n with
        # scale 1/n and zero point 0 (zero point n/2 is not an integer).
        n = 2**quant.bits - 1
        return _WeightCodes(
            name, quant.bits, 2 * codes - n, torch.tensor(1.0 / n), torch.tensor(0), -n, n, None
        )
    if isinstance(quant, SignQuant):
        # sign with sign(0) = +1 is already in the weight: codes -1 and +1, scale 1.
        return _WeightCodes(
            name, 1, 2 * codes - 1, torch.tensor(1.0), torch.tensor(0), -1, 1, None
        )
    raise OnnxExportError(
        f"{name}: {type(quant).__name__} has no known ONNX form (only quantsearch's own "
        "weight quantizers are exported)"
    )


def _activation_qdq(name: str, quant: TensorQuant) -> _ActivationQDQ | None:
    """The fixed QDQ of an activation quantizer (None: eval mode leaves it in float)."""
    if isinstance(quant, SignQuant):
        raise OnnxExportError(
            f"{name}: BNN's sign activation (+1 for x >= 0, -1 below) has no QDQ form: "
            "QuantizeLinear rounds x / scale to the nearest integer, so values near 0 become 0 "
            "whatever the scale and zero point; export BNN models that binarize weights only"
        )
    # Any affine activation quantizer (QAT's EMA, LSQ, PTQ's observers) says how it deploys.
    if hasattr(quant, "fixed_params"):
        if not getattr(quant, "_observed", True):
            return None
        fixed = quant.fixed_params()
        zero_point = fixed.get("zero_point", torch.zeros_like(fixed["scale"], dtype=torch.int32))
        return _ActivationQDQ(
            name, quant.bits, fixed["scale"], zero_point, fixed["qmin"], fixed["qmax"],
            fixed["axis"],
        )
    raise OnnxExportError(
        f"{name}: {type(quant).__name__} has no known ONNX form (only quantsearch's own "
        "activation quantizers are exported)"
    )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


@torch.no_grad()
def _deployed_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A CPU copy of ``model`` in eval mode with every quantized layer deployed; the names of the
    roles left in float. All refusals are raised together, one line each."""
    deployed = copy.deepcopy(model).cpu().eval()
    refusals: list[str] = []
    unquantized: list[str] = []
    paths = {m.name: path for path, m in deployed.named_modules() if isinstance(m, QuantWrapper)}
    for name, wrapper in wrappers_of(deployed).items():
        weight = None
        qdqs: dict[str, _ActivationQDQ | None] = {}
        try:
            if wrapper.weight_quant is not None:
                weight = _weight_codes(
                    f"{name}.weight", wrapper.weight_quant, wrapper.quantized_weight()
                )
            for role in ("input", "output"):
                quant = getattr(wrapper, f"{role}_quant")
                if quant is None:
                    continue
                qdq = _activation_qdq(f"{name}.{role}", quant)
                if qdq is None:
                    unquantized.append(f"{name}.{role}")
                qdqs[role] = qdq
        except OnnxExportError as error:
            refusals.append(str(error))
            continue
        layer = _DeployedLayer(wrapper, weight, qdqs.get("input"), qdqs.get("output"))
        _set_module(deployed, paths[name], layer)
    if refusals:
        raise OnnxExportError("cannot export to ONNX QDQ:\n  " + "\n  ".join(refusals))
    return deployed, unquantized


# -- the ONNX side -------------------------------------------------------------------------------


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxscript
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript ({error}): {_EXTRA_HINT}"
        ) from None
    return onnx, onnxscript


def _register_schemas(onnx: Any) -> None:
    """Schemas for the placeholder ops, which the exporter's graph builder looks up."""
    defs = onnx.defs
    if defs.has("FakeQuantize", _DOMAIN):
        return
    formal = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    kinds = defs.OpSchema.AttrType
    common = [
        attr("name", kinds.STRING, ""),
        attr("bits", kinds.INT, ""),
        attr("qmin", kinds.INT, ""),
        attr("qmax", kinds.INT, ""),
        attr("axis", kinds.INT, "", required=False),
    ]
    defs.register_schema(defs.OpSchema(
        "Dequantize", _DOMAIN, 1, doc="placeholder: codes to float",
        inputs=[formal("codes", "tensor(int32)"), formal("scale", "tensor(float)"),
                formal("zero_point", "tensor(int32)")],
        outputs=[formal("y", "tensor(float)")], attributes=common,
    ))
    defs.register_schema(defs.OpSchema(
        "FakeQuantize", _DOMAIN, 1, doc="placeholder: QuantizeLinear then DequantizeLinear",
        inputs=[formal("x", "tensor(float)"), formal("scale", "tensor(float)"),
                formal("zero_point", "tensor(int32)"), formal("low", "tensor(float)"),
                formal("high", "tensor(float)")],
        outputs=[formal("y", "tensor(float)")], attributes=common,
    ))


def _translations(onnxscript: Any) -> dict[Any, Any]:
    ops = onnxscript.values.Opset(_DOMAIN, 1)

    def attributes(name: str, bits: int, qmin: int, qmax: int, axis: int | None) -> dict:
        extra = {} if axis is None else {"axis": axis}
        return {"name": name, "bits": bits, "qmin": qmin, "qmax": qmax, **extra}

    def dequantize(codes: Any, scale: Any, zero_point: Any, name: str, bits: int, qmin: int,
                   qmax: int, axis: int | None = None) -> Any:
        return ops.Dequantize(codes, scale, zero_point, **attributes(name, bits, qmin, qmax, axis))

    def fake_quantize(x: Any, scale: Any, zero_point: Any, low: Any, high: Any, name: str,
                      bits: int, qmin: int, qmax: int, axis: int | None = None) -> Any:
        return ops.FakeQuantize(
            x, scale, zero_point, low, high, **attributes(name, bits, qmin, qmax, axis)
        )

    return {
        torch.ops.quantsearch_onnx.dequantize.default: dequantize,
        torch.ops.quantsearch_onnx.fake_quantize.default: fake_quantize,
    }


@dataclass(frozen=True)
class _IntType:
    name: str
    low: int
    high: int
    min_opset: int
    sub_byte: bool


_INT_TYPES = (
    _IntType("int2", -2, 1, 25, True),
    _IntType("uint2", 0, 3, 25, True),
    _IntType("int4", -8, 7, 21, True),
    _IntType("uint4", 0, 15, 21, True),
    _IntType("int8", -128, 127, 10, False),
    _IntType("uint8", 0, 255, 10, False),
    _IntType("int16", -(2**15), 2**15 - 1, 21, False),
    _IntType("uint16", 0, 2**16 - 1, 21, False),
    _IntType("int32", -(2**31), 2**31 - 1, 10, False),  # DequantizeLinear only, zero point 0
)


def _int_type(qmin: int, qmax: int, opset: int, sub_byte: bool, weight: bool) -> _IntType:
    """The narrowest ONNX integer type holding qmin..qmax that the opset allows: unsigned for a
    range from 0 up, signed otherwise."""
    for kind in _INT_TYPES:
        if kind.min_opset > opset or (kind.sub_byte and not sub_byte):
            continue
        if kind.name == "int32" and not weight:
            continue
        if (kind.low < 0) == (qmin < 0) and kind.low <= qmin and qmax <= kind.high:
            return kind
    raise OnnxExportError(f"no ONNX integer type at opset {opset} holds the range {qmin}..{qmax}")


def _numpy_type(kind: _IntType) -> Any:
    import ml_dtypes
    import numpy as np

    return getattr(ml_dtypes, kind.name) if kind.sub_byte else np.dtype(kind.name)


class _GraphEditor:
    """Replaces the placeholder nodes of an exported graph with standard ONNX operators."""

    def __init__(self, onnx: Any, proto: Any, opset: int, sub_byte: bool) -> None:
        self.onnx, self.proto, self.opset, self.sub_byte = onnx, proto, opset, sub_byte
        graph = proto.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.records: list[OnnxTensor] = []

    def array(self, name: str) -> Any:
        if name not in self.initializers:
            raise RuntimeError(f"ONNX export: placeholder input {name!r} is not a constant")
        return self.onnx.numpy_helper.to_array(self.initializers[name])

    def add_initializer(self, name: str, values: Any) -> str:
        tensor = self.onnx.numpy_helper.from_array(values, name)
        self.initializers[name] = tensor
        return name

    def run(self) -> list[OnnxTensor]:
        graph = self.proto.graph
        nodes = []
        for node in graph.node:
            if node.domain != _DOMAIN:
                nodes.append(node)
                continue
            attrs = {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}
            attrs["name"] = attrs["name"].decode() if isinstance(attrs["name"], bytes) else (
                attrs["name"]
            )
            if node.op_type == "Dequantize":
                nodes += self.dequantize(node, attrs)
            else:
                nodes += self.fake_quantize(node, attrs)
        del graph.node[:]
        graph.node.extend(nodes)
        _prune(self.proto, self.initializers)
        return self.records

    def typed(self, values: Any, kind: _IntType) -> Any:
        import numpy as np

        return np.asarray(values).astype(np.int64).astype(_numpy_type(kind))

    def dequantize(self, node: Any, attrs: dict[str, Any]) -> list[Any]:
        codes_name, scale_name, zero_name = node.input
        qmin, qmax, axis = attrs["qmin"], attrs["qmax"], attrs.get("axis")
        kind = _int_type(qmin, qmax, self.opset, self.sub_byte, weight=True)
        out, tag = node.output[0], attrs["name"]
        codes = self.add_initializer(f"{tag}.codes", self.typed(self.array(codes_name), kind))
        zero = self.add_initializer(f"{tag}.zero_point", self.typed(self.array(zero_name), kind))
        self.records.append(OnnxTensor(
            attrs["name"], attrs["bits"], kind.name, qmin, qmax, axis is not None, False
        ))
        extra = {} if axis is None else {"axis": axis}
        return [self.onnx.helper.make_node(
            "DequantizeLinear", [codes, scale_name, zero], [out], name=f"{tag}.dequantize", **extra
        )]

    def fake_quantize(self, node: Any, attrs: dict[str, Any]) -> list[Any]:
        make = self.onnx.helper.make_node
        x, scale_name, zero_name, low, high = node.input
        qmin, qmax, axis = attrs["qmin"], attrs["qmax"], attrs.get("axis")
        # 8 bits at least: onnxruntime 1.32's graph optimizations fail on 2- and 4-bit
        # activations (its Clip-QuantizeLinear check, its QDQ propagation through MaxPool).
        kind = _int_type(qmin, qmax, self.opset, sub_byte=False, weight=False)
        out, tag = node.output[0], attrs["name"]
        zero = self.add_initializer(f"{tag}.zero_point", self.typed(self.array(zero_name), kind))
        clipped = (qmin, qmax) != (kind.low, kind.high)
        nodes = []
        if clipped:
            # Min and Max rather than Clip: they broadcast per-channel bounds.
            nodes.append(make("Min", [x, high], [f"{tag}.below"], name=f"{tag}.min"))
            nodes.append(make("Max", [f"{tag}.below", low], [f"{tag}.clipped"], name=f"{tag}.max"))
            x = f"{tag}.clipped"
        extra = {} if axis is None else {"axis": axis}
        nodes.append(make("QuantizeLinear", [x, scale_name, zero], [f"{tag}.codes"],
                          name=f"{tag}.quantize", **extra))
        nodes.append(make("DequantizeLinear", [f"{tag}.codes", scale_name, zero], [out],
                          name=f"{tag}.dequantize", **extra))
        self.records.append(OnnxTensor(
            tag, attrs["bits"], kind.name, qmin, qmax, axis is not None, clipped
        ))
        return nodes


def _prune(proto: Any, initializers: dict[str, Any]) -> None:
    """Drop nodes no graph output depends on and initializers no node reads."""
    graph = proto.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(t for name, t in initializers.items() if name in needed)
    # The exporter's metadata (stack traces, its program) and shape notes would double a small
    # file; runtimes infer shapes themselves.
    del graph.value_info[:]
    del graph.metadata_props[:]
    for node in graph.node:  # extend() copied the nodes: edit the graph's own
        del node.metadata_props[:]
        node.doc_string = ""
    imports = [o for o in proto.opset_import if o.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)


def _input_tuple(dummy_input: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    inputs = (dummy_input,) if isinstance(dummy_input, Tensor) else tuple(dummy_input)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise OnnxExportError("dummy_input must be a tensor or a tuple of tensors")
    return tuple(t.detach().cpu() for t in inputs)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    dummy_input: Tensor | Sequence[Tensor],
    *,
    opset: int = DEFAULT_OPSET,
    sub_byte_types: bool = True,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> OnnxExport:
    """Write ``model`` (compressed by a quantizer, or a plain float model) as an ONNX QDQ model.

    Weights become integer codes and ``DequantizeLinear``; quantized inputs and outputs become
    ``QuantizeLinear``/``DequantizeLinear`` pairs; scales and zero points are the model's own
    (per tensor or per channel), and BatchNorm is folded as in eval mode. Weight codes are stored
    in the narrowest integer type the opset has: int2/uint2 (opset 25), int4/uint4, int8/uint8,
    int16/uint16, int32 (DoReFa's 16 bits); ``sub_byte_types=False`` keeps 8-bit containers for
    runtimes without the 2- and 4-bit types. Activations use int8/uint8 (int16/uint16 above 8
    bits): onnxruntime's graph optimizations fail on 2- and 4-bit activations. A range narrower
    than its type (-127..127 or 4-bit codes in int8) is kept by Min/Max before QuantizeLinear.

    ``dummy_input`` is an example batch (a tensor or a tuple of tensors); with ``dynamic_batch``
    the batch dimension of every input is left free. The model is copied, never changed, and
    nothing but ``path`` is written. Raises :class:`OnnxExportError` for quantizers without an
    exact QDQ form (BNN's sign activations, user-defined quantizers), naming each, and
    ``ImportError`` naming the ``quantsearch[onnx]`` extra when onnx is missing.
    """
    from ._pack import model_size_bytes

    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if opset < MIN_OPSET:
        raise OnnxExportError(
            f"opset {opset} is too old: the QDQ export needs opset {MIN_OPSET} or newer "
            "(int4 and int16 QuantizeLinear/DequantizeLinear)"
        )
    inputs = _input_tuple(dummy_input)
    onnx, onnxscript = _import_onnx()
    _register_ops()
    deployed, unquantized = _deployed_copy(model)
    size_bytes = model_size_bytes(model)
    _register_schemas(onnx)
    names = list(input_names) if input_names is not None else (
        ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    )
    dynamic_shapes = None
    if dynamic_batch:
        # A size-1 dimension is specialised by torch.export: trace a batch of two instead.
        inputs = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in inputs)
        dynamic_shapes = tuple({0: torch.export.Dim("batch")} if t.dim() else None for t in inputs)
    program = _run_exporter(
        deployed, inputs, opset=opset, input_names=names, output_names=output_names,
        dynamic_shapes=dynamic_shapes, translations=_translations(onnxscript),
    )
    proto = program.model_proto
    records = _GraphEditor(onnx, proto, opset, sub_byte_types).run()
    needed_ir = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    proto.ir_version = max(proto.ir_version, needed_ir, 11 if opset >= 25 else 10)
    proto.producer_name = "quantsearch"
    onnx.checker.check_model(proto, full_check=True)
    out = Path(path)
    onnx.save_model(proto, str(out))
    return OnnxExport(
        path=out,
        file_bytes=out.stat().st_size,
        size_bytes=size_bytes,
        opset=opset,
        tensors=tuple(records),
        unquantized=tuple(unquantized),
    )


def _run_exporter(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    *,
    opset: int,
    input_names: list[str],
    output_names: Sequence[str] | None,
    dynamic_shapes: tuple | None,
    translations: dict[Any, Any],
) -> Any:
    """torch.onnx.export, quietly: its progress lines and missing-torchvision notes are noise."""
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                model,
                inputs,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=list(output_names) if output_names is not None else None,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translations,
                optimize=True,
                verbose=False,
            )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxExportError(f"torch.onnx.export failed: {first}") from error
    finally:
        quiet.setLevel(level)
