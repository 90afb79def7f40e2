"""Properties of the two validators every user value goes through.

Whatever the input, the space parser returns a space whose every searched value builds a working
quantizer, or raises SpaceError; a config_list either compresses a model that then runs, or
raises ConfigError. Nothing else (no TypeError, KeyError, RecursionError) ever escapes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantsearch.quantization import QUANTIZERS, ConfigError, get_quantizer
from quantsearch.search import ModelLayers, SpaceError, SpacePlan, parse_space
from quantsearch.search._parser import TOP_KEYS
from quantsearch.search._rules import MAX_SEED
from quantsearch.search._spec import BITS_PARAMS
from quantsearch.tasks import get_task

TASK = get_task("digits", seed=0, options={"limit": 100})
PARAM_NAMES = (*BITS_PARAMS, "quant_start_step", "quant_scheme", "quant_dtype", "lr",
               "weight_decay", "momentum", "batch_size")
LAYER_TYPES = ["Conv2d", "Linear", "ReLU6", "ReLU", "BatchNorm2d", "default", "Dropout", "x"]
# What a parsed space may still be refused for by the quantizer: the algorithm's bit range or
# quant types, weights asked of weightless layers, ptq's percentile without its observer.
QUANTIZER_REFUSALS = (
    " bits for ",
    "is not supported by",
    "has a weight",
    "only used with observer 'percentile'",
)
LAYER_NAMES = ["conv1", "conv2", "fc1", "fc2", "relu1", "nope"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["float", "int", "uint", "per_tensor_affine", "per_channel_symmetric",
                     "qat", "", "..", "x" * 200, "\0"]),
    st.text(max_size=10),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=12,
)
bits = st.integers(min_value=1, max_value=16)
bit_params = st.one_of(
    bits,
    st.just("float"),
    st.lists(st.sampled_from([1, 2, 3, 4, 8, 16, "float"]), min_size=1, max_size=4, unique=True)
    .map(lambda v: {"_type": "choice", "_value": v}),
    st.tuples(bits, bits).map(lambda t: {"_type": "randint", "_value": [min(t), max(t) + 1]}),
    st.tuples(bits, bits, st.sampled_from([1, 2, 4])).map(
        lambda t: {"_type": "quniform", "_value": [min(t[:2]), max(t[:2]) + 1, t[2]]}
    ),
)
positive = st.floats(min_value=1e-6, max_value=1.0)
lr_params = st.one_of(
    positive,
    st.tuples(positive, positive).map(
        lambda t: {"_type": "loguniform", "_value": [min(t), max(t) * 2]}
    ),
    st.tuples(positive, positive).map(
        lambda t: {"_type": "uniform", "_value": [min(t), max(t) + 1]}
    ),
)
layer_selectors = st.fixed_dictionaries(
    {"op_types": st.lists(st.sampled_from(LAYER_TYPES[:3]), min_size=1, max_size=2, unique=True)}
)
# A valid space; the mutations below then break it in one or two places.
base_spaces = st.fixed_dictionaries(
    {
        "algorithm": st.sampled_from(sorted(QUANTIZERS)),
        "params": st.fixed_dictionaries(
            {"quant_bits": bit_params},
            optional={
                "quant_start_step": st.integers(min_value=0, max_value=5),
                "lr": lr_params,
                "batch_size": st.sampled_from([16, 32, {"_type": "choice", "_value": [16, 64]}]),
            },
        ),
    },
    optional={
        "quantize": st.fixed_dictionaries(
            {"weight": layer_selectors}, optional={"output": layer_selectors}
        ),
        "per_layer": st.fixed_dictionaries(
            {"op_types": st.just(["Conv2d", "Linear"]), "weight_bits": bit_params}
        ),
        "baselines": st.fixed_dictionaries(
            {"float": st.booleans(), "uniform_bits": st.lists(bits, max_size=2, unique=True)}
        ),
        "seed": st.integers(min_value=0, max_value=MAX_SEED),
        "n_trials": st.integers(min_value=1, max_value=40),
        "study_name": st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True),
    },
)
PATHS: list[tuple[str, ...]] = [
    *[(key,) for key in (*TOP_KEYS, "junk")],
    ("params", "quant_bits"),
    ("params", "quant_bits", "_value"),
    ("params", "quant_bits", "_type"),
    ("params", "lr"),
    ("params", "lr", "_value"),
    ("params", "weight_bits"),
    ("params", "quant_scheme"),
    ("params", "quant_dtype"),
    ("quantize", "weight"),
    ("quantize", "weight", "op_types"),
    ("quantize", "input", "op_names"),
    ("per_layer", "weight_bits"),
    ("per_layer", "op_names"),
    ("baselines", "uniform_bits"),
    ("train", "epochs"),
    ("train", "device"),
    ("train", "lr"),
    ("sampler", "population_size"),
    ("constraints", "min_accuracy"),
    ("hopeless", "margin"),
    ("task", "options"),
]


def _mutated(data: dict[str, Any], changes: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """``data`` with each (key path, value) set, the path's mappings made as needed."""
    import copy

    out = copy.deepcopy(data)
    for path, value in changes:
        node = out
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    return out


spaces = st.builds(
    _mutated,
    base_spaces,
    st.lists(st.tuples(st.sampled_from(PATHS), values), max_size=2),
)


def _check_quantizer(algorithm: str, config_list: Any) -> None:
    """The config_list compresses the model, which then gives finite outputs."""
    torch.manual_seed(0)
    model = get_quantizer(algorithm)(
        TASK.build_model(), config_list, optimizer=None, dummy_input=TASK.dummy_input
    ).compress()
    output = model(TASK.dummy_input)
    assert torch.isfinite(output).all()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(spaces)
def test_a_space_parses_into_working_quantizers_or_raises_space_error(data: dict) -> None:
    try:
        spec = parse_space(data, source="s.yaml", default_name="s")
    except SpaceError as error:
        assert str(error).startswith("s.yaml: "), str(error)
        return
    try:
        plan = SpacePlan(spec, ModelLayers.of(TASK.build_model()))
    except SpaceError as error:
        assert error.key is not None and str(error).startswith(f"{error.key}: "), str(error)
        return
    # Every searched value the space can give, as prepare() tries it.
    for _, _, point in plan.candidate_points():
        config_list = plan.config_list(point)
        if not config_list:
            continue  # every layer stays float: no quantizer to build
        try:
            _check_quantizer(spec.algorithm, config_list)
        except ConfigError as error:
            # Only what needs the algorithm and the model together is left to the quantizer
            # (prepare() reports it as a SpaceError naming the value); a key or a value the
            # space could check alone must have been refused by the parser.
            message = str(error)
            assert message.startswith("config_list["), message
            assert any(refusal in message for refusal in QUANTIZER_REFUSALS), message
    for name, distribution in plan.distributions.items():
        for bound in ("low", "high"):
            value = getattr(distribution, bound, None)
            assert value is None or math.isfinite(value), name


config_entries = st.fixed_dictionaries(
    {},
    optional={
        "quant_types": st.lists(st.sampled_from(["weight", "input", "output", "x"]), max_size=3)
        | values,
        "quant_bits": st.integers(min_value=-2, max_value=40)
        | st.dictionaries(st.sampled_from(["weight", "input", "output", "x"]),
                          st.integers(min_value=-2, max_value=40) | scalars, max_size=3)
        | scalars,
        "op_types": st.lists(st.sampled_from(LAYER_TYPES), max_size=3) | values,
        "op_names": st.lists(st.sampled_from(LAYER_NAMES), max_size=3) | values,
        "exclude": st.booleans() | scalars,
        "quant_scheme": st.sampled_from(["per_tensor_affine", "per_channel_symmetric", "x"])
        | scalars,
        "quant_dtype": st.sampled_from(["int", "uint", "x"]) | scalars,
        "quant_start_step": st.integers(min_value=-1, max_value=3) | scalars,
        "junk": scalars,
    },
)


@pytest.mark.parametrize("algorithm", sorted(QUANTIZERS))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(config_list=st.lists(config_entries, max_size=3) | values)
def test_a_config_list_compresses_a_working_model_or_raises_config_error(
    algorithm: str, config_list: Any
) -> None:
    with contextlib.suppress(ConfigError):
        _check_quantizer(algorithm, config_list)
