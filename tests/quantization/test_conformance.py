"""The suite every quantizer passes: one parametrized test per property, per algorithm."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from quantsearch.quantization import (
    Quantizer,
    QuantWrapper,
    load_packed,
    model_size_bytes,
)

from .cases import CASES
from .conftest import batch, make_net

IDS = [case[0] for case in CASES]


def compressed(case: tuple, *, seed: int = 0, train_steps: int = 5) -> tuple[nn.Module, Quantizer]:
    _, cls, config_list, _ = case
    model = make_net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, _ = batch()
    quantizer = cls(model, config_list, optimizer, dummy_input=x[:1])
    model = quantizer.compress()
    for step in range(train_steps):
        xb, yb = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    return model, quantizer


def outputs_of(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())
        )
        for name in names
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_quantized_tensors_take_at_most_2_pow_bits_values(case: tuple) -> None:
    model, quantizer = compressed(case)
    expected: dict[str, dict[str, int]] = case[3]
    wrappers = {m.name: m for m in model.modules() if isinstance(m, QuantWrapper)}
    assert {n: b for n, b in quantizer.layer_bits().items() if n in expected} == {
        n: {**quantizer.layer_bits()[n], **b} for n, b in expected.items()
    }
    model.eval()
    x, _ = batch(99)
    outputs = outputs_of(model, list(expected), x)
    checked = 0
    for name, roles in expected.items():
        for role, bits in roles.items():
            if role == "weight":
                # Integer codes: per-channel scales give 2^bits levels per channel.
                quant = wrappers[name].weight_quant
                values, _ = quant.codes(wrappers[name].quantized_weight())
                assert int(values.min()) >= 0 and int(values.max()) < 2**bits
            else:
                values = outputs[name]
            distinct = torch.unique(values).numel()
            assert 1 <= distinct <= 2**bits, (name, role, distinct)
            checked += 1
    assert checked == sum(len(r) for r in expected.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_straight_through_gradients_reach_every_quantized_weight(case: tuple) -> None:
    model, _ = compressed(case, train_steps=0)
    model.train()
    x, y = batch(3)
    nn.functional.cross_entropy(model(x), y).backward()
    for wrapper in (m for m in model.modules() if isinstance(m, QuantWrapper)):
        if wrapper.weight_quant is not None:
            grad = wrapper.module.weight.grad
            assert grad is not None and grad.abs().sum() > 0, wrapper.name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip_restores_outputs_and_steps(case: tuple) -> None:
    model, quantizer = compressed(case, train_steps=4)
    state = model.state_dict()
    fresh, fresh_quantizer = compressed(case, seed=1, train_steps=0)
    fresh.load_state_dict(state)
    assert fresh_quantizer.steps == quantizer.steps == 4
    model.eval()
    fresh.eval()
    x, _ = batch(5)
    assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_mode_freezes_every_statistic(case: tuple) -> None:
    model, _ = compressed(case)
    model.eval()
    with torch.no_grad():  # weight scales follow the weights, which the last step changed
        model(batch(6)[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(batch(7)[0] * 10)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes_and_dtypes_are_preserved(case: tuple) -> None:
    reference = make_net()
    model, _ = compressed(case)
    x, _ = batch(2)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(reference, mode)()
        out, ref = model(x), reference(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_packed_export_reloads_bit_exact_and_matches_the_size(case: tuple, tmp_path: Any) -> None:
    model, quantizer = compressed(case)
    model.eval()
    x, _ = batch(11)
    expected = model(x)
    path = tmp_path / "model.qpk"
    written = quantizer.export_packed(path)
    assert written == path.stat().st_size
    header = int.from_bytes(path.read_bytes()[8:12], "little") + 12
    assert written - header == model_size_bytes(model)
    loaded = load_packed(path, make_net(seed=3))
    assert torch.equal(loaded(x), expected)
    wrappers = {m.name: m for m in model.modules() if isinstance(m, QuantWrapper)}
    for name, wrapper in wrappers.items():
        if wrapper.weight_quant is not None:
            assert torch.equal(loaded.get_submodule(name).weight, wrapper.quantized_weight())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_export_model_twice_loads_strictly_into_a_fresh_model(case: tuple, tmp_path: Any) -> None:
    model, quantizer = compressed(case)
    first = quantizer.export_model(tmp_path / "a.pt", tmp_path / "a.json")
    second = quantizer.export_model(tmp_path / "b.pt", tmp_path / "b.json")
    assert first == second
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    fresh = make_net(seed=4)
    fresh.load_state_dict(torch.load(tmp_path / "b.pt"), strict=True)
    wrappers = {m.name: m for m in model.modules() if isinstance(m, QuantWrapper)}
    for name, wrapper in wrappers.items():
        if wrapper.weight_quant is not None:
            weight = fresh.get_submodule(name).weight
            assert torch.equal(weight, wrapper.module.weight.detach())
            assert first[name]["weight_bits"] == wrapper.weight_quant.bits
    assert set(first) == set(wrappers)
