"""The measurements behind the README's "where the speed comes from", each as a ratio.

    python benchmarks/bench_fake_quant.py [--repeats 2000] [--threads 1]

1. Fake quantization, forward and backward, per tensor size: quantsearch's ``fake_quantize``
   against torch's ``fake_quantize_per_tensor_affine`` (bit-identical results, tested).
2. The straight-through mask on an activation-sized tensor: building it and multiplying the
   gradient by it, as a bool tensor against a float 0/1 tensor.
3. A quantized ReLU6 output (the clamp folded into the quantizer) on 2,097,152 elements,
   forward and backward: the gradient passed on an interval of x against an explicit 0/1 mask
   tensor (bit-identical, tested), and the float ReLU6 alone.
4. The same on one of MobileNetV2's large ReLU6 outputs at batch 128 (12,582,912 elements):
   the quantizer's passes run chunk by chunk in the cache against over the whole tensor
   (bit-identical, tested), the float ReLU6 alone, and the EMA's aminmax pass.
5. Minor page faults and time per QAT training step of the digits CNN (batch 64), with glibc's
   malloc as it is and after ``keep_freed_memory`` (each in a fresh process: the setting is
   process-wide).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from quantsearch.quantization import _math
from quantsearch.quantization._math import fake_quantize, fake_quantize_clamped

SIZES = (4_608, 32_768, 131_072)  # conv2's weight, fc1's weight, conv2's output at batch 64


def per_call_us(fn: Callable[[], object], repeats: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``repeats`` calls, in microseconds."""
    for _ in range(repeats // 10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(times)


def fake_quant_section(repeats: int) -> None:
    print("fake quantization, forward + backward (us per call):")
    for numel in SIZES:
        x = torch.randn(numel, requires_grad=True)
        grad = torch.randn(numel)

        def ours(x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
            fake_quantize(x, 0.02, 3, -127, 127).backward(grad)

        def torch_kernel(x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
            torch.fake_quantize_per_tensor_affine(x, 0.02, 3, -127, 127).backward(grad)

        a, b = per_call_us(ours, repeats), per_call_us(torch_kernel, repeats)
        print(f"  {numel:>7} elements: quantsearch {a:7.1f}, torch kernel {b:7.1f}, "
              f"torch / quantsearch {b / a:.2f}x")


def mask_section(repeats: int) -> None:
    numel = SIZES[-1]
    codes = torch.randn(numel).mul_(100).round_()
    clamped = codes.clamp(-127, 127)
    grad = torch.randn(numel)
    as_bool, as_float = clamped.eq(codes), clamped.eq(codes).float()
    out = torch.empty(numel)
    build_bool = per_call_us(lambda: clamped.eq(codes), repeats)
    build_float = per_call_us(lambda: torch.eq(clamped, codes, out=out), repeats)
    apply_bool = per_call_us(lambda: grad * as_bool, repeats)
    apply_float = per_call_us(lambda: grad * as_float, repeats)
    print(f"straight-through mask on {numel} elements (us per call):")
    print(f"  build: bool {build_bool:.1f}, float {build_float:.1f} "
          f"({build_bool / build_float:.1f}x)")
    print(f"  apply: bool {apply_bool:.1f}, float {apply_float:.1f} "
          f"({apply_bool / apply_float:.1f}x)")


def interval_section(repeats: int) -> None:
    numel = 2_097_152  # a 64-channel 32x32 activation at batch 32; far beyond the caches
    x = torch.randn(numel, requires_grad=True)
    grad = torch.randn(numel)
    repeats = max(repeats // 100, 5)

    def interval() -> None:
        fake_quantize_clamped(x, 0.0, 6.0, 6.0 / 255, 0, 0, 255).backward(grad)

    def mask() -> None:
        found = _math._passing_interval
        _math._passing_interval = lambda *args: None  # the masked computation
        try:
            fake_quantize_clamped(x, 0.0, 6.0, 6.0 / 255, 0, 0, 255).backward(grad)
        finally:
            _math._passing_interval = found

    def relu6() -> None:
        torch.nn.functional.hardtanh(x, 0.0, 6.0).backward(grad)

    a, b, c = (per_call_us(fn, repeats) for fn in (interval, mask, relu6))
    print(f"quantized ReLU6 output on {numel} elements, forward + backward (us per call):")
    print(f"  gradient interval {a:.0f}, 0/1 mask {b:.0f} ({b / a:.2f}x), float ReLU6 {c:.0f}; "
          f"quantization adds {a - c:.0f} against {b - c:.0f}")


def chunk_section(rounds: int) -> None:
    """MobileNetV2's ReLU6 output at batch 128 (96 channels, 32x32), forward + backward."""
    shape = (128, 96, 32, 32)
    x = (torch.randn(shape) * 3).requires_grad_(True)
    grad = torch.randn(shape)
    scale = float(torch.tensor(6.0 / 255))
    chunked = _math.CHUNK_NUMEL

    def quantized(chunk: int) -> Callable[[], None]:
        def run() -> None:
            _math.CHUNK_NUMEL = chunk
            try:
                fake_quantize_clamped(x, 0.0, 6.0, scale, 0, 0, 255).backward(grad)
            finally:
                _math.CHUNK_NUMEL = chunked
        return run

    cases = {
        "chunked": quantized(chunked),
        "whole tensor": quantized(1 << 62),
        "float ReLU6": lambda: torch.nn.functional.hardtanh(x, 0.0, 6.0).backward(grad),
        "aminmax": lambda: torch.aminmax(x.detach()),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for index in range(rounds + 1):  # interleaved; the first round warms up
        for name, fn in cases.items():
            x.grad = None
            start = time.process_time()
            fn()
            if index:
                times[name].append((time.process_time() - start) * 1e3)
    ms = {name: statistics.median(values) for name, values in times.items()}
    print(f"quantized ReLU6 output of {shape}, forward + backward (CPU ms, median of {rounds}):")
    print(f"  chunked ({chunked} elements, 1 thread) {ms['chunked']:.1f}, whole-tensor passes "
          f"{ms['whole tensor']:.1f} ({ms['whole tensor'] / ms['chunked']:.2f}x), "
          f"float ReLU6 {ms['float ReLU6']:.1f}; aminmax (the EMA's statistics) "
          f"{ms['aminmax']:.1f}")
    print(f"  quantization adds {ms['chunked'] - ms['float ReLU6']:.1f} against "
          f"{ms['whole tensor'] - ms['float ReLU6']:.1f}, aminmax included: "
          f"{ms['chunked'] + ms['aminmax'] - ms['float ReLU6']:.1f} against "
          f"{ms['whole tensor'] + ms['aminmax'] - ms['float ReLU6']:.1f}")


STEPS_CHILD = """
import resource, sys, time, torch
from torch import nn
from quantsearch._malloc import keep_freed_memory
from quantsearch.quantization import QAT_Quantizer
from quantsearch.tasks import DigitsCNN

torch.set_num_threads(int(sys.argv[2]))
if sys.argv[1] == "kept":
    keep_freed_memory()
torch.manual_seed(0)
model = DigitsCNN()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
config = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]
model = QAT_Quantizer(model, config, optimizer, dummy_input=torch.rand(1, 1, 8, 8)).compress()
x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))

def steps(n):
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

steps(50)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
steps(500)
seconds = time.perf_counter() - start
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 500, seconds / 500 * 1e3)
"""


def page_fault_section(threads: int) -> None:
    print("QAT W8A8 training step of the digits CNN, batch 64 (fresh process each):")
    results = {}
    for mode in ("default", "kept"):
        out = subprocess.run(
            [sys.executable, "-c", STEPS_CHILD, mode, str(threads)],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        results[mode] = (float(out[0]), float(out[1]))
        label = "glibc defaults" if mode == "default" else "keep_freed_memory"
        print(f"  {label:>17}: {results[mode][0]:7.1f} page faults, {results[mode][1]:.2f} ms "
              "per step")
    print(f"  time saved per step: {1 - results['kept'][1] / results['default'][1]:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the chunk section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fake_quant_section(args.repeats)
    mask_section(args.repeats)
    interval_section(args.repeats)
    chunk_section(args.rounds)
    page_fault_section(args.threads)
    print(f"({args.threads} threads, torch {torch.__version__}, "
          f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB)")


if __name__ == "__main__":
    main()
