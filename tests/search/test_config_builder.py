"""From sampled values and a model's layers to an NNI config_list."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from torch import nn

from quantsearch.quantization import QATQuantizer, match_layers
from quantsearch.quantization._config import select_layers, validate_config_list
from quantsearch.search import ModelLayers, SpaceError, SpacePlan, config_key, parse_space
from quantsearch.search._spec import LayerSelector


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.relu2 = nn.ReLU6()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))


LAYERS = ModelLayers.of(_Net())


def _plan(**space: object) -> SpacePlan:
    spec = parse_space({"algorithm": "qat", **space}, source="s.yaml")
    return SpacePlan(spec, LAYERS)


PER_LAYER = {
    "quantize": {"weight": {"op_types": ["default"]}, "output": {"op_types": ["ReLU6"]}},
    "params": {
        "output_bits": {"_type": "choice", "_value": [4, 8]},
        "quant_start_step": {"_type": "randint", "_value": [0, 10]},
    },
    "per_layer": {
        "op_types": ["default"],
        "weight_bits": {"_type": "choice", "_value": [2, 4, 8, "float"]},
    },
}


def test_model_layers_in_order_with_qualified_names() -> None:
    assert LAYERS.weighted == ["conv1", "conv2", "head.1"]
    assert ("head.0", "Flatten") in LAYERS.modules


def test_per_layer_parameters_are_named_after_their_layer() -> None:
    plan = _plan(**PER_LAYER)
    assert plan.distributions == {
        "output_bits": CategoricalDistribution([4, 8]),
        "quant_start_step": IntDistribution(0, 9),
        "conv1.weight_bits": CategoricalDistribution([2, 4, 8, "float"]),
        "conv2.weight_bits": CategoricalDistribution([2, 4, 8, "float"]),
        "head.1.weight_bits": CategoricalDistribution([2, 4, 8, "float"]),
    }


def test_config_list_groups_equal_settings_in_model_order() -> None:
    plan = _plan(**PER_LAYER)
    values = plan.values(
        {
            "output_bits": 8,
            "quant_start_step": 3,
            "conv1.weight_bits": 4,
            "conv2.weight_bits": "float",
            "head.1.weight_bits": 4,
        }
    )
    assert plan.config_list(values) == [
        {
            "quant_types": ["weight"],
            "quant_bits": {"weight": 4},
            "op_names": ["conv1", "head.1"],
            "quant_start_step": 3,
        },
        {
            "quant_types": ["output"],
            "quant_bits": {"output": 8},
            "op_names": ["relu1", "relu2"],
            "quant_start_step": 3,
        },
    ]


def test_a_layer_with_weight_and_output_gets_one_entry_for_both() -> None:
    plan = _plan(
        quantize={"weight": {"op_types": ["Conv2d"]}, "output": {"op_types": ["Conv2d"]}},
        params={"weight_bits": 4, "output_bits": {"_type": "choice", "_value": [8, "float"]}},
    )
    assert plan.config_list(plan.values({"output_bits": 8})) == [
        {
            "quant_types": ["weight", "output"],
            "quant_bits": {"weight": 4, "output": 8},
            "op_names": ["conv1", "conv2"],
        }
    ]
    assert plan.config_list(plan.values({"output_bits": "float"})) == [
        {"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_names": ["conv1", "conv2"]}
    ]


def test_a_scheme_per_quant_type_is_cut_to_each_entry() -> None:
    scheme = {"weight": "per_channel_symmetric", "output": "per_tensor_affine"}
    plan = _plan(**{**PER_LAYER, "params": {"output_bits": 8, "quant_scheme": scheme}})
    values = plan.values({"conv1.weight_bits": 4, "conv2.weight_bits": 4,
                          "head.1.weight_bits": 4})
    entries = plan.config_list(values)
    assert [entry["quant_scheme"] for entry in entries] == [
        {"weight": "per_channel_symmetric"}, {"output": "per_tensor_affine"}
    ]
    validate_config_list(entries, QATQuantizer.rules)  # what the quantizer accepts


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ({"weight": "per_row"}, "params.quant_scheme: {'weight': 'per_row'} is not weight: one "
         "of ['per_tensor_affine'"),
        ({"bias": "per_tensor_affine"}, "params.quant_scheme: {'bias': 'per_tensor_affine'} is "
         "not a dict with keys from ['weight', 'input', 'output']"),
        ({"_type": "choice", "_value": [{"weight": "per_tensor_affine"}]},
         "params.quant_scheme._value[0]: {'weight': 'per_tensor_affine'} is not allowed; "
         "choices are numbers, strings, booleans or null"),
    ],
)
def test_a_bad_scheme_per_quant_type_is_refused(scheme: dict, message: str) -> None:
    with pytest.raises(SpaceError) as caught:
        _plan(params={"quant_bits": 8, "quant_scheme": scheme})
    assert message in str(caught.value)


def test_a_named_baseline_sets_every_parameter_of_its_keys() -> None:
    plan = _plan(**PER_LAYER, baselines={"configs": {"w4-a8": {"weight_bits": 4,
                                                                "output_bits": 8}}})
    assert plan.spec.baselines.labels == ["float", "w4-a8"]
    raw = plan.baseline_params("w4-a8")
    assert {name: plan.params[name].decode(v) for name, v in raw.items()} == {
        "output_bits": 8, "conv1.weight_bits": 4, "conv2.weight_bits": 4, "head.1.weight_bits": 4
    }
    assert [e["quant_bits"] for e in plan.config_list(plan.values({**raw,
            "quant_start_step": 0}))] == [{"weight": 4}, {"output": 8}]


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        ({"w4": {"weight_bits": 4}},
         "baselines.configs.w4: gives no output_bits (for params.output_bits)"),
        ({"w4": {"weight_bits": 3, "output_bits": 8}},
         "baselines.configs.w4.weight_bits: 3 is not a value of per_layer.weight_bits"),
        ({"w4": {"weight_bits": 4, "output_bits": 8, "input_bits": 8}},
         "baselines.configs.w4: the space has no input_bits to set"),
        ({"uniform-4": {"weight_bits": 4, "output_bits": 8}},
         "baselines.configs.uniform-4: a baseline's name is 1 to 40 letters"),
        ({"w4": {"weight_bits": 4, "lr": 0.1}}, "baselines.configs.w4.lr: unknown key 'lr'"),
    ],
)
def test_a_bad_named_baseline_is_refused(configs: dict, message: str) -> None:
    with pytest.raises(SpaceError) as caught:
        _plan(**PER_LAYER, baselines={"configs": configs})
    assert message in str(caught.value)


def test_all_float_is_an_empty_config_list() -> None:
    plan = _plan(per_layer=PER_LAYER["per_layer"])
    raw = dict.fromkeys(plan.distributions, "float")
    assert plan.config_list(plan.values(raw)) == []


def test_global_quant_bits_when_no_per_layer_value() -> None:
    plan = _plan(
        params={"quant_bits": {"_type": "choice", "_value": [2, 8]}},
        per_layer={"op_names": ["conv1"], "weight_bits": {"_type": "choice", "_value": [4]}},
    )
    config = plan.config_list(plan.values({"quant_bits": 2, "conv1.weight_bits": 4}))
    assert config == [
        {"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_names": ["conv1"]},
        {"quant_types": ["weight"], "quant_bits": {"weight": 2}, "op_names": ["conv2", "head.1"]},
    ]


def test_searched_training_values_are_overrides() -> None:
    plan = _plan(params={"quant_bits": 8, "lr": {"_type": "loguniform", "_value": [1e-4, 1e-2]}})
    assert plan.train_overrides(plan.values({"lr": 0.003})) == {"lr": 0.003}


def test_baseline_params() -> None:
    plan = _plan(**PER_LAYER)
    assert plan.baseline_params("uniform-8") == {
        "output_bits": 8,
        "conv1.weight_bits": 8,
        "conv2.weight_bits": 8,
        "head.1.weight_bits": 8,
    }
    # float: "float" where offered, else the largest bit width (its config_list is empty).
    assert plan.baseline_params("float") == {
        "output_bits": 8,
        "conv1.weight_bits": "float",
        "conv2.weight_bits": "float",
        "head.1.weight_bits": "float",
    }


def test_candidate_points_try_every_value_once() -> None:
    plan = _plan(**PER_LAYER)
    points = list(plan.candidate_points())
    assert points[0][0] == "params"
    tried = [(key, value) for key, value, _ in points[1:]]
    assert tried == [
        ("params.output_bits", 4),
        ("params.output_bits", 8),
        ("params.quant_start_step", 0),
        ("params.quant_start_step", 9),
        ("per_layer.weight_bits", 2),
        ("per_layer.weight_bits", 4),
        ("per_layer.weight_bits", 8),
        ("per_layer.weight_bits", "float"),
    ]
    last = points[-1][2]
    assert {last[f"{n}.weight_bits"] for n in ("conv1", "conv2", "head.1")} == {"float"}


def test_config_key_tells_experiments_apart() -> None:
    config = [{"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_names": ["a"]}]
    assert config_key(config, {}) == config_key([dict(config[0])], {})
    assert config_key(config, {}) != config_key(config, {"lr": 0.1})
    assert config_key(config, {}) != config_key([], {})


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"params": {"quant_bits": 8}, "quantize": {"weight": {"op_names": ["conv3"]}}},
            "quantize.weight.op_names: 'conv3' is not a module of the model; nearest: conv2, conv1",
        ),
        (
            {"params": {"quant_bits": 8}, "quantize": {"weight": {"op_types": ["Conv1d"]}}},
            "quantize.weight.op_types: 'Conv1d' matches no module; the model has Conv2d",
        ),
        (
            {
                "params": {"quant_bits": 8},
                "quantize": {"weight": {"op_types": ["Linear"], "op_names": ["conv1"]}},
            },
            "quantize.weight: selects no module of the model",
        ),
        (
            {
                "quantize": {"output": {"op_types": ["ReLU6"]}},
                "per_layer": {"op_names": ["relu1"], "output_bits": 8},
            },
            "quantize.output: layer 'relu2' is selected for output quantization, but no param",
        ),
        (
            {
                "quantize": {"weight": {"op_types": ["Conv2d"]}},
                "per_layer": {"op_types": ["default"], "weight_bits": 8},
            },
            "per_layer.weight_bits: layer 'head.1' gets its own weight_bits, but quantize does "
            "not select it for weight quantization",
        ),
    ],
)
def test_layer_errors_name_the_key(space: dict, message: str) -> None:
    with pytest.raises(SpaceError) as caught:
        _plan(**space)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "selector",
    [
        LayerSelector(op_types=("default",)),
        LayerSelector(op_types=("Conv2d", "ReLU6")),
        LayerSelector(op_names=("conv1", "head.1")),
        LayerSelector(op_types=("default",), op_names=("conv1", "relu1")),
    ],
)
def test_a_selector_selects_what_the_quantizer_selects(selector: LayerSelector) -> None:
    model = _Net()
    chosen = ModelLayers.of(model).select(selector, key="quantize.weight")
    entry = {"quant_types": ["output"], "quant_bits": 8, **selector.to_dict()}
    rules = QATQuantizer.rules
    quantized = select_layers(model, validate_config_list([entry], rules), rules)
    assert chosen == list(quantized)
    assert chosen == match_layers(ModelLayers.of(model).modules, **selector.to_dict())
