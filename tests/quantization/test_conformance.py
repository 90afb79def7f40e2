"""The suite every registered quantizer passes: one parametrized test per check, per example.

An algorithm joins by declaring ``examples`` on its class; nothing here names an algorithm.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from quantsearch.quantization import (
    QUANTIZERS,
    Example,
    NaiveQuantizer,
    QAT_Quantizer,
    register_quantizer,
)
from quantsearch.quantization.testing import (
    ConformanceCase,
    check_calibration,
    check_eval_freezes_statistics,
    check_export_model_twice,
    check_gradients,
    check_levels,
    check_packed_export,
    check_shapes_and_dtypes,
    check_state_dict_round_trip,
    conformance_cases,
)

CASES = conformance_cases()
every_case = pytest.mark.parametrize("case", CASES, ids=str)


@every_case
def test_quantized_tensors_take_at_most_2_pow_bits_values(case: ConformanceCase) -> None:
    check_levels(case)


@every_case
def test_straight_through_gradients_reach_every_quantized_weight(case: ConformanceCase) -> None:
    check_gradients(case)


@every_case
def test_state_dict_round_trip_restores_outputs_and_steps(case: ConformanceCase) -> None:
    check_state_dict_round_trip(case)


@every_case
def test_eval_mode_freezes_every_statistic(case: ConformanceCase) -> None:
    check_eval_freezes_statistics(case)


@every_case
def test_shapes_and_dtypes_are_preserved(case: ConformanceCase) -> None:
    check_shapes_and_dtypes(case)


@every_case
def test_packed_export_reloads_bit_exact_and_matches_the_size(
    case: ConformanceCase, tmp_path: Path
) -> None:
    check_packed_export(case, tmp_path)


@every_case
def test_export_model_twice_loads_strictly_into_a_fresh_model(
    case: ConformanceCase, tmp_path: Path
) -> None:
    check_export_model_twice(case, tmp_path)


@every_case
def test_calibration_observes_the_float_model_and_restores_it(case: ConformanceCase) -> None:
    check_calibration(case)


def test_every_registered_algorithm_has_cases() -> None:
    assert {case.algorithm for case in CASES} == set(QUANTIZERS)
    assert len({str(case) for case in CASES}) == len(CASES)


class _Undeclared(NaiveQuantizer):
    """Inherits its parent's examples but declares none of its own."""


def test_an_algorithm_without_declared_examples_cannot_register() -> None:
    with pytest.raises(TypeError) as info:
        register_quantizer("undeclared")(_Undeclared)
    assert str(info.value) == (
        "cannot register 'undeclared': _Undeclared declares no conformance examples: set the "
        "class attribute `examples = (Example(id, config_list, bits), ...)` (see "
        "quantsearch.quantization.testing)"
    )
    assert "undeclared" not in QUANTIZERS


def test_an_algorithm_put_in_the_registry_without_examples_fails_the_suite() -> None:
    registry = {"naive": NaiveQuantizer, "undeclared": _Undeclared}
    with pytest.raises(TypeError, match="algorithm 'undeclared' cannot join the conformance "
                                        "suite: _Undeclared declares no conformance examples"):
        conformance_cases(registry)


def test_a_declared_example_that_quantizes_less_than_it_says_fails_its_check() -> None:
    class Overclaiming(QAT_Quantizer):
        examples = (Example("w8", [{"quant_types": ["weight"], "quant_bits": 8,
                                    "op_names": ["conv1"]}], {"fc": {"weight": 8}}),)

    case = conformance_cases({"overclaiming": Overclaiming})[0]
    with pytest.raises(AssertionError, match="overclaiming-w8: fc is quantized as None"):
        check_levels(case)


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="cannot register 'qat': already taken by "
                                         "QAT_Quantizer"):
        register_quantizer("qat")(NaiveQuantizer)
