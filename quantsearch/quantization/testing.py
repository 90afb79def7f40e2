"""The conformance suite every registered quantizer passes, reusable from any test runner.

An algorithm joins it by declaring ``examples`` on its class and registering it
(``@register_quantizer(name)``); :func:`conformance_cases` then yields one case per example of
every registered algorithm, and a class without examples makes it raise. A test file
parametrizes each check over the cases:

    @pytest.mark.parametrize("case", conformance_cases(), ids=str)
    def test_levels(case): check_levels(case)

The checks raise ``AssertionError`` with a message; they need only torch (and a folder for the
export checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._base import Example, Quantizer
from ._pack import load_packed, model_size_bytes
from ._registry import QUANTIZERS, missing_examples
from ._tensor_quant import TensorQuant
from ._wrapper import QuantWrapper

__all__ = [
    "CHECKS",
    "ConformanceCase",
    "ConformanceNet",
    "build",
    "check_calibration",
    "check_eval_freezes_statistics",
    "check_export_model_twice",
    "check_gradients",
    "check_levels",
    "check_packed_export",
    "check_shapes_and_dtypes",
    "check_state_dict_round_trip",
    "conformance_cases",
    "example_batch",
    "make_net",
]


class ConformanceNet(nn.Module):
    """Conv-BN-ReLU6, Conv-ReLU6, Linear: every layer kind the core treats differently.

    Input (N, 1, 8, 8), 5 classes. Declared examples refer to its layer names.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU6()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.flatten(x))


def make_net(seed: int = 0) -> ConformanceNet:
    """A ConformanceNet with weights seeded by ``seed``."""
    torch.manual_seed(seed)
    return ConformanceNet()


def example_batch(seed: int = 0, n: int = 16) -> tuple[Tensor, Tensor]:
    """Seeded inputs (n, 1, 8, 8) and labels 0..4."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    return x, torch.randint(0, 5, (n,), generator=generator)


@dataclass(frozen=True)
class ConformanceCase:
    """One declared example of one registered algorithm."""

    algorithm: str
    cls: type[Quantizer]
    example: Example

    def __str__(self) -> str:
        return f"{self.algorithm}-{self.example.id}"


def conformance_cases(
    registry: Mapping[str, type[Quantizer]] | None = None,
) -> list[ConformanceCase]:
    """Every example of every algorithm in ``registry`` (default: :data:`QUANTIZERS`).

    Raises ``TypeError`` naming the algorithm when one declares no examples: an algorithm is
    never silently left out of the suite.
    """
    registry = QUANTIZERS if registry is None else registry
    cases: list[ConformanceCase] = []
    for name, cls in registry.items():
        problem = missing_examples(cls)
        if problem is not None:
            raise TypeError(f"algorithm {name!r} cannot join the conformance suite: {problem}")
        cases.extend(ConformanceCase(name, cls, example) for example in cls.examples)
    return cases


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def build(
    case: ConformanceCase, *, seed: int = 0, train_steps: int = 5
) -> tuple[nn.Module, Quantizer]:
    """Compress a seeded ConformanceNet with the case's config_list and train it a few steps."""
    model = make_net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, _ = example_batch()
    quantizer = case.cls(model, case.example.config_list, optimizer, dummy_input=x[:1])
    model = quantizer.compress()
    model.train()
    for step in range(train_steps):
        xb, yb = example_batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    return model, quantizer


def _wrappers(model: nn.Module) -> dict[str, QuantWrapper]:
    return {m.name: m for m in model.modules() if isinstance(m, QuantWrapper)}


def _outputs_of(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    captured: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())
        )
        for name in names
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


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


#: Check name -> check; the export checks take a folder as second argument.
CHECKS: dict[str, Callable[..., None]] = {
    "levels": check_levels,
    "gradients": check_gradients,
    "state_dict_round_trip": check_state_dict_round_trip,
    "eval_freezes_statistics": check_eval_freezes_statistics,
    "shapes_and_dtypes": check_shapes_and_dtypes,
    "packed_export": check_packed_export,
    "export_model_twice": check_export_model_twice,
    "calibration": check_calibration,
}
