"""Post-training methods beyond round-to-nearest, as keys of the ptq config_list entries.

``rounding`` (``nearest``, ``adaround``, ``gptq``), ``bias_correction`` and ``equalize``, with
``adaround_iters``, ``gptq_damp`` and ``fit_inputs``: their validators and what
``PtqQuantizer`` runs for them: :func:`equalize_model` on the float model before wrapping, and
a :class:`Recording` that samples each layer's inputs during ``calibrate()`` and fits the
rounding and the bias when the calibration ends (:mod:`._ptq_fit`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._algorithms import _WEIGHTED
from ._base import Example
from ._config import one_of
from ._equalize import EqualizeResult, equalize
from ._ptq_fit import FitRecord, LayerInputs, fit_layer, fits_layer
from ._wrapper import eval_mode

__all__ = [
    "ADAROUND_ITERS",
    "FIT_INPUTS",
    "GPTQ_DAMP",
    "METHOD_EXAMPLES",
    "METHOD_OPTIONS",
    "ROUNDINGS",
    "Recording",
    "equalize_model",
    "recording_needed",
]

ROUNDINGS = ("nearest", "adaround", "gptq")
#: The inputs a learned rounding and a bias correction are fitted on: the float model's, or the
#: quantized model's (each layer then also compensates the error of the layers before it).
FIT_INPUTS = ("float", "quantized")
#: AdaRound's Adam steps per layer. The paper runs 10k-20k (1024 images, batches of 32); on
#: 2 CPU cores 500 steps keep a ResNet-18 trial under two minutes, and the scaled-up step size
#: (``_rounding.adaround``) lets the masks settle in that many.
ADAROUND_ITERS = 500
#: GPTQ's dampening: 1% of the Hessian's mean diagonal (GPTQ, section 3).
GPTQ_DAMP = 0.01


def _bool_value(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def _iters_value(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100_000
    return None if ok else "expected an int in 1..100000"


def _damp_value(value: Any) -> str | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if number and 0 < value <= 1 else "expected a number in (0, 1]"


#: key -> (default, validator), merged into ``PtqQuantizer.rules.options``. No cross-key
#: check: a search writes every searched key into every entry, so an entry without weights
#: (ReLU6 outputs) and one whose rounding is not AdaRound take them too, and ignore them.
METHOD_OPTIONS: dict[str, tuple[Any, Any]] = {
    "rounding": ("nearest", one_of(ROUNDINGS)),
    "bias_correction": (False, _bool_value),
    "fit_inputs": ("float", one_of(FIT_INPUTS)),
    "equalize": (False, _bool_value),
    "adaround_iters": (ADAROUND_ITERS, _iters_value),
    "gptq_damp": (GPTQ_DAMP, _damp_value),
}

#: The conformance suite's cases for these keys (on ``ConformanceNet``), in PtqQuantizer's
#: ``examples``.
METHOD_EXAMPLES = (
    Example(
        "w4a8-adaround-bias-correction-equalize",
        [
            {"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"],
             "rounding": "adaround", "adaround_iters": 20, "bias_correction": True,
             "equalize": True},
            {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
        ],
        {"conv1": {"weight": 4}, "conv2": {"weight": 4}, "fc": {"weight": 4},
         "relu1": {"output": 8}, "relu2": {"output": 8}},
    ),
    Example(
        "w3a8-gptq-per-channel-mse-quantized-inputs",
        [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 3, "input": 8},
          "op_types": ["Conv2d", "Linear"], "quant_scheme": "per_channel_symmetric",
          "quant_dtype": "int", "observer": {"weight": "mse", "input": "minmax"},
          "rounding": "gptq", "gptq_damp": 0.05, "bias_correction": True,
          "fit_inputs": "quantized"}],
        {name: {"weight": 3} for name in _WEIGHTED},
    ),
    Example(
        "w2-adaround-per-channel-affine",
        [{"quant_types": ["weight"], "quant_bits": 2, "op_types": ["Conv2d", "Linear"],
          "quant_scheme": "per_channel_affine", "rounding": "adaround",
          "adaround_iters": 10}],
        {name: {"weight": 2} for name in _WEIGHTED},
    ),
)


def equalize_model(model: nn.Module, layers: Mapping[str, Any]) -> EqualizeResult | None:
    """Cross-layer equalization of the pairs whose two layers both have ``equalize: true``
    and a quantized weight; None when no layer asks for it."""
    allowed = {
        name for name, layer in layers.items()
        if layer.options.get("equalize") and "weight" in layer.quant_types
    }
    return equalize(model, allowed) if allowed else None


def _needs_fit(layer: Any) -> bool:
    options = layer.options
    return "weight" in layer.quant_types and (
        options.get("rounding", "nearest") != "nearest" or bool(options.get("bias_correction"))
    )


class _Reached(Exception):
    """Stops a replayed forward once the layer being fitted has seen its input."""


class Recording:
    """Input samples of the layers that fit something, recorded while calibrating.

    ``start`` hooks every such wrapper (its forward pre-hook sees the layer's float input)
    and, where a layer fits on the quantized model's inputs, the model itself (to keep the
    calibration batches); ``finish`` removes the hooks and fits each layer in the order the
    forward reached them, returning what it did, by layer name.
    """

    def __init__(self, model: nn.Module, wrappers: Mapping[str, Any],
                 layers: Mapping[str, Any]) -> None:
        self.model = model
        self.layers = layers
        self.inputs: dict[str, LayerInputs] = {}
        self.wrappers: dict[str, Any] = {}
        self.seeds: dict[str, int] = {}
        for index, (name, wrapper) in enumerate(wrappers.items()):
            layer = layers.get(name)
            if layer is None or not _needs_fit(layer) or wrapper.weight_quant is None:
                continue
            if not fits_layer(wrapper.module):
                continue  # other layer types keep nearest rounding and their bias
            self.inputs[name] = LayerInputs(wrapper.module, seed=index)
            self.wrappers[name] = wrapper
            self.seeds[name] = index
        self.replays = any(
            layers[name].options.get("fit_inputs") == "quantized" for name in self.wrappers
        )
        #: Calls per layer, in the order the forward first reached each.
        self.calls: dict[str, int] = {}
        self.batches: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._handles: list[Any] = []

    def start(self) -> None:
        for name, wrapper in self.wrappers.items():
            self._handles.append(wrapper.register_forward_pre_hook(
                lambda _m, args, name=name: self._record(name, args[0])
            ))
        if self.replays:
            self._handles.append(self.model.register_forward_pre_hook(
                lambda _m, args, kwargs: self.batches.append((args, dict(kwargs))),
                with_kwargs=True,
            ))

    def _record(self, name: str, x: Any) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.inputs[name].add(x)

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def quantized_inputs(self, name: str) -> LayerInputs:
        """The layer's input rows as the quantized model (as fitted so far) computes them on
        the calibration batches: sampled at the positions of its float rows, after its own
        input quantizer."""
        wrapper = self.wrappers[name]
        inputs = LayerInputs(wrapper.module, seed=self.seeds[name])
        once = self.calls[name] == len(self.batches)  # then the rest of each forward is moot

        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            inputs.add(x if wrapper.input_quant is None else wrapper.input_quant(x, True))
            if once:
                raise _Reached

        handle = wrapper.register_forward_pre_hook(record)
        try:
            with eval_mode(self.model):
                for args, kwargs in self.batches:
                    with contextlib.suppress(_Reached):
                        self.model(*args, **kwargs)
        finally:
            handle.remove()
        expected = self.inputs[name].keys
        if inputs.keys is None or expected is None or not torch.equal(inputs.keys, expected):
            raise RuntimeError(
                f"layer {name!r} saw inputs of other shapes when the calibration batches ran "
                "again through the quantized model; fit_inputs: quantized needs a forward "
                "that calls each layer alike for the same batches"
            )
        return inputs

    def finish(self) -> dict[str, FitRecord]:
        """Fit every recorded layer in forward order (in eval mode, without autograd)."""
        records: dict[str, FitRecord] = {}
        for name in list(self.calls):  # a layer no batch reached has nothing to fit on
            wrapper, options = self.wrappers[name], self.layers[name].options
            quantized = (
                self.quantized_inputs(name) if options["fit_inputs"] == "quantized" else None
            )
            quant = wrapper.weight_quant
            training = quant.training
            quant.train(False)  # a training forward would drop the fitted rounding
            try:
                records[name] = fit_layer(
                    wrapper, self.inputs[name], rounding=options["rounding"],
                    iters=int(options["adaround_iters"]), damp=float(options["gptq_damp"]),
                    bias_correction=bool(options["bias_correction"]), seed=self.seeds[name],
                    quantized=quantized,
                )
            finally:
                quant.train(training)
            self.inputs[name] = LayerInputs(wrapper.module, seed=self.seeds[name])  # free rows
        self.batches.clear()
        return records


def recording_needed(layers: Mapping[str, Any]) -> bool:
    """Whether any layer fits a rounding or a bias at the end of a calibration."""
    return any(_needs_fit(layer) for layer in layers.values())

