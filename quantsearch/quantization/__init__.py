"""The quantizer core: NNI-style quantizers driven by an NNI v2 ``config_list``.

    from quantsearch.quantization import QAT_Quantizer
    config_list = [{"quant_types": ["weight", "output"], "quant_bits": 8,
                    "op_types": ["Conv2d", "Linear", "ReLU6"]}]
    model = QAT_Quantizer(model, config_list, optimizer).compress()

Post-training: ``PtqQuantizer(model, config_list, dummy_input=x).compress()``, then
``with quantizer.calibrate(): model(batch)`` for a few batches, then evaluate. Its entries may
ask for more than round-to-nearest: ``rounding: adaround|gptq`` (fitted on the calibration
batches when the block ends), ``bias_correction: true`` and ``equalize: true`` (cross-layer
equalization of the float model in ``compress()``); the learned integers are ordinary codes.

The core owns its vocabulary: :data:`SCHEMES` (``quant_scheme`` values), :data:`OBSERVERS`
(PTQ's ``observer`` values), :data:`QUANT_TYPES`, and per registered algorithm its
:class:`AlgorithmRules`, read with ``algorithm_rules(name)``: ``options``, ``quant_types``,
``min_bits``/``max_bits``, ``trains`` (False for ptq, which only calibrates) and ``affine``
(True where 16 bits reproduce the float model up to rounding: qat, ptq, naive).

This package imports torch only: no search, no tasks.
"""

from ._algorithms import (
    BNNQuantizer,
    DoReFaQuantizer,
    LsqQuantizer,
    NaiveQuantizer,
    QAT_Quantizer,
    QATQuantizer,
)
from ._base import Example, Quantizer, real_state_dict
from ._config import DEFAULT_OP_TYPES, QUANT_TYPES, AlgorithmRules, ConfigError, match_layers
from ._observers import OBSERVERS
from ._onnx import FloatOp, ModelInputs, OnnxExport, OnnxExportError, OnnxTensor, export_onnx
from ._onnx_fuse import runtime_float_ops, runtime_op_counts
from ._pack import load_packed, model_size_bytes, save_packed
from ._ptq import NotCalibratedError, PtqQuantizer
from ._registry import QUANTIZERS, algorithm_rules, get_quantizer, register_quantizer
from ._tensor_quant import SCHEMES
from ._wrapper import QuantWrapper, eval_mode, wrappers_of

__all__ = [
    "DEFAULT_OP_TYPES",
    "OBSERVERS",
    "QUANTIZERS",
    "QUANT_TYPES",
    "SCHEMES",
    "AlgorithmRules",
    "BNNQuantizer",
    "ConfigError",
    "DoReFaQuantizer",
    "Example",
    "FloatOp",
    "LsqQuantizer",
    "ModelInputs",
    "NaiveQuantizer",
    "NotCalibratedError",
    "OnnxExport",
    "OnnxExportError",
    "OnnxTensor",
    "PtqQuantizer",
    "QATQuantizer",
    "QAT_Quantizer",
    "QuantWrapper",
    "Quantizer",
    "algorithm_rules",
    "eval_mode",
    "export_onnx",
    "get_quantizer",
    "load_packed",
    "match_layers",
    "model_size_bytes",
    "real_state_dict",
    "register_quantizer",
    "runtime_float_ops",
    "runtime_op_counts",
    "save_packed",
    "wrappers_of",
]
