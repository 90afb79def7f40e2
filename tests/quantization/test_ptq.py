"""Post-training quantization: observers on known data, calibration, errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from quantsearch.quantization import (
    ConfigError,
    NotCalibratedError,
    PtqQuantizer,
    QAT_Quantizer,
    get_quantizer,
)
from quantsearch.quantization._math import affine_qparams_float, fake_quantize
from quantsearch.quantization._observers import (
    histogram_add,
    histogram_start,
    mse_range,
    percentile_range,
)
from quantsearch.quantization._ptq import PtqActivationQuant, PtqWeightQuant

from .conftest import batch, make_net

W8A8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]


def _warmed_net() -> nn.Module:
    model = make_net()
    model.train()
    with torch.no_grad():
        for step in range(3):
            model(batch(200 + step)[0])
    return model.eval()


def test_ptq_is_registered_and_the_study_contract_works() -> None:
    float_model = _warmed_net()
    model = copy.deepcopy(float_model)
    x, _ = batch()
    quantizer = get_quantizer("ptq")(model, W8A8, optimizer=None, dummy_input=x[:1])
    assert isinstance(quantizer, PtqQuantizer)
    model = quantizer.compress()
    model.train()
    bn = model.conv1.bn
    running = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    with quantizer.calibrate():
        for step in range(4):
            out = model(batch(step)[0])
            assert not out.requires_grad
    assert model.training  # flags restored
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert int(bn.num_batches_tracked) == running[2]
    model.eval()
    with torch.no_grad():
        quantized, reference = model(x), float_model(x)
    error = float((quantized - reference).abs().max())
    assert 0 < error < 0.02 * float(reference.abs().max())


def test_evaluating_before_calibration_names_the_layer() -> None:
    model = make_net()
    quantizer = PtqQuantizer(model, W8A8, dummy_input=batch()[0][:1])
    quantizer.compress()
    model.eval()
    with pytest.raises(NotCalibratedError) as info:
        model(batch()[0])
    assert str(info.value) == (
        "relu1 (output): the post-training quantizer has observed no data; run batches through "
        "the model inside `with quantizer.calibrate():` (or train it) first"
    )
    with pytest.raises(NotCalibratedError):
        quantizer.export_packed("/dev/null")


def test_weight_only_ptq_needs_no_calibration() -> None:
    model, reference = make_net(), make_net().eval()
    PtqQuantizer(model, W8A8[:1]).compress()
    model.eval()
    x = batch()[0]
    assert torch.allclose(model(x), reference(x), atol=0.05)


def test_minmax_observer_keeps_the_extremes_of_every_batch() -> None:
    quant = PtqActivationQuant(8, scheme="per_tensor_affine", dtype="uint", observer="minmax",
                               percentile=99.99)
    for low, high in ((-1.0, 2.0), (-0.5, 3.0), (-2.0, 1.0)):
        quant.observe(torch.linspace(low, high, 101))
    quant.end_calibration()
    assert (float(quant.range_min), float(quant.range_max)) == (-2.0, 3.0)
    scale, zero_point = quant.qparams()
    assert float(scale) == pytest.approx(5.0 / 255, rel=1e-6)
    assert int(zero_point) == round(2.0 / (5.0 / 255))


def test_per_channel_minmax_observer_uses_dim_1() -> None:
    quant = PtqActivationQuant(8, scheme="per_channel_symmetric", dtype="int",
                               observer="minmax", percentile=99.99)
    x = torch.zeros(4, 3, 2)
    x[:, 0] = 1.0
    x[:, 1] = -2.0
    x[0, 2, 0] = 5.0
    quant.observe(x)
    quant.end_calibration()
    assert quant.range_max.tolist() == [1.0, -2.0, 5.0]
    assert quant.range_min.tolist() == [1.0, -2.0, 0.0]
    scale, _ = quant.qparams()
    assert scale.tolist() == pytest.approx([1 / 127, 2 / 127, 5 / 127], rel=1e-6)


def test_histogram_growth_merges_bins_exactly() -> None:
    # Integers and power-of-two widths: every bin edge is exact, so counts must agree exactly.
    first = torch.arange(0, 1025, dtype=torch.float32).reshape(1, -1)
    second = torch.tensor([[-3000.0, -1.0, 2500.0, 2500.0, 7.0]])
    counts, low, width = histogram_start(first, 2048)
    assert float(width) == 0.5
    counts, low, width = histogram_add(counts, low, width, second)
    assert float(counts.sum()) == first.numel() + second.numel()
    both = torch.cat([first, second], dim=1).double()
    both[0, 1024] = 1023.9  # the first maximum was counted in the closed top bin it started
    index = ((both - low) / width).floor().clamp(0, 2047).long().reshape(-1)
    direct = torch.bincount(index, minlength=2048).double()
    assert torch.equal(counts.reshape(-1), direct)
    assert float(low) <= -3000 and float(low + 2048 * width) >= 2500


def test_percentile_observer_matches_the_data_quantile() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(20000, generator=generator) * (1 + i) for i in range(3)]
    quant = PtqActivationQuant(8, scheme="per_tensor_affine", dtype="int",
                               observer="percentile", percentile=99.9)
    for data in batches:
        quant.observe(data)
    quant.end_calibration()
    ordered = torch.cat(batches).sort().values
    n = ordered.numel()
    bin_width = float(quant.hist_width)
    # Within a bin the histogram cannot tell values apart: the estimate lies between the
    # order statistics around the percentile's rank, give or take one bin.
    for value, rank in ((float(quant.range_max), 0.999 * n), (float(quant.range_min), 0.001 * n)):
        k = int(rank)
        assert float(ordered[k - 2]) - bin_width <= value <= float(ordered[k + 1]) + bin_width
    assert float(quant.range_max) < float(ordered[-1])
    assert float(quant.range_min) > float(ordered[0])


def test_percentile_100_is_minmax() -> None:
    rows = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    counts, low, width = histogram_start(rows, 2048)
    data_min, data_max = torch.aminmax(rows, dim=1)
    lo, hi = percentile_range(counts, low, width, 100.0, data_min, data_max)
    assert torch.equal(lo.float(), data_min) and torch.equal(hi.float(), data_max)


def _real_mse(x: torch.Tensor, low: float, high: float, bits: int) -> float:
    scale, zero_point = affine_qparams_float(low, high, 0, 2**bits - 1, False)
    return float(((fake_quantize(x, scale, zero_point, 0, 2**bits - 1) - x) ** 2).mean())


def test_mse_observer_clips_outliers_and_lowers_the_real_error() -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(50000, generator=generator)
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -30.0])  # rare outliers
    rows = x.reshape(1, -1)
    counts, low, width = histogram_start(rows, 2048)
    data_min, data_max = torch.aminmax(rows, dim=1)
    lo, hi = mse_range(counts, low, width, data_min, data_max, 0, 15, False)
    chosen = _real_mse(x, float(lo), float(hi), 4)
    widest = _real_mse(x, float(data_min), float(data_max), 4)
    assert float(hi) < 0.5 * float(data_max)
    assert chosen < 0.25 * widest
    # No clipping range of the same shape does much better on the real data.
    for alpha in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
        other = _real_mse(x, alpha * float(data_min), alpha * float(data_max), 4)
        assert chosen <= 1.1 * other, alpha


def test_mse_and_percentile_weights_are_recomputed_only_when_the_weight_changes() -> None:
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    quant = PtqWeightQuant(4, scheme="per_channel_symmetric", dtype="int", channels=6,
                           observer="mse", percentile=99.99).eval()
    first = quant(weight)
    scale = quant.scale.clone()
    assert torch.equal(quant(weight.clone()), first)
    assert torch.unique(quant.codes(first)[0][0]).numel() <= 16
    changed = weight.clone()
    changed[0] *= 3
    quant(changed)
    assert not torch.equal(quant.scale, scale)
    assert torch.equal(quant.scale[1:], scale[1:])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"observer": "max"},
         "config_list[0]: 'observer' = 'max' is invalid: expected one of ['minmax', "
         "'percentile', 'mse'], or a dict of them per quant type"),
        ({"observer": {"weight": "mse"}},
         "config_list[0]: 'observer' = {'weight': 'mse'} is invalid: no value given for "
         "['output']"),
        ({"observer": {"weight": "mse", "output": "mse", "input": "mse"}},
         "config_list[0]: 'observer' = {'weight': 'mse', 'output': 'mse', 'input': 'mse'} is "
         "invalid: key 'input' is not in quant_types ['weight', 'output']"),
        ({"observer": "percentile", "percentile": 40},
         "config_list[0]: 'percentile' = 40 is invalid: expected a number in (50, 100]"),
        ({"percentile": 99.0},
         "config_list[0]: 'percentile' = 99.0 is invalid: only used with observer "
         "'percentile' (this entry's: ['minmax'])"),
        ({"quant_start_step": 10},
         "config_list[0]: unknown key 'quant_start_step' for PtqQuantizer; allowed keys: "
         "quant_types, quant_bits, op_types, op_names, exclude, quant_scheme, quant_dtype, "
         "observer, percentile, rounding, bias_correction, fit_inputs, equalize, "
         "adaround_iters, gptq_damp"),
        ({"quant_bits": 1},
         "config_list[0]: 'quant_bits' = 1 is invalid: PtqQuantizer takes an int in 2..16 bits "
         "for weight"),
    ],
)
def test_config_errors(entry: dict[str, Any], message: str) -> None:
    base = {"quant_types": ["weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]}
    with pytest.raises(ConfigError) as info:
        PtqQuantizer(make_net(), [{**base, **entry}])
    assert str(info.value) == message


def test_qat_calibration_starts_the_moving_average_from_float_activations() -> None:
    float_model = _warmed_net()
    model = copy.deepcopy(float_model)
    config = [{"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu2"]}]
    quantizer = QAT_Quantizer(model, config)
    quantizer.compress()
    seen: list[tuple[float, float]] = []
    float_model.relu2.register_forward_hook(
        lambda _m, _i, out: seen.append((float(out.detach().min()), float(out.detach().max())))
    )
    with quantizer.calibrate(), torch.no_grad():
        for step in range(3):
            model(batch(step)[0])
            float_model(batch(step)[0])
    expected_min, expected_max = seen[0]
    for low, high in seen[1:]:
        expected_min = 0.99 * expected_min + 0.01 * low
        expected_max = 0.99 * expected_max + 0.01 * high
    quant = model.relu2.output_quant
    assert float(quant.tracked_min) == pytest.approx(expected_min, rel=1e-6, abs=1e-7)
    assert float(quant.tracked_max) == pytest.approx(expected_max, rel=1e-6)
    # A fine-tune continues from the calibrated range instead of starting it again.
    model.train()
    float_model.train()
    x = batch(9)[0]
    model(x)
    float_model(x)
    assert float(quant.tracked_max) == pytest.approx(
        0.99 * expected_max + 0.01 * seen[-1][1], rel=1e-5
    )


def test_calibrate_needs_compress_and_does_not_nest() -> None:
    model = make_net()
    quantizer = PtqQuantizer(model, W8A8)
    with pytest.raises(RuntimeError, match="call compress\\(\\) first"), quantizer.calibrate():
        pass
    quantizer.compress()
    with quantizer.calibrate():
        with pytest.raises(RuntimeError, match="already active"), quantizer.calibrate():
            pass
        model(batch()[0])
    model.eval()
    model(batch()[0])


def test_an_error_inside_calibrate_restores_the_model() -> None:
    model = make_net()
    quantizer = PtqQuantizer(model, W8A8)
    quantizer.compress()
    model.train()
    with pytest.raises(ValueError, match="boom"), quantizer.calibrate():
        raise ValueError("boom")
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()
    assert not any(m._calibrating for m in model.modules() if hasattr(m, "_calibrating"))
