"""The integer side of the ONNX export: a QDQ graph that onnxruntime runs on its integer kernels.

onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear`` groups into integer kernels
(QLinearConv, QGemm, QLinearAdd, QLinearConcat, ...) when every activation input of the op is
dequantized from 8 bits, its weight is 8-bit codes and its output goes straight to a
``QuantizeLinear`` (through a ReLU or a clamp that the quantizer's range makes redundant). Two
patterns of a quantized model break that shape and are folded here:

* a tensor quantized twice in a row: a conv's output quantizer followed by the ReLU's output
  quantizer (``Q1 -> DQ1 -> Relu -> Q2``), or a layer's output quantizer followed by the next
  layer's input quantizer (``Q1 -> DQ1 -> Q2``) on a tensor nobody else reads. The first pair
  is dropped: the tensor is rounded once, to the second quantizer's grid, instead of twice
  (a value next to a rounding boundary of the first grid can land one step of the second apart
  from PyTorch's double rounding);
* a quantized tensor that passes through MaxPool (Reshape, Flatten...) into another
  quantizer (``Q1 -> DQ1 -> MaxPool -> Q2``): its values are already on the first grid, so
  the second pair is dropped (onnxruntime carries the first through the pooling);
* a float tensor (a residual add's output) that one quantizer and other adds read: the adds
  read it quantized too, as onnxruntime's ``quantize_static`` quantizes every tensor once;
* a lower bound (``Max``) before a ``QuantizeLinear`` whose input is a ReLU's or a clamp's
  output, which is never below it.

:func:`float_ops` then says, for every compute node that onnxruntime will not fuse, why.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FloatOp",
    "float_ops",
    "fold_requantizations",
    "runtime_float_ops",
    "runtime_op_counts",
    "runtime_quantized_weights",
    "unsigned_weights_for_centred_inputs",
]

#: Ops between an op and its QuantizeLinear that onnxruntime removes (ReluQuantFusion,
#: ClipQuantFusion) when the quantizer's range makes them redundant.
_CLAMPS = ("Relu", "Clip")
#: Ops that move or select values without computing new ones: a quantized tensor stays on its
#: grid through them.
_MOVES = ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
#: Compute ops that onnxruntime's CPU provider runs as integer kernels in a QDQ group.
_WEIGHTED = ("Conv", "Gemm", "MatMul")
_ELEMENTWISE = ("Add", "Mul", "Concat")
_UNARY = ("AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid", "Softmax")
_EIGHT_BIT = ("INT8", "UINT8")
#: Node types of onnxruntime's optimised graph that compute a layer in float.
_RUNTIME_FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")
_ONE_SCALE = "integer kernels take one scale per activation tensor"


@dataclass(frozen=True)
class FloatOp:
    """A compute node of the exported graph that onnxruntime runs in float, and why."""

    name: str
    """The layer (a weighted op's weight name without ``.weight``) or the ONNX node's name."""
    op_type: str
    reason: str


class _Graph:
    """Producers and consumers of an ONNX graph's tensors."""

    def __init__(self, onnx: Any, proto: Any) -> None:
        self.onnx, self.graph = onnx, proto.graph
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        outputs = {o.name for o in self.graph.output}
        for name in outputs:
            self.consumers[name].append(None)  # a graph output is read by the user
        self.initializers = {t.name: t for t in self.graph.initializer}

    def only_consumer(self, tensor: str) -> Any:
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 else None

    def constant(self, name: str) -> Any:
        tensor = self.initializers.get(name)
        return None if tensor is None else self.onnx.numpy_helper.to_array(tensor)

    def code_type(self, dequantize: Any) -> str:
        """The integer type of a DequantizeLinear's codes (its zero point's type)."""
        zero = self.initializers.get(dequantize.input[2]) if len(dequantize.input) > 2 else None
        if zero is None:
            return "unknown"
        return self.onnx.TensorProto.DataType.Name(zero.data_type)


def _tag(node: Any) -> str:
    """The quantized tensor a node of the export belongs to: ``conv1.output.quantize`` and
    ``conv1.output.min`` -> ``conv1.output``."""
    if node.name.endswith((".quantize", ".dequantize", ".min", ".max")):
        return node.name.rsplit(".", 1)[0]
    return node.name


def _fold_pairs(graph: _Graph) -> list[str]:
    """Drop the first of two quantizations in a row; returns 'first -> second' per fold."""
    folded = []
    for quantize in list(graph.graph.node):
        if quantize.op_type != "QuantizeLinear":
            continue
        dequantize = graph.only_consumer(quantize.output[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        follower = graph.only_consumer(dequantize.output[0])
        if follower is None:
            continue
        if follower.op_type in _MOVES:
            second = _drop_second(graph, follower)
            if second is not None:
                folded.append(f"{_tag(quantize)} -> {second}")
            continue
        second = follower
        if follower.op_type in _CLAMPS:
            second = graph.only_consumer(follower.output[0])
        if second is None or second.op_type != "QuantizeLinear":
            continue
        source = quantize.input[0]
        bound = graph.producer.get(source)
        while bound is not None and bound.op_type in ("Min", "Max") and _tag(bound) == _tag(
            quantize
        ):  # the first quantizer's own bounds go with it
            source = bound.input[0]
            bound = graph.producer.get(source)
        follower.input[0] = source  # the clamp, or the second QuantizeLinear, reads the float
        folded.append(f"{_tag(quantize)} -> {_tag(second)}")
        graph.refresh()
    return folded


def _drop_second(graph: _Graph, move: Any) -> str | None:
    """``Q1 -> DQ1 -> MaxPool (Reshape, ...) -> Q2 -> DQ2``: the values are already on Q1's
    grid, so Q2 and DQ2 go and DQ2's readers read the pooled tensor (onnxruntime carries Q1's
    quantization through the pooling). Returns Q2's tensor, or None when the pattern differs."""
    second = graph.only_consumer(move.output[0])
    while second is not None and second.op_type in _MOVES:  # MaxPool, then Flatten
        move, second = second, graph.only_consumer(second.output[0])
    if second is None or second.op_type != "QuantizeLinear":
        return None
    dequantize = graph.only_consumer(second.output[0])
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    for reader in graph.consumers.get(dequantize.output[0], []):
        if reader is None:
            return None  # a graph output: leave it
        for index, name in enumerate(reader.input):
            if name == dequantize.output[0]:
                reader.input[index] = move.output[0]
    graph.refresh()
    return _tag(second)


def _quantized_after(graph: _Graph, tensor: str) -> bool:
    """Every reader of ``tensor`` (through ReLUs and clamps) is a QuantizeLinear, or an add
    that is itself quantized: the op that makes ``tensor`` can become an integer kernel."""
    readers = graph.consumers.get(tensor, [])
    if not readers:
        return False
    for reader in readers:
        if reader is None:
            return False
        if reader.op_type in _CLAMPS or reader.op_type in _ELEMENTWISE:
            if not _quantized_after(graph, reader.output[0]):
                return False
        elif reader.op_type != "QuantizeLinear":
            return False
    return True


def _share_quantized(graph: _Graph) -> list[str]:
    """A float tensor that one QuantizeLinear reads and residual adds (concats) read as it is:
    the adds read the dequantized tensor instead, so that they fuse (``QLinearAdd``) and the
    tensor's producer (an add) keeps one reader. Returns 'tensor -> quantizer' per tensor."""
    shared = []
    for tensor, readers in list(graph.consumers.items()):
        quantizers = [r for r in readers if r is not None and r.op_type == "QuantizeLinear"]
        others = [r for r in readers if r not in quantizers]
        if len(quantizers) != 1 or not others:
            continue
        if any(r is None or r.op_type not in _ELEMENTWISE for r in others):
            continue
        if not all(_quantized_after(graph, r.output[0]) for r in others):
            continue  # an add that stays float gains nothing from an input rounded first
        dequantize = graph.only_consumer(quantizers[0].output[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        for reader in others:
            for index, name in enumerate(reader.input):
                if name == tensor:
                    reader.input[index] = dequantize.output[0]
        shared.append(f"{tensor} -> {_tag(quantizers[0])}")
        graph.refresh()
    return shared


def _drop_bounds(graph: _Graph) -> None:
    """A Max(x, low) before a QuantizeLinear, where x is a ReLU's or a clamp's output that is
    never below ``low``, is dropped."""
    for node in list(graph.graph.node):
        if node.op_type != "Max" or len(node.input) != 2:
            continue
        reader = graph.only_consumer(node.output[0])
        producer = graph.producer.get(node.input[0])
        low = graph.constant(node.input[1])
        if reader is None or reader.op_type != "QuantizeLinear" or producer is None or low is None:
            continue
        if producer.op_type == "Relu":
            floor = 0.0
        elif producer.op_type == "Clip" and len(producer.input) > 1 and producer.input[1]:
            value = graph.constant(producer.input[1])
            if value is None:
                continue
            floor = float(value)
        else:
            continue
        if float(low.max()) <= floor:
            reader.input[0] = node.input[0]
            graph.refresh()


def fold_requantizations(onnx: Any, proto: Any) -> list[str]:
    """Fold the patterns above in ``proto`` (in place, nodes left unread are for the caller's
    pruning); returns the folded quantizer pairs as 'first -> second'."""
    graph = _Graph(onnx, proto)
    folded = _fold_pairs(graph)
    _drop_bounds(graph)
    return folded + _share_quantized(graph)


def _readers_through_moves(graph: _Graph, tensor: str) -> list[Any]:
    """The nodes that read ``tensor``, looking through ops that only move or split values."""
    found, pending = [], [tensor]
    while pending:
        for node in graph.consumers.get(pending.pop(), []):
            if node is not None and node.op_type in (*_MOVES, "Split", "Slice"):
                pending.extend(node.output)
            elif node is not None:
                found.append(node)
    return found


def _source_through_moves(graph: _Graph, tensor: str) -> Any:
    node = graph.producer.get(tensor)
    while node is not None and node.op_type in _MOVES:
        node = graph.producer.get(node.input[0])
    return node


def unsigned_weights_for_centred_inputs(onnx: Any, proto: Any) -> list[str]:
    """Write back as uint8 every int8 weight that a layer multiplies with uint8 activations
    whose zero point is not 0; returns those weights' names.

    onnxruntime's u8s8 kernels on x86 CPUs without VNNI add pairs of uint8 x int8 products in
    16 bits and saturate when both activations of a pair are large: activations centred on
    their zero point (a transformer's, codes near 128) do so often, ReLU outputs (codes near
    0) rarely. Its uint8 x uint8 kernels are exact, so such a layer keeps uint8 weights.
    """
    graph = _Graph(onnx, proto)
    unsigned = []
    for dequantize in list(graph.graph.node):
        if (dequantize.op_type != "DequantizeLinear" or graph.code_type(dequantize) != "INT8"
                or dequantize.input[0] not in graph.initializers):
            continue
        centred = False
        for reader in _readers_through_moves(graph, dequantize.output[0]):
            if reader.op_type not in _WEIGHTED:
                continue
            source = _source_through_moves(graph, reader.input[0])
            if source is not None and source.op_type == "DequantizeLinear" and (
                graph.code_type(source) == "UINT8"
                and np.any(graph.constant(source.input[2]) != 0)
            ):
                centred = True
        if not centred:
            continue
        for name in (dequantize.input[0], dequantize.input[2]):
            values = graph.constant(name).astype(np.int64) + 128
            tensor = graph.initializers[name]
            tensor.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.uint8), name))
        unsigned.append(_tag(dequantize))
    return unsigned


def _input_reason(graph: _Graph, tensor: str, what: str) -> str | None:
    producer = graph.producer.get(tensor)
    while producer is not None and producer.op_type in _MOVES:  # onnxruntime carries DQ on
        producer = graph.producer.get(producer.input[0])
    if producer is None or producer.op_type != "DequantizeLinear":
        return f"its {what} is not quantized"
    kind = graph.code_type(producer)
    if kind not in _EIGHT_BIT:
        return f"its {what} is {kind.lower()} (integer kernels need int8 or uint8)"
    if what != "weight" and _per_axis(graph, producer):
        return f"its {what} is quantized per channel ({_ONE_SCALE})"
    return None


def _per_axis(graph: _Graph, node: Any) -> bool:
    scale = graph.constant(node.input[1])
    return scale is not None and scale.size > 1


def _output_reason(graph: _Graph, tensor: str) -> str | None:
    reader = graph.only_consumer(tensor)
    while reader is not None and reader.op_type in _CLAMPS:
        reader = graph.only_consumer(reader.output[0])
    if reader is None:
        return "its output is not quantized (or is read by more than one node)"
    if reader.op_type in ("Min", "Max"):
        return "its output quantizer's range is narrower than its type (Min/Max before it)"
    if reader.op_type != "QuantizeLinear":
        return "its output is not quantized"
    dequantize = graph.only_consumer(reader.output[0])
    kind = graph.code_type(dequantize) if dequantize is not None else "unknown"
    if dequantize is not None and kind not in _EIGHT_BIT:
        return f"its output is {kind.lower()} (integer kernels need int8 or uint8)"
    if _per_axis(graph, reader):
        return f"its output is quantized per channel ({_ONE_SCALE})"
    return None


def _weighted_name(graph: _Graph, node: Any) -> str:
    weight = graph.producer.get(node.input[1]) if len(node.input) > 1 else None
    if weight is not None and weight.op_type == "DequantizeLinear":
        return _tag(weight).removesuffix(".weight")
    if len(node.input) > 1 and node.input[1] in graph.initializers:  # a float weight
        # A quantized layer's wrapper holds the float module as ``<layer>.module``.
        return node.input[1].removesuffix(".weight").removesuffix(".module")
    return node.name


def _runtime_quantizes_weight(graph: _Graph, node: Any) -> bool:
    """onnxruntime's WeightBiasQuantization: a Conv or Gemm whose input is dequantized and
    whose output is quantized, with a float constant weight, gets that weight quantized to
    int8 per tensor when the model loads, and so runs on an integer kernel."""
    return (
        node.op_type in ("Conv", "Gemm")
        and len(node.input) > 1
        and node.input[1] in graph.initializers
        and _input_reason(graph, node.input[0], "input") is None
        and _output_reason(graph, node.output[0]) is None
    )


def runtime_quantized_weights(onnx: Any, proto: Any) -> list[str]:
    """The layers of ``proto`` whose float weight onnxruntime quantizes itself (int8 per tensor)
    when it loads the model: their outputs there differ from the PyTorch model's by that
    rounding."""
    graph = _Graph(onnx, proto)
    return [
        _weighted_name(graph, node)
        for node in graph.graph.node
        if _runtime_quantizes_weight(graph, node)
    ]


def float_ops(onnx: Any, proto: Any) -> list[FloatOp]:
    """Every compute node of ``proto`` that onnxruntime's CPU provider keeps in float, with the
    first reason found: an input that is not dequantized from 8 bits, a weight below 8 bits, an
    output that does not go straight to an 8-bit QuantizeLinear."""
    graph = _Graph(onnx, proto)
    found = []
    for node in graph.graph.node:
        reasons: list[str | None] = []
        name = node.name
        if node.op_type in _WEIGHTED:
            if _runtime_quantizes_weight(graph, node):
                continue
            name = _weighted_name(graph, node)
            reasons.append(_input_reason(graph, node.input[0], "input"))
            reasons.append(_input_reason(graph, node.input[1], "weight"))
            if node.op_type != "MatMul":  # MatMulIntegerToFloat may output float; QGemm not
                reasons.append(_output_reason(graph, node.output[0]))
        elif node.op_type in _ELEMENTWISE:
            for index, tensor in enumerate(node.input):
                reasons.append(_input_reason(graph, tensor, f"input {index}"))
            reasons.append(_output_reason(graph, node.output[0]))
        elif node.op_type in _UNARY:
            reasons.append(_input_reason(graph, node.input[0], "input"))
            reasons.append(_output_reason(graph, node.output[0]))
        else:
            continue
        reason = next((r for r in reasons if r is not None), None)
        if reason is not None:
            found.append(FloatOp(name, node.op_type, reason))
    return found


def runtime_op_counts(path: Any, *, threads: int = 1) -> dict[str, int]:
    """Node types of the model at ``path`` after onnxruntime's graph optimisation (CPU
    provider), with their counts, most frequent first: what became ``QLinearConv``,
    ``QGemm``, ``QLinearAdd``... and what stayed float."""
    import tempfile
    from collections import Counter
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return dict(counts.most_common())


def runtime_float_ops(counts: Mapping[str, int]) -> dict[str, int]:
    """Of ``runtime_op_counts``'s node types, those that compute a layer in float."""
    return {kind: n for kind, n in counts.items() if kind in _RUNTIME_FLOAT_OPS}
