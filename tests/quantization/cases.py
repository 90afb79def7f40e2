"""One config_list per algorithm for the conformance suite, on conftest.TinyNet."""

from __future__ import annotations

from typing import Any

from quantsearch.quantization import (
    BNNQuantizer,
    DoReFaQuantizer,
    LsqQuantizer,
    NaiveQuantizer,
    QAT_Quantizer,
    Quantizer,
)

WEIGHTED = ["conv1", "conv2", "fc"]

# (id, quantizer class, config_list, {layer: {role: bits}} the suite checks)
CASES: list[tuple[str, type[Quantizer], list[dict[str, Any]], dict[str, dict[str, int]]]] = [
    (
        "naive-w4",
        NaiveQuantizer,
        [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["default"]}],
        {name: {"weight": 4} for name in WEIGHTED},
    ),
    (
        "qat-w4a8",
        QAT_Quantizer,
        [
            {"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
        ],
        {"conv1": {"weight": 4}, "conv2": {"weight": 4}, "fc": {"weight": 4},
         "relu1": {"output": 8}, "relu2": {"output": 8}},
    ),
    (
        "qat-per-channel-int",
        QAT_Quantizer,
        [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 3, "input": 6},
          "op_types": ["Conv2d", "Linear"], "quant_scheme": "per_channel_symmetric",
          "quant_dtype": "int"}],
        {name: {"weight": 3} for name in WEIGHTED},
    ),
    (
        "dorefa-w2",
        DoReFaQuantizer,
        [{"quant_types": ["weight"], "quant_bits": 2, "op_types": ["default"]}],
        {name: {"weight": 2} for name in WEIGHTED},
    ),
    (
        "bnn",
        BNNQuantizer,
        [
            {"quant_types": ["weight"], "quant_bits": 1, "op_types": ["Conv2d", "Linear"]},
            {"quant_types": ["output"], "quant_bits": 1, "op_names": ["relu2"]},
        ],
        {"conv1": {"weight": 1}, "conv2": {"weight": 1}, "fc": {"weight": 1},
         "relu2": {"output": 1}},
    ),
    (
        "lsq-w3a4",
        LsqQuantizer,
        [
            {"quant_types": ["weight"], "quant_bits": 3, "op_types": ["Conv2d", "Linear"]},
            {"quant_types": ["output"], "quant_bits": 4, "op_types": ["ReLU6"],
             "quant_dtype": "uint"},
        ],
        {"conv1": {"weight": 3}, "conv2": {"weight": 3}, "fc": {"weight": 3},
         "relu1": {"output": 4}, "relu2": {"output": 4}},
    ),
]
