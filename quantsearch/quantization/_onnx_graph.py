"""The graph side of the ONNX export: placeholder nodes become standard QDQ operators.

``torch.onnx.export`` writes the deploy side's two markers as nodes of a private domain; this
module registers their schemas and translations, then edits the exported proto:

* a weight: its codes as an initializer of the narrowest ONNX integer type that holds them,
  then ``DequantizeLinear`` (per tensor, or per output channel with ``axis=0``); optionally
  8-bit unsigned codes shifted to int8, which onnxruntime's fast kernels take;
* an activation: ``QuantizeLinear`` then ``DequantizeLinear`` with the trial's scale and zero
  point, in an 8-bit (or 16-bit) type, after Min/Max bounds when the quantizer's integer range
  is narrower than the type's (QuantizeLinear saturates to the type's range only);

and drops what no output needs. onnx, onnxscript and ml_dtypes are imported only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._onnx_deploy import OnnxExportError

__all__ = [
    "OnnxTensor",
    "edit_graph",
    "import_onnx",
    "prune_graph",
    "register_schemas",
    "translation_table",
]

_EXTRA_HINT = "install the ONNX extra: pip install 'quantsearch[onnx]'"
_DOMAIN = "quantsearch.export"  # placeholder nodes only; none is left in a written model


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


def import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxscript
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript ({error}): {_EXTRA_HINT}"
        ) from None
    return onnx, onnxscript


def register_schemas(onnx: Any) -> None:
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


def translation_table(onnxscript: Any) -> dict[Any, Any]:
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

    def __init__(
        self, onnx: Any, proto: Any, opset: int, sub_byte: bool, signed_weights: bool
    ) -> None:
        self.onnx, self.proto, self.opset, self.sub_byte = onnx, proto, opset, sub_byte
        self.signed_weights = signed_weights
        graph = proto.graph
        self.initializers = {t.name: t for t in graph.initializer}
        # The exporter's constants as exported: it names a buffer by its module path
        # (``conv1.weight.zero_point``) and shares one among layers with the same value, so a
        # written initializer may take the name of one that a later placeholder still reads.
        self.exported = dict(self.initializers)
        self.records: list[OnnxTensor] = []

    def array(self, name: str) -> Any:
        if name not in self.exported:
            raise RuntimeError(f"ONNX export: placeholder input {name!r} is not a constant")
        return self.onnx.numpy_helper.to_array(self.exported[name])

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
        codes, zero = self.array(codes_name), self.array(zero_name)
        if self.signed_weights and kind.name == "uint8":
            # The same (codes - zero point) in int8: onnxruntime's fast integer kernels take
            # uint8 activations times int8 weights, uint8 weights run a much slower path.
            kind, qmin, qmax = _INT_TYPES[4], qmin - 128, qmax - 128
            codes, zero = codes.astype("int64") - 128, zero.astype("int64") - 128
        codes = self.add_initializer(f"{tag}.codes", self.typed(codes, kind))
        zero = self.add_initializer(f"{tag}.zero_point", self.typed(zero, kind))
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
        # Min and Max rather than Clip: they broadcast per-channel bounds. Only the side that is
        # narrower than the type gets one: QuantizeLinear saturates to the type's range.
        if qmax < kind.high:
            nodes.append(make("Min", [x, high], [f"{tag}.below"], name=f"{tag}.min"))
            x = f"{tag}.below"
        if qmin > kind.low:
            nodes.append(make("Max", [x, low], [f"{tag}.clipped"], name=f"{tag}.max"))
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


def prune_graph(proto: Any) -> None:
    """Drop the nodes and initializers of ``proto`` that no graph output needs (after a fold)."""
    _prune(proto, {t.name: t for t in proto.graph.initializer})


def edit_graph(
    onnx: Any, proto: Any, opset: int, sub_byte: bool, signed_weights: bool = False
) -> list[OnnxTensor]:
    """Replace every placeholder node of ``proto`` in place; returns how each tensor was
    written. With ``signed_weights`` 8-bit unsigned weight codes are written as int8 (codes and
    zero point minus 128: the same dequantized values)."""
    return _GraphEditor(onnx, proto, opset, sub_byte, signed_weights).run()
