"""The five quantization algorithms and the registry that names them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._base import Example, Quantizer
from ._config import AlgorithmRules, LayerConfig, one_of, per_quant_type, quantizable_weight
from ._registry import register_quantizer
from ._tensor_quant import (
    SCHEMES,
    AffineWeightQuant,
    DoReFaWeightQuant,
    EmaActivationQuant,
    LsqQuant,
    SignQuant,
    TensorQuant,
)

__all__ = [
    "BNNQuantizer",
    "DoReFaQuantizer",
    "LsqQuantizer",
    "NaiveQuantizer",
    "QATQuantizer",
    "QAT_Quantizer",
]

# The conformance net's weighted layers (quantsearch.quantization.testing.ConformanceNet).
_WEIGHTED = ("conv1", "conv2", "fc")

_DTYPES = ("int", "uint")


def _non_negative_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "expected an int >= 0"


def _channels(module: nn.Module) -> int:
    weight = quantizable_weight(module)
    return int(weight.shape[0]) if weight is not None and weight.dim() else 1


@register_quantizer("naive")
class NaiveQuantizer(Quantizer):
    """Weights only, symmetric int per tensor (scale = max|w| / (2^(b-1) - 1)), rounded to the
    nearest level (NNI truncates toward zero). NNI takes only 8 bits; 2..16 are accepted here.
    Without a config_list every weighted layer gets 8 bits."""

    rules = AlgorithmRules(
        name="NaiveQuantizer", quant_types=("weight",), min_bits=2, max_bits=16, trains=True,
        affine=True,
    )
    examples = (
        Example(
            "w4",
            [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["default"]}],
            {name: {"weight": 4} for name in _WEIGHTED},
        ),
    )

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        dummy_input: Any = None,
    ) -> None:
        if config_list is None:
            config_list = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]}]
        super().__init__(model, config_list, optimizer, dummy_input)

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        return {
            "weight": AffineWeightQuant(
                layer.bits["weight"], scheme="per_tensor_symmetric", dtype="int",
                channels=_channels(module),
            )
        }


@register_quantizer("qat")
class QAT_Quantizer(Quantizer):
    """Quantization-aware training (Jacob et al. 2018).

    Weights: min/max of the current (BatchNorm-folded) weight on every forward. Inputs and
    outputs: min/max tracked by an EMA (decay 0.99). Options per entry: ``quant_start_step``
    (default 0), ``quant_scheme`` (default ``per_tensor_affine``), ``quant_dtype`` (default
    ``uint``; ``int`` is the restricted symmetric range -(2^(b-1)-1)..2^(b-1)-1). BatchNorm is
    folded into the conv before it when a ``dummy_input`` is given (pairs found by running it).
    """

    rules = AlgorithmRules(
        name="QAT_Quantizer",
        quant_types=("weight", "input", "output"),
        min_bits=2,
        max_bits=16,
        options={
            "quant_start_step": (0, _non_negative_int),
            "quant_scheme": ("per_tensor_affine", one_of(SCHEMES)),
            "quant_dtype": ("uint", one_of(_DTYPES)),
        },
        trains=True,
        affine=True,
        per_type=("quant_scheme", "quant_dtype"),
    )
    folds_batch_norm = True
    examples = (
        Example(
            "w4a8",
            [
                {"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"]},
                {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
            ],
            {"conv1": {"weight": 4}, "conv2": {"weight": 4}, "fc": {"weight": 4},
             "relu1": {"output": 8}, "relu2": {"output": 8}},
        ),
        Example(
            "per-channel-int",
            [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 3, "input": 6},
              "op_types": ["Conv2d", "Linear"], "quant_scheme": "per_channel_symmetric",
              "quant_dtype": "int"}],
            {name: {"weight": 3} for name in _WEIGHTED},
        ),
    )

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        quants: dict[str, TensorQuant] = {}
        for quant_type in layer.quant_types:
            bits = layer.bits[quant_type]
            scheme = per_quant_type(layer.options, "quant_scheme", quant_type)
            dtype = per_quant_type(layer.options, "quant_dtype", quant_type)
            if quant_type == "weight":
                quants["weight"] = AffineWeightQuant(
                    bits, scheme=scheme, dtype=dtype, channels=_channels(module)
                )
            else:
                quants[quant_type] = EmaActivationQuant(bits, scheme=scheme, dtype=dtype)
        return quants


QATQuantizer = QAT_Quantizer


@register_quantizer("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa-Net weights (Zhou et al. 2016): tanh, rescale to [0, 1], k-bit levels, back to
    [-1, 1]. Weights only, 1..16 bits."""

    rules = AlgorithmRules(
        name="DoReFaQuantizer", quant_types=("weight",), min_bits=1, max_bits=16, trains=True,
        affine=False,
    )
    examples = (
        Example(
            "w2",
            [{"quant_types": ["weight"], "quant_bits": 2, "op_types": ["default"]}],
            {name: {"weight": 2} for name in _WEIGHTED},
        ),
    )

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        return {"weight": DoReFaWeightQuant(layer.bits["weight"])}


@register_quantizer("bnn")
class BNNQuantizer(Quantizer):
    """Binarized networks (Courbariaux/Hubara et al. 2016): sign of weights and outputs, 1 bit.

    Output gradients pass only where |x| <= 1; weight gradients pass unchanged, and the latent
    float weights are clipped to [-1, 1] after every optimizer step."""

    rules = AlgorithmRules(
        name="BNNQuantizer", quant_types=("weight", "output"), min_bits=1, max_bits=1,
        trains=True, affine=False,
    )
    examples = (
        Example(
            "w1a1",
            [
                {"quant_types": ["weight"], "quant_bits": 1, "op_types": ["Conv2d", "Linear"]},
                {"quant_types": ["output"], "quant_bits": 1, "op_names": ["relu2"]},
            ],
            {"conv1": {"weight": 1}, "conv2": {"weight": 1}, "fc": {"weight": 1},
             "relu2": {"output": 1}},
        ),
        # Weights only: the form that exports to ONNX (sign activations have no QDQ form).
        Example(
            "w1",
            [{"quant_types": ["weight"], "quant_bits": 1, "op_types": ["Conv2d", "Linear"]}],
            {name: {"weight": 1} for name in _WEIGHTED},
        ),
    )

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        quants: dict[str, TensorQuant] = {}
        if "weight" in layer.quant_types:
            quants["weight"] = SignQuant(window=False)
        if "output" in layer.quant_types:
            quants["output"] = SignQuant(window=True)
        return quants

    @torch.no_grad()
    def _after_step(self) -> None:
        for wrapper in self._wrapper_list:
            for key in wrapper.param_quants():
                wrapper.module.get_parameter(key).clamp_(-1.0, 1.0)


@register_quantizer("lsq")
class LsqQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al. 2019) for weights, inputs and outputs.

    The step sizes are Parameters: when an optimizer is given they are added to it as a new
    param group; otherwise build the optimizer after :meth:`compress`. Option: ``quant_dtype``
    (default ``int``: -2^(b-1)..2^(b-1)-1 as in NNI; ``uint``: 0..2^b-1)."""

    rules = AlgorithmRules(
        name="LsqQuantizer",
        quant_types=("weight", "input", "output"),
        min_bits=2,
        max_bits=16,
        options={"quant_dtype": ("int", one_of(_DTYPES))},
        per_type=("quant_dtype",),
        trains=True,
        affine=False,
    )
    examples = (
        Example(
            "w3a4",
            [
                {"quant_types": ["weight"], "quant_bits": 3, "op_types": ["Conv2d", "Linear"]},
                {"quant_types": ["output"], "quant_bits": 4, "op_types": ["ReLU6"],
                 "quant_dtype": "uint"},
            ],
            {"conv1": {"weight": 3}, "conv2": {"weight": 3}, "fc": {"weight": 3},
             "relu1": {"output": 4}, "relu2": {"output": 4}},
        ),
    )

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        quants: dict[str, TensorQuant] = {}
        for quant_type in layer.quant_types:
            bits = layer.bits[quant_type]
            dtype = per_quant_type(layer.options, "quant_dtype", quant_type)
            if quant_type == "weight":
                quants["weight"] = LsqQuant(bits, dtype=dtype, init_from=quantizable_weight(module))
            else:
                quants[quant_type] = LsqQuant(bits, dtype=dtype)
        return quants
