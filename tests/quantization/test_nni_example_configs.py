"""The config_lists of NNI's QAT and BNN examples apply unchanged to their networks."""

from __future__ import annotations

import torch
from torch import nn

from quantsearch.quantization import BNNQuantizer, QAT_Quantizer, QuantWrapper
from quantsearch.tasks import MnistCNN, VGG_Cifar10

BNN_CONFIG = [{
    "quant_bits": 1,
    "quant_types": ["weight"],
    "op_types": ["Conv2d", "Linear"],
    "op_names": ["features.0", "features.3", "features.7", "features.10", "features.14",
                 "features.17", "classifier.0", "classifier.3"],
}, {
    "quant_bits": 1,
    "quant_types": ["output"],
    "op_types": ["Hardtanh"],
    "op_names": ["features.6", "features.9", "features.13", "features.16", "features.20",
                 "classifier.2", "classifier.5"],
}]

QAT_CONFIG = [{
    "quant_types": ["weight"],
    "quant_bits": {"weight": 8},
    "op_types": ["Conv2d", "Linear"],
}, {
    "quant_types": ["output"],
    "quant_bits": 8,
    "quant_start_step": 7000,
    "op_types": ["ReLU6"],
}]


def test_nni_bnn_example_config_quantizes_exactly_its_layers() -> None:
    torch.manual_seed(0)
    model = VGG_Cifar10()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    quantizer = BNNQuantizer(model, BNN_CONFIG, optimizer)
    quantizer.compress()
    wrapped = {m.name: m for m in model.modules() if isinstance(m, QuantWrapper)}
    assert sorted(wrapped) == sorted(BNN_CONFIG[0]["op_names"] + BNN_CONFIG[1]["op_names"])
    assert quantizer.layer_bits()["features.0"] == {"weight": 1}
    assert quantizer.layer_bits()["classifier.5"] == {"output": 1}
    assert isinstance(model.classifier[6], nn.Linear)  # the last linear stays float
    assert isinstance(model.features[2], nn.Hardtanh)  # and so does the first Hardtanh
    model.train()
    x = torch.randn(2, 3, 32, 32)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    optimizer.step()
    weight = model.features[0].module.weight
    assert float(weight.detach().abs().max()) <= 1.0
    assert set(torch.unique(model.features[0].quantized_weight()).tolist()) == {-1.0, 1.0}


def test_nni_qat_example_config_on_the_mnist_network() -> None:
    model = MnistCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QAT_Quantizer(model, QAT_CONFIG, optimizer)
    quantizer.compress()
    assert quantizer.layer_bits() == {
        "conv1": {"weight": 8}, "relu1": {"output": 8}, "conv2": {"weight": 8},
        "relu2": {"output": 8}, "fc1": {"weight": 8}, "relu3": {"output": 8},
        "fc2": {"weight": 8},
    }
    assert model.relu1.quant_start_step == 7000
