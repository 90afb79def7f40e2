"""config_list validation: one ConfigError, with the exact message a user reads."""

from __future__ import annotations

from typing import Any

import pytest

from quantsearch.quantization import (
    BNNQuantizer,
    ConfigError,
    DoReFaQuantizer,
    NaiveQuantizer,
    QAT_Quantizer,
    get_quantizer,
)

from .conftest import make_net

W8 = {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}


@pytest.mark.parametrize(
    ("config_list", "message"),
    [
        ([], "config_list must be a non-empty list of dicts, got []"),
        ([W8, "conv1"], "config_list[1] must be a dict, got 'conv1'"),
        (
            [{**W8, "quant_bit": 8}],
            "config_list[0]: unknown key 'quant_bit' for QAT_Quantizer; allowed keys: "
            "quant_types, quant_bits, op_types, op_names, exclude, quant_start_step, "
            "quant_scheme, quant_dtype",
        ),
        (
            [{"quant_types": ["weight"], "quant_bits": 8}],
            "config_list[0]: needs 'op_types' or 'op_names' to select layers",
        ),
        (
            [{**W8, "op_types": "default"}],
            "config_list[0]: 'op_types' = 'default' is invalid: expected a non-empty list of "
            "strings",
        ),
        (
            [{**W8, "quant_types": "weight"}],
            "config_list[0]: 'quant_types' = 'weight' is invalid: expected a non-empty list from "
            "['weight', 'input', 'output']",
        ),
        (
            [{**W8, "quant_types": ["weights"]}],
            "config_list[0]: 'quant_types' = ['weights'] is invalid: each must be one of "
            "['weight', 'input', 'output']",
        ),
        (
            [{**W8, "quant_bits": 40}],
            "config_list[0]: 'quant_bits' = 40 is invalid: QAT_Quantizer takes an int in 2..16 "
            "bits for weight",
        ),
        (
            [{**W8, "quant_bits": {"weight": 8, "output": 8}}],
            "config_list[0]: 'quant_bits' = {'weight': 8, 'output': 8} is invalid: key 'output' "
            "is not in quant_types ['weight']",
        ),
        (
            [{**W8, "quant_types": ["weight", "output"], "quant_bits": {"weight": 8}}],
            "config_list[0]: 'quant_bits' = {'weight': 8} is invalid: no bits given for "
            "['output']",
        ),
        (
            [{**W8, "quant_scheme": "per_layer"}],
            "config_list[0]: 'quant_scheme' = 'per_layer' is invalid: expected one of "
            "['per_tensor_affine', 'per_tensor_symmetric', 'per_channel_affine', "
            "'per_channel_symmetric'], or a dict of them per quant type",
        ),
        (
            [{**W8, "quant_types": ["weight", "input"], "quant_scheme": {
                "weight": "per_channel_symmetric"}}],
            "config_list[0]: 'quant_scheme' = {'weight': 'per_channel_symmetric'} is invalid: "
            "no value given for ['input']",
        ),
        (
            [{**W8, "quant_scheme": {"weight": "per_channel_symmetric", "output": "x"}}],
            "config_list[0]: 'quant_scheme' = {'weight': 'per_channel_symmetric', 'output': "
            "'x'} is invalid: key 'output' is not in quant_types ['weight']",
        ),
        (
            [{**W8, "quant_dtype": {"weight": "int8"}}],
            "config_list[0]: 'quant_dtype' = {'weight': 'int8'} is invalid: weight: expected "
            "one of ['int', 'uint']",
        ),
        (
            [{**W8, "quant_start_step": -5}],
            "config_list[0]: 'quant_start_step' = -5 is invalid: expected an int >= 0",
        ),
        (
            [{**W8, "exclude": "yes"}],
            "config_list[0]: 'exclude' = 'yes' is invalid: expected true or false",
        ),
    ],
)
def test_schema_errors(config_list: list[Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        QAT_Quantizer(make_net(), config_list)
    assert str(info.value) == message


def test_scheme_and_dtype_may_differ_per_quant_type() -> None:
    entry = {"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d"],
             "quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
             "quant_dtype": {"weight": "int", "input": "uint"}}
    quantizer = QAT_Quantizer(make_net(), [entry])
    quantizer.compress()
    wrapper = quantizer.bound_model.conv1
    assert wrapper.weight_quant.per_channel and wrapper.weight_quant.qmin == -127
    assert not wrapper.input_quant.per_channel and wrapper.input_quant.qmin == 0


def test_unknown_op_name_lists_the_closest_real_names() -> None:
    with pytest.raises(ConfigError) as info:
        QAT_Quantizer(make_net(), [{**W8, "op_names": ["conv_1"]}])
    assert str(info.value) == (
        "config_list[0]: 'op_names' has 'conv_1', which is not a module of the model "
        "(closest: conv1, conv2, bn1)"
    )


def test_entry_that_selects_nothing_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        QAT_Quantizer(make_net(), [W8, {**W8, "op_types": ["Conv1d"]}])
    assert str(info.value) == (
        "config_list[1]: selects no layer of the model (op_types ['Conv1d'], op_names None); "
        "layer types present: BatchNorm2d, Conv2d, Flatten, Linear, ReLU6"
    )


def test_weight_quantization_of_weightless_layers_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        QAT_Quantizer(make_net(), [{**W8, "op_types": ["ReLU6"]}])
    assert str(info.value) == (
        "config_list[0]: 'quant_types' has 'weight' but none of the selected layers "
        "(relu1, relu2) has a weight; quantize their 'input' or 'output' instead"
    )


@pytest.mark.parametrize(
    ("cls", "entry", "message"),
    [
        (
            DoReFaQuantizer,
            {"quant_types": ["output"], "quant_bits": 4, "op_types": ["ReLU6"]},
            "config_list[0]: 'quant_types' = ['output'] is not supported by DoReFaQuantizer: "
            "it quantizes only ['weight']",
        ),
        (
            BNNQuantizer,
            {"quant_types": ["weight"], "quant_bits": 2, "op_types": ["Conv2d"]},
            "config_list[0]: 'quant_bits' = 2 is invalid: BNNQuantizer takes exactly 1 bits for "
            "weight",
        ),
        (
            NaiveQuantizer,
            {**W8, "quant_types": ["input"]},
            "config_list[0]: 'quant_types' = ['input'] is not supported by NaiveQuantizer: it "
            "quantizes only ['weight']",
        ),
        (
            DoReFaQuantizer,
            {**W8, "quant_start_step": 10},
            "config_list[0]: unknown key 'quant_start_step' for DoReFaQuantizer; allowed keys: "
            "quant_types, quant_bits, op_types, op_names, exclude",
        ),
    ],
)
def test_unsupported_combinations(cls: type, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls(make_net(), [entry])
    assert str(info.value) == message


def test_last_matching_entry_wins_and_exclude_is_honest() -> None:
    config_list = [
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]},
        {"quant_types": ["weight"], "quant_bits": 4, "op_names": ["conv2"]},
        {"exclude": True, "op_names": ["fc", "conv1"]},
        # NNI excludes on the key's mere presence; false means false here.
        {"quant_types": ["weight"], "quant_bits": 6, "op_names": ["fc"], "exclude": False},
    ]
    quantizer = QAT_Quantizer(make_net(), config_list)
    assert quantizer.layer_bits() == {"conv2": {"weight": 4}, "fc": {"weight": 6}}


def test_default_op_types_and_registry() -> None:
    quantizer = NaiveQuantizer(make_net())
    assert quantizer.layer_bits() == {n: {"weight": 8} for n in ("conv1", "conv2", "fc")}
    assert get_quantizer("qat") is QAT_Quantizer
    with pytest.raises(ConfigError, match="unknown algorithm 'int8': expected one of naive, qat"):
        get_quantizer("int8")
