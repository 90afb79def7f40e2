"""NNI's known defects, fixed; BatchNorm folding; step counting; size accounting."""

from __future__ import annotations

import math

import torch
from torch import nn

from quantsearch.quantization import (
    BNNQuantizer,
    DoReFaQuantizer,
    LsqQuantizer,
    NaiveQuantizer,
    QAT_Quantizer,
    QuantWrapper,
    model_size_bytes,
    real_state_dict,
)
from quantsearch.tasks import DigitsCNN

from .conftest import batch, make_net

QAT_W8A8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"], "quant_start_step": 3},
]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    model.train()
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_gradients_flow_before_quant_start_step() -> None:
    model = make_net()
    config = [{"quant_types": ["weight", "output"], "quant_bits": 8,
               "op_types": ["Conv2d", "Linear"], "quant_start_step": 100}]
    QAT_Quantizer(model, config).compress()
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    for name in ("conv1", "conv2", "fc"):
        grad = model.get_submodule(name).module.weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_before_quant_start_step_training_is_float_and_eval_is_quantized() -> None:
    reference, model = make_net(), make_net()
    config = [{"quant_types": ["weight"], "quant_bits": 2, "op_types": ["Conv2d", "Linear"],
               "quant_start_step": 5}]
    QAT_Quantizer(model, config).compress()  # no dummy_input: no folding, no error
    x, _ = batch()
    assert torch.allclose(model.train()(x), reference.train()(x))
    assert not torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-3)


def test_eval_before_any_training_keeps_the_weights() -> None:
    model = make_net()
    reference = make_net()
    QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 8,
                           "op_types": ["Conv2d", "Linear"]}]).compress()
    x, _ = batch()
    out, ref = model.eval()(x), reference.eval()(x)
    assert float(model.get_submodule("fc").quantized_weight().abs().sum()) > 0
    assert torch.allclose(out, ref, atol=0.05)


def test_steps_count_with_and_without_optimizer_and_survive_state_dict() -> None:
    model = make_net()
    quantizer = QAT_Quantizer(model, QAT_W8A8)
    quantizer.compress()
    for _ in range(4):
        quantizer.step()
    assert quantizer.steps == 4
    state = model.state_dict()
    other_model = make_net(1)
    other = QAT_Quantizer(other_model, QAT_W8A8)
    other.compress()
    other_model.load_state_dict(state)
    assert other.steps == 4
    with_optimizer = make_net()
    optimizer = torch.optim.SGD(with_optimizer.parameters(), lr=0.01)
    counted = QAT_Quantizer(with_optimizer, QAT_W8A8, optimizer)
    counted.compress()
    train_steps(with_optimizer, optimizer, 3)
    assert counted.steps == 3


def test_output_quantization_starts_at_quant_start_step() -> None:
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    QAT_Quantizer(model, QAT_W8A8, optimizer).compress()
    relu = model.get_submodule("relu1")
    outputs: list[torch.Tensor] = []
    relu.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    train_steps(model, optimizer, 5)  # forwards at steps 0..4; quantized from step 3
    levels = [torch.unique(out).numel() for out in outputs]
    scale = float(relu.output_quant.qparams()[0])
    assert all(n > 256 for n in levels[:3])
    assert all(n <= 256 for n in levels[3:])
    on_grid = torch.remainder(outputs[4] / scale + 1e-3, 1.0) < 2e-3
    assert bool(on_grid.all())


def test_batch_norm_folding_trains_with_batch_statistics_and_exports_unfolded() -> None:
    model = make_net()
    reference = make_net()
    x, _ = batch()
    config = [{"quant_types": ["weight"], "quant_bits": 16, "op_types": ["Conv2d"]}]
    quantizer = QAT_Quantizer(model, config, dummy_input=x[:1])
    quantizer.compress()
    wrapper = model.get_submodule("conv1")
    assert isinstance(model.get_submodule("bn1"), nn.Identity)
    assert wrapper.bn_name == "bn1" and isinstance(wrapper.bn, nn.BatchNorm2d)
    # Training forward: same output and same running statistics as the float model (16 bits).
    out, ref = model.train()(x), reference.train()(x)
    assert torch.allclose(out, ref, atol=1e-3)
    assert torch.allclose(wrapper.bn.running_mean, reference.bn1.running_mean, atol=1e-4)
    assert torch.allclose(wrapper.bn.running_var, reference.bn1.running_var, atol=1e-4)
    # Eval: the folded conv equals conv + BatchNorm with running statistics.
    assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-3)
    state = real_state_dict(model)
    fresh = make_net(2)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.conv1.weight, reference.conv1.weight)
    assert torch.equal(fresh.bn1.running_var, wrapper.bn.running_var)
    assert quantizer.calibration_config()["conv1"]["folded_batch_norm"] == "bn1"


def test_without_dummy_input_batch_norm_stays_a_separate_layer() -> None:
    model = make_net()
    QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 8,
                           "op_types": ["Conv2d"]}]).compress()
    assert isinstance(model.get_submodule("bn1"), nn.BatchNorm2d)
    assert model.get_submodule("conv1").bn is None


def test_bnn_clips_latent_weights_after_each_step() -> None:
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    BNNQuantizer(model, [{"quant_types": ["weight"], "quant_bits": 1,
                          "op_types": ["Conv2d", "Linear"]}], optimizer).compress()
    train_steps(model, optimizer, 2)
    for name in ("conv1", "conv2", "fc"):
        weight = model.get_submodule(name).module.weight
        assert float(weight.detach().abs().max()) <= 1.0
    assert float(model.get_submodule("fc").module.weight.detach().abs().max()) == 1.0


def test_naive_rounds_to_the_nearest_level() -> None:
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.9 / 127, 0.4 / 127, -1.6 / 127]]))
    NaiveQuantizer(model).compress()
    levels = model[0].quantized_weight() * 127
    assert torch.round(levels).tolist() == [[127.0, 1.0, 0.0, -2.0]]


def test_float_model_size_is_4_bytes_per_element() -> None:
    model = make_net()
    elements = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert model_size_bytes(model) == 4 * elements


def test_quantized_size_counts_bits_scales_and_folded_bias() -> None:
    model = make_net()
    x, _ = batch()
    QAT_Quantizer(model, [
        {"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu2"]},
    ], dummy_input=x[:1]).compress()
    conv1 = math.ceil(4 * 9 * 4 / 8) + 4 * 4 + 8  # weight codes, folded bias, scale + zp
    conv2 = math.ceil(6 * 4 * 9 * 4 / 8) + 8  # no bias
    fc = math.ceil(5 * 384 * 4 / 8) + 4 * 5 + 8
    relu2 = 8
    assert model_size_bytes(model) == conv1 + conv2 + fc + relu2
    assert isinstance(model.get_submodule("relu2"), QuantWrapper)


def test_weightless_layers_in_a_weight_entry_are_left_alone() -> None:
    for cls in (NaiveQuantizer, DoReFaQuantizer):
        model = make_net()
        quantizer = cls(model, [{"quant_types": ["weight"], "quant_bits": 4,
                                 "op_names": ["conv1", "relu1"]}])
        quantizer.compress()
        assert quantizer.layer_bits() == {"conv1": {"weight": 4}}
        assert isinstance(model.get_submodule("conv1"), QuantWrapper)
        assert isinstance(model.get_submodule("relu1"), nn.ReLU6)
        model(batch()[0])


class _ConvReluThenBn(nn.Module):
    """A conv whose output does not feed the BatchNorm: nothing may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU6()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.relu(self.conv(x)) + 1.0)


def test_batch_norm_is_folded_only_into_the_conv_that_feeds_it() -> None:
    model = _ConvReluThenBn()
    x, _ = batch()
    QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}],
                  dummy_input=x[:1]).compress()
    assert model.conv.bn is None
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_activation_clamp_folded_into_output_quantization_trains_identically() -> None:
    """ReLU6 outputs: the folded path (one pass fewer) against the plain one, over real steps."""
    config = [
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
    ]
    runs = []
    for fold in (True, False):
        torch.manual_seed(0)
        model = DigitsCNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        QAT_Quantizer(model, config, optimizer).compress()
        wrappers = [m for m in model.modules() if isinstance(m, QuantWrapper)]
        assert [w._clamp for w in wrappers if w.output_quant is not None] == [(0.0, 6.0)] * 3
        if not fold:
            for wrapper in wrappers:
                wrapper._clamp = None
        torch.manual_seed(1)
        x = torch.rand(64, 1, 8, 8) * 16
        train_steps(model, optimizer, 3)
        runs.append((model(x), model.state_dict()))
    (out_folded, state_folded), (out_plain, state_plain) = runs
    assert torch.equal(out_folded, out_plain)
    assert all(torch.equal(state_folded[k], state_plain[k]) for k in state_plain)


def test_lsq_activation_clamp_folded_into_output_quantization_trains_identically() -> None:
    """LSQ on ReLU6 outputs: the folded path (x kept instead of the ReLU6 output) against the
    plain one, over real steps: outputs and every state entry (step sizes included) equal."""
    config = [
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"],
         "quant_dtype": "uint"},
    ]
    runs = []
    for fold in (True, False):
        torch.manual_seed(0)
        model = DigitsCNN()
        LsqQuantizer(model, config).compress()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        wrappers = [m for m in model.modules() if isinstance(m, QuantWrapper)]
        assert [w._clamp for w in wrappers if w.output_quant is not None] == [(0.0, 6.0)] * 3
        if not fold:
            for wrapper in wrappers:
                wrapper._clamp = None
        torch.manual_seed(1)
        x = torch.rand(64, 1, 8, 8) * 16
        train_steps(model, optimizer, 3)
        runs.append((model(x), model.state_dict()))
    (out_folded, state_folded), (out_plain, state_plain) = runs
    assert torch.equal(out_folded, out_plain)
    assert all(torch.equal(state_folded[k], state_plain[k]) for k in state_plain)


def test_only_plain_clamp_activations_are_folded() -> None:
    types = ["ReLU", "Hardtanh", "ReLU6", "Sigmoid"]
    config = [{"quant_types": ["output"], "quant_bits": 8, "op_types": types}]
    model = nn.Sequential(
        nn.ReLU(inplace=True), nn.Hardtanh(0.5, 2.0), nn.ReLU6(), nn.Sigmoid(), nn.Hardtanh()
    )
    QAT_Quantizer(model, config).compress()
    assert [m._clamp for m in model] == [None, None, (0.0, 6.0), None, (-1.0, 1.0)]
    # A hook on the activation must fire: that layer then takes the plain path.
    seen: list[int] = []
    model[2].module.register_forward_hook(lambda *_: seen.append(1))
    model.train()(torch.randn(4, 8))
    assert seen == [1]
