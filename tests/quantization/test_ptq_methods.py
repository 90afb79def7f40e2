"""AdaRound, GPTQ, bias correction and cross-layer equalization of the ptq quantizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from quantsearch.quantization import ConfigError, PtqQuantizer, load_packed, wrappers_of
from quantsearch.quantization._equalize import equalization_pairs, equalize
from quantsearch.quantization._rounding import (
    AdaRoundLoss,
    adaround,
    gptq,
    nearest_codes,
    reconstruction_error,
    row_errors,
)


def _data(seed: int, n: int, shape: tuple[int, ...]) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator)


class ConvNet(nn.Module):
    """conv-BN-ReLU, a depthwise conv-BN-ReLU, a pointwise conv, a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pw = nn.Conv2d(8, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu2(self.bn2(self.dw(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(self.pool(self.pw(x)).flatten(1))


def _conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet()
    with torch.no_grad():  # BatchNorms with their own statistics, far from the identity
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.2, 3.0)
            bn.bias.uniform_(-0.5, 1.0)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.3, 2.0)
        net.conv1.weight.mul_(torch.logspace(-1, 1, 8).reshape(8, 1, 1, 1))  # unequal ranges
    return net.eval()


def _calibrated(model: nn.Module, config: list[dict], batches: list[Tensor]) -> PtqQuantizer:
    quantizer = PtqQuantizer(model, config, dummy_input=batches[0][:1])
    quantizer.compress()
    with quantizer.calibrate():
        for batch in batches:
            model(batch)
    model.eval()
    return quantizer


def _weights(bits: int, **options: object) -> list[dict]:
    return [{"quant_types": ["weight"], "quant_bits": bits, "op_types": ["Conv2d", "Linear"],
             **options}]


def _layer_mse(wrapper: nn.Module, inputs: Tensor) -> float:
    """Mean squared output error of the quantized weight against the float one (same input)."""
    module = wrapper.module
    weight, bias = wrapper._folded()
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            ref = nn.functional.linear(inputs, weight, bias)
            out = nn.functional.linear(inputs, wrapper.quantized_weight(), bias)
        else:
            ref = module._conv_forward(inputs, weight, bias)
            out = module._conv_forward(inputs, wrapper.quantized_weight(), bias)
    return float((out - ref).pow(2).mean())


def _layer_inputs(model: nn.Module, name: str, batches: list[Tensor]) -> Tensor:
    seen: list[Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach())
    )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen)


# -- the solvers ----------------------------------------------------------------------------
def _linear_problem(bits: int, seed: int = 0) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 16, 32, generator=generator)
    mixing = torch.randn(32, 32, generator=generator) / 4
    x = (torch.randn(1, 2048, 32, generator=generator) @ mixing) + 0.3  # correlated inputs
    scale = (w.abs().amax(dim=2, keepdim=True) / (2 ** (bits - 1) - 1))
    zero = torch.zeros_like(scale)
    h = x.transpose(1, 2) @ x / x.shape[1]
    return w, x, h, scale, zero


def test_adaround_masks_end_binary_and_beat_nearest() -> None:
    w, _, h, scale, zero = _linear_problem(3)
    qmin, qmax = -3, 3
    codes, soft = adaround(w, scale, zero, qmin, qmax, iters=500, h=h)
    assert float(((soft == 0) | (soft == 1)).float().mean()) > 0.99
    nearest = nearest_codes(w, scale, zero, qmin, qmax)
    assert float(reconstruction_error(w, codes * scale, h)) < 0.7 * float(
        reconstruction_error(w, nearest * scale, h)
    )
    assert bool(((codes - torch.floor(w / scale)).abs() <= 1).all())  # only up or down


@pytest.mark.parametrize("form", ["h", "rows"])
@pytest.mark.parametrize("beta", [None, 12.5, 2.0])
def test_adaround_gradient_is_the_losss_autograd_gradient(form: str, beta: float | None) -> None:
    w, x, h, scale, _ = _linear_problem(3)
    floor = torch.floor(w / scale)
    low, high = -3.0, 2.0  # some floors outside low .. high - 1: fixed codes, no gradient
    loss = AdaRoundLoss(
        residual=w - scale * floor.clamp(low, high),
        slope=torch.where((floor >= low) & (floor <= high - 1), scale, 0.0),
        norm=0.37, h=h if form == "h" else None, rows=x if form == "rows" else None,
    )
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 3  # clamped ends too
    pick = torch.randint(x.shape[1], (64,), generator=torch.Generator().manual_seed(4))
    leaf = v.clone().requires_grad_(True)
    loss.value(leaf, beta, pick).backward()
    assert leaf.grad is not None and float(leaf.grad.abs().max()) > 1e-3
    assert torch.allclose(loss.gradient(v, beta, pick), leaf.grad, atol=1e-6, rtol=1e-4)


def test_row_errors_agree_between_rows_and_second_moment() -> None:
    w, x, h, scale, zero = _linear_problem(3)
    w_hat = nearest_codes(w, scale, zero, -3, 3) * scale
    from_rows, from_h = row_errors(w, w_hat, x=x), row_errors(w, w_hat, h=h)
    assert from_rows.shape == (1, 16)
    assert torch.allclose(from_rows, from_h, rtol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_nearest(bits: int) -> None:
    w, _, h, scale, zero = _linear_problem(bits, seed=1)
    qmax = 2 ** (bits - 1) - 1
    codes = gptq(w, scale, zero, -qmax, qmax, h=h, damp=0.01)
    nearest = nearest_codes(w, scale, zero, -qmax, qmax)
    assert float(reconstruction_error(w, codes * scale, h)) < 0.8 * float(
        reconstruction_error(w, nearest * scale, h)
    )


# -- through the quantizer -------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["per_tensor_affine", "per_channel_symmetric"])
@pytest.mark.parametrize("rounding", ["adaround", "gptq"])
def test_learned_rounding_lowers_every_layers_output_error(scheme: str, rounding: str) -> None:
    batches = [_data(i, 32, (3, 8, 8)) for i in range(3)]
    bits = 3 if rounding == "adaround" else 4
    config = _weights(bits, quant_scheme=scheme, quant_dtype="int", rounding=rounding,
                      adaround_iters=300)
    model = _conv_net()
    quantizer = _calibrated(model, config, batches)
    reference = _calibrated(_conv_net(), _weights(bits, quant_scheme=scheme, quant_dtype="int"),
                            batches)
    assert set(quantizer.fit_records) == {"conv1", "dw", "pw", "fc"}
    improved = 0
    for name, record in quantizer.fit_records.items():
        assert record.error <= record.error_nearest, name  # never worse on the recorded rows
        if rounding == "adaround":
            assert record.mask_binary > 0.97, name
        inputs = _layer_inputs(_conv_net(), name, batches)  # float inputs, every position
        fitted = _layer_mse(wrappers_of(model)[name], inputs)
        nearest = _layer_mse(wrappers_of(reference.bound_model)[name], inputs)
        # rows where nearest fits the sample better keep it, so never much worse; conv1's
        # inputs are independent noise, where nothing beats nearest by much
        assert fitted < 1.01 * nearest, (name, fitted, nearest)
        improved += fitted < 0.9 * nearest
    assert improved >= 2


def _model_error(model: nn.Module, batches: list[Tensor]) -> float:
    reference = _conv_net()
    with torch.no_grad():
        return float(sum((model(b) - reference(b)).pow(2).mean() for b in batches))


@pytest.mark.parametrize("rounding", ["adaround", "gptq"])
def test_fitting_on_quantized_inputs_lowers_the_models_output_error(rounding: str) -> None:
    batches = [_data(i, 32, (3, 8, 8)) for i in range(3)]
    config = [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 2, "input": 4},
               "op_types": ["Conv2d", "Linear"], "quant_scheme": "per_channel_symmetric",
               "quant_dtype": "int", "rounding": rounding, "adaround_iters": 200,
               "bias_correction": True}]
    errors = {}
    for fit_inputs in ("float", "quantized"):
        model = _conv_net()
        quantizer = _calibrated(model, [{**config[0], "fit_inputs": fit_inputs}], batches)
        # fitted in forward order, whatever the modules' registration order
        assert list(quantizer.fit_records) == ["conv1", "dw", "pw", "fc"]
        errors[fit_inputs] = _model_error(model, batches)
    assert errors["quantized"] < 0.8 * errors["float"], errors


def test_quantized_inputs_without_quantization_before_are_the_float_fit() -> None:
    batches = [_data(i, 16, (3, 8, 8)) for i in range(2)]
    records, weights = [], []
    for fit_inputs in ("float", "quantized"):
        model = _conv_net()
        config = _weights(3, rounding="gptq", bias_correction=True, fit_inputs=fit_inputs)
        config[0]["op_types"] = ["Conv2d"]
        config[0]["op_names"] = ["conv1"]  # only the first layer: its inputs are the float ones
        quantizer = _calibrated(model, config, batches)
        records.append(quantizer.fit_records["conv1"])
        weights.append(wrappers_of(model)["conv1"].quantized_weight())
    assert torch.equal(weights[0], weights[1])
    assert records[0].error == pytest.approx(records[1].error, rel=1e-5)
    assert records[0].bias_shift is not None and records[1].bias_shift is not None
    assert torch.allclose(records[0].bias_shift, records[1].bias_shift, atol=1e-6)


class _ShiftingNet(nn.Module):
    """A forward that crops its input differently on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.conv(x[..., self.calls % 3 :])


def test_quantized_inputs_need_a_repeatable_forward() -> None:
    model = _ShiftingNet()
    quantizer = PtqQuantizer(model, _weights(3, rounding="gptq", fit_inputs="quantized"))
    quantizer.compress()
    message = "layer 'conv' saw inputs of other shapes"
    with pytest.raises(RuntimeError, match=message), quantizer.calibrate():
        model(_data(0, 4, (3, 8, 8)))


def test_bias_correction_zeroes_the_mean_output_error() -> None:
    batches = [_data(i, 32, (3, 8, 8)) for i in range(2)]
    model = _conv_net()
    quantizer = _calibrated(model, _weights(3, bias_correction=True), batches)
    for name in ("conv1", "dw", "pw", "fc"):
        wrapper = wrappers_of(model)[name]
        inputs = _layer_inputs(_conv_net(), name, batches)  # the float layer inputs
        module = wrapper.module
        weight, _bias = wrapper._folded()
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                error = nn.functional.linear(inputs, wrapper.quantized_weight() - weight)
                ref = nn.functional.linear(inputs, weight)
            else:
                error = module._conv_forward(inputs, wrapper.quantized_weight() - weight, None)
                ref = module._conv_forward(inputs, weight, None)
        dims = [0, *list(range(2, error.dim()))]
        shift = quantizer.fit_records[name].bias_shift
        assert shift is not None  # dw has no bias, but its BatchNorm takes the correction
        mean_error = error.mean(dims) + shift  # the corrected bias cancels the mean change
        assert float(mean_error.abs().max()) < 1e-4 * float(ref.abs().mean()) + 1e-6
        assert float(error.mean(dims).abs().max()) > 1e-4  # there was something to correct


def test_second_calibration_replaces_the_bias_correction() -> None:
    batches = [_data(i, 16, (3, 8, 8)) for i in range(2)]
    model = _conv_net()
    quantizer = _calibrated(model, _weights(4, bias_correction=True), batches)
    first = model.conv1.bn.bias.detach().clone()  # conv1 sees the data: the same inputs again
    with quantizer.calibrate():
        for batch in batches:
            model(batch)
    assert torch.allclose(model.conv1.bn.bias, first, atol=1e-6)
    assert not torch.allclose(first, _conv_net().bn1.bias, atol=1e-4)


def test_learned_codes_survive_state_dict_and_exports(tmp_path: Path) -> None:
    batches = [_data(i, 16, (3, 8, 8)) for i in range(2)]
    # weights only: onnxruntime's activation rounding ties would blur an exact comparison
    config = _weights(3, rounding="adaround", adaround_iters=40)
    model = _conv_net()
    quantizer = _calibrated(model, config, batches)
    wrappers = {n: w for n, w in wrappers_of(model).items() if w.weight_quant is not None}
    moved = sum(int((w.weight_quant.rounding_offset != 0).sum()) for w in wrappers.values())
    assert moved > 0  # AdaRound rounded some weights away from nearest
    x = _data(9, 8, (3, 8, 8))
    with torch.no_grad():
        expected = model(x)
    fresh = PtqQuantizer(_conv_net(), config, dummy_input=x[:1])
    fresh_model = fresh.compress()
    fresh_model.load_state_dict(model.state_dict())
    fresh_model.eval()
    with torch.no_grad():
        assert torch.equal(fresh_model(x), expected)
    quantizer.export_packed(tmp_path / "m.qpk")
    loaded = load_packed(tmp_path / "m.qpk", _conv_net())
    for name, wrapper in wrappers.items():
        assert torch.equal(loaded.get_submodule(name).weight, wrapper.quantized_weight())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from quantsearch.quantization import export_onnx

    export_onnx(model, tmp_path / "m.onnx", x[:1])
    session = onnxruntime.InferenceSession(
        str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]
    )
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-5 * (1 + float(expected.abs().max())))


def test_training_forward_drops_the_learned_rounding() -> None:
    batches = [_data(0, 16, (3, 8, 8))]
    model = _conv_net()
    _calibrated(model, _weights(3, rounding="gptq"), batches)
    quant = wrappers_of(model)["fc"].weight_quant
    assert quant.rounding == "gptq" and quant.rounding_offset.numel() > 0
    model.train()
    model(batches[0])
    assert quant.rounding == "nearest" and quant.rounding_offset.numel() == 0


def test_conv1d_and_grouped_conv_fit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=2, dilation=2), nn.ReLU(),
                          nn.Conv1d(8, 8, 3, stride=2, groups=4), nn.Flatten(),
                          nn.Linear(8 * 7, 3))
    batches = [_data(i, 16, (4, 16)) for i in range(2)]
    quantizer = _calibrated(model, [{"quant_types": ["weight"], "quant_bits": 3,
                                     "op_types": ["Conv1d", "Linear"], "rounding": "gptq"}],
                            batches)
    assert set(quantizer.fit_records) == {"0", "2", "4"}
    for record in quantizer.fit_records.values():
        assert record.error < record.error_nearest


# -- cross-layer equalization ---------------------------------------------------------------
def _ranges(weight: Tensor, dim: int) -> Tensor:
    return weight.abs().transpose(0, dim).reshape(weight.shape[dim], -1).amax(1)


def test_equalize_keeps_float_outputs_and_equalizes_ranges() -> None:
    model = _conv_net()
    x = _data(3, 16, (3, 8, 8))
    with torch.no_grad():
        before = model(x)
    result = equalize(model)
    pairs = {(p.first, p.second) for p in result.pairs}
    assert pairs == {("conv1", "dw"), ("dw", "pw")}
    with torch.no_grad():
        after = model(x)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())
    # conv1's folded output ranges equal dw's input ranges (dw's BatchNorm folded)
    f1 = model.bn1.weight / torch.sqrt(model.bn1.running_var + model.bn1.eps)
    f2 = model.bn2.weight / torch.sqrt(model.bn2.running_var + model.bn2.eps)
    r1 = _ranges(model.conv1.weight * f1.reshape(-1, 1, 1, 1), 0)
    r2 = _ranges(model.dw.weight * f2.reshape(-1, 1, 1, 1), 0)
    r3 = _ranges(model.pw.weight, 1)
    assert torch.allclose(r1, r2, rtol=1e-3)
    assert torch.allclose(r2, r3, rtol=1e-3)


def test_high_bias_absorption_is_exact_where_its_assumption_holds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = _data(1, 64, (6,))
    with torch.no_grad():
        model[1].running_mean.copy_(model[0](x).mean(0))
        model[1].running_var.copy_(model[0](x).var(0) * 16)  # |normalised| stays well under 3
        model[1].weight.uniform_(0.5, 1.0)
        model[1].bias.uniform_(3.0, 4.0)  # high biases: beta - 3 gamma > 0
        before = model(x)
    result = equalize(model)
    (pair,) = result.pairs
    assert pair.absorbed is not None and float(pair.absorbed.min()) > 0
    with torch.no_grad():
        after = model(x)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())


def test_relu6_and_residual_pairs_are_left_alone() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)
            self.act = nn.ReLU6()
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.a(x)
            return self.c(self.act(self.b(y) + y))

    assert equalization_pairs(Residual()) == []
    six = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1))
    assert equalization_pairs(six) == []


def test_equalize_through_the_quantizer_keeps_float_calibration() -> None:
    model = _conv_net()
    reference = _conv_net()
    x = _data(5, 8, (3, 8, 8))
    quantizer = PtqQuantizer(model, _weights(4, equalize=True), dummy_input=x[:1])
    quantizer.compress()
    assert quantizer.equalization is not None and len(quantizer.equalization.pairs) == 2
    with quantizer.calibrate():
        out = model(x)
    with torch.no_grad():
        expected = reference(x)
    assert float((out - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


# -- the keys ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"rounding": "stochastic"},
         "config_list[0]: 'rounding' = 'stochastic' is invalid: expected one of ['nearest', "
         "'adaround', 'gptq']"),
        ({"bias_correction": "yes"},
         "config_list[0]: 'bias_correction' = 'yes' is invalid: expected true or false"),
        ({"equalize": 1},
         "config_list[0]: 'equalize' = 1 is invalid: expected true or false"),
        ({"rounding": "adaround", "adaround_iters": 0},
         "config_list[0]: 'adaround_iters' = 0 is invalid: expected an int in 1..100000"),
        ({"rounding": "gptq", "gptq_damp": 0},
         "config_list[0]: 'gptq_damp' = 0 is invalid: expected a number in (0, 1]"),
        ({"adaround_iters": 2.5},
         "config_list[0]: 'adaround_iters' = 2.5 is invalid: expected an int in 1..100000"),
        ({"gptq_damp": True},
         "config_list[0]: 'gptq_damp' = True is invalid: expected a number in (0, 1]"),
        ({"fit_inputs": "fake"},
         "config_list[0]: 'fit_inputs' = 'fake' is invalid: expected one of ['float', "
         "'quantized']"),
    ],
)
def test_bad_keys(entry: dict, message: str) -> None:
    base = {"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d"]}
    with pytest.raises(ConfigError) as info:
        PtqQuantizer(_conv_net(), [{**base, **entry}])
    assert str(info.value) == message
