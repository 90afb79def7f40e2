"""Training-step cost of QAT against float on the default digits CNN.

Same model architecture, same batch, same process: float steps and QAT W8A8 steps (per-tensor
affine 8-bit weights of every Conv2d/Linear, 8-bit ReLU6 outputs) are timed in alternating
rounds, and the ratio of the median round times is printed.

    python benchmarks/bench_qat_step.py [--steps 300] [--rounds 5] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from quantsearch.quantization import QAT_Quantizer
from quantsearch.tasks import DigitsCNN

W8A8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]


def build(quantized: bool, batch: torch.Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if quantized:
        model = QAT_Quantizer(model, W8A8, optimizer, dummy_input=batch[:1]).compress()
    return model.train(), optimizer


def time_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator)
    runs = {"float": build(False, x), "qat_w8a8": build(True, x)}
    for model, optimizer in runs.values():  # warm-up
        time_steps(model, optimizer, x, y, 20)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            times[name].append(time_steps(model, optimizer, x, y, args.steps))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>9}: {1e3 * value / args.steps:.3f} ms/step (median of {args.rounds} rounds)")
    print(f"ratio qat_w8a8 / float: {medians['qat_w8a8'] / medians['float']:.2f}x "
          f"(batch {args.batch_size}, {args.threads} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
