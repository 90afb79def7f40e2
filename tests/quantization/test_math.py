"""Numbers on hand-made tensors: scales, zero points, EMA, STE windows, DoReFa, BNN, LSQ."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from quantsearch.quantization import _math
from quantsearch.quantization._math import (
    NATIVE_MAX_NUMEL,
    SCALE_FLOOR,
    affine_qparams,
    fake_quantize,
    fake_quantize_clamped,
    quant_range,
    to_float32,
)
from quantsearch.quantization._tensor_quant import (
    AffineWeightQuant,
    DoReFaWeightQuant,
    EmaActivationQuant,
    LsqQuant,
    SignQuant,
)


def test_quant_ranges() -> None:
    assert quant_range(8, "uint") == (0, 255)
    assert quant_range(8, "int") == (-127, 127)
    assert quant_range(2, "int") == (-1, 1)


# tensor [-1, 0, 3]: range [-1, 3]
@pytest.mark.parametrize(
    ("scheme", "dtype", "scale", "zero_point"),
    [
        ("per_tensor_affine", "uint", 4 / 255, 64),  # 0 - round(-1 / (4/255)) = round(63.75)
        ("per_tensor_affine", "int", 4 / 254, -63),  # -127 - round(-63.5) = -127 + 64
        ("per_tensor_symmetric", "int", 3 / 127, 0),
        ("per_tensor_symmetric", "uint", 3 / 127.5, 128),
    ],
)
def test_per_tensor_scale_and_zero_point(
    scheme: str, dtype: str, scale: float, zero_point: int
) -> None:
    quant = AffineWeightQuant(8, scheme=scheme, dtype=dtype, channels=3)
    quant(torch.tensor([-1.0, 0.0, 3.0]))
    assert float(quant.scale.detach()) == pytest.approx(scale, rel=1e-6)
    assert int(quant.zero_point) == zero_point


def test_range_is_widened_to_contain_zero() -> None:
    quant = AffineWeightQuant(8, scheme="per_tensor_affine", dtype="uint", channels=1)
    out = quant(torch.tensor([2.0, 4.0]))
    assert float(quant.scale.detach()) == pytest.approx(4 / 255, rel=1e-6)
    assert int(quant.zero_point) == 0
    assert torch.allclose(out, torch.tensor([2.0, 4.0]), atol=4 / 255 / 2)


@pytest.mark.parametrize(
    ("scheme", "dtype", "scales", "zero_points"),
    [
        ("per_channel_affine", "uint", [3 / 255, 0.5 / 255], [85, 0]),
        ("per_channel_symmetric", "int", [2 / 127, 0.5 / 127], [0, 0]),
    ],
)
def test_per_channel_scales_use_dim_0(
    scheme: str, dtype: str, scales: list[float], zero_points: list[int]
) -> None:
    quant = AffineWeightQuant(8, scheme=scheme, dtype=dtype, channels=2)
    quant(torch.tensor([[-1.0, 2.0], [0.5, 0.25]]))
    assert quant.scale.tolist() == pytest.approx(scales, rel=1e-6)
    assert quant.zero_point.tolist() == zero_points


def test_all_zero_tensor_gets_the_scale_floor_and_no_nan() -> None:
    for scheme in ("per_tensor_affine", "per_channel_symmetric"):
        quant = AffineWeightQuant(8, scheme=scheme, dtype="uint", channels=2)
        out = quant(torch.zeros(2, 3))
        assert quant.scale.flatten().tolist() == pytest.approx([SCALE_FLOOR] * quant.scale.numel())
        assert torch.equal(out, torch.zeros(2, 3))
    scale, zero_point = affine_qparams(torch.zeros(()), torch.zeros(()), 0, 255, False)
    assert float(scale) == pytest.approx(SCALE_FLOOR) and int(zero_point) == 0
    assert torch.isfinite(DoReFaWeightQuant(2)(torch.zeros(4))).all()


def test_ema_starts_from_the_first_batch_then_decays_by_0_99() -> None:
    quant = EmaActivationQuant(8, scheme="per_tensor_affine", dtype="uint").train()
    quant(torch.tensor([-1.0, 3.0]))
    assert (float(quant.tracked_min), float(quant.tracked_max)) == (-1.0, 3.0)
    quant(torch.tensor([-2.0, 5.0]))
    assert float(quant.tracked_min) == pytest.approx(0.99 * -1 + 0.01 * -2)
    assert float(quant.tracked_max) == pytest.approx(0.99 * 3 + 0.01 * 5)
    quant.eval()
    quant(torch.tensor([-100.0, 100.0]))
    assert float(quant.tracked_max) == pytest.approx(3.02)


def test_ema_per_channel_tracks_dim_1() -> None:
    quant = EmaActivationQuant(8, scheme="per_channel_affine", dtype="uint").train()
    quant(torch.tensor([[[1.0, 2.0], [-3.0, 0.5]], [[4.0, 0.0], [-1.0, 1.0]]]))
    assert quant.tracked_min.tolist() == [0.0, -3.0]
    assert quant.tracked_max.tolist() == [4.0, 1.0]


def test_straight_through_gradient_is_zero_outside_the_range() -> None:
    quant = EmaActivationQuant(8, scheme="per_tensor_affine", dtype="uint").train()
    quant(torch.tensor([0.0, 1.0]))
    quant.eval()
    x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    quant(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_fake_quantization_formula() -> None:
    quant = AffineWeightQuant(2, scheme="per_tensor_affine", dtype="uint", channels=4)
    x = torch.tensor([-1.0, 0.1, 0.9, 2.0])
    out = quant(x)
    scale, zp = 3.0 / 3, 1  # range [-1, 2] on 0..3
    expected = [scale * (min(max(round(v / scale + zp), 0), 3) - zp) for v in x.tolist()]
    assert out.tolist() == pytest.approx(expected)
    assert float(quant.scale.detach()) == scale and int(quant.zero_point) == zp


def _with_gradient(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.linspace(-1, 1, x.numel()).reshape(x.shape))
    return out.detach(), x.grad


@pytest.mark.parametrize("numel", [300, NATIVE_MAX_NUMEL + 300], ids=["small", "large"])
@pytest.mark.parametrize(("bits", "dtype"), [(8, "int"), (8, "uint"), (3, "uint"), (16, "int")])
def test_fake_quantize_is_bit_identical_to_torch_kernels(numel: int, bits: int, dtype: str) -> None:
    """Small tensors go to torch's kernels, large ones to our arithmetic: both agree bit for bit,
    ties (x exactly half a step) and clipped values included, in output and gradient."""
    qmin, qmax = quant_range(bits, dtype)
    scale = to_float32(5.0 / (qmax - qmin))
    zero_point = qmin + (qmax - qmin) // 3
    x = torch.randn(numel, generator=torch.Generator().manual_seed(bits)) * 4
    x[:200] = (torch.arange(200) - 100 + 0.5) * scale  # round-half-to-even cases
    ours = _with_gradient(lambda t: fake_quantize(t, scale, zero_point, qmin, qmax), x)
    torch_ = _with_gradient(
        lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zero_point, qmin, qmax), x
    )
    assert torch.equal(ours[0], torch_[0]) and torch.equal(ours[1], torch_[1])
    assert 0 < int((ours[1] == 0).sum()) < numel  # some values were clipped, some not

    channels = torch.linspace(0.5, 2, 4) * scale
    zero_points = torch.tensor([qmin, zero_point, zero_point, qmax], dtype=torch.int32)
    x2 = x.reshape(4, -1)
    ours = _with_gradient(
        lambda t: fake_quantize(t, channels, zero_points, qmin, qmax, axis=0), x2
    )
    torch_ = _with_gradient(
        lambda t: torch.fake_quantize_per_channel_affine(t, channels, zero_points, 0, qmin, qmax),
        x2,
    )
    assert torch.equal(ours[0], torch_[0]) and torch.equal(ours[1], torch_[1])


@pytest.mark.parametrize("numel", [300, NATIVE_MAX_NUMEL + 300], ids=["small", "large"])
@pytest.mark.parametrize(
    ("activation", "low", "high"),
    [(nn.ReLU(), 0.0, math.inf), (nn.ReLU6(), 0.0, 6.0), (nn.Hardtanh(), -1.0, 1.0)],
    ids=["relu", "relu6", "hardtanh"],
)
@pytest.mark.parametrize("dtype", ["uint", "int"])
def test_clamp_folded_into_output_quantization_is_bit_identical(
    activation: nn.Module, low: float, high: float, numel: int, dtype: str
) -> None:
    """forward_clamped(x) == forward(activation(x)): outputs, gradients and EMA statistics, also
    for inputs a hair outside the activation's range (inside half a quantization step)."""
    folded = EmaActivationQuant(8, scheme="per_tensor_affine", dtype=dtype).train()
    plain = EmaActivationQuant(8, scheme="per_tensor_affine", dtype=dtype).train()
    generator = torch.Generator().manual_seed(numel)
    edge = 6.0 if math.isinf(high) else high
    for _ in range(3):
        x = torch.randn(numel, generator=generator) * 4
        x[:8] = torch.tensor([low, edge, 0.0, low - 1e-3, edge + 1e-3, low + 1e-3, edge - 1e-3, 9])
        ours = _with_gradient(lambda t: folded.forward_clamped(t, low, high), x)
        reference = _with_gradient(lambda t: plain(activation(t)), x)
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
        assert (folded._min, folded._max) == (plain._min, plain._max)
    assert 0 < int((ours[1] == 0).sum()) < numel


def _around(value: float, ulps: int = 3) -> list[float]:
    """float32 values from ``ulps`` below to ``ulps`` above ``value``."""
    out, low, high = [to_float32(value)], to_float32(value), to_float32(value)
    for _ in range(ulps):
        low = float(np.nextafter(np.float32(low), np.float32(-np.inf)))
        high = float(np.nextafter(np.float32(high), np.float32(np.inf)))
        out += [low, high]
    return out


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize(("low", "high"), [(0.0, math.inf), (0.0, 6.0), (-1.0, 1.0)])
def test_gradient_interval_equals_the_explicit_mask(bits: int, low: float, high: float) -> None:
    """The clamped fake quantization passes its gradient on an interval of x instead of a mask
    tensor: outputs and gradients equal the masked computation's bit for bit, for x on every
    float32 near a rounding boundary of the lowest and highest codes and of the activation."""
    generator = torch.Generator().manual_seed(bits)
    qmin, qmax = quant_range(bits, "uint")
    for trial in range(20):
        span = float(torch.rand((), generator=generator)) * 10 + 1e-3
        scale = to_float32(span / (qmax - qmin))
        zero_point = int(torch.randint(qmin, qmax + 1, (), generator=generator))
        if trial == 0:
            scale, zero_point = to_float32(6.0 / (qmax - qmin)), qmin  # ReLU6's own range
        inv_scale = to_float32(1.0 / scale)
        edges = [(qmin - zero_point - 0.5) * scale, (qmax - zero_point + 0.5) * scale, low, high]
        x = torch.tensor(
            [v for edge in edges if math.isfinite(edge) for v in _around(edge)]
            + (torch.randn(NATIVE_MAX_NUMEL, generator=generator) * span).tolist()
        )
        results = []
        for interval in (True, False):
            with pytest.MonkeyPatch.context() as patch:
                if not interval:
                    patch.setattr(_math, "_passing_interval", lambda *args: None)
                quantize = functools.partial(
                    fake_quantize_clamped, low=low, high=high, scale=scale,
                    zero_point=zero_point, qmin=qmin, qmax=qmax,
                )
                results.append(_with_gradient(quantize, x))
        (out, grad), (ref_out, ref_grad) = results
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad), (scale, zero_point)
        code_low, code_high = qmin - zero_point, qmax - zero_point
        assert _math._passing_interval(inv_scale, code_low, code_high, (low, high)) is not None


def test_dorefa_two_bit_levels() -> None:
    w = torch.linspace(-3, 3, 101)
    out = DoReFaWeightQuant(2)(w)
    assert sorted(set(torch.round(out * 3).tolist())) == [-3.0, -1.0, 1.0, 3.0]
    assert out.min() == -1.0 and out.max() == 1.0


def test_dorefa_gradient_includes_tanh_derivative() -> None:
    w = torch.tensor([0.1, -0.5, 2.0], requires_grad=True)
    out = DoReFaWeightQuant(8)(w)
    out[0].backward()
    # d/dw0 of tanh(w0) / (2 max|tanh|) + 1/2, times 2: max|tanh| = tanh(2) comes from w2
    expected = (1 - math.tanh(0.1) ** 2) / math.tanh(2.0)
    assert float(w.grad[0]) == pytest.approx(expected, rel=1e-5)


def test_bnn_sign_of_zero_is_plus_one_and_gradients() -> None:
    activation = SignQuant(window=True)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    out = activation(x)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    w = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    SignQuant(window=False)(w).sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0]


def test_lsq_initial_scale_and_scale_gradient() -> None:
    bits = 3
    qn, qp = -4, 3
    x = torch.tensor([-1.0, -0.3, 0.05, 0.4, 2.5])
    quant = LsqQuant(bits, dtype="int", init_from=x)
    s0 = 2 * x.abs().mean().item() / math.sqrt(qp)
    assert float(quant.scale.detach()) == pytest.approx(s0, rel=1e-6)
    out = quant(x)
    out.sum().backward()
    s = float(quant.scale.detach())
    expected = 0.0
    for v in x.tolist():
        r = v / s
        if r <= qn:
            expected += qn
        elif r >= qp:
            expected += qp
        else:
            expected += -r + round(r)
    expected /= math.sqrt(x.numel() * qp)
    assert float(quant.scale.grad) == pytest.approx(expected, rel=1e-4)
    assert out.tolist() == pytest.approx(
        [s * min(max(round(v / s), qn), qp) for v in x.tolist()], rel=1e-6
    )


def test_lsq_activation_scale_comes_from_the_first_training_batch() -> None:
    quant = LsqQuant(4, dtype="uint")
    x = torch.tensor([0.0, 1.0, 3.0])
    assert torch.equal(quant.eval()(x), x)  # nothing observed yet: passes through
    quant.train()(x)
    assert float(quant.scale.detach()) == pytest.approx(2 * (4 / 3) / math.sqrt(15), rel=1e-6)


class _DeviceMathEma(EmaActivationQuant):
    """The accelerator path (statistics kept as tensors), run on the CPU."""

    @staticmethod
    def _host_math(x: torch.Tensor) -> bool:
        return False


class _DeviceMathWeight(AffineWeightQuant):
    @staticmethod
    def _host_math(x: torch.Tensor) -> bool:
        return False


def test_tensor_path_for_accelerators_matches_the_host_path() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 4, 4, generator=generator) * (i + 1) for i in range(3)]
    host = EmaActivationQuant(8, scheme="per_tensor_affine", dtype="uint").train()
    device = _DeviceMathEma(8, scheme="per_tensor_affine", dtype="uint").train()
    for x in batches:
        host_out, device_out = host(x), device(x)
        scale = float(host.qparams()[0])
        assert torch.allclose(host_out, device_out, atol=scale * 1.01)
    assert float(device.tracked_min) == pytest.approx(float(host.tracked_min), rel=1e-6)
    assert float(device.tracked_max) == pytest.approx(float(host.tracked_max), rel=1e-6)
    weight = torch.randn(6, 3, generator=generator)
    host_w = AffineWeightQuant(4, scheme="per_tensor_affine", dtype="uint", channels=6)
    device_w = _DeviceMathWeight(4, scheme="per_tensor_affine", dtype="uint", channels=6)
    assert torch.allclose(host_w(weight), device_w(weight), atol=float(host_w.scale) * 1.01)
    assert float(device_w.scale) == pytest.approx(float(host_w.scale), rel=1e-6)


def test_lsq_step_size_that_overshoots_zero_keeps_learning() -> None:
    quant = LsqQuant(4, dtype="int", init_from=torch.tensor([0.5, -0.5]))
    with torch.no_grad():
        quant.scale.fill_(-0.1)  # an optimizer step past zero
    x = torch.tensor([0.33, -0.71, 0.07])
    out = quant(x)
    assert out.tolist() == pytest.approx([0.3, -0.7, 0.1])  # |s| = 0.1
    out.sum().backward()
    assert float(quant.scale.grad) != 0.0


def _boundary_inputs(scale: float, zero_point: int, qmin: int, qmax: int, numel: int,
                     generator: torch.Generator, extra: tuple[float, ...] = ()) -> torch.Tensor:
    """Random values, plus every float32 within 3 ulps of the rounding boundaries of the lowest
    and highest codes, of ties in between and of the ``extra`` values (activation bounds)."""
    edges = [(qmin - zero_point - 0.5) * scale, (qmax - zero_point + 0.5) * scale,
             (qmin - zero_point) * scale, (qmax - zero_point) * scale, 0.5 * scale,
             -1.5 * scale, *extra]
    special = [v for edge in edges if math.isfinite(edge) for v in _around(edge)]
    x = torch.randn(numel, generator=generator) * (qmax - qmin) * scale / 3
    x[: len(special)] = torch.tensor(special)
    return x[torch.randperm(numel, generator=generator)]  # boundaries in every chunk


@pytest.mark.parametrize(("bits", "dtype"), [(8, "uint"), (8, "int"), (4, "uint")])
def test_chunked_fake_quantization_is_bit_identical(
    bits: int, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large CPU tensors are fake-quantized chunk by chunk (the passes stay in the cache): the
    values and gradients equal the whole-tensor passes and torch's kernel bit for bit, for
    float32 values next to the rounding and clamp boundaries, in every chunk and in a last,
    partial one; with the clamp of a ReLU, ReLU6 and Hardtanh folded in as well."""
    qmin, qmax = quant_range(bits, dtype)
    generator = torch.Generator().manual_seed(bits)
    numel = NATIVE_MAX_NUMEL + 1234
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # several threads: the whole-tensor passes
    try:
        assert _math._chunk_size(torch.zeros(numel), 0.1) == 0
    finally:
        torch.set_num_threads(1)  # chunks run at one thread only
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.set_num_threads(threads)
    for trial in range(4):
        scale = to_float32(float(torch.rand((), generator=generator)) * 8 / (qmax - qmin) + 1e-3)
        zero_point = int(torch.randint(qmin, qmax + 1, (), generator=generator))
        if trial == 0:
            scale, zero_point = to_float32(6.0 / (qmax - qmin)), qmin  # ReLU6's own range
        x = _boundary_inputs(scale, zero_point, qmin, qmax, numel, generator, (6.0, 1.0, -1.0))
        quantize = functools.partial(
            fake_quantize, scale=scale, zero_point=zero_point, qmin=qmin, qmax=qmax
        )
        clamped = [
            functools.partial(fake_quantize_clamped, low=low, high=high, scale=scale,
                              zero_point=zero_point, qmin=qmin, qmax=qmax)
            for low, high in ((0.0, math.inf), (0.0, 6.0), (-1.0, 1.0))
        ]
        results = {}
        for chunk in (1000, 1 << 40):  # several chunks, and none (the whole-tensor passes)
            monkeypatch.setattr(_math, "CHUNK_NUMEL", chunk)
            assert bool(_math._chunk_size(x, scale)) == (chunk == 1000)
            results[chunk] = [_with_gradient(fn, x) for fn in (quantize, *clamped)]
        reference = _with_gradient(
            functools.partial(torch.fake_quantize_per_tensor_affine, scale=scale,
                              zero_point=zero_point, quant_min=qmin, quant_max=qmax), x
        )
        for (out, grad), (ref_out, ref_grad) in zip(results[1000], results[1 << 40], strict=True):
            assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad), (scale, zero_point)
        assert torch.equal(results[1000][0][0], reference[0])
        assert torch.equal(results[1000][0][1], reference[1])
        assert 0 < int((results[1000][0][1] == 0).sum()) < numel


def _lsq_reference(x: torch.Tensor, quant: LsqQuant) -> torch.Tensor:
    """LsqQuant.forward as the autograd graph of its formula (before the custom Function)."""
    grad_factor = 1.0 / math.sqrt(x.numel() * quant.qmax)
    step = quant.scale.abs().clamp(min=SCALE_FLOOR)
    step = (step - step * grad_factor).detach() + step * grad_factor
    return _math.round_ste(torch.clamp(x / step, quant.qmin, quant.qmax)) * step


@pytest.mark.parametrize(("bits", "dtype"), [(8, "int"), (8, "uint"), (3, "int"), (2, "uint")])
@pytest.mark.parametrize("shape", [(5,), (64, 3, 3, 3), (8, 16, 12, 12)])
def test_lsq_function_matches_the_autograd_graph_of_its_formula(
    bits: int, dtype: str, shape: tuple[int, ...]
) -> None:
    """LSQ keeps only x and the step for backward and recomputes the rest there: values, x's
    gradient and the step's gradient equal those of the plain autograd graph bit for bit, for
    x at and next to the clamp bounds and the rounding boundaries, with and without x's
    gradient, and for a step that went negative."""
    generator = torch.Generator().manual_seed(bits + len(shape))
    for trial in range(4):
        quant = LsqQuant(bits, dtype=dtype)
        with torch.no_grad():
            quant.scale.fill_(float(torch.rand((), generator=generator)) * 0.2 + 0.01)
            if trial == 3:
                quant.scale.neg_()
        quant._observed = True
        s = to_float32(abs(float(quant.scale.detach())))
        numel = math.prod(shape)
        x = _boundary_inputs(s, 0, quant.qmin, quant.qmax, max(numel, 64), generator)[:numel]
        x = x.reshape(shape)
        grad_out = torch.randn(shape, generator=generator)
        results, names = [], []
        for fn in (quant, lambda t, quant=quant: _lsq_reference(t, quant)):
            quant.scale.grad = None
            leaf = x.clone().requires_grad_(trial != 2)
            out = fn(leaf)
            out.backward(grad_out)
            names.append(type(out.grad_fn).__name__)
            results.append((out.detach(), leaf.grad, quant.scale.grad.clone()))
        (out, grad, step_grad), (ref_out, ref_grad, ref_step_grad) = results
        assert torch.equal(out, ref_out)
        assert (grad is None and ref_grad is None) or torch.equal(grad, ref_grad)
        assert torch.equal(step_grad, ref_step_grad), (step_grad, ref_step_grad)
        assert "Lsq" in names[0] and "Lsq" not in names[1]  # the Function, and the graph


@pytest.mark.parametrize(
    ("activation", "low", "high"),
    [(nn.ReLU(), 0.0, math.inf), (nn.ReLU6(), 0.0, 6.0), (nn.Hardtanh(), -1.0, 1.0)],
    ids=["relu", "relu6", "hardtanh"],
)
@pytest.mark.parametrize("dtype", ["uint", "int"])
def test_lsq_clamp_folded_into_output_quantization_is_bit_identical(
    activation: nn.Module, low: float, high: float, dtype: str
) -> None:
    """LsqQuant.forward_clamped(x) == forward(activation(x)): the start value of the step,
    outputs, x's gradient and the step's gradient, bit for bit, for x at and next to the
    activation's bounds and the clamp bounds of the codes."""
    folded, plain = LsqQuant(8, dtype=dtype).train(), LsqQuant(8, dtype=dtype).train()
    generator = torch.Generator().manual_seed(len(dtype) + int(high if math.isfinite(high) else 9))
    for step in range(3):
        x = torch.randn(4, 8, 6, 6, generator=generator) * 3
        if step:
            s = to_float32(float(plain.scale.detach()))
            special = [v for edge in (low, high, plain.qmin * s, plain.qmax * s,
                                      (plain.qmax + 0.5) * s, 0.5 * s)
                       if math.isfinite(edge) for v in _around(edge)]
            x.view(-1)[: len(special)] = torch.tensor(special)
        grad_out = torch.randn(x.shape, generator=generator)
        results = []
        for quant, fn in ((folded, lambda t: folded.forward_clamped(t, low, high)),
                          (plain, lambda t: plain(activation(t)))):
            quant.scale.grad = None
            leaf = x.clone().requires_grad_(True)
            out = fn(leaf)
            out.backward(grad_out)
            results.append((out.detach(), leaf.grad, quant.scale.grad.clone(),
                            quant.scale.detach().clone()))
        for ours, reference in zip(*results, strict=True):
            assert torch.equal(ours, reference)
        with torch.no_grad():  # an optimizer step, the same on both
            for quant in (folded, plain):
                quant.scale.sub_(quant.scale.grad * 0.1)
    assert 0 < int((results[0][1] == 0).sum()) < x.numel()
