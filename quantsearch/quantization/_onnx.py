"""ONNX export: a compressed model as a QDQ graph that onnxruntime runs.

How it works: the deploy side (``_onnx_deploy``) copies the model with every quantized layer as
fixed integers (each tensor quantizer gives its own QDQ form) and marker ops where tensors are
quantized; ``torch.onnx.export`` (the torch.export-based exporter) traces it; the graph side
(``_onnx_graph``) replaces the markers' placeholder nodes with ``DequantizeLinear`` on integer
weight codes and ``QuantizeLinear``/``DequantizeLinear`` pairs on activations.

onnx and onnxscript are imported only inside :func:`export_onnx` (the ``quantsearch[onnx]``
extra); importing this module needs torch alone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._onnx_deploy import OnnxExportError, deployed_copy, register_ops
from ._onnx_fuse import (
    FloatOp,
    float_ops,
    fold_requantizations,
    runtime_quantized_weights,
    unsigned_weights_for_centred_inputs,
)
from ._onnx_graph import (
    OnnxTensor,
    edit_graph,
    import_onnx,
    prune_graph,
    register_schemas,
    translation_table,
)
from ._onnx_inputs import ModelInputs
from ._pack import model_size_bytes

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "FloatOp",
    "ModelInputs",
    "OnnxExport",
    "OnnxExportError",
    "OnnxTensor",
    "export_onnx",
]

#: Opset 25 has int2/uint2 QuantizeLinear/DequantizeLinear; 21 has int4/uint4 and int16/uint16.
DEFAULT_OPSET = 25
MIN_OPSET = 21


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
    folded: tuple[str, ...] = ()
    """Tensors quantized twice in a row, written once (``first -> second``): the first
    quantizer is dropped so that onnxruntime fuses the op into an integer kernel."""
    float_ops: tuple[FloatOp, ...] = ()
    """Compute nodes onnxruntime keeps in float, each with the reason; empty when the whole
    graph runs on integer kernels (or the model is float)."""
    runtime_quantized: tuple[str, ...] = ()
    """Layers left with a float weight between a quantized input and a quantized output:
    onnxruntime quantizes such a weight itself (int8 per tensor) and runs an integer kernel,
    so its outputs differ from the PyTorch model's by that rounding. To keep a layer float in
    onnxruntime, leave its input or output unquantized too."""

    @property
    def integer(self) -> bool:
        """Quantized, and every compute node fits onnxruntime's integer kernels."""
        return bool(self.tensors) and not self.float_ops

    def types(self) -> dict[str, str]:
        """Tensor name -> ONNX integer type of its codes."""
        return {t.name: t.onnx_type for t in self.tensors}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    dummy_input: Any,
    *,
    opset: int = DEFAULT_OPSET,
    sub_byte_types: bool = True,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    fold: bool = True,
    int8_weights: bool = True,
) -> OnnxExport:
    """Write ``model`` (compressed by a quantizer, or a plain float model) as an ONNX QDQ model.

    Weights become integer codes and ``DequantizeLinear``; quantized inputs and outputs become
    ``QuantizeLinear``/``DequantizeLinear`` pairs; scales and zero points are the model's own
    (per tensor or per channel), and BatchNorm is folded as in eval mode. Weight codes are stored
    in the narrowest integer type the opset has: int2/uint2 (opset 25), int4/uint4, int8/uint8,
    int16/uint16, int32 (DoReFa's 16 bits); ``sub_byte_types=False`` keeps 8-bit containers for
    runtimes without the 2- and 4-bit types. Activations use int8/uint8 (int16/uint16 above 8
    bits): onnxruntime's graph optimizations fail on 2- and 4-bit activations. A range narrower
    than its type (-127..127 or 4-bit codes in int8) is kept by Min (Max) before QuantizeLinear
    on the side where it is narrower, unless a ReLU or clamp already keeps it.

    With ``fold`` (the default) a tensor quantized twice in a row (a conv's output quantizer,
    then the ReLU's after it; a layer's output quantizer, then the next layer's input quantizer
    on a tensor nothing else reads) is rounded once, to the second quantizer's grid, so that
    onnxruntime fuses the op into an integer kernel: ``OnnxExport.folded`` names each pair and
    ``OnnxExport.float_ops`` every op that stays float, and why.

    ``int8_weights`` (the default) writes 8-bit unsigned weights as int8 (codes and zero point
    minus 128, the same values): onnxruntime runs uint8 activations times int8 weights on its
    fast kernels, uint8 weights on a slower path. Those u8s8 kernels add pairs of products in
    16 bits on x86 CPUs without VNNI and saturate when both activations of a pair are large,
    which activations centred on a nonzero zero point (a transformer's) make common: a layer
    whose input has a nonzero zero point keeps uint8 weights, computed exactly; ReLU-like inputs
    (zero point 0) take int8, as ``quantize_static``'s weights do. ``int8_weights=False`` keeps
    uint8 weights everywhere.

    ``dummy_input`` is an example batch: a tensor, a tuple of positional arguments or a dict of
    keyword arguments (:class:`ModelInputs`; graph inputs are named ``input``, ``input_0``...,
    or by their keyword); with ``dynamic_batch`` the batch dimension of every input that has
    the example's batch size is left free. The model is copied, never changed, and
    nothing but ``path`` is written. Raises :class:`OnnxExportError` for quantizers without an
    exact QDQ form (BNN's sign activations, user-defined quantizers), naming each, and
    ``ImportError`` naming the ``quantsearch[onnx]`` extra when onnx is missing.
    """
    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if opset < MIN_OPSET:
        raise OnnxExportError(
            f"opset {opset} is too old: the QDQ export needs opset {MIN_OPSET} or newer "
            "(int4 and int16 QuantizeLinear/DequantizeLinear)"
        )
    inputs = ModelInputs.of(dummy_input).keyword_form(model).map(lambda t: t.detach().cpu())
    onnx, onnxscript = import_onnx()
    register_ops()
    deployed, unquantized = deployed_copy(model)
    size_bytes = model_size_bytes(model)
    register_schemas(onnx)
    names = list(input_names) if input_names is not None else (
        None if inputs.kwargs else list(inputs.tensors())
    )
    dynamic_shapes = None
    if dynamic_batch:
        batch = inputs.batch_size()
        # A size-1 dimension is specialised by torch.export: trace a batch of two instead.
        inputs = inputs.batched(2) if batch == 1 else inputs
        dynamic_shapes = _dynamic_shapes(inputs, 2 if batch == 1 else batch)
    program = _run_exporter(
        deployed, inputs, opset=opset, input_names=names, output_names=output_names,
        dynamic_shapes=dynamic_shapes, translations=translation_table(onnxscript),
    )
    proto = program.model_proto
    records = edit_graph(onnx, proto, opset, sub_byte_types, signed_weights=int8_weights)
    folded = fold_requantizations(onnx, proto) if fold else []
    if int8_weights:
        unsigned = set(unsigned_weights_for_centred_inputs(onnx, proto))
        records = [
            replace(r, onnx_type="uint8", qmin=r.qmin + 128, qmax=r.qmax + 128)
            if r.name in unsigned else r
            for r in records
        ]
    prune_graph(proto)
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
        folded=tuple(folded),
        float_ops=tuple(float_ops(onnx, proto)) if records else (),
        runtime_quantized=tuple(runtime_quantized_weights(onnx, proto)) if records else (),
    )


def _dynamic_shapes(inputs: ModelInputs, batch: int | None) -> Any:
    """torch.export's dynamic_shapes: dimension 0 free in every tensor of the batch's size
    (shared, so the inputs keep one batch size), in the structure of the arguments."""
    free = torch.export.Dim("batch")

    def dim(value: Any) -> dict[int, Any] | None:
        is_batch = isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch
        return {0: free} if is_batch else None

    if inputs.kwargs:
        return {name: dim(value) for name, value in inputs.kwargs.items()}
    return tuple(dim(v) for v in inputs.args)


def _run_exporter(
    model: nn.Module,
    inputs: ModelInputs,
    *,
    opset: int,
    input_names: list[str] | None,
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
                inputs.args,
                kwargs=inputs.kwargs or None,
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
