"""The suite every registered quantizer passes: every check of CHECKS on every declared example.

An algorithm joins by declaring ``examples`` on its class; nothing here names an algorithm or a
check. A plug-in's tests do the same as :class:`TestToyPlugIn`: subclass ``ConformanceSuite``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest
from torch import Tensor, nn

from quantsearch.quantization import (
    QUANTIZERS,
    AlgorithmRules,
    Example,
    NaiveQuantizer,
    OnnxExportError,
    QAT_Quantizer,
    Quantizer,
    algorithm_rules,
    export_onnx,
    register_quantizer,
)
from quantsearch.quantization._codes import QdqForm
from quantsearch.quantization._config import LayerConfig, quantizable_weight
from quantsearch.quantization._tensor_quant import AffineWeightQuant, DoReFaWeightQuant, TensorQuant
from quantsearch.quantization.testing import (
    CHECKS,
    Check,
    ConformanceSuite,
    build,
    check_levels,
    check_onnx_export,
    conformance_cases,
    example_batch,
    suite_parameters,
)

CASES = conformance_cases()


class TestRegisteredAlgorithms(ConformanceSuite):
    """Every check on every example of every registered algorithm."""


class ToyAffineQuantizer(Quantizer):
    """A plug-in built from an existing block: weights only, per-channel affine uint, 2..8 bits."""

    rules = AlgorithmRules(
        name="ToyAffineQuantizer", quant_types=("weight",), min_bits=2, max_bits=8, affine=True
    )
    examples = (
        Example(
            "w5",
            [{"quant_types": ["weight"], "quant_bits": 5, "op_types": ["Conv2d", "Linear"]}],
            {name: {"weight": 5} for name in ("conv1", "conv2", "fc")},
        ),
    )

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        weight = quantizable_weight(module)
        assert weight is not None
        return {
            "weight": AffineWeightQuant(
                layer.bits["weight"], scheme="per_channel_affine", dtype="uint",
                channels=int(weight.shape[0]),
            )
        }


class TestToyPlugIn(ConformanceSuite):
    """A plug-in's test file: the whole suite, inherited, on its own algorithm."""

    registry: ClassVar[Mapping[str, type[Quantizer]]] = {"toy": ToyAffineQuantizer}


def test_the_suite_runs_every_check_on_every_case() -> None:
    pairs = suite_parameters()
    assert {name for name, _ in pairs} == set(CHECKS)
    assert len(pairs) == len(CHECKS) * len(CASES) == len(set((n, str(c)) for n, c in pairs))
    assert "onnx_export" in CHECKS and CHECKS["onnx_export"].requires == (
        "onnx", "onnxscript", "onnxruntime"
    )


def test_a_check_added_to_checks_runs_on_every_case(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setitem(CHECKS, "added", Check(lambda case: seen.append(str(case))))
    added = [case for name, case in suite_parameters() if name == "added"]
    assert [str(case) for case in added] == [str(case) for case in CASES]
    CHECKS["added"](added[0])
    assert seen == [str(CASES[0])]


def test_a_registered_plug_in_joins_the_default_suite() -> None:
    assert "toy" not in QUANTIZERS
    register_quantizer("toy")(ToyAffineQuantizer)
    try:
        pairs = suite_parameters()
        assert sorted(name for name, case in pairs if case.algorithm == "toy") == sorted(CHECKS)
        assert algorithm_rules("toy") is ToyAffineQuantizer.rules
    finally:
        del QUANTIZERS["toy"]


def test_a_check_says_what_it_needs() -> None:
    with pytest.raises(TypeError, match="check_packed_export needs a folder to write in"):
        CHECKS["packed_export"](CASES[0])
    assert [name for name, check in CHECKS.items() if check.needs_folder] == [
        "packed_export", "export_model_twice", "onnx_export"
    ]
    needs = Check(check_levels, requires=("torch", "quantsearch_no_such_module"))
    assert needs.missing() == ["quantsearch_no_such_module"]


class _Skewed(AffineWeightQuant):
    """Quantizes like its parent but states a QDQ scale twice too large."""

    def qdq_weight(self, x_hat: Tensor) -> QdqForm:
        form = super().qdq_weight(x_hat)
        return dataclasses.replace(form, scale=form.scale * 2)


class _SkewedQuantizer(ToyAffineQuantizer):
    examples = ToyAffineQuantizer.examples

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        return {"weight": _Skewed(layer.bits["weight"], scheme="per_tensor_affine", dtype="uint",
                                  channels=1)}


def test_the_onnx_check_fails_a_block_whose_qdq_form_is_wrong(tmp_path: Path) -> None:
    for module in CHECKS["onnx_export"].requires:
        pytest.importorskip(module)
    case = conformance_cases({"skewed": _SkewedQuantizer})[0]
    with pytest.raises(AssertionError, match=r"skewed-w5: onnxruntime agrees with the eval-mode "
                                             r"model on \d+\.\d% of the outputs"):
        check_onnx_export(case, tmp_path)


class _Opaque(DoReFaWeightQuant):
    """A block that quantizes but never says its QDQ form (the TensorQuant default)."""

    qdq_weight = TensorQuant.qdq_weight


class _OpaqueQuantizer(Quantizer):
    rules = AlgorithmRules(name="_OpaqueQuantizer", quant_types=("weight",), min_bits=2,
                           max_bits=2)
    examples = (Example("w2", [{"quant_types": ["weight"], "quant_bits": 2,
                                "op_names": ["conv1", "fc"]}], {"conv1": {"weight": 2}}),)

    def _make_quants(self, layer: LayerConfig, module: nn.Module) -> dict[str, TensorQuant]:
        return {"weight": _Opaque(layer.bits["weight"])}


def test_a_block_without_a_qdq_form_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    case = conformance_cases({"opaque": _OpaqueQuantizer})[0]
    model, _ = build(case)
    with pytest.raises(OnnxExportError) as raised:
        export_onnx(model.eval(), tmp_path / "m.onnx", example_batch()[0][:1])
    assert str(raised.value) == (
        "cannot export to ONNX QDQ:\n"
        "  conv1.weight: _Opaque has no QDQ form for a weight (it defines no qdq_weight)\n"
        "  fc.weight: _Opaque has no QDQ form for a weight (it defines no qdq_weight)"
    )
    assert not (tmp_path / "m.onnx").exists()
    pytest.importorskip("onnxruntime")
    check_onnx_export(case, tmp_path)  # the suite's check accepts a refusal that names them


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
