"""The module that stands in a model where a layer is quantized, and finding them in a model."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._math import to_float32
from ._tensor_quant import EmaActivationQuant, LsqQuant, TensorQuant

__all__ = [
    "QuantWrapper",
    "eval_mode",
    "keep_transformers_on_slow_path",
    "unwrapped_float_state",
    "wrappers_of",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _clamp_range(module: nn.Module) -> tuple[float, float] | None:
    """(low, high) of a ReLU, ReLU6 or Hardtanh that is a plain clamp to a range holding 0."""
    if getattr(module, "inplace", False):
        return None  # it also overwrites its input, which someone may read
    if type(module) is nn.ReLU:
        return 0.0, math.inf
    if type(module) in (nn.ReLU6, nn.Hardtanh):
        low, high = to_float32(module.min_val), to_float32(module.max_val)
        return (low, high) if low <= 0.0 <= high else None
    return None


class QuantWrapper(nn.Module):
    """Wraps one layer: quantizes its input, its weight (after BatchNorm folding) and its output.

    The original layer stays in ``self.module`` with its own parameters, so training updates
    the float ("latent") weights and the optimizer built on the original model keeps working.
    Before ``quant_start_step`` optimizer steps the training forward passes tensors through
    unquantized (statistics still update); eval mode always quantizes, so an evaluated accuracy
    is always the quantized model's.

    A ``nn.MultiheadAttention`` is wrapped whole: ``weight_quant`` quantizes its packed
    ``in_proj_weight``, ``out_proj_quant`` its ``out_proj.weight`` (torch computes the
    projection inside the attention, never calling out_proj), the input quantizer its query,
    key and value, the output quantizer the attention output.

    Attributes the wrapper lacks are read from the wrapped layer (``in_features``,
    ``batch_first``...), so code around it keeps working; reading a quantized parameter that
    way is an error rather than a silent float tensor.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str,
        weight_quant: TensorQuant | None = None,
        input_quant: TensorQuant | None = None,
        output_quant: TensorQuant | None = None,
        out_proj_quant: TensorQuant | None = None,
        quant_start_step: int = 0,
        bn: nn.Module | None = None,
        bn_name: str | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.name = name
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.output_quant = output_quant
        self.out_proj_quant = out_proj_quant
        self.bn = bn
        self.bn_name = bn_name
        self.quant_start_step = quant_start_step
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._steps = 0
        self._calibrating = False
        for role, quant in (("weight", weight_quant), ("input", input_quant),
                            ("output", output_quant)):
            if quant is not None:
                quant.owner = f"{name} ({role})"
        weight_key = "weight"
        if isinstance(module, nn.MultiheadAttention):
            self._kind = "attention"
            weight_key = "in_proj_weight"
        elif isinstance(module, _CONV):
            self._kind = "conv"
        elif isinstance(module, nn.Linear):
            self._kind = "linear"
        else:
            self._kind = "generic"
        if out_proj_quant is not None and self._kind != "attention":
            raise ValueError(f"{name}: out_proj_quant needs a MultiheadAttention")
        # Parameter key in the layer's state dict -> the quantizer of that parameter.
        self._param_quants: dict[str, TensorQuant] = {}
        if weight_quant is not None:
            self._param_quants[weight_key] = weight_quant
        if out_proj_quant is not None:
            out_proj_quant.owner = f"{name}.out_proj (weight)"
            self._param_quants["out_proj.weight"] = out_proj_quant
        if bn is not None and self._kind != "conv":
            raise ValueError(f"{name}: BatchNorm folding needs a Conv1d/2d/3d layer")
        # An activation whose quantized output can absorb it (forward_clamped): its range.
        self._clamp = (
            _clamp_range(module)
            if (
                (isinstance(output_quant, EmaActivationQuant) and not output_quant.per_channel)
                or isinstance(output_quant, LsqQuant)
            )
            and input_quant is None
            and weight_quant is None
            else None
        )

    def extra_repr(self) -> str:
        parts = [
            f"{role}={quant.bits}b"
            for role, quant in (
                ("input", self.input_quant),
                ("weight", self.weight_quant),
                ("output", self.output_quant),
                ("out_proj", self.out_proj_quant),
            )
            if quant is not None
        ]
        if self.bn is not None:
            parts.append(f"folded={self.bn_name}")
        return ", ".join(parts)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("__"):
                raise
        if name in self.__dict__.get("_param_quants", {}):
            raise AttributeError(
                f"QuantWrapper {self.__dict__.get('name')!r}: {name!r} is quantized inside the "
                f"wrapper; read .module.{name} for the float tensor or .quantized_params() for "
                "the quantized one"
            )
        return getattr(module, name)

    def param_quants(self) -> dict[str, TensorQuant]:
        """Key in the wrapped layer's state dict -> the quantizer of that parameter."""
        return dict(self._param_quants)

    @torch.no_grad()
    def quantized_params(self) -> dict[str, Tensor]:
        """Every quantized parameter as the layer uses it (folded, fake-quantized), by key in
        the wrapped layer's state dict."""
        if self._kind != "attention":
            return {"weight": self.quantized_weight()} if self.weight_quant is not None else {}
        module = self.module
        return {
            key: quant(module.get_parameter(key).detach(), True)
            for key, quant in self._param_quants.items()
        }

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.steps.fill_(self._steps)  # the count lives in Python; the buffer carries it
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.__dict__["_steps"] = int(self.steps)

    def advance(self) -> None:
        """Count one optimizer step."""
        # Straight into __dict__: nn.Module.__setattr__ costs microseconds per layer and step.
        self.__dict__["_steps"] = self._steps + 1

    def _folded(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the layer computes with: BatchNorm folded in when paired.

        w_fold = w * gamma / sqrt(var + eps) per output channel,
        b_fold = beta + (b - mean) * gamma / sqrt(var + eps), from the running statistics.
        """
        weight, bias = self.module.weight, getattr(self.module, "bias", None)
        bn = self.bn
        if bn is None:
            return weight, bias
        factor = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            factor = bn.weight * factor
        shift = -bn.running_mean if bias is None else bias - bn.running_mean
        folded_bias = shift * factor
        if bn.bias is not None:
            folded_bias = folded_bias + bn.bias
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return weight * factor.reshape(shape), folded_bias

    def _weighted(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, args: tuple, kwargs: dict
    ) -> Tensor:
        if self._kind == "conv":
            return self.module._conv_forward(x, weight, bias)
        if self._kind == "linear":
            return F.linear(x, weight, bias)
        return torch.func.functional_call(self.module, {"weight": weight}, (x, *args), kwargs)

    def set_calibrating(self, calibrating: bool) -> None:
        """Switch the calibration forward on or off (see ``Quantizer.calibrate``)."""
        self.__dict__["_calibrating"] = calibrating

    def _calibration_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The float layer (BatchNorm folded with its running statistics), every quantizer
        observing its tensor and quantizing nothing."""
        if self._kind == "attention":
            return self._attention_forward((x, *args), kwargs, None)
        if self.input_quant is not None:
            self.input_quant.observe(x)
        if self.weight_quant is None:
            out = self.module(x, *args, **kwargs)
        else:
            weight, bias = self._folded()
            out = self._weighted(x, weight, bias, args, kwargs)
        if self.output_quant is not None:
            self.output_quant.observe(out)
        return out

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._calibrating:
            return self._calibration_forward(x, *args, **kwargs)
        active = not self.training or self._steps >= self.quant_start_step
        if self._kind == "attention":
            return self._attention_forward((x, *args), kwargs, active)
        module = self.module
        if self._clamp is not None and not (module._forward_hooks or module._forward_pre_hooks):
            return self.output_quant.forward_clamped(x, *self._clamp, active)  # type: ignore[union-attr]
        if self.input_quant is not None:
            x = self.input_quant(x, active)
        if self.weight_quant is None:
            out = self.module(x, *args, **kwargs)
        elif self.bn is not None and self.training:
            out = self._folded_training_forward(x, active)
        else:
            weight, bias = self._folded()
            out = self._weighted(x, self.weight_quant(weight, active), bias, args, kwargs)
        if self.output_quant is not None:
            out = self.output_quant(out, active)
        return out

    def _folded_training_forward(self, x: Tensor, active: bool) -> Tensor:
        """Training with BatchNorm folded in, in one convolution.

        The weight is quantized folded, q(w * f) with f = gamma / sigma_running, then divided by
        f again per output channel: the conv computes the float conv's scale, and BatchNorm
        normalises with the batch statistics and updates its running averages, as in float
        training. (Dividing the tiny weight instead of the conv's output is the same linear map,
        and far cheaper.) f is a constant here: BatchNorm normalises it away, so gamma learns
        through BatchNorm alone. Eval mode uses the folded weight and bias directly.

        A channel whose f vanishes (gamma = 0) convolves with its float weight instead: the
        BatchNorm output is beta either way, every value stays finite, and the folded eval weight
        of that channel is exactly 0.
        """
        bn = self.bn
        assert bn is not None
        weight = self.module.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        with torch.no_grad():
            factor = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                factor.mul_(bn.weight)
            factor = factor.reshape(shape)
            inverse = torch.reciprocal(factor)
            # f = 0 (gamma = 0 in zero-initialised residual blocks) or tiny: 1/f is inf and
            # q(0) * inf NaN. On the CPU the check is cheap, and most steps skip the fix-up.
            vanishing = torch.isinf(inverse)
            fix = x.device.type != "cpu" or bool(vanishing.any())
            if fix:
                inverse.masked_fill_(vanishing, 0.0)
        quantized = self.weight_quant(weight * factor, active) * inverse
        if fix:
            # Those channels run the float weight: BatchNorm multiplies them by ~0 anyway, and
            # gamma still gets its gradient through a meaningful conv output.
            quantized = torch.where(vanishing, weight, quantized)
        return bn(self.module._conv_forward(x, quantized, self.module.bias))

    def _attention_forward(self, args: tuple, kwargs: dict, active: bool | None) -> Any:
        """MultiheadAttention with quantized inputs and projection weights; ``active`` None is
        the calibration forward (observe, compute in float)."""
        calibrating = active is None
        if self.input_quant is not None:
            # Query, key and value (the same tensor in self-attention, quantized once).
            done: dict[int, Tensor] = {}
            tensors = list(args)
            for i, value in enumerate(tensors[:3]):
                if isinstance(value, Tensor):
                    if id(value) not in done:
                        if calibrating:
                            self.input_quant.observe(value)
                            done[id(value)] = value
                        else:
                            done[id(value)] = self.input_quant(value, active)
                    tensors[i] = done[id(value)]
            args = tuple(tensors)
        module = self.module
        if calibrating:
            out = module(*args, **kwargs)
        else:
            weights = {
                key: quant(module.get_parameter(key), active)
                for key, quant in self._param_quants.items()
            }
            # The attention reads its parameters by attribute, also on torch's fast path.
            out = torch.func.functional_call(module, weights, args, kwargs)
        if self.output_quant is not None:
            if calibrating:
                self.output_quant.observe(out[0])
            else:
                out = (self.output_quant(out[0], active), *out[1:])
        return out

    @torch.no_grad()
    def quantized_weight(self) -> Tensor:
        """The weight as the quantized layer uses it (folded, fake-quantized), without updates."""
        if self.weight_quant is None:
            raise ValueError(f"{self.name}: its weight is not quantized")
        if self._kind == "attention":
            return self.weight_quant(self.module.in_proj_weight.detach(), True)
        weight, _ = self._folded()
        return self.weight_quant(weight.detach(), True)

    @torch.no_grad()
    def deployed_bias(self) -> Tensor | None:
        """The bias a deployed model stores (the folded one when BatchNorm was folded in)."""
        return self._folded()[1] if self.weight_quant is not None else None

    def storage_bytes(self) -> int:
        """Bytes this layer needs deployed: quantized weight codes at their bits, every other
        float tensor at 32 bits, plus scales and zero points. A folded BatchNorm costs only the
        bias it folds into."""
        total = 0
        quants = self._param_quants
        for key, tensor in self.module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if key in quants:
                total += math.ceil(tensor.numel() * quants[key].bits / 8)
            else:
                total += 4 * tensor.numel()
        if self.bn is not None and getattr(self.module, "bias", None) is None:
            total += 4 * self.bn.num_features
        for quant in (*quants.values(), self.input_quant, self.output_quant):
            if quant is not None:
                total += quant.param_bytes()
        return total


def _slow_path(_module: nn.Module, _args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence keeps torch's fast path off."""


def keep_transformers_on_slow_path(model: nn.Module, quantized: set[str]) -> None:
    """Make every ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` holding one of the
    ``quantized`` modules (names) run its submodules' forwards.

    Under no_grad in eval mode torch's fused fast path reads the float parameters directly and
    skips every submodule's forward (so every quantizer); it is not taken for a layer with a
    forward hook, nor for an encoder whose ``use_nested_tensor`` is off.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if not any(q.startswith(prefix) for q in quantized):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            if _slow_path not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_slow_path)
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def wrappers_of(model: nn.Module) -> dict[str, QuantWrapper]:
    """Every quantized layer of a model, by its original qualified name."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantWrapper)}


def unwrapped_float_state(model: nn.Module) -> dict[str, Tensor]:
    """The floating-point state tensors that no quantized layer owns, by state-dict key."""
    prefixes = tuple(
        f"{path}." for path, m in model.named_modules() if isinstance(m, QuantWrapper)
    )
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes) or not tensor.is_floating_point() or id(tensor) in seen:
            continue
        seen.add(id(tensor))  # tied weights are stored once
        state[key] = tensor
    return state


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; every submodule gets back its own training flag afterwards (a
    quantizer's observers and step counters must not stay frozen)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
