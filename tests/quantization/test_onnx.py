"""ONNX QDQ export: onnxruntime computes what the quantized PyTorch model computes in eval mode.

Every registered algorithm's examples are exported and run by the conformance suite
(``CHECKS["onnx_export"]``); this file checks what the file holds: types, codes, scales,
clipping, refusals and the export's arguments.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from quantsearch.quantization import (
    BNNQuantizer,
    ConfigError,
    LsqQuantizer,
    OnnxExport,
    OnnxExportError,
    QAT_Quantizer,
    Quantizer,
    export_onnx,
    model_size_bytes,
)

from .conftest import batch, make_net

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

QAT_PER_TENSOR_8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]


def _qat_per_channel(bits: int) -> list[dict[str, Any]]:
    return [
        {"quant_types": ["weight", "input"], "quant_bits": bits, "op_types": ["Conv2d", "Linear"],
         "quant_scheme": "per_channel_symmetric", "quant_dtype": "int"},
        # Per tensor after Conv and ReLU6: the pattern whose 4-bit type onnxruntime cannot
        # optimize.
        {"quant_types": ["output"], "quant_bits": bits, "op_types": ["ReLU6"]},
    ]


QAT_PER_CHANNEL_4 = _qat_per_channel(4)
LSQ_3_4 = [
    {"quant_types": ["weight", "output"], "quant_bits": {"weight": 3, "output": 4},
     "op_types": ["Conv2d", "Linear"]},
]


def _trained(quantizer_class: type[Quantizer], config_list: list[dict[str, Any]]) -> Any:
    """TinyNet compressed and trained for a few steps: statistics and step sizes are set."""
    model = make_net()
    x, _ = batch(n=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    quantizer = quantizer_class(model, config_list, optimizer, dummy_input=x)
    model = quantizer.compress()
    model.train()
    for step in range(6):
        inputs, targets = batch(seed=step, n=32)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return quantizer, model.eval()


def _run(path: Path, inputs: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs.numpy()})[0]


def _compare(model: torch.nn.Module, path: Path) -> tuple[np.ndarray, np.ndarray]:
    inputs, _ = batch(seed=99, n=200)
    with torch.no_grad():
        expected = model(inputs).numpy()
    return expected, _run(path, inputs)


def _weight_arrays(path: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, scale and zero point that the DequantizeLinear of weight ``name`` reads."""
    graph = onnx.load(str(path)).graph
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    (node,) = [n for n in graph.node if n.name == f"{name}.dequantize"]
    assert node.op_type == "DequantizeLinear"
    codes, scale, zero_point = (arrays[i] for i in node.input)
    return codes.astype(np.int64), scale, zero_point.astype(np.int64)


def _node_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def qat8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, torch.nn.Module, OnnxExport]:
    quantizer, model = _trained(QAT_Quantizer, QAT_PER_TENSOR_8)
    path = tmp_path_factory.mktemp("qat8") / "model.onnx"
    elsewhere = tmp_path_factory.mktemp("cwd")
    cwd = os.getcwd()
    os.chdir(elsewhere)  # the exporter must not leave files in the current folder either
    try:
        result = export_onnx(model, path, batch(n=1)[0])
    finally:
        os.chdir(cwd)
    assert list(elsewhere.iterdir()) == [] and list(path.parent.iterdir()) == [path]
    return quantizer, model, result


def test_qat_8_bit_per_tensor_runs_in_onnxruntime(qat8: Any) -> None:
    _, model, result = qat8
    expected, got = _compare(model, result.path)
    assert got.shape == expected.shape == (200, 5)  # the batch dimension is free
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
    assert np.median(np.abs(got - expected)) < 1e-5
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)
    # uint8 codes (QAT's default dtype) for every ReLU6 output, per tensor; the 8-bit unsigned
    # weights are written as int8 (codes and zero point minus 128), which onnxruntime's fast
    # integer kernels take.
    assert result.types() == {
        "conv1.weight": "int8", "conv2.weight": "int8", "fc.weight": "int8",
        "relu1.output": "uint8", "relu2.output": "uint8",
    }
    assert not any(t.per_channel or t.clipped for t in result.tensors)
    ops = _node_types(result.path)
    assert ops.count("DequantizeLinear") == 5 and ops.count("QuantizeLinear") == 2
    # BatchNorm is folded into conv1, as in eval mode; no placeholder is left.
    assert "BatchNormalization" not in ops
    assert {o.domain for o in onnx.load(str(result.path)).opset_import} == {""}


def test_qat_8_bit_file_holds_the_integer_codes(qat8: Any) -> None:
    _, model, result = qat8
    x_hat = model.conv2.quantized_weight().numpy()
    stored, scale, zero = _weight_arrays(result.path, "conv2.weight")
    assert scale.dtype == np.float32 and scale.shape == () == zero.shape
    # DequantizeLinear of the stored codes is the quantized weight, bit for bit.
    np.testing.assert_array_equal((stored - zero).astype(np.float32) * scale, x_hat)
    # The float latent weights are not in the file: it is about model_size_bytes.
    assert result.size_bytes == model_size_bytes(model)
    assert result.size_bytes < result.file_bytes < result.size_bytes + 4096


@pytest.mark.parametrize("bits", [4, 8])
def test_qat_per_channel_weights_and_clipped_activations(tmp_path: Path, bits: int) -> None:
    _, model = _trained(QAT_Quantizer, _qat_per_channel(bits))
    result = export_onnx(model, tmp_path / "model.onnx", batch(n=1)[0])
    expected, got = _compare(model, result.path)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(got, expected, atol=5e-2 * np.abs(expected).max())
    assert np.median(np.abs(got - expected)) < 1e-5
    by_name = {t.name: t for t in result.tensors}
    # Symmetric int: -(2^(b-1) - 1)..2^(b-1) - 1 per output channel, 4 bits in int4 (-8..7).
    # Activations take 8-bit types, clipped to a narrower range: the inputs per channel to
    # -7..7 or -127..127, the 4-bit ReLU6 outputs to 0..15.
    top = 2 ** (bits - 1) - 1
    for layer in ("conv1", "conv2", "fc"):
        weight = by_name[f"{layer}.weight"]
        assert (weight.onnx_type, weight.qmin, weight.qmax, weight.per_channel) == (
            f"int{bits}", -top, top, True
        )
        inputs = by_name[f"{layer}.input"]
        assert (inputs.onnx_type, inputs.per_channel, inputs.clipped) == ("int8", True, True)
    relu = by_name["relu1.output"]
    assert (relu.onnx_type, relu.qmin, relu.qmax) == ("uint8", 0, 2**bits - 1)
    assert relu.clipped == (bits == 4) and not relu.per_channel
    graph = onnx.load(str(result.path)).graph
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "axis" and a.i == 0 for n in dequantize for a in n.attribute)
    assert any(a.name == "axis" and a.i == 1 for n in dequantize for a in n.attribute)
    # A bound only on the side narrower than the type: -127..127 in int8 needs Max alone.
    ops = {n.op_type for n in graph.node}
    assert "Max" in ops and ("Min" in ops) == (bits == 4)


def test_lsq_exports_its_learned_step_sizes(tmp_path: Path) -> None:
    _, model = _trained(LsqQuantizer, LSQ_3_4)
    result = export_onnx(model, tmp_path / "model.onnx", batch(n=1)[0])
    expected, got = _compare(model, result.path)
    # LSQ divides by its step as QuantizeLinear does: the same codes, up to float sums.
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    by_name = {t.name: t for t in result.tensors}
    # 3-bit signed codes -4..3 sit in int4 (the file stores them at 4 bits); 4-bit outputs
    # -8..7 in int8, clipped.
    assert (by_name["conv1.weight"].onnx_type, by_name["conv1.weight"].qmin) == ("int4", -4)
    output = by_name["conv1.output"]
    assert (output.onnx_type, output.qmin, output.clipped, output.bits) == ("int8", -8, True, 4)
    graph = onnx.load(str(result.path)).graph
    scales = {t.name: float(onnx.numpy_helper.to_array(t)) for t in graph.initializer
              if t.name.endswith("output_qdq.scale")}
    assert scales["conv1.output_qdq.scale"] == pytest.approx(
        float(model.conv1.output_quant._scale_value())
    )


@pytest.mark.slow
def test_without_sub_byte_types_codes_use_8_bit_containers(tmp_path: Path) -> None:
    _, model = _trained(QAT_Quantizer, QAT_PER_CHANNEL_4)
    result = export_onnx(model, tmp_path / "model.onnx", batch(n=1)[0], sub_byte_types=False)
    assert set(result.types().values()) == {"int8", "uint8"}
    assert all(t.clipped for t in result.tensors if not t.name.endswith(".weight"))
    expected, got = _compare(model, result.path)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_bnn_sign_activations_are_refused_with_the_reason(tmp_path: Path) -> None:
    config = [
        {"quant_types": ["weight"], "quant_bits": 1, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 1, "op_names": ["relu1", "relu2"]},
    ]
    _, model = _trained(BNNQuantizer, config)
    path = tmp_path / "model.onnx"
    with pytest.raises(OnnxExportError) as raised:
        export_onnx(model, path, batch(n=1)[0])
    message = str(raised.value)
    assert "relu1.output" in message and "relu2.output" in message
    assert "sign activation" in message and "no QDQ form" in message
    assert "values near 0 become 0" in message
    assert not path.exists()


def test_old_opsets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match=r"opset 13 is too old: .* opset 21 or newer"):
        export_onnx(make_net(), tmp_path / "m.onnx", batch(n=1)[0], opset=13)


def test_a_missing_onnx_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_onnx(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnx" or name.startswith("onnx."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ImportError, match=r"pip install 'quantsearch\[onnx\]'"):
        export_onnx(make_net(), tmp_path / "m.onnx", batch(n=1)[0])
    assert not (tmp_path / "m.onnx").exists()


def test_export_model_takes_nni_onnx_arguments(tmp_path: Path) -> None:
    quantizer, model = _trained(QAT_Quantizer, QAT_PER_TENSOR_8)
    quantizer.dummy_input = None  # input_shape alone must do
    calibration = quantizer.export_model(
        tmp_path / "model.pt", tmp_path / "calibration.json", onnx_path=tmp_path / "model.onnx",
        input_shape=(1, 1, 8, 8), device="cpu",
    )
    assert set(calibration) == {"conv1", "conv2", "fc", "relu1", "relu2"}
    make_net().load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    expected, got = _compare(model, tmp_path / "model.onnx")
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    with pytest.raises(ConfigError, match="needs input_shape, or a dummy_input"):
        quantizer.export_model(tmp_path / "again.pt", onnx_path=tmp_path / "again.onnx")
    assert not (tmp_path / "again.pt").exists()


def test_calibrated_ptq_observers_export_as_their_settled_ranges(tmp_path: Path) -> None:
    from quantsearch.quantization import PtqQuantizer

    config_list = [
        {"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"],
         "quant_scheme": "per_channel_symmetric", "quant_dtype": "int", "observer": "mse"},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"],
         "observer": "percentile"},
    ]
    model = make_net()
    quantizer = PtqQuantizer(model, config_list, dummy_input=batch(n=1)[0])
    model = quantizer.compress()
    with quantizer.calibrate():
        for step in range(3):
            model(batch(seed=step, n=32)[0])
    model.eval()
    result = export_onnx(model, tmp_path / "ptq.onnx", batch(n=1)[0])
    expected, got = _compare(model, result.path)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
    assert result.types()["relu1.output"] == "uint8"
    assert result.types()["conv1.weight"] == "int4"


class _TwoInputs(torch.nn.Module):
    """A model called with keyword arguments and a constant, returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.text = torch.nn.Linear(4, 3)
        self.image = torch.nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> Any:
        return {"joint": self.text(ids) + scale * self.image(mask), "text": self.text(ids)}


@pytest.mark.parametrize(
    ("example", "names"),
    [
        ({"mask": torch.randn(1, 5), "ids": torch.randn(1, 4)}, ["mask", "ids"]),
        ((torch.randn(1, 4), torch.randn(1, 5)), ["input_0", "input_1"]),
        ((torch.randn(3, 4), torch.randn(3, 5), 2.0), ["input_0", "input_1"]),
    ],
)
def test_keyword_and_positional_inputs_export_and_feed_by_name(
    tmp_path: Path, example: Any, names: list[str]
) -> None:
    from quantsearch.quantization import ModelInputs

    torch.manual_seed(0)
    model = _TwoInputs().eval()
    export_onnx(model, tmp_path / "two.onnx", example)
    session = ort.InferenceSession(str(tmp_path / "two.onnx"))
    assert sorted(i.name for i in session.get_inputs()) == sorted(names)
    inputs = ModelInputs.of(example).batched(7)  # a batch size the trace never saw
    assert inputs.batch_size() == 7
    joint, text = session.run(None, inputs.feed(model))
    expected = inputs.call(model)
    np.testing.assert_allclose(joint, expected["joint"].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(text, expected["text"].detach().numpy(), atol=1e-5)


def test_inputs_that_cannot_be_fed_are_refused_by_name(tmp_path: Path) -> None:
    model = _TwoInputs()
    with pytest.raises(OnnxExportError, match=r"argument 'mask' is a list: each argument must"):
        export_onnx(model, tmp_path / "x.onnx", {"ids": torch.randn(1, 4), "mask": [1, 2]})
    with pytest.raises(OnnxExportError, match=r"dummy_input holds no tensor"):
        export_onnx(model, tmp_path / "x.onnx", (1.0, 2.0))
    with pytest.raises(OnnxExportError, match=r"must be a tensor, a tuple .* got str"):
        export_onnx(model, tmp_path / "x.onnx", "ids")
    assert not (tmp_path / "x.onnx").exists()
