"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction"), on the float model.

A pair is two Conv1d/Conv2d/Linear layers where the first one's output reaches only the second
one's input, through at most a BatchNorm (of the first, folded in the arithmetic) and
activations ``f`` with ``f(x / s) = f(x) / s`` for s > 0: ReLU, LeakyReLU, Identity, Dropout, or
nothing. Scaling the first layer's output channel i by 1/s_i and the second one's input channel
i by s_i leaves the model's function unchanged; the paper's choice
``s_i = sqrt(r1_i / r2_i)`` (r1: range of the first weight's output channel, r2: of the second
weight's input channel; section 4.1, eq. 9, s_i = (1/r2_i) sqrt(r1_i r2_i)) makes both ranges
``sqrt(r1_i r2_i)``. Pairs are equalized again until the scales settle (chains share layers).

ReLU6 and Hardtanh clip at a fixed value, so ``f(x / s) != f(x) / s``: a pair through them is
left alone (the paper replaces ReLU6 with ReLU first, which changes the float model).

High-bias absorption (section 4.2): where the first layer has a BatchNorm, its output channel i
is ~N(beta_i, gamma_i^2); ``c_i = max(0, beta_i - 3 |gamma_i|)`` is moved from beta into the
second layer's bias (``b2 += W2 c``). That is exact when the activation's input stays above c
and the second layer does not pad (a zero-padded border would see 0, not c), so only pairs whose
second layer is a Linear or a conv without padding absorb.

Pairs are found with ``torch.fx.symbolic_trace``; a model it cannot trace raises
:class:`~._config.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import ConfigError

__all__ = ["EqualizePair", "EqualizeResult", "equalization_pairs", "equalize"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# f(x / s) = f(x) / s for every s > 0: positively homogeneous activations, and identities.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.dropout)
_HOMOGENEOUS_METHODS = ("relu", "relu_")
_RELU_LIKE = (nn.ReLU, nn.LeakyReLU, F.relu, torch.relu, F.leaky_relu, "relu", "relu_")
_SWEEPS = 20  # equalizing a chain again until its scales settle
_TOLERANCE = 1e-4  # ... to within this much of 1


@dataclass
class EqualizePair:
    """Two layers equalized through what lies between them."""

    first: str
    second: str
    bn: str | None
    relu: bool  # a ReLU-like activation in between (absorption keeps what it clips)
    absorbed: Tensor | None = None  # c, moved from the first layer's BatchNorm


@dataclass
class EqualizeResult:
    """The pairs found and equalized, and the sweeps it took."""

    pairs: list[EqualizePair] = field(default_factory=list)
    sweeps: int = 0


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:
        raise ConfigError(
            f"'equalize': true needs the pairs of consecutive layers, found with "
            f"torch.fx.symbolic_trace, which failed on {type(model).__name__}: {error}"
        ) from error


def _homogeneous(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[str(node.target)]) in _HOMOGENEOUS_MODULES
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def _relu_like(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    target = type(modules[str(node.target)]) if node.op == "call_module" else node.target
    return target in _RELU_LIKE


def _channels_match(first: nn.Module, second: nn.Module) -> bool:
    out = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    conv = isinstance(first, (nn.Conv1d, nn.Conv2d))
    if conv != isinstance(second, (nn.Conv1d, nn.Conv2d)) or type(first) is not type(second):
        return False
    return out == (second.in_features if isinstance(second, nn.Linear) else second.in_channels)


def equalization_pairs(model: nn.Module) -> list[EqualizePair]:
    """Every pair of consecutive layers of ``model`` that equalization may rescale."""
    graph = _trace(model)
    modules = dict(model.named_modules())
    pairs: list[EqualizePair] = []
    for node in graph.graph.nodes:
        if node.op != "call_module" or type(modules[str(node.target)]) not in _LAYERS:
            continue
        current, bn, relu = node, None, False
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user.args[:1] != (current,) or any(
                arg is current for arg in (*user.args[1:], *user.kwargs.values())
            ):
                break  # it must read the tensor as its one input
            if user.op == "call_module" and type(modules[str(user.target)]) in _LAYERS:
                first, second = modules[str(node.target)], modules[str(user.target)]
                if _channels_match(first, second):
                    pairs.append(EqualizePair(str(node.target), str(user.target), bn, relu))
                break
            if (
                bn is None and current is node and user.op == "call_module"
                and type(modules[str(user.target)]) in _BATCH_NORMS
            ):
                norm = modules[str(user.target)]
                if norm.weight is None or norm.running_var is None:
                    break
                bn = str(user.target)
            elif _homogeneous(user, modules):
                relu = relu or _relu_like(user, modules)
            else:
                break
            current = user
    return pairs


def _bn_factor(bn: nn.Module | None, channels: int) -> Tensor:
    if bn is None:
        return torch.ones(channels)
    return (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach()


def _output_ranges(layer: nn.Module, bn: nn.Module | None) -> Tensor:
    """max |W| per output channel of the layer as it computes (BatchNorm folded)."""
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).abs().amax(1)
    return weight * _bn_factor(bn, weight.shape[0]).abs()


def _input_view(layer: nn.Module) -> tuple[Tensor, int]:
    """The weight as (groups, out per group, in per group, kernel) and its group count."""
    weight = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    out = weight.shape[0]
    return weight.reshape(groups, out // groups, weight.shape[1], -1), groups


def _input_ranges(layer: nn.Module, bn: nn.Module | None) -> Tensor:
    """max |W| per input channel (over outputs and kernel), BatchNorm after it folded in."""
    view, groups = _input_view(layer)
    factor = _bn_factor(bn, layer.weight.shape[0]).abs().reshape(groups, -1, 1, 1)
    return (view.abs() * factor).amax(dim=(1, 3)).reshape(-1)


@torch.no_grad()
def _rescale(first: nn.Module, bn: nn.Module | None, second: nn.Module, s: Tensor) -> None:
    """First layer's output channel i times 1/s_i, second layer's input channel i times s_i."""
    if bn is not None:
        bn.weight.div_(s)
        bn.bias.div_(s)
    else:
        first.weight.div_(s.reshape((-1,) + (1,) * (first.weight.dim() - 1)))
        if first.bias is not None:
            first.bias.div_(s)
    view, groups = _input_view(second)
    view.mul_(s.reshape(groups, 1, -1, 1))
    second.weight.copy_(view.reshape(second.weight.shape))


def _following_bn(model: nn.Module, graph: torch.fx.GraphModule, name: str) -> str | None:
    for node in graph.graph.nodes:
        if node.op == "call_module" and node.target == name and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and type(model.get_submodule(str(user.target))) in (
                _BATCH_NORMS
            ):
                return str(user.target)
    return None


@torch.no_grad()
def _absorb(pair: EqualizePair, model: nn.Module, second_bn: str | None) -> None:
    """Move c = max(0, beta - 3|gamma|) from the first layer's BatchNorm into the second."""
    if pair.bn is None:
        return
    bn, second = model.get_submodule(pair.bn), model.get_submodule(pair.second)
    if isinstance(second, (nn.Conv1d, nn.Conv2d)) and any(
        p != 0 for p in second._reversed_padding_repeated_twice
    ):
        return  # its zero padding would see 0 where the input now lacks c
    norm = model.get_submodule(second_bn) if second_bn else None
    if getattr(second, "bias", None) is None and (norm is None or norm.bias is None):
        return  # nowhere to put W2 c
    c = torch.clamp(bn.bias - 3 * bn.weight.abs(), min=0.0) if pair.relu else bn.bias.clone()
    if not bool((c != 0).any()):
        return
    view, groups = _input_view(second)
    moved = (view.sum(3) * c.reshape(groups, 1, -1)).sum(2).reshape(-1)  # W2 c per output
    bn.bias.sub_(c)
    if getattr(second, "bias", None) is not None:
        second.bias.add_(moved)
    else:
        assert norm is not None
        norm.bias.add_(moved * _bn_factor(norm, moved.shape[0]))
    pair.absorbed = c


def equalize(model: nn.Module, allowed: set[str] | None = None) -> EqualizeResult:
    """Equalize every pair of ``model`` (both layers in ``allowed``, when given) in place,
    then absorb high biases; the float model computes the same function (see the module)."""
    graph = _trace(model)
    pairs = [
        p for p in equalization_pairs(model)
        if allowed is None or (p.first in allowed and p.second in allowed)
    ]
    result = EqualizeResult(pairs)
    second_bns = {p.second: _following_bn(model, graph, p.second) for p in pairs}
    for sweep in range(_SWEEPS):
        worst = 0.0
        for pair in pairs:
            first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
            bn = model.get_submodule(pair.bn) if pair.bn else None
            norm = model.get_submodule(second_bns[pair.second]) if second_bns[pair.second] else None
            r1, r2 = _output_ranges(first, bn), _input_ranges(second, norm)
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-30)), 1.0)
            worst = max(worst, float((s - 1).abs().max()))
            _rescale(first, bn, second, s)
        result.sweeps = sweep + 1
        if worst < _TOLERANCE:
            break
    for pair in pairs:
        _absorb(pair, model, second_bns[pair.second])
    return result
