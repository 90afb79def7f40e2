"""NNI's search-space syntax mapped onto Optuna distributions, one _type at a time."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from quantsearch.search import SpaceError, parse_nni_param


def _param(kind: str, value: list) -> object:
    return parse_nni_param({"_type": kind, "_value": value}, key="params.x")


def test_choice_keeps_mixed_values_including_float() -> None:
    param = _param("choice", [2, 4, 8, "float"])
    assert param.distribution == CategoricalDistribution([2, 4, 8, "float"])
    assert param.decode("float") == "float"
    assert param.candidates() == [2, 4, 8, "float"]
    assert param.encode(4) == 4


def test_randint_excludes_the_upper_bound_like_nni() -> None:
    param = _param("randint", [0, 100])
    assert param.distribution == IntDistribution(0, 99)
    assert param.candidates() == [0, 99]
    with pytest.raises(ValueError, match="100"):
        param.encode(100)


def test_uniform_and_loguniform() -> None:
    assert _param("uniform", [0.1, 0.5]).distribution == FloatDistribution(0.1, 0.5)
    assert _param("loguniform", [1e-4, 1e-2]).distribution == FloatDistribution(
        1e-4, 1e-2, log=True
    )


def test_quniform_on_the_grid_is_a_stepped_distribution() -> None:
    assert _param("quniform", [0, 100, 25]).distribution == IntDistribution(0, 100, step=25)
    assert _param("quniform", [0.0, 1.0, 0.25]).distribution == FloatDistribution(
        0.0, 1.0, step=0.25
    )


def test_quniform_off_the_grid_adds_the_clipped_ends_like_nni() -> None:
    # NNI: clip(round(uniform(1, 10) / 4) * 4, 1, 10) reaches 1, 4, 8 and 10.
    param = _param("quniform", [1, 10, 4])
    assert param.distribution == CategoricalDistribution([1, 4, 8, 10])


def test_qloguniform_rounds_a_log_sample_to_q_and_clips() -> None:
    param = _param("qloguniform", [1, 1000, 10])
    assert param.distribution == FloatDistribution(1, 1000, log=True)
    assert param.decode(3.0) == 1  # round(0.3) * 10 = 0, clipped up to low
    assert param.decode(44.9) == 40
    assert param.decode(999.0) == 1000
    assert isinstance(param.decode(44.9), int)
    assert param.candidates() == [1, 1000]


def test_qloguniform_with_q_one_on_integers_is_an_integer_log_distribution() -> None:
    param = _param("qloguniform", [1, 64, 1])
    assert param.distribution == IntDistribution(1, 64, log=True)
    assert param.decode(17) == 17


def test_qloguniform_on_floats_keeps_floats() -> None:
    param = _param("qloguniform", [0.001, 0.1, 0.005])
    assert param.decode(0.0123) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("obj", "key", "message"),
    [
        ({"_type": "chioce", "_value": [1]}, "params.x._type", "'chioce' is not a search-space"),
        ({"_type": "normal", "_value": [0, 1]}, "params.x._type", "no Optuna counterpart"),
        ({"_type": "choice"}, "params.x._value", "missing"),
        ({"_type": "choice", "_value": []}, "params.x._value", "at least one value"),
        ({"_type": "choice", "_value": [2, 2]}, "params.x._value[1]", "listed twice"),
        ({"_type": "choice", "_value": [{"a": 1}]}, "params.x._value[0]", "nested"),
        ({"_type": "randint", "_value": [0.5, 3]}, "params.x._value", "integers"),
        ({"_type": "randint", "_value": [5, 5]}, "params.x._value", "smaller than high"),
        ({"_type": "uniform", "_value": [1]}, "params.x._value", r"\[low, high\]"),
        ({"_type": "loguniform", "_value": [0, 1]}, "params.x._value", "above 0"),
        ({"_type": "quniform", "_value": [0, 1, 0]}, "params.x._value", "q must be above 0"),
        ({"_type": "choice", "_value": [1], "x": 2}, "params.x", "unknown key 'x'"),
        (3, "params.x", "expected a mapping"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(obj: object, key: str, message: str) -> None:
    with pytest.raises(SpaceError, match=message) as caught:
        parse_nni_param(obj, key="params.x")
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")


def test_unknown_type_lists_the_allowed_ones() -> None:
    with pytest.raises(SpaceError) as caught:
        _param("gauss", [0, 1])
    for kind in ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform"):
        assert kind in str(caught.value)
