"""Structures of real networks (timm, torchvision) that broke the core, rebuilt without timm."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from quantsearch.quantization import (
    QAT_Quantizer,
    QuantWrapper,
    load_packed,
    model_size_bytes,
    real_state_dict,
)

from .conftest import batch, make_net

W8A8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass that also applies its activation."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class ZeroGammaResNet(nn.Module):
    """A residual block whose last BatchNorm starts at gamma = 0 (zero_init_residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        nn.init.zeros_(self.bn2.weight)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(self.relu2(x + y)).flatten(1))


def _warm_batch_norms(model: nn.Module, steps: int = 3) -> None:
    """Move the running statistics away from their initial values, as a trained model has."""
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(batch(100 + step)[0])


def test_batch_norm_subclass_with_activation_is_not_folded() -> None:
    torch.manual_seed(0)
    model = NormActNet()
    _warm_batch_norms(model)
    reference = copy.deepcopy(model).eval()
    x, _ = batch()
    quantizer = QAT_Quantizer(model, W8A8, dummy_input=x[:1])
    quantizer.compress()
    assert isinstance(model.bn1, BatchNormAct2d) and isinstance(model.bn2, BatchNormAct2d)
    assert model.conv1.bn is None and model.conv2.bn is None
    # The activation inside the norm layer is a module like any other: its output is quantized.
    assert isinstance(model.bn1.act, QuantWrapper)
    assert quantizer.layer_bits()["bn1.act"] == {"output": 8}
    model.train()
    model(batch(1)[0])  # one training forward gives the output quantizers their ranges
    model.eval()
    with torch.no_grad():
        out, ref = model(x), reference(x)
    # W8A8 keeps the float logits within a few quantization steps.
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert bool((out.argmax(1) == ref.argmax(1)).all())


def test_batch_norm_subclass_model_exports_and_reloads(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = NormActNet()
    _warm_batch_norms(model)
    x, _ = batch()
    quantizer = QAT_Quantizer(model, W8A8, dummy_input=x[:1])
    quantizer.compress()
    model.train()
    model(batch(1)[0])
    model.eval()
    expected = model(x)
    quantizer.export_model(tmp_path / "model.pt")
    fresh = NormActNet()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    written = quantizer.export_packed(tmp_path / "model.qpk")
    header = int.from_bytes((tmp_path / "model.qpk").read_bytes()[8:12], "little") + 12
    assert written - header == model_size_bytes(model)
    assert torch.equal(load_packed(tmp_path / "model.qpk", NormActNet())(x), expected)


def test_zero_gamma_folding_is_finite_and_exact() -> None:
    torch.manual_seed(0)
    model = ZeroGammaResNet()
    _warm_batch_norms(model)
    reference = copy.deepcopy(model)
    x, y = batch()
    config = [{"quant_types": ["weight"], "quant_bits": 16, "op_types": ["Conv2d", "Linear"]}]
    quantizer = QAT_Quantizer(model, config, dummy_input=x[:1])
    quantizer.compress()
    assert model.conv2.bn_name == "bn2"
    # Training forward: the float model's output and a finite gradient at the very first step.
    out = model.train()(x)
    assert torch.allclose(out, reference.train()(x), atol=1e-4)
    nn.functional.cross_entropy(out, y).backward()
    for name in ("stem", "conv1", "conv2"):
        grad = model.get_submodule(name).module.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()), name
    assert model.conv2.bn.weight.grad is not None
    assert float(model.conv2.bn.weight.grad.abs().sum()) > 0  # gamma can leave zero
    # Eval: the folded weight of a gamma = 0 channel is exactly 0 and the bias is beta.
    model.eval()
    reference.eval()
    folded = model.conv2.quantized_weight()
    assert bool(torch.isfinite(folded).all()) and float(folded.abs().max()) == 0.0
    assert torch.equal(model.conv2.deployed_bias(), reference.bn2.bias.detach())
    assert torch.allclose(model(x), reference(x), atol=1e-4)


def test_zero_gamma_qat_trains_without_nan_and_with_finite_qparams() -> None:
    torch.manual_seed(0)
    model = ZeroGammaResNet()
    x, _ = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    quantizer = QAT_Quantizer(model, W8A8, optimizer, dummy_input=x[:1])
    quantizer.compress()
    model.train()
    for step in range(4):
        xb, yb = batch(step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        assert math.isfinite(float(loss.detach())), step
        loss.backward()
        optimizer.step()
    model.eval()
    assert bool(torch.isfinite(model(x)).all())
    for layer, entry in quantizer.calibration_config().items():
        for key, value in entry.items():
            if key.endswith(("scale", "zero_point")) or key.startswith("tracked"):
                values = value if isinstance(value, list) else [value]
                assert all(math.isfinite(v) for v in values), (layer, key)


def test_qat_state_dict_loaded_into_its_own_model_changes_no_output() -> None:
    config = [{"quant_types": ["weight", "input", "output"], "quant_bits": 8,
               "op_types": ["Conv2d", "Linear", "ReLU6"]}]
    x_eval = batch(50)[0]
    for seed in range(6):
        model = make_net(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        quantizer = QAT_Quantizer(model, config, optimizer, dummy_input=batch()[0][:1])
        quantizer.compress()
        for step in range(8):
            xb, yb = batch(step)
            optimizer.zero_grad()
            # Growing inputs keep the moving averages away from float32-representable values.
            nn.functional.cross_entropy(model(xb * (1.0 + 0.37 * step)), yb).backward()
            optimizer.step()
        model.eval()
        before = model(x_eval)
        model.load_state_dict(model.state_dict())
        assert torch.equal(model(x_eval), before), seed
        state = real_state_dict(model)
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


class TinyTransformer(nn.Module):
    """torch's own encoder, as users have it: batch_first, nested tensors allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask).mean(1))


def _tokens(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, 6, generator=generator), torch.randint(0, 5, (n,),
                                                                    generator=generator)


def _transformer(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


ATTENTION = "encoder.layers.0.self_attn"
QAT_TRANSFORMER = [
    {"quant_types": ["weight", "output"], "quant_bits": 8, "op_types": ["default"]},
]


def _trained_transformer(config: list[dict[str, Any]], steps: int = 2) -> tuple[nn.Module, Any]:
    model = _transformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QAT_Quantizer(model, config, optimizer, dummy_input=_tokens()[0][:1])
    quantizer.compress()
    model.train()
    for step in range(steps):
        x, y = _tokens(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, quantizer


def test_quantized_transformer_evaluates_under_no_grad_through_its_quantizers() -> None:
    model, _ = _trained_transformer(QAT_TRANSFORMER)
    model.eval()
    x, _ = _tokens(5)
    mask = torch.zeros(8, 7, dtype=torch.bool)
    mask[:, 5:] = True
    with torch.no_grad():  # torch's fast path would read linear1.weight from the wrapper
        fast = model(x)
        masked = model(x, mask)
    slow = model(x).detach()  # with autograd on torch never takes its fast path
    assert torch.equal(fast, slow)
    assert torch.equal(masked, model(x, mask).detach())
    float_model = _transformer()
    float_model.load_state_dict(real_state_dict(model))
    seen = _tokens(0)[0]  # two training batches give ranges for data like theirs only
    with torch.no_grad():
        error = float((model(seen) - float_model.eval()(seen)).abs().max())
        assert 0 < error < 0.05 * float(float_model(seen).abs().max())


def test_attention_projections_are_quantized_and_train() -> None:
    model, quantizer = _trained_transformer(QAT_TRANSFORMER)
    bits = quantizer.layer_bits()
    for layer in (0, 1):
        attention = f"encoder.layers.{layer}.self_attn"
        assert bits[attention] == {"weight": 8, "output": 8}
        assert bits[f"{attention}.out_proj"] == {"weight": 8}
    wrapper = model.get_submodule(ATTENTION)
    assert isinstance(wrapper, QuantWrapper)
    assert isinstance(wrapper.module.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    quantized = wrapper.quantized_params()
    assert set(quantized) == {"in_proj_weight", "out_proj.weight"}
    for key, value in quantized.items():
        assert 1 < torch.unique(value).numel() <= 256, key
        assert not torch.equal(value, wrapper.module.get_parameter(key).detach()), key
    # Gradients reach both projection weights through the quantizers.
    model.zero_grad()
    x, y = _tokens(3)
    nn.functional.cross_entropy(model(x), y).backward()
    for key in quantized:
        grad = wrapper.module.get_parameter(key).grad
        assert grad is not None and float(grad.abs().sum()) > 0, key
    assert quantizer.calibration_config()[f"{ATTENTION}.out_proj"]["weight_bits"] == 8


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"op_types": ["NonDynamicallyQuantizableLinear"]},
         {f"encoder.layers.{i}.self_attn.out_proj": {"weight": 4} for i in (0, 1)}),
        ({"op_names": [f"{ATTENTION}.out_proj"]}, {f"{ATTENTION}.out_proj": {"weight": 4}}),
        ({"op_names": [ATTENTION]}, {ATTENTION: {"weight": 4},
                                     f"{ATTENTION}.out_proj": {"weight": 4}}),
        ({"op_types": ["MultiheadAttention"]},
         {name: {"weight": 4} for i in (0, 1)
          for name in (f"encoder.layers.{i}.self_attn", f"encoder.layers.{i}.self_attn.out_proj")}),
    ],
)
def test_attention_weights_are_selected_by_op_type_and_op_name(
    entry: dict[str, Any], expected: dict[str, dict[str, int]], tmp_path: Any
) -> None:
    model = _transformer()
    quantizer = QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 4, **entry}])
    quantizer.compress()
    assert quantizer.layer_bits() == expected
    model.eval()
    x, _ = _tokens(4)
    with torch.no_grad():
        out = model(x)
    written = quantizer.export_packed(tmp_path / "model.qpk")
    header = int.from_bytes((tmp_path / "model.qpk").read_bytes()[8:12], "little") + 12
    assert written - header == model_size_bytes(model)
    loaded = load_packed(tmp_path / "model.qpk", _transformer(seed=1))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    fresh = _transformer(seed=2)
    fresh.load_state_dict(real_state_dict(model), strict=True)


def test_out_proj_excluded_keeps_its_float_weight() -> None:
    model = _transformer()
    quantizer = QAT_Quantizer(model, [
        {"quant_types": ["weight"], "quant_bits": 8, "op_names": [ATTENTION]},
        {"exclude": True, "op_names": [f"{ATTENTION}.out_proj"]},
    ])
    quantizer.compress()
    assert quantizer.layer_bits() == {ATTENTION: {"weight": 8}}
    assert set(model.get_submodule(ATTENTION).quantized_params()) == {"in_proj_weight"}


def test_transformer_packed_export_with_quantized_activations_reloads_bit_exact(
    tmp_path: Any,
) -> None:
    config = [{"quant_types": ["weight", "input", "output"], "quant_bits": 6,
               "op_types": ["default"]}]
    model, quantizer = _trained_transformer(config)
    model.eval()
    x, _ = _tokens(6)
    with torch.no_grad():
        out = model(x)
    quantizer.export_packed(tmp_path / "model.qpk")
    loaded = load_packed(tmp_path / "model.qpk", _transformer(seed=1))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_attention_parts_that_cannot_be_quantized_are_refused_up_front() -> None:
    from quantsearch.quantization import ConfigError

    with pytest.raises(ConfigError) as info:
        QAT_Quantizer(_transformer(), [{"quant_types": ["weight", "output"], "quant_bits": 8,
                                        "op_names": [f"{ATTENTION}.out_proj"]}])
    assert str(info.value) == (
        f"config_list[0]: '{ATTENTION}.out_proj' is the output projection of the "
        f"MultiheadAttention '{ATTENTION}', which computes its input and output internally: "
        f"only its 'weight' can be quantized, not ['output'] (quantize the 'output' of "
        f"'{ATTENTION}', the same tensor as out_proj's output)"
    )
    cross = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ConfigError, match="config_list\\[0\\]: the MultiheadAttention '0' has "
                                          "separate q/k/v projection weights"):
        QAT_Quantizer(cross, [{"quant_types": ["weight"], "quant_bits": 8,
                               "op_types": ["default"]}])


def test_ptq_calibrates_a_transformer() -> None:
    from quantsearch.quantization import PtqQuantizer

    float_model = _transformer().eval()
    model = _transformer()
    quantizer = PtqQuantizer(model, [{"quant_types": ["weight", "input", "output"],
                                      "quant_bits": 8, "op_types": ["default"],
                                      "observer": "percentile", "percentile": 99.9}])
    quantizer.compress()
    with quantizer.calibrate():
        for seed in range(3):
            model(_tokens(seed)[0])
    model.eval()
    x, _ = _tokens(7)
    with torch.no_grad():
        out, reference = model(x), float_model(x)
    assert 0 < float((out - reference).abs().max()) < 0.1 * float(reference.abs().max())


def test_a_wrapper_reads_through_to_its_layer_but_not_its_quantized_weight() -> None:
    model = make_net()
    QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 8,
                           "op_names": ["fc"]}]).compress()
    assert model.fc.in_features == 384
    assert model.fc.bias is model.fc.module.bias
    with pytest.raises(AttributeError, match="'weight' is quantized inside the wrapper"):
        _ = model.fc.weight
