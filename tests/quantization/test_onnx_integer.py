"""The ONNX export as onnxruntime's integer kernels run it: a W8A8 model fuses end to end (every
conv a QLinearConv, every residual add a QLinearAdd, one QuantizeLinear between layers), and a
model that does not fit says what stays float and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from quantsearch.quantization import (
    QAT_Quantizer,
    export_onnx,
    runtime_op_counts,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

W8A8 = [
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8,
     "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


class _Block(nn.Module):
    """conv-bn-relu, conv-bn, a residual add, a ReLU: a ResNet basic block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + x)


class _ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.block1 = _Block(16)
        self.block2 = _Block(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.relu(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def _quantized(config_list: list[dict[str, Any]]) -> nn.Module:
    torch.manual_seed(0)
    model = _ResNetLike().eval()
    quantizer = QAT_Quantizer(model, config_list, dummy_input=torch.randn(1, 3, 8, 8))
    model = quantizer.compress()
    with quantizer.calibrate():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
    return model.eval()


def _run(path: Path, inputs: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Any]:
    model = _quantized(W8A8)
    path = tmp_path_factory.mktemp("w8a8") / "model.onnx"
    return model, export_onnx(model, path, torch.randn(1, 3, 8, 8))


def test_w8a8_runs_on_integer_kernels_end_to_end(w8a8: tuple[nn.Module, Any]) -> None:
    _, result = w8a8
    assert result.float_ops == () and result.integer
    counts = runtime_op_counts(result.path)
    # 5 convs, 2 residual adds and the Linear on integer kernels; nothing computes in float
    # but the pooling; one QuantizeLinear (the input) and one DequantizeLinear (before the
    # pooling) are left: no requantization between layers.
    assert counts.get("QLinearConv") == 5 and counts.get("QLinearAdd") == 2
    assert counts.get("QGemm", 0) + counts.get("MatMulIntegerToFloat", 0) == 1
    assert not {"Conv", "Add", "Relu", "Gemm", "MatMul"} & set(counts)
    assert counts.get("QuantizeLinear", 0) <= 2 and counts.get("DequantizeLinear", 0) <= 2


def test_w8a8_folds_each_double_quantization_once(w8a8: tuple[nn.Module, Any]) -> None:
    _, result = w8a8
    # Each conv's output quantizer followed by a ReLU's: the conv's is dropped.
    assert "stem.output -> relu.output" in result.folded
    assert "block1.conv1.output -> block1.relu1.output" in result.folded
    # conv2's output goes to the residual add, which needs it quantized: kept.
    assert not any(pair.startswith("block1.conv2.output") for pair in result.folded)
    # 8-bit unsigned weights are written as int8 (the same values, faster kernels).
    assert result.types()["block1.conv1.weight"] == "int8"


def test_int8_weights_hold_the_same_values(tmp_path: Path, w8a8: tuple[nn.Module, Any]) -> None:
    model, result = w8a8
    signed = result
    unsigned = export_onnx(
        model, tmp_path / "u8.onnx", torch.randn(1, 3, 8, 8), int8_weights=False
    )
    assert unsigned.types()["block1.conv1.weight"] == "uint8"
    inputs = torch.randn(50, 3, 8, 8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = [
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        .run(None, {"input": inputs.numpy()})[0]
        for path in (unsigned.path, signed.path)
    ]
    np.testing.assert_array_equal(plain[0], plain[1])  # DequantizeLinear gives equal weights


def test_w8a8_computes_what_pytorch_computes(w8a8: tuple[nn.Module, Any]) -> None:
    model, result = w8a8
    torch.manual_seed(1)
    inputs = torch.randn(200, 3, 8, 8)
    with torch.no_grad():
        expected = model(inputs).numpy()
    got = _run(result.path, inputs)
    # Rounded once instead of twice, and onnxruntime's integer requantization: a difference of
    # a few output steps (0.003 here), far below the outputs' spread.
    difference = np.abs(got - expected)
    assert difference.mean() < 0.03 * expected.std()
    assert difference.max() < 0.25 * expected.std()
    margin = np.sort(expected, axis=1)
    margin = margin[:, -1] - margin[:, -2]
    differ = got.argmax(1) != expected.argmax(1)
    assert not (differ & (margin > 2 * difference.max(axis=1))).any()


def test_without_fold_the_double_quantization_stays(tmp_path: Path) -> None:
    model = _quantized(W8A8)
    result = export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 3, 8, 8), fold=False)
    assert result.folded == ()
    counts = runtime_op_counts(result.path)
    assert counts.get("QuantizeLinear", 0) > 2  # a requantization between conv and ReLU


def test_a_model_that_does_not_fit_says_what_stays_float(tmp_path: Path) -> None:
    config = [
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    result = export_onnx(_quantized(config), tmp_path / "model.onnx", torch.randn(1, 3, 8, 8))
    reasons = {(op.name, op.op_type): op.reason for op in result.float_ops}
    assert not result.integer
    assert reasons[("stem", "Conv")] == "its input is not quantized"
    # conv2 feeds the residual add in float; the add's inputs are not quantized.
    assert reasons[("block1.conv2", "Conv")].startswith("its output is not quantized")
    assert any(kind == "Add" for _, kind in reasons)
    # block1.conv1 reads a quantized ReLU output and feeds one: an integer kernel.
    assert ("block1.conv1", "Conv") not in reasons


def test_weights_below_8_bits_are_named(tmp_path: Path) -> None:
    config = [
        {"quant_types": ["input", "weight", "output"], "quant_bits": {"input": 8, "weight": 4,
         "output": 8}, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    model = _quantized(config)
    result = export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 3, 8, 8))
    assert all("uint4" in op.reason for op in result.float_ops if op.op_type == "Conv")
    assert {op.name for op in result.float_ops if op.op_type == "Conv"} >= {"stem", "block1.conv1"}
    # In 8-bit containers the same 4-bit codes run on the integer kernels.
    packed = export_onnx(
        model, tmp_path / "int8.onnx", torch.randn(1, 3, 8, 8), sub_byte_types=False
    )
    assert packed.integer


def test_per_channel_weights_with_per_tensor_activations_run_on_integer_kernels(
    tmp_path: Path,
) -> None:
    scheme = {"input": "per_tensor_affine", "weight": "per_channel_symmetric",
              "output": "per_tensor_affine"}
    model = _quantized([{**W8A8[0], "quant_scheme": scheme}, W8A8[1]])
    assert model.block1.conv1.weight_quant.per_channel
    assert not model.block1.conv1.input_quant.per_channel
    result = export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 3, 8, 8))
    assert result.integer
    counts = runtime_op_counts(result.path)
    assert counts.get("QLinearConv") == 5
    assert not {"Conv", "FusedConv", "Gemm", "FusedGemm"} & set(counts)


def test_activations_quantized_per_channel_stay_float_and_say_why(tmp_path: Path) -> None:
    config = [{**W8A8[0], "quant_scheme": "per_channel_affine"}, W8A8[1]]
    result = export_onnx(_quantized(config), tmp_path / "model.onnx", torch.randn(1, 3, 8, 8))
    reasons = {op.name: op.reason for op in result.float_ops if op.op_type == "Conv"}
    assert not result.integer
    assert reasons["block1.conv1"] == (
        "its input is quantized per channel (integer kernels take one scale per activation "
        "tensor)"
    )
    # What the check says is what onnxruntime does: the convs compute in float.
    counts = runtime_op_counts(result.path)
    assert counts.get("Conv", 0) + counts.get("FusedConv", 0) >= 1
    assert "QLinearConv" not in counts


def test_a_float_weight_between_quantized_tensors_is_quantized_by_onnxruntime(
    tmp_path: Path,
) -> None:
    float_weight = {"quant_types": ["input", "output"], "quant_bits": 8,
                    "op_names": ["block1.conv1"]}
    result = export_onnx(
        _quantized([*W8A8, float_weight]), tmp_path / "model.onnx", torch.randn(1, 3, 8, 8)
    )
    assert "block1.conv1.weight" not in result.types()  # written as a float weight
    assert result.runtime_quantized == ("block1.conv1",) and result.integer
    counts = runtime_op_counts(result.path)  # onnxruntime made it an integer kernel
    assert counts.get("QLinearConv") == 5 and not {"Conv", "FusedConv"} & set(counts)


def test_a_linear_layer_with_a_float_output_stays_float(tmp_path: Path) -> None:
    config = [{**W8A8[0], "op_types": ["Conv2d"]}, W8A8[1],
              {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}]
    result = export_onnx(_quantized(config), tmp_path / "model.onnx", torch.randn(1, 3, 8, 8))
    reasons = {op.name: op.reason for op in result.float_ops}
    assert reasons == {"fc": "its output is not quantized (or is read by more than one node)"}
    assert runtime_op_counts(result.path).get("Gemm") == 1  # onnxruntime 1.32 has no QGemm here


class _Inverted(nn.Module):
    """MobileNetV2's pattern: residual adds with no ReLU after them, one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv1(x)
        x = x + self.conv2(x)
        return self.fc(self.head(x).mean((2, 3)))


def test_residual_adds_without_relu_read_the_quantized_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Inverted().eval()
    config = [{"quant_types": ["input", "weight", "output"], "quant_bits": 8,
               "op_types": ["Conv2d", "Linear"]}]
    quantizer = QAT_Quantizer(model, config, dummy_input=torch.randn(1, 3, 8, 8))
    model = quantizer.compress()
    with quantizer.calibrate():
        model(torch.randn(16, 3, 8, 8))
    model.eval()
    result = export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 3, 8, 8))
    # The first add's output is conv2's quantized input and the second add's float input: the
    # second add reads it quantized, so both adds fuse.
    assert result.float_ops == ()
    assert any(pair.endswith("-> conv2.input") for pair in result.folded)
    counts = runtime_op_counts(result.path)
    assert counts.get("QLinearAdd") == 2 and counts.get("QLinearConv") == 4
    assert "Add" not in counts


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_a_quantized_multihead_attention_exports_and_runs_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Attention().eval()
    config = [{"quant_types": ["weight", "input"], "quant_bits": 8,
               "op_types": ["MultiheadAttention", "Linear"]}]
    quantizer = QAT_Quantizer(model, config, dummy_input=torch.randn(1, 4, 8))
    model = quantizer.compress()
    with quantizer.calibrate():
        model(torch.randn(16, 4, 8))
    model.eval()
    result = export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 4, 8))
    types = {t.name: t.onnx_type for t in result.tensors}
    # The packed in_proj and the out_proj weights are codes. The in_proj multiplies the centred
    # input (zero point not 0), so it stays uint8 (exact on CPUs without VNNI); the out_proj
    # reads the attention's float output, so its int8 codes are dequantized to a float Gemm.
    assert types["attn.in_proj_weight"] == "uint8" and types["attn.out_proj.weight"] == "int8"
    assert types["attn.input"] == "uint8" and types["fc.weight"] == "uint8"
    x = torch.randn(9, 4, 8)
    session = ort.InferenceSession(str(result.path))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-5)
