"""Training-step cost of QAT against float (and NNI v2's QAT_Quantizer) on the default digits CNN.

    python benchmarks/bench_qat_step.py [--steps 300] [--rounds 5] [--threads 1]

Up to three runs on the same work: float, quantsearch QAT and NNI QAT, each W8A8 (8-bit weights of
every Conv2d/Linear, 8-bit ReLU6 outputs), Adam lr 1e-3, the same batch every step. Both
quantizers get ``dummy_input=torch.rand(1, 1, 8, 8)``, so both fold BatchNorm into the convs.
Runs are timed in alternating rounds (the order rotates each round) and the medians are printed,
with the ratios ours/float, nni/float and nni/ours. Like ``quantsearch study``, the script makes
glibc's malloc keep freed memory (``--system-malloc`` leaves it alone): otherwise page faults
add a noisy 5% to 20% to every step, float and quantized alike (see bench_fake_quant.py).

NNI is not a dependency of quantsearch; to include it, run this in a throwaway venv that has it:

    python3 -m venv /tmp/nni-venv
    /tmp/nni-venv/bin/pip install torch==2.13.0 nni==2.10.1 tensorboard
    /tmp/nni-venv/bin/pip install -e . --no-deps
    /tmp/nni-venv/bin/python benchmarks/bench_qat_step.py

Without nni it says so and times float against quantsearch QAT only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantsearch._malloc import keep_freed_memory
from quantsearch.quantization import QAT_Quantizer
from quantsearch.tasks import DigitsCNN

W8A8: list[dict[str, Any]] = [
    {"quant_types": ["weight"], "quant_bits": {"weight": 8}, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ["ReLU6"]},
]

Run = tuple[nn.Module, torch.optim.Optimizer]


def load_nni() -> tuple[Callable[..., Any] | None, str]:
    """NNI's QAT_Quantizer and version, or None and why it cannot be imported."""
    try:
        import nni
        from nni.algorithms.compression.pytorch.quantization import QAT_Quantizer as NniQAT
    except ImportError as error:  # nni missing, or one of its imports (e.g. tensorboard)
        return None, f"{type(error).__name__}: {error}"
    return NniQAT, f"nni {nni.__version__}"


def build(quantizer: Callable[..., Any] | None) -> Run:
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if quantizer is not None:
        model = quantizer(model, W8A8, optimizer, dummy_input=torch.rand(1, 1, 8, 8)).compress()
    return model.train(), optimizer


def time_steps(run: Run, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    model, optimizer = run
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
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--system-malloc", action="store_true",
        help="leave glibc's malloc as it is (quantsearch study makes it keep freed memory)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc = "glibc defaults" if args.system_malloc or not keep_freed_memory() else "freed kept"
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator)

    nni_qat, nni_note = load_nni()
    runs = {"float": build(None), "ours": build(QAT_Quantizer)}
    if nni_qat is None:
        print(f"NNI is not installed ({nni_note}): timing float and quantsearch QAT only")
    else:
        runs["nni"] = build(nni_qat)
    for run in runs.values():
        time_steps(run, x, y, args.warmup)

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for index in range(args.rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(1e3 * time_steps(runs[name], x, y, args.steps) / args.steps)

    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{name:>5}: {median[name]:.3f} ms/step "
            f"(median of {args.rounds} rounds of {args.steps} steps, "
            f"range {min(values):.3f}-{max(values):.3f})"
        )
    print(f"ours/float: {median['ours'] / median['float']:.2f}x")
    if "nni" in median:
        print(f" nni/float: {median['nni'] / median['float']:.2f}x")
        print(f"  nni/ours: {median['nni'] / median['ours']:.2f}x")
    versions = f"torch {torch.__version__}" + (f", {nni_note}" if nni_qat is not None else "")
    print(f"(batch {args.batch_size}, {args.threads} threads, malloc {malloc}, {versions})")


if __name__ == "__main__":
    main()
