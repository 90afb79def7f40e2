"""QAT with 8-bit weights and activations keeps float accuracy on the bundled digits."""

from __future__ import annotations

import torch

from quantsearch.quantization import QAT_Quantizer
from quantsearch.tasks import TrainConfig, evaluate, fit, get_task, make_optimizer

W8A8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]


def test_qat_w8a8_is_within_one_point_of_float_on_digits() -> None:
    task = get_task("digits", seed=0)
    config = TrainConfig(epochs=8, batch_size=64, optimizer="adam", lr=3e-3, num_threads=1)
    accuracies = {}
    for quantized in (False, True):
        torch.manual_seed(0)
        model = task.build_model()
        optimizer = make_optimizer(model.parameters(), config)
        if quantized:
            quantizer = QAT_Quantizer(model, W8A8, optimizer, dummy_input=task.dummy_input)
            model = quantizer.compress()
        fit(model, task, optimizer, config, seed=0)
        accuracies[quantized] = evaluate(model, task.test_set)
    assert accuracies[False] > 0.93
    assert accuracies[True] >= accuracies[False] - 0.01, accuracies
