"""The conformance suite every registered quantizer passes, reusable from any test runner.

An algorithm joins it by declaring ``examples`` on its class and registering it
(``@register_quantizer(name)``); :func:`conformance_cases` then yields one case per example of
every registered algorithm, and a class without examples makes it raise. :data:`CHECKS` names
every check; a check declares whether it takes a folder and which modules it needs
(:class:`Check`). With pytest, subclass :class:`ConformanceSuite` and every check runs on every
case, a check added to CHECKS included (as Optuna's sampler test cases are inherited):

    class TestMyQuantizer(ConformanceSuite):
        registry = {"mine": MyQuantizer}   # None (the default): every registered algorithm

The checks raise ``AssertionError`` with a message; they need only torch, a folder for the
export checks, and onnx, onnxscript and onnxruntime for the ONNX one (skipped without them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ._base import Quantizer
from ._codes import NoQdqFormError
from ._conformance import (
    ConformanceCase,
    ConformanceNet,
    build,
    conformance_cases,
    example_batch,
    make_net,
)
from ._conformance import expect as _expect
from ._conformance import outputs_of as _outputs_of
from ._conformance import wrappers as _wrappers
from ._onnx import OnnxExportError, export_onnx
from ._pack import load_packed, model_size_bytes
from ._tensor_quant import TensorQuant

if TYPE_CHECKING:
    import pytest

__all__ = [
    "CHECKS",
    "Check",
    "ConformanceCase",
    "ConformanceNet",
    "ConformanceSuite",
    "build",
    "check_calibration",
    "check_eval_freezes_statistics",
    "check_export_model_twice",
    "check_gradients",
    "check_levels",
    "check_onnx_export",
    "check_packed_export",
    "check_shapes_and_dtypes",
    "check_state_dict_round_trip",
    "conformance_cases",
    "example_batch",
    "make_net",
    "suite_parameters",
]


def check_levels(case: ConformanceCase) -> None:
    """The declared layers are quantized at the declared bits, and every quantized weight and
    output takes at most 2^bits values (integer codes inside 0..2^bits-1)."""
    model, quantizer = build(case)
    expected = case.example.bits
    layer_bits = quantizer.layer_bits()
    for name, roles in expected.items():
        _expect(
            {**layer_bits.get(name, {}), **roles} == layer_bits.get(name),
            f"{case}: {name} is quantized as {layer_bits.get(name)}, declared {dict(roles)}",
        )
    model.eval()
    wrappers = _wrappers(model)
    with torch.no_grad():
        outputs = _outputs_of(model, list(expected), example_batch(99)[0])
    for name, roles in expected.items():
        for role, bits in roles.items():
            if role == "weight":
                quant = wrappers[name].weight_quant
                assert quant is not None
                values, _ = quant.codes(wrappers[name].quantized_weight())
                _expect(
                    int(values.min()) >= 0 and int(values.max()) < 2**bits,
                    f"{case}: {name} weight codes outside 0..{2**bits - 1}",
                )
            elif role == "output":
                values = outputs[name]
            else:
                continue  # an input's levels are those of the layer before's output
            distinct = torch.unique(values).numel()
            _expect(1 <= distinct <= 2**bits, f"{case}: {name} {role}: {distinct} levels")


def check_gradients(case: ConformanceCase) -> None:
    """A training backward reaches every quantized weight with a non-zero gradient."""
    model, _ = build(case, train_steps=0)
    model.train()
    x, y = example_batch(3)
    nn.functional.cross_entropy(model(x), y).backward()
    for wrapper in _wrappers(model).values():
        if wrapper.weight_quant is not None:
            grad = wrapper.module.weight.grad
            _expect(
                grad is not None and float(grad.abs().sum()) > 0,
                f"{case}: no straight-through gradient reaches {wrapper.name}'s weight",
            )


def check_state_dict_round_trip(case: ConformanceCase) -> None:
    """A state dict restores steps and eval outputs in a fresh compressed model, and loading a
    model's own state dict changes nothing."""
    model, quantizer = build(case, train_steps=4)
    state = model.state_dict()
    fresh, fresh_quantizer = build(case, seed=1, train_steps=0)
    fresh.load_state_dict(state)
    _expect(
        fresh_quantizer.steps == quantizer.steps == 4,
        f"{case}: steps {fresh_quantizer.steps} after load, {quantizer.steps} before",
    )
    model.eval()
    fresh.eval()
    x, _ = example_batch(5)
    with torch.no_grad():
        before = model(x)
        _expect(torch.equal(before, fresh(x)), f"{case}: a loaded model computes differently")
        model.load_state_dict(model.state_dict())
        _expect(torch.equal(before, model(x)), f"{case}: its own state dict changed the model")


def check_eval_freezes_statistics(case: ConformanceCase) -> None:
    """Eval-mode forwards change no buffer or parameter."""
    model, _ = build(case)
    model.eval()
    with torch.no_grad():  # weight scales follow the weights, which the last step changed
        model(example_batch(6)[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(example_batch(7)[0] * 10)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    _expect(changed == [], f"{case}: eval changed {changed}")


def check_shapes_and_dtypes(case: ConformanceCase) -> None:
    """Train and eval outputs have the float model's shape and dtype."""
    reference = make_net()
    model, _ = build(case)
    x, _ = example_batch(2)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(reference, mode)()
        out, ref = model(x), reference(x)
        _expect(
            out.shape == ref.shape and out.dtype == ref.dtype,
            f"{case}: {mode} output {tuple(out.shape)} {out.dtype}, float "
            f"{tuple(ref.shape)} {ref.dtype}",
        )


def check_packed_export(case: ConformanceCase, folder: Path) -> None:
    """The packed file is model_size_bytes plus its header and reloads bit-exactly."""
    model, quantizer = build(case)
    model.eval()
    x, _ = example_batch(11)
    with torch.no_grad():
        expected = model(x)
    path = Path(folder) / "model.qpk"
    written = quantizer.export_packed(path)
    _expect(written == path.stat().st_size, f"{case}: returned {written} bytes, wrote more")
    header = int.from_bytes(path.read_bytes()[8:12], "little") + 12
    size = model_size_bytes(model)
    _expect(written - header == size, f"{case}: payload {written - header}, size {size}")
    loaded = load_packed(path, make_net(seed=3))
    with torch.no_grad():
        _expect(torch.equal(loaded(x), expected), f"{case}: reloaded outputs differ")
    for name, wrapper in _wrappers(model).items():
        if wrapper.weight_quant is not None:
            _expect(
                torch.equal(loaded.get_submodule(name).weight, wrapper.quantized_weight()),
                f"{case}: reloaded {name}.weight differs",
            )


def check_export_model_twice(case: ConformanceCase, folder: Path) -> None:
    """export_model twice: identical calibration, a state dict that loads strictly into a fresh
    float model and holds the latent float weights."""
    folder = Path(folder)
    model, quantizer = build(case)
    first = quantizer.export_model(folder / "a.pt", folder / "a.json")
    second = quantizer.export_model(folder / "b.pt", folder / "b.json")
    _expect(first == second, f"{case}: two exports differ")
    _expect(
        (folder / "a.json").read_text() == (folder / "b.json").read_text(),
        f"{case}: two calibration files differ",
    )
    fresh = make_net(seed=4)
    fresh.load_state_dict(torch.load(folder / "b.pt"), strict=True)
    wrappers = _wrappers(model)
    for name, wrapper in wrappers.items():
        if wrapper.weight_quant is not None:
            _expect(
                torch.equal(fresh.get_submodule(name).weight, wrapper.module.weight.detach()),
                f"{case}: exported {name}.weight is not the latent float weight",
            )
            _expect(
                first[name]["weight_bits"] == wrapper.weight_quant.bits,
                f"{case}: calibration of {name} has weight_bits {first[name]['weight_bits']}",
            )
    _expect(set(first) == set(wrappers), f"{case}: calibration layers {sorted(first)}")


def _quants(model: nn.Module) -> list[TensorQuant]:
    return [m for m in model.modules() if isinstance(m, TensorQuant)]


def check_calibration(case: ConformanceCase) -> None:
    """``calibrate()`` on a freshly compressed model: the float model's outputs, no autograd,
    BatchNorm statistics untouched, training flags restored, and afterwards an evaluable model
    whose outputs take at most 2^bits values."""
    model, quantizer = build(case, train_steps=0)
    reference = make_net().eval()
    model.train()
    model.get_submodule("flatten").eval()  # a mixed set of flags must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    statistics = {
        k: v.clone() for k, v in model.state_dict().items()
        if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }
    x, _ = example_batch(21)
    with quantizer.calibrate() as calibrating:
        _expect(calibrating is model, f"{case}: calibrate() yields another object")
        _expect(not torch.is_grad_enabled(), f"{case}: autograd is on inside calibrate()")
        out = model(x)
        model(example_batch(22)[0])
    _expect(torch.is_grad_enabled(), f"{case}: autograd stays off after calibrate()")
    _expect(
        torch.allclose(out, reference(x), atol=1e-5, rtol=1e-5),
        f"{case}: a calibration forward is not the float model's",
    )
    _expect(
        flags == {name: m.training for name, m in model.named_modules()},
        f"{case}: calibrate() did not restore the training flags",
    )
    for key, value in statistics.items():
        _expect(torch.equal(model.state_dict()[key], value), f"{case}: calibrate() moved {key}")
    _expect(quantizer.steps == 0, f"{case}: calibration counted {quantizer.steps} steps")
    model.eval()
    with torch.no_grad():
        outputs = _outputs_of(model, list(case.example.bits), x)
    for name, roles in case.example.bits.items():
        if "output" in roles:
            distinct = torch.unique(outputs[name]).numel()
            _expect(
                distinct <= 2 ** roles["output"],
                f"{case}: {name} output after calibration: {distinct} levels",
            )


_ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


def _quantized_roles(model: nn.Module) -> dict[str, TensorQuant]:
    """``layer.role`` -> its tensor quantizer, for every quantized tensor of the model."""
    roles: dict[str, TensorQuant] = {}
    for name, wrapper in _wrappers(model).items():
        for role in ("weight", "input", "output"):
            quant = getattr(wrapper, f"{role}_quant")
            if quant is not None:
                roles[f"{name}.{role}"] = quant
    return roles


def _without_qdq_form(model: nn.Module) -> set[str]:
    """The tensors whose quantizer says it has no QDQ form (``NoQdqFormError``)."""
    refused: set[str] = set()
    for name, quant in _quantized_roles(model).items():
        layer, role = name.rsplit(".", 1)
        try:
            if role == "weight":
                quant.qdq_weight(_wrappers(model)[layer].quantized_weight())
            else:
                quant.qdq_activation()
        except NoQdqFormError:
            refused.add(name)
    return refused


def check_onnx_export(case: ConformanceCase, folder: Path) -> None:
    """The ONNX QDQ export: every quantized tensor is in the file at its bits, ``size_bytes`` is
    model_size_bytes, and onnxruntime computes the eval-mode model's outputs (up to float sums).
    A model holding a quantizer without a QDQ form is refused whole, naming exactly those
    tensors, and nothing is written."""
    import numpy as np
    import onnxruntime  # declared in CHECKS["onnx_export"].requires: a runner skips without it

    model, _ = build(case)
    model.eval()
    path = Path(folder) / "model.onnx"
    refused = _without_qdq_form(model)
    try:
        result = export_onnx(model, path, example_batch()[0][:1])
    except OnnxExportError as error:
        named = {line.split(":", 1)[0].strip() for line in str(error).splitlines()[1:]}
        _expect(
            bool(refused) and named == refused,
            f"{case}: ONNX export refused {sorted(named)} ({error}); the quantizers without a "
            f"QDQ form: {sorted(refused)}",
        )
        _expect(not path.exists(), f"{case}: a refused ONNX export wrote {path.name}")
        return
    _expect(not refused, f"{case}: exported to ONNX although {sorted(refused)} have no QDQ form")
    bits = {name: quant.bits for name, quant in _quantized_roles(model).items()}
    written = {t.name: t.bits for t in result.tensors}
    _expect(written == bits, f"{case}: ONNX tensors {written}, quantized tensors {bits}")
    _expect(result.unquantized == (), f"{case}: left in float in ONNX: {result.unquantized}")
    size = model_size_bytes(model)
    _expect(result.size_bytes == size, f"{case}: size_bytes {result.size_bytes}, model {size}")
    x, _ = example_batch(31, n=64)
    with torch.no_grad():
        expected = model(x).numpy()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"input": x.numpy()})[0]
    _expect(got.shape == expected.shape, f"{case}: onnxruntime output shape {got.shape}")
    # A rounding tie that float sums break the other way moves one code: allow a few.
    tolerance = 1e-4 * (1.0 + float(np.abs(expected).max()))
    close = float((np.abs(got - expected) <= tolerance).mean())
    _expect(
        close >= 0.95,
        f"{case}: onnxruntime agrees with the eval-mode model on {close:.1%} of the outputs "
        f"(within {tolerance:.2g})",
    )


@dataclass(frozen=True)
class Check:
    """One conformance check and what running it needs: ``check(case)``, or
    ``check(case, folder)`` when ``needs_folder``."""

    run: Callable[..., None]
    #: It writes files: a runner passes a fresh empty folder as second argument.
    needs_folder: bool = False
    #: Modules it imports beyond torch: a runner skips it where one is missing.
    requires: tuple[str, ...] = ()

    def __call__(self, case: ConformanceCase, folder: Path | None = None) -> None:
        if not self.needs_folder:
            self.run(case)
        elif folder is None:
            raise TypeError(f"{self.run.__name__} needs a folder to write in")
        else:
            self.run(case, Path(folder))

    def missing(self) -> list[str]:
        """The required modules that cannot be imported here."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


#: Check name -> check. A check added here runs in every :class:`ConformanceSuite`.
CHECKS: dict[str, Check] = {
    "levels": Check(check_levels),
    "gradients": Check(check_gradients),
    "state_dict_round_trip": Check(check_state_dict_round_trip),
    "eval_freezes_statistics": Check(check_eval_freezes_statistics),
    "shapes_and_dtypes": Check(check_shapes_and_dtypes),
    "packed_export": Check(check_packed_export, needs_folder=True),
    "export_model_twice": Check(check_export_model_twice, needs_folder=True),
    "calibration": Check(check_calibration),
    "onnx_export": Check(check_onnx_export, needs_folder=True, requires=_ONNX_MODULES),
}


def suite_parameters(
    registry: Mapping[str, type[Quantizer]] | None = None,
) -> list[tuple[str, ConformanceCase]]:
    """Every (check name, case) pair the suite runs: :data:`CHECKS` as it is now, times
    :func:`conformance_cases` of ``registry``."""
    return [(name, case) for name in CHECKS for case in conformance_cases(registry)]


class ConformanceSuite:
    """Every check of :data:`CHECKS` on every example of ``registry``, as pytest tests.

    Subclass it in a test file (``class TestMine(ConformanceSuite): registry = {...}``); the
    test ids read ``check-algorithm-example``. A check that needs a folder gets pytest's
    ``tmp_path``; one whose ``requires`` cannot be imported is skipped, as with
    ``pytest.importorskip``.
    """

    #: Algorithm name -> quantizer class; None: every registered algorithm.
    registry: ClassVar[Mapping[str, type[Quantizer]] | None] = None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if {"check_name", "case"} <= set(metafunc.fixturenames):
            pairs = suite_parameters(self.registry)
            metafunc.parametrize(
                ("check_name", "case"), pairs, ids=[f"{name}-{case}" for name, case in pairs]
            )

    def test_conformance(
        self, check_name: str, case: ConformanceCase, request: pytest.FixtureRequest
    ) -> None:
        import pytest  # only a pytest run gets here: the module itself never needs pytest

        check = CHECKS[check_name]
        for module in check.requires:
            pytest.importorskip(module)
        folder = request.getfixturevalue("tmp_path") if check.needs_folder else None
        check(case, folder)
