"""config_list validation and layer selection, with NNI v2's semantics.

Every entry of a config_list is checked in order against every module of ``named_modules()``
(the root skipped); an entry matches a module when the module's class name is in ``op_types``
(if given) and its qualified name is in ``op_names`` (if given). The last matching entry wins.
A winning entry with ``exclude: True`` leaves the module alone (``exclude: False`` is honoured
as "not excluded", unlike NNI, which only checks that the key is present).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "DEFAULT_OP_TYPES",
    "QUANT_TYPES",
    "AlgorithmRules",
    "ConfigError",
    "LayerConfig",
    "match_layers",
    "one_of",
    "per_quant_type",
    "quantizable_weight",
    "select_layers",
    "validate_config_list",
]

QUANT_TYPES = ("weight", "input", "output")

#: The class names that ``op_types: ['default']`` stands for: the layer types that own a weight
#: (NNI's list, and MultiheadAttention, whose projections hold half a transformer's weights).
DEFAULT_OP_TYPES = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Linear",
    "Bilinear",
    "PReLU",
    "Embedding",
    "EmbeddingBag",
    "MultiheadAttention",
)

_COMMON_KEYS = ("quant_types", "quant_bits", "op_types", "op_names", "exclude")


class ConfigError(ValueError):
    """A config_list that cannot be applied; the message names the entry, the key and the fix."""


@dataclass(frozen=True)
class AlgorithmRules:
    """What one algorithm accepts (quant types, bit ranges, its own config keys) and what it
    is (whether it trains, whether its grid is affine)."""

    name: str
    quant_types: tuple[str, ...]
    min_bits: int
    max_bits: int
    # Extra keys: key -> (default, validator returning an error text or None).
    options: Mapping[str, tuple[Any, Callable[[Any], str | None]]] = field(default_factory=dict)
    # Checks across keys, after each one passed alone: (given entry, normalised entry) ->
    # (key, error text) or None.
    entry_check: (
        Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[str, str] | None] | None
    ) = None
    #: False for an algorithm that only calibrates (post-training): it never trains.
    trains: bool = True
    #: True where quantizing at 16 bits reproduces the float model up to rounding (an affine
    #: grid over the tensor's range); False for grids that change the values (tanh, sign, a
    #: learned step).
    affine: bool = False
    #: Options that may also be a dict per quant type (``{"weight": "per_channel_symmetric",
    #: "output": "per_tensor_affine"}``), covering exactly the entry's quant types.
    per_type: tuple[str, ...] = ()


def one_of(choices: Sequence[str]) -> Callable[[Any], str | None]:
    """An option validator that accepts one of ``choices``."""

    def check(value: Any) -> str | None:
        ok = isinstance(value, str) and value in choices
        return None if ok else f"expected one of {list(choices)}"

    return check


def per_quant_type(options: Mapping[str, Any], key: str, quant_type: str) -> Any:
    """An option's value for one quant type, whether given once or as a dict per type."""
    value = options[key]
    return value[quant_type] if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class LayerConfig:
    """The settings one module ends up with after every entry was applied."""

    name: str
    op_type: str
    entry_index: int
    quant_types: tuple[str, ...]
    bits: Mapping[str, int]
    options: Mapping[str, Any]


def _fmt(value: Any) -> str:
    return repr(value)


def _error(index: int, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config_list[{index}]: '{key}' = {_fmt(value)} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_str_list(index: int, entry: Mapping[str, Any], key: str) -> None:
    value = entry[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _error(index, key, value, "expected a non-empty list of strings")


def validate_config_list(
    config_list: Any, rules: AlgorithmRules
) -> list[dict[str, Any]]:
    """Check a config_list against NNI's schema and ``rules``; return normalised copies.

    Normalised entries always hold ``quant_types``, a ``quant_bits`` dict per type, and every
    algorithm option with its default filled in. Raises :class:`ConfigError` on the first problem.
    """
    if not isinstance(config_list, list) or not config_list:
        raise ConfigError(
            f"config_list must be a non-empty list of dicts, got {_fmt(config_list)}"
        )
    allowed_keys = (*_COMMON_KEYS, *rules.options)
    normalised: list[dict[str, Any]] = []
    for index, entry in enumerate(config_list):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config_list[{index}] must be a dict, got {_fmt(entry)}")
        for key in entry:
            if key not in allowed_keys:
                raise ConfigError(
                    f"config_list[{index}]: unknown key {_fmt(key)} for {rules.name}; "
                    f"allowed keys: {', '.join(allowed_keys)}"
                )
        if "op_types" not in entry and "op_names" not in entry:
            raise ConfigError(
                f"config_list[{index}]: needs 'op_types' or 'op_names' to select layers"
            )
        for key in ("op_types", "op_names"):
            if key in entry:
                _check_str_list(index, entry, key)
        exclude = entry.get("exclude", False)
        if not isinstance(exclude, bool):
            raise _error(index, "exclude", exclude, "expected true or false")
        out: dict[str, Any] = {k: entry[k] for k in ("op_types", "op_names") if k in entry}
        out["exclude"] = exclude
        if exclude:
            normalised.append(out)
            continue
        out["quant_types"] = _validate_quant_types(index, entry, rules)
        out["quant_bits"] = _validate_bits(index, entry, out["quant_types"], rules)
        for key, (default, check) in rules.options.items():
            value = entry.get(key, default)
            problem = _check_option(value, check, out["quant_types"], key in rules.per_type)
            if problem is not None:
                raise _error(index, key, value, problem)
            out[key] = value
        if rules.entry_check is not None:
            problem = rules.entry_check(entry, out)
            if problem is not None:
                key, text = problem
                raise _error(index, key, entry.get(key, out.get(key)), text)
        normalised.append(out)
    return normalised


def _check_option(
    value: Any, check: Callable[[Any], str | None], quant_types: tuple[str, ...], per_type: bool
) -> str | None:
    if not (per_type and isinstance(value, Mapping)):
        problem = check(value)
        if problem is None or not per_type:
            return problem
        return f"{problem}, or a dict of them per quant type"
    for key in value:
        if key not in quant_types:
            return f"key {_fmt(key)} is not in quant_types {list(quant_types)}"
    missing = [t for t in quant_types if t not in value]
    if missing:
        return f"no value given for {missing}"
    for quant_type, item in value.items():
        problem = check(item)
        if problem is not None:
            return f"{quant_type}: {problem}"
    return None


def _validate_quant_types(
    index: int, entry: Mapping[str, Any], rules: AlgorithmRules
) -> tuple[str, ...]:
    if "quant_types" not in entry:
        raise ConfigError(
            f"config_list[{index}]: missing 'quant_types' (a list from {list(rules.quant_types)})"
        )
    value = entry["quant_types"]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _error(
            index, "quant_types", value, f"expected a non-empty list from {list(QUANT_TYPES)}"
        )
    for quant_type in value:
        if quant_type not in QUANT_TYPES:
            raise _error(index, "quant_types", value, f"each must be one of {list(QUANT_TYPES)}")
        if quant_type not in rules.quant_types:
            raise ConfigError(
                f"config_list[{index}]: 'quant_types' = {_fmt(value)} is not supported by "
                f"{rules.name}: it quantizes only {list(rules.quant_types)}"
            )
    return tuple(dict.fromkeys(value))


def _validate_bits(
    index: int, entry: Mapping[str, Any], quant_types: tuple[str, ...], rules: AlgorithmRules
) -> dict[str, int]:
    if "quant_bits" not in entry:
        raise ConfigError(
            f"config_list[{index}]: missing 'quant_bits' (an int, or a dict per quant type)"
        )
    value = entry["quant_bits"]
    if _is_int(value):
        bits = dict.fromkeys(quant_types, value)
    elif isinstance(value, Mapping):
        for key in value:
            if key not in quant_types:
                raise _error(
                    index, "quant_bits", value,
                    f"key {_fmt(key)} is not in quant_types {list(quant_types)}",
                )
        missing = [t for t in quant_types if t not in value]
        if missing:
            raise _error(index, "quant_bits", value, f"no bits given for {missing}")
        bits = dict(value)
    else:
        raise _error(index, "quant_bits", value, "expected an int or a dict per quant type")
    for quant_type, b in bits.items():
        if not _is_int(b) or not rules.min_bits <= b <= rules.max_bits:
            span = (
                f"exactly {rules.min_bits}"
                if rules.min_bits == rules.max_bits
                else f"an int in {rules.min_bits}..{rules.max_bits}"
            )
            raise _error(
                index, "quant_bits", value, f"{rules.name} takes {span} bits for {quant_type}"
            )
    return bits


def _matches(entry: Mapping[str, Any], name: str, op_type: str) -> bool:
    if "op_types" in entry:
        types = entry["op_types"]
        if op_type not in types and not ("default" in types and op_type in DEFAULT_OP_TYPES):
            return False
    return "op_names" not in entry or name in entry["op_names"]


def match_layers(
    modules: Iterable[tuple[str, str]],
    *,
    op_types: Sequence[str] | None = None,
    op_names: Sequence[str] | None = None,
) -> list[str]:
    """The names of ``modules`` (``(qualified name, class name)`` pairs) that a config_list
    entry with these ``op_types`` and ``op_names`` selects, in their order.

    NNI's rule: the class name is in ``op_types`` (``"default"`` standing for
    :data:`DEFAULT_OP_TYPES`) and the name is in ``op_names``, each only when given.
    """
    entry = {
        key: value
        for key, value in (("op_types", op_types), ("op_names", op_names))
        if value is not None
    }
    return [name for name, op_type in modules if _matches(entry, name, op_type)]


def select_layers(
    model: nn.Module, entries: Sequence[Mapping[str, Any]], rules: AlgorithmRules
) -> dict[str, LayerConfig]:
    """Apply validated entries to ``model``: module name -> its winning settings, in model order.

    Errors: an ``op_names`` item that is not a module (the closest real names are listed), and
    an entry that matches no module at all (nothing would be quantized).
    """
    modules = [(name, type(module).__name__) for name, module in model.named_modules() if name]
    names = [name for name, _ in modules]
    known = set(names)
    for index, entry in enumerate(entries):
        for name in entry.get("op_names", ()):
            if name not in known:
                close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
                hint = (
                    f"closest: {', '.join(close)}" if close else f"modules: {', '.join(names[:8])}"
                )
                raise ConfigError(
                    f"config_list[{index}]: 'op_names' has {name!r}, which is not a module of "
                    f"the model ({hint})"
                )
    winners: dict[str, int] = {}
    matched = [False] * len(entries)
    for name, op_type in modules:
        for index, entry in enumerate(entries):
            if _matches(entry, name, op_type):
                winners[name] = index
                matched[index] = True
    for index, hit in enumerate(matched):
        if not hit:
            present = sorted({op_type for _, op_type in modules})
            raise ConfigError(
                f"config_list[{index}]: selects no layer of the model "
                f"(op_types {entries[index].get('op_types')}, op_names "
                f"{entries[index].get('op_names')}); layer types present: {', '.join(present)}"
            )
    types = dict(modules)
    module_of = dict(model.named_modules())
    _check_attention(module_of, entries, winners)
    layers: dict[str, LayerConfig] = {}
    for name in names:
        index = winners.get(name)
        if index is None or entries[index]["exclude"]:
            continue
        entry = entries[index]
        quant_types = entry["quant_types"]
        if not _has_weight(module_of[name]):  # NNI too skips the weight of a weightless layer
            quant_types = tuple(t for t in quant_types if t != "weight")
        layers[name] = LayerConfig(
            name=name,
            op_type=types[name],
            entry_index=index,
            quant_types=quant_types,
            bits={t: entry["quant_bits"][t] for t in quant_types},
            options={key: entry[key] for key in rules.options},
        )
    _check_weights(model, entries, layers)
    _attention_out_projections(module_of, winners, layers)
    return {name: layers[name] for name in names if name in layers and layers[name].quant_types}


def _out_projections(module_of: Mapping[str, nn.Module]) -> dict[str, str]:
    """Name of each MultiheadAttention's out_proj -> the attention's name."""
    return {
        f"{name}.out_proj" if name else "out_proj": name
        for name, module in module_of.items()
        if isinstance(module, nn.MultiheadAttention)
    }


def _check_attention(
    module_of: Mapping[str, nn.Module], entries: Sequence[Mapping[str, Any]],
    winners: Mapping[str, int],
) -> None:
    """What MultiheadAttention cannot quantize is refused up front, naming the layer."""
    for out_name, attention in _out_projections(module_of).items():
        index = winners.get(out_name)
        if index is not None and not entries[index]["exclude"]:
            others = [t for t in entries[index]["quant_types"] if t != "weight"]
            if others:
                raise ConfigError(
                    f"config_list[{index}]: '{out_name}' is the output projection of the "
                    f"MultiheadAttention '{attention}', which computes its input and output "
                    f"internally: only its 'weight' can be quantized, not {others} (quantize "
                    f"the 'output' of '{attention}', the same tensor as out_proj's output)"
                )
        index = winners.get(attention)
        mha = module_of[attention]
        if (
            index is not None and not entries[index]["exclude"]
            and "weight" in entries[index]["quant_types"]
            and getattr(mha, "in_proj_weight", None) is None
        ):
            raise ConfigError(
                f"config_list[{index}]: the MultiheadAttention '{attention}' has separate "
                "q/k/v projection weights (kdim or vdim differs from embed_dim): only a packed "
                "in_proj_weight can be quantized; quantize its 'input' or 'output', or exclude it"
            )


def _attention_out_projections(
    module_of: Mapping[str, nn.Module], winners: Mapping[str, int],
    layers: dict[str, LayerConfig],
) -> None:
    """An attention whose weight is quantized quantizes its out_proj's weight too, at the same
    bits, unless an entry of its own selects (or excludes) the out_proj."""
    for out_name, attention in _out_projections(module_of).items():
        parent = layers.get(attention)
        if parent is None or "weight" not in parent.quant_types or out_name in winners:
            continue
        layers[out_name] = LayerConfig(
            name=out_name,
            op_type=type(module_of[out_name]).__name__,
            entry_index=parent.entry_index,
            quant_types=("weight",),
            bits={"weight": parent.bits["weight"]},
            options=parent.options,
        )


def _check_weights(
    model: nn.Module, entries: Sequence[Mapping[str, Any]], layers: Mapping[str, LayerConfig]
) -> None:
    """An entry that asks for weight quantization must select at least one layer with a weight."""
    modules = dict(model.named_modules())
    for index, entry in enumerate(entries):
        if entry["exclude"] or "weight" not in entry["quant_types"]:
            continue
        chosen = [layer.name for layer in layers.values() if layer.entry_index == index]
        if chosen and not any(_has_weight(modules[name]) for name in chosen):
            raise ConfigError(
                f"config_list[{index}]: 'quant_types' has 'weight' but none of the selected "
                f"layers ({', '.join(chosen[:5])}) has a weight; quantize their 'input' or "
                "'output' instead"
            )


def quantizable_weight(module: nn.Module) -> nn.Parameter | None:
    """The parameter a weight quantizer of ``module`` quantizes: ``weight``, or a
    MultiheadAttention's packed ``in_proj_weight``; None when it has neither."""
    name = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
    weight = getattr(module, name, None)
    return weight if isinstance(weight, nn.Parameter) else None


def _has_weight(module: nn.Module) -> bool:
    return quantizable_weight(module) is not None
