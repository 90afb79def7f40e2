"""From a search space and a model's layers to Optuna distributions and NNI config_lists."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution
from torch import nn

from quantsearch.quantization import DEFAULT_OP_TYPES, QUANT_TYPES, match_layers
from quantsearch.search._errors import SpaceError
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._rules import TRAIN_PARAMS, entry_keys
from quantsearch.search._spec import BITS_PARAMS, LayerSelector, Param, SearchSpec

__all__ = ["FLOAT", "ModelLayers", "SpacePlan", "config_key"]

FLOAT = "float"


@dataclass(frozen=True)
class ModelLayers:
    """The modules of a model as ``(qualified name, class name)``, root skipped, in order."""

    modules: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayers:
        return cls(
            tuple((name, type(module).__name__) for name, module in model.named_modules() if name)
        )

    @property
    def weighted(self) -> list[str]:
        """Names of the weighted layers (the 'default' op types), in model order."""
        return [name for name, kind in self.modules if kind in DEFAULT_OP_TYPES]

    def select(self, selector: LayerSelector, *, key: str) -> list[str]:
        """Names the selector matches (op_types AND op_names), in model order.

        A name or class that matches no module of the model is an error, not a silent no-op.
        """
        names = [name for name, _ in self.modules]
        kinds = sorted({kind for _, kind in self.modules})
        if selector.op_names is not None:
            for op_name in selector.op_names:
                if op_name not in names:
                    close = difflib.get_close_matches(op_name, names, n=3)
                    hint = f"; nearest: {', '.join(close)}" if close else ""
                    raise SpaceError(
                        f"{op_name!r} is not a module of the model{hint}",
                        key=f"{key}.op_names",
                    )
        if selector.op_types is not None:
            for op_type in selector.op_types:
                if op_type != "default" and op_type not in kinds:
                    raise SpaceError(
                        f"{op_type!r} matches no module; the model has {', '.join(kinds)} "
                        "(or use 'default' for every weighted layer)",
                        key=f"{key}.op_types",
                    )
        chosen = match_layers(
            self.modules, op_types=selector.op_types, op_names=selector.op_names
        )
        if not chosen:
            raise SpaceError("selects no module of the model", key=key)
        return chosen


def config_key(config_list: list[dict[str, Any]], train: Mapping[str, Any]) -> str:
    """One string per distinct experiment: equal keys train the same thing."""
    return json.dumps({"config_list": config_list, "train": dict(train)}, sort_keys=True)


def _for_entry(value: Any, quant_types: Iterable[str]) -> Any:
    """A value given per quant type, cut to the quant types of one entry."""
    if not isinstance(value, Mapping):
        return value
    return {quant_type: value[quant_type] for quant_type in quant_types if quant_type in value}


class SpacePlan:
    """A search space laid onto one model: its distributions, and values -> config_list.

    Parameter names: the global ones keep their name (``quant_bits``); each layer selected by
    ``per_layer`` gets ``<layer>.<key>`` (``conv1.weight_bits``).
    """

    def __init__(self, spec: SearchSpec, layers: ModelLayers) -> None:
        self.spec = spec
        self.layers = layers
        self.selected = {
            quant_type: set(layers.select(selector, key=f"quantize.{quant_type}"))
            for quant_type, selector in spec.quantize.items()
        }
        self.per_layer_names: list[str] = []
        if spec.per_layer is not None:
            self.per_layer_names = layers.select(spec.per_layer.selector, key="per_layer")
        self.params: dict[str, Param] = dict(spec.params)
        if spec.per_layer is not None:
            for name in self.per_layer_names:
                for key, param in spec.per_layer.params.items():
                    self._check_quantized(name, key)
                    self.params[f"{name}.{key}"] = param
        # (layer, quant type) -> the parameter giving its bits, resolved once.
        self.bits_source: dict[tuple[str, str], str] = {}
        for name, _ in layers.modules:
            for quant_type in QUANT_TYPES:
                if name in self.selected.get(quant_type, ()):
                    self.bits_source[(name, quant_type)] = self._bits_param(name, quant_type)

    def _check_quantized(self, layer: str, key: str) -> None:
        """A per-layer parameter must act on its layer: an idle one only slows the search."""
        types = QUANT_TYPES if key == "quant_bits" else (key.removesuffix("_bits"),)
        if not any(layer in self.selected.get(quant_type, ()) for quant_type in types):
            raise SpaceError(
                f"layer {layer!r} gets its own {key}, but quantize does not select it for "
                f"{' or '.join(types)} quantization; narrow per_layer or widen quantize",
                key=f"per_layer.{key}",
            )

    def _bits_param(self, layer: str, quant_type: str) -> str:
        keys = (f"{quant_type}_bits", "quant_bits")
        if layer in self.per_layer_names:
            for key in keys:
                if f"{layer}.{key}" in self.params:
                    return f"{layer}.{key}"
        for key in keys:
            if key in self.spec.params:
                return key
        raise SpaceError(
            f"layer {layer!r} is selected for {quant_type} quantization, but no parameter "
            f"gives its bits; add params.quant_bits or params.{quant_type}_bits",
            key=f"quantize.{quant_type}",
        )

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        """What Optuna samples: every parameter written in NNI's syntax."""
        return {
            name: param.distribution
            for name, param in self.params.items()
            if isinstance(param, NniParam)
        }

    def values(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter's value: fixed ones as written, sampled ones decoded from ``raw``."""
        out: dict[str, Any] = {}
        for name, param in self.params.items():
            out[name] = param.decode(raw[name]) if isinstance(param, NniParam) else param
        return out

    def config_list(self, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The NNI config_list: one entry per distinct setting, listing its layers by name.

        Entries come in the order of their first layer in the model; a layer whose every
        quant type is "float" is left out (stays float).
        """
        groups: dict[tuple[tuple[str, int], ...], list[str]] = {}
        for name, _ in self.layers.modules:
            bits: dict[str, int] = {}
            for quant_type in QUANT_TYPES:
                source = self.bits_source.get((name, quant_type))
                if source is None or values[source] == FLOAT:
                    continue
                bits[quant_type] = int(values[source])
            if bits:
                groups.setdefault(tuple(bits.items()), []).append(name)
        return [self.entry(dict(setting), names, values) for setting, names in groups.items()]

    def entry(
        self, bits: Mapping[str, int], op_names: list[str], values: Mapping[str, Any]
    ) -> dict[str, Any]:
        """One config_list entry: ``bits`` on ``op_names``, with the algorithm's own config
        keys the space sets (a value given per quant type cut to the entry's types)."""
        extras = {key: values[key] for key in entry_keys(self.spec.algorithm) if key in values}
        return {
            "quant_types": list(bits),
            "quant_bits": dict(bits),
            "op_names": op_names,
            **{key: _for_entry(value, bits) for key, value in extras.items()},
        }

    def train_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Training settings the space searches (lr, ...), to replace the fixed ones."""
        return {key: values[key] for key in TRAIN_PARAMS if key in values}

    def baseline_params(self, label: str) -> dict[str, Any]:
        """Raw Optuna values of a baseline trial (``float``, ``uniform-<bits>`` or a named
        config of ``baselines.configs``).

        ``uniform-b`` sets every bits parameter to b. ``float`` (whose config_list is empty)
        records the most precise point of the space: "float" where a parameter offers it,
        else its largest bit width. Other parameters are left to the sampler.
        """
        bits_names = [
            name
            for name, param in self.params.items()
            if isinstance(param, NniParam) and name.rsplit(".", 1)[-1] in BITS_PARAMS
        ]
        params: dict[str, Any] = {}
        named = self.spec.baselines.config(label)
        for name in bits_names:
            param = self.params[name]
            assert isinstance(param, NniParam)
            if named is not None:
                value = named[name.rpartition(".")[2]]
            elif label == "float":
                candidates = param.candidates()
                value = FLOAT if FLOAT in candidates else max(c for c in candidates if c != FLOAT)
            else:
                value = int(label.removeprefix("uniform-"))
            params[name] = param.encode(value)
        return params

    def candidate_points(self) -> Iterable[tuple[str, Any, dict[str, Any]]]:
        """(space key, value, values of all parameters) for a dry check: each value once.

        Per-layer parameters take each value on every layer at once.
        """
        base = {
            name: (param.candidates()[0] if isinstance(param, NniParam) else param)
            for name, param in self.params.items()
        }
        yield "params", None, base
        seen: set[tuple[str, Any]] = set()
        for name, param in self.params.items():
            if not isinstance(param, NniParam):
                continue
            layer, _, key = name.rpartition(".")
            space_key = f"per_layer.{key}" if layer else f"params.{name}"
            for value in param.candidates():
                if (space_key, repr(value)) in seen:
                    continue
                seen.add((space_key, repr(value)))
                point = dict(base)
                if layer:
                    point.update({f"{other}.{key}": value for other in self.per_layer_names})
                else:
                    point[name] = value
                yield space_key, value, point
