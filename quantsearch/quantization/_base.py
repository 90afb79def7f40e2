"""The quantizer base class: config_list -> wrapped layers, step counting, export.

The export methods call the modules that own each format (``_pack``, ``_onnx``); those import
nothing from here, so the import graph has no cycle.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._config import AlgorithmRules, ConfigError, LayerConfig, select_layers, validate_config_list
from ._onnx import export_onnx
from ._pack import save_packed
from ._tensor_quant import TensorQuant
from ._wrapper import QuantWrapper, eval_mode, keep_transformers_on_slow_path, wrappers_of

__all__ = [
    "Example",
    "Quantizer",
    "find_conv_bn_pairs",
    "real_state_dict",
]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_conv_bn_pairs(model: nn.Module, dummy_input: Any) -> dict[str, str]:
    """Conv name -> BatchNorm name, for each BatchNorm whose input is exactly a conv's output.

    Only modules whose type is exactly ``nn.BatchNorm1d/2d/3d`` are paired: subclasses (timm's
    ``BatchNormAct2d``, which also applies an activation) stay separate layers. Found by
    running ``dummy_input`` through the model in eval mode with forward hooks (nothing in the
    model changes); the channel counts must agree.
    """
    # Outputs stay referenced during the trace, so no later tensor can reuse their id().
    produced: dict[int, tuple[str, Tensor]] = {}
    pairs: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())

    def after_conv(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        produced[id(output)] = (names[id(module)], output)

    def before_bn(module: nn.Module, inputs: tuple) -> None:
        entry = produced.get(id(inputs[0])) if inputs else None
        if entry is None or entry[1] is not inputs[0]:
            return
        conv_name = entry[0]
        if modules[conv_name].out_channels == module.num_features:
            pairs[conv_name] = names[id(module)]

    handles = []
    for module in model.modules():
        if isinstance(module, _CONVS):
            handles.append(module.register_forward_hook(after_conv))
        elif type(module) in _BATCH_NORMS:
            # Exactly a torch BatchNorm: a subclass (timm's BatchNormAct2d) may do more than
            # normalise, and folding would drop that.
            handles.append(module.register_forward_pre_hook(before_bn))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(dummy_input, Mapping):
                model(**dummy_input)
            elif isinstance(dummy_input, tuple):
                model(*dummy_input)
            else:
                model(dummy_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return pairs


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def real_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the original architecture: wrappers removed, BatchNorm unfolded.

    Loads strictly into a fresh instance of the model; quantizer state (scales, statistics,
    step counts) is left out.
    """
    wrapper_paths = {
        path: m for path, m in model.named_modules() if isinstance(m, QuantWrapper)
    }
    state: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        new_key: str | None = key
        # Innermost wrapper first: a key belongs to the longest wrapper path that prefixes it.
        for path in sorted(wrapper_paths, key=len, reverse=True):
            if not key.startswith(path + "."):
                continue
            rest = key[len(path) + 1 :]
            wrapper = wrapper_paths[path]
            if rest.startswith("module."):
                new_key = f"{path}.{rest[len('module.'):]}"
            elif rest.startswith("bn.") and wrapper.bn_name is not None:
                new_key = f"{wrapper.bn_name}.{rest[len('bn.'):]}"
            else:
                new_key = None
            break
        if new_key is not None:
            state[new_key] = tensor.detach().clone()
    return state


@dataclass(frozen=True)
class Example:
    """A config_list an algorithm declares for the conformance suite.

    It applies to :class:`quantsearch.quantization.testing.ConformanceNet` (conv1, bn1, relu1,
    conv2, relu2, flatten, fc); ``bits`` is what the suite must find quantized, per layer and
    quant type (``{"conv1": {"weight": 4}}``).
    """

    id: str
    config_list: Sequence[Mapping[str, Any]]
    bits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


class Quantizer:
    """Base of the NNI-style quantizers: ``Quantizer(model, config_list, optimizer, dummy_input)``.

    The config_list is validated on construction (:class:`ConfigError`); :meth:`compress` wraps
    the selected layers in place and returns the model. Steps are counted by a post-step hook on
    ``optimizer`` when one is given, or by calling :meth:`step` yourself; the count lives in the
    model's state dict, so it survives a save and load. :meth:`calibrate` feeds data to the
    activation observers without training.

    A subclass declares ``rules`` (what its config_list accepts), ``_make_quants`` and
    ``examples`` (its conformance cases; registering a class without them is an error).
    """

    rules: ClassVar[AlgorithmRules]
    #: Algorithms whose weights are quantized after BatchNorm folding.
    folds_batch_norm: ClassVar[bool] = False
    #: The config_lists the conformance suite runs for this algorithm (declare your own).
    examples: ClassVar[tuple[Example, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping[str, Any]],
        optimizer: torch.optim.Optimizer | None = None,
        dummy_input: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.bound_model = model
        self.config_list = copy.deepcopy(list(config_list)) if isinstance(
            config_list, Sequence
        ) else config_list
        self.optimizer = optimizer
        self.dummy_input = dummy_input
        entries = validate_config_list(self.config_list, self.rules)
        self.layers: dict[str, LayerConfig] = select_layers(model, entries, self.rules)
        self._compressed = False
        self._calibrating = False
        self._wrapper_list: list[QuantWrapper] = []
        self._hook_handle: Any = None

    # -- construction -------------------------------------------------------------------
    def _make_quants(
        self, layer: LayerConfig, module: nn.Module
    ) -> dict[str, TensorQuant]:
        """The tensor quantizers of one layer, by quant type."""
        raise NotImplementedError

    def compress(self) -> nn.Module:
        """Wrap every selected layer; idempotent. Returns the (same) model."""
        if self._compressed:
            return self.bound_model
        model = self.bound_model
        modules = dict(model.named_modules())
        pairs: dict[str, str] = {}
        if self.folds_batch_norm and self.dummy_input is not None:
            pairs = {
                conv: bn
                for conv, bn in find_conv_bn_pairs(model, self.dummy_input).items()
                if conv in self.layers and "weight" in self.layers[conv].quant_types
            }
        new_params: list[nn.Parameter] = []
        # A MultiheadAttention computes its out_proj itself: that weight's quantizer goes into
        # the attention's wrapper (which exists even when only out_proj is selected).
        out_projections = {
            f"{name}.out_proj" if name else "out_proj": name
            for name, module in modules.items()
            if isinstance(module, nn.MultiheadAttention)
        }
        out_proj_quants: dict[str, TensorQuant] = {}
        for out_name, attention in out_projections.items():
            if out_name in self.layers:
                quant = self._make_quants(self.layers[out_name], modules[out_name])["weight"]
                out_proj_quants[attention] = quant
                new_params.extend(quant.parameters())
        to_wrap = [n for n in self.layers if n not in out_projections]
        to_wrap += [n for n in out_proj_quants if n not in self.layers]
        # Deepest layers first, so a wrapped child keeps its path while its parent is wrapped.
        for name in sorted(to_wrap, key=lambda n: n.count("."), reverse=True):
            layer = self.layers.get(name)
            module = modules[name]
            quants = self._make_quants(layer, module) if layer is not None else {}
            bn_name = pairs.get(name)
            wrapper = QuantWrapper(
                module,
                name=name,
                weight_quant=quants.get("weight"),
                input_quant=quants.get("input"),
                output_quant=quants.get("output"),
                out_proj_quant=out_proj_quants.get(name),
                quant_start_step=int(layer.options.get("quant_start_step", 0)) if layer else 0,
                bn=modules[bn_name] if bn_name else None,
                bn_name=bn_name,
            )
            device = next(module.parameters(), torch.empty(0)).device
            wrapper.to(device)
            _set_module(model, name, wrapper)
            if bn_name:
                _set_module(model, bn_name, nn.Identity())
            for quant in quants.values():
                new_params.extend(quant.parameters())
        if self.optimizer is not None:
            known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            fresh = [p for p in new_params if id(p) not in known]
            if fresh:
                self.optimizer.add_param_group({"params": fresh})
            self._hook_handle = self.optimizer.register_step_post_hook(
                lambda *_args, **_kwargs: self.step()
            )
        self._wrapper_list = list(wrappers_of(model).values())
        keep_transformers_on_slow_path(model, set(to_wrap))
        self._compressed = True
        return model

    # -- training -----------------------------------------------------------------------
    def _wrappers(self) -> dict[str, QuantWrapper]:
        if not self._compressed:
            raise RuntimeError("call compress() first")
        return wrappers_of(self.bound_model)

    def step(self) -> None:
        """Count one optimizer step (called for you after ``optimizer.step()`` when an
        optimizer was given to the constructor)."""
        if not self._compressed:
            raise RuntimeError("call compress() first")
        for wrapper in self._wrapper_list:  # kept from compress(): this runs every step
            wrapper.advance()
        self._after_step()

    def _after_step(self) -> None:
        """Per-algorithm work after each optimizer step."""

    @contextlib.contextmanager
    def calibrate(self) -> Iterator[nn.Module]:
        """Run calibration batches through the compressed model: ``with q.calibrate(): model(x)``.

        Inside the block every module is in eval mode (BatchNorm normalises with its running
        statistics and never updates them, dropout is off), autograd is off, and each quantized
        layer computes the float layer while its activation quantizers observe their inputs or
        outputs (QAT: the moving average of min/max; LSQ: the initial step size, if not yet set;
        PTQ: its observer). Nothing is quantized inside, so observers see float activations.
        On leaving, the observers settle their ranges and every module gets back the training
        flag it had; steps are not counted. Yields the model.
        """
        model = self._compressed_model()
        if self._calibrating:
            raise RuntimeError("calibrate() is already active for this quantizer")
        with eval_mode(model):
            self._calibrating = True
            try:
                for wrapper in self._wrapper_list:
                    wrapper.set_calibrating(True)
                with torch.no_grad():
                    yield model
            finally:
                for wrapper in self._wrapper_list:
                    wrapper.set_calibrating(False)
                self._calibrating = False
        with torch.no_grad():
            for wrapper in self._wrapper_list:
                for quant in (wrapper.weight_quant, wrapper.input_quant, wrapper.output_quant):
                    if quant is not None:
                        quant.end_calibration()

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far."""
        wrappers = self._wrappers()
        return next(iter(wrappers.values()))._steps if wrappers else 0

    # -- inspection and export ------------------------------------------------------------
    def layer_bits(self) -> dict[str, dict[str, int]]:
        """Bits per quantized layer and quant type, e.g. ``{"conv1": {"weight": 8}}``."""
        return {name: dict(layer.bits) for name, layer in self.layers.items()}

    def folded_batch_norms(self) -> dict[str, str]:
        """Conv name -> the name of the BatchNorm folded into it."""
        return {name: w.bn_name for name, w in self._wrappers().items() if w.bn_name is not None}

    def calibration_config(self) -> dict[str, dict[str, Any]]:
        """Per-layer calibration with NNI's keys (``weight_bits``, ``tracked_min_output``...)."""
        config: dict[str, dict[str, Any]] = {}
        for name, wrapper in self._wrappers().items():
            entry: dict[str, Any] = {}
            for role in ("weight", "input", "output"):
                quant = getattr(wrapper, f"{role}_quant")
                if quant is not None:
                    entry.update(quant.calibration(role))
            if wrapper.bn_name is not None:
                entry["folded_batch_norm"] = wrapper.bn_name
            if entry:
                config[name] = entry
            if wrapper.out_proj_quant is not None:
                config[f"{name}.out_proj"] = wrapper.out_proj_quant.calibration("weight")
        return config

    def export_model(
        self,
        model_path: str | Path,
        calibration_path: str | Path | None = None,
        onnx_path: str | Path | None = None,
        input_shape: Sequence[int] | None = None,
        device: str | torch.device | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Save the real state dict (unwrapped, BatchNorm unfolded: it loads strictly into a
        fresh model) and, if asked, the calibration as JSON. Can be called any number of times;
        returns the calibration dict.

        NNI's signature: with ``onnx_path`` the model is also written as an ONNX QDQ model
        (:func:`export_onnx`; NNI wrote the float model), traced on a random batch of
        ``input_shape`` placed on ``device`` (default: the model's device), or on the
        quantizer's ``dummy_input`` when no shape is given.
        """
        model = self._compressed_model()
        dummy = None
        if onnx_path is not None:  # checked first, so nothing is written for a bad call
            dummy = self._onnx_input(input_shape, device)
        torch.save(real_state_dict(model), model_path)
        calibration = self.calibration_config()
        if calibration_path is not None:
            Path(calibration_path).write_text(json.dumps(calibration, indent=2) + "\n")
        if onnx_path is not None:
            export_onnx(model, onnx_path, dummy)
        return calibration

    def _onnx_input(
        self, input_shape: Sequence[int] | None, device: str | torch.device | None
    ) -> Any:
        if input_shape is not None:
            if device is None:
                device = next(self.bound_model.parameters(), torch.empty(0)).device
            return torch.randn(*input_shape, device=device)
        if self.dummy_input is None:
            raise ConfigError(
                "export_model(onnx_path=...) needs input_shape, or a dummy_input given to the "
                "quantizer, to trace the model"
            )
        return self.dummy_input

    def export_packed(self, path: str | Path) -> int:
        """Write the deployed model with integer weights packed at their bit width; returns the
        file's size in bytes. :func:`load_packed` reads it back."""
        return save_packed(self._compressed_model(), path)

    def _compressed_model(self) -> nn.Module:
        if not self._compressed:
            raise RuntimeError("call compress() first")
        return self.bound_model
