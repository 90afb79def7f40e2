"""Training-step time and peak memory of quantized ResNet-18 and MobileNetV2 over the float step.

    python benchmarks/bench_real_networks.py [--networks resnet18 mobilenetv2] [--threads 1 2]
        [--rounds 3] [--steps 1] [--batch-size 128] [--memory]

Both networks are the CIFAR-style ones of benchmarks/_networks.py (32x32 inputs, BatchNorm,
ReLU / ReLU6 modules). Every variant trains the same model (seed 0) on the same batch with
SGD (lr 0.01, momentum 0.9):

- float: the model as it is;
- quantsearch QAT W8A8 and W4A8: weights of every Conv2d/Linear at 8 (4) bits, BatchNorm
  folded (``dummy_input`` given), every ReLU/ReLU6 output at 8 bits;
- quantsearch LSQ 8: the same tensors at 8 bits with learned step sizes (no folding; uint
  outputs); quantsearch DoReFa 4: weights at 4 bits;
- torch.ao: eager-mode QAT as its tutorial has it: conv-bn(-relu) groups fused with
  ``fuse_modules_qat`` (torch has no conv-bn-ReLU6 fusion, so a ReLU6 stays its own module),
  ``default_qat_qconfig`` (FakeQuantize with moving-average min/max observers), then
  ``prepare_qat``. It fake-quantizes more tensors than the W8A8 rows: the input (QuantStub),
  every fused conv-bn(-relu) output, every ReLU6 output and every residual add;
- nni: NNI 2.10.1's QAT_Quantizer with the W8A8 config_list and ``dummy_input`` (folding),
  when nni imports; NNI is not a dependency, see bench_qat_step.py for a venv that has it.

Timing: per thread count, rounds of ``--steps`` steps per variant, the order rotating every
round, after one warm-up step each; the medians per variant of the wall-clock time and of the
process's CPU time (all its threads; on a machine shared with other work it is the steadier
of the two) are printed with their ratios over float. glibc's malloc keeps freed memory (as
in ``quantsearch study``).

``--memory``: for each variant, a fresh process (one thread, glibc's malloc left as it is)
builds the model, trims the heap (``malloc_trim``), resets the kernel's peak resident set
(``/proc/self/clear_refs``), reads its resident set (RSS), runs ``--memory-steps`` training
steps (2) and reads the peak (``VmHWM``): peak step memory = peak - RSS before, which counts
the activations kept for backward, gradients, optimizer state and every temporary
(tracemalloc sees no tensor memory).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _networks import MobileNetV2, ResNet18, fuse_groups

from quantsearch._malloc import keep_freed_memory
from quantsearch.quantization import DoReFaQuantizer, LsqQuantizer, QAT_Quantizer

NETWORKS: dict[str, Callable[[], nn.Module]] = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}
WEIGHTED = ["Conv2d", "Linear"]
ACTIVATIONS = ["ReLU", "ReLU6"]


def qat_config(weight_bits: int) -> list[dict[str, Any]]:
    return [
        {"quant_types": ["weight"], "quant_bits": {"weight": weight_bits}, "op_types": WEIGHTED},
        {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ACTIVATIONS},
    ]


LSQ8 = [
    {"quant_types": ["weight"], "quant_bits": {"weight": 8}, "op_types": WEIGHTED},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ACTIVATIONS,
     "quant_dtype": "uint"},
]
DOREFA4 = [{"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_types": WEIGHTED}]

Run = tuple[nn.Module, torch.optim.Optimizer]


def dummy() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def load_nni() -> tuple[Any, str]:
    """NNI's QAT_Quantizer and version, or None and why it cannot be imported."""
    try:
        import nni
        from nni.algorithms.compression.pytorch.quantization import QAT_Quantizer as NniQAT
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"
    return NniQAT, f"nni {nni.__version__}"


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _torch_ao(model: nn.Module) -> Run:
    from torch.ao.quantization import default_qat_qconfig, fuse_modules_qat, prepare_qat

    model.train()
    fuse_modules_qat(model, fuse_groups(model), inplace=True)
    model.qconfig = default_qat_qconfig
    prepare_qat(model, inplace=True)
    return model, _sgd(model)  # the optimizer sees the prepared modules' parameters


def _ours(quantizer: Any, config: list[dict[str, Any]]) -> Callable[[nn.Module], Run]:
    def build(model: nn.Module) -> Run:
        optimizer = _sgd(model)
        quantizer(model, config, optimizer, dummy_input=dummy()).compress()
        return model, optimizer
    return build


def variants() -> tuple[dict[str, Callable[[nn.Module], Run]], str]:
    """Variant name -> builder, and a note on NNI."""
    builders: dict[str, Callable[[nn.Module], Run]] = {
        "float": lambda model: (model, _sgd(model)),
        "QAT W8A8": _ours(QAT_Quantizer, qat_config(8)),
        "QAT W4A8": _ours(QAT_Quantizer, qat_config(4)),
        "LSQ 8": _ours(LsqQuantizer, LSQ8),
        "DoReFa 4": _ours(DoReFaQuantizer, DOREFA4),
        "torch.ao QAT": _torch_ao,
    }
    nni_qat, note = load_nni()
    if nni_qat is not None:
        builders["NNI QAT W8A8"] = _ours(nni_qat, qat_config(8))
    return builders, note


def build(network: str, builder: Callable[[nn.Module], Run]) -> Run:
    torch.manual_seed(0)
    model, optimizer = builder(NETWORKS[network]())
    return model.train(), optimizer


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(size, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (size,), generator=generator))


def train_steps(run: Run, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of the process) of ``steps`` training steps."""
    model, optimizer = run
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start, time.process_time() - cpu


def selected(args: argparse.Namespace) -> dict[str, Callable[[nn.Module], Run]]:
    builders, _ = variants()
    names = ["float", *(n for n in args.variants or builders if n != "float" and n in builders)]
    return {name: builders[name] for name in names}


def time_network(network: str, args: argparse.Namespace) -> dict[str, list[float]]:
    builders = selected(args)
    runs = {name: build(network, builder) for name, builder in builders.items()}
    x, y = batch(args.batch_size)
    for run in runs.values():
        train_steps(run, x, y, 1)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for index in range(args.rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = train_steps(runs[name], x, y, args.steps)
            times[name].append((wall / args.steps, cpu / args.steps))
        done = ", ".join(f"{name} {values[-1][0]:.2f}" for name, values in times.items())
        print(f"  ({network}, round {index + 1}: {done})", file=sys.stderr, flush=True)
    return times


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_child(network: str, variant: str, batch_size: int, steps: int) -> dict[str, float]:
    """Run in a fresh process: peak memory of training steps over the RSS before them."""
    torch.set_num_threads(1)
    builders, _ = variants()
    run = build(network, builders[variant])
    x, y = batch(batch_size)
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building left free
    # "5" resets the peak RSS (VmHWM) to the current RSS: ru_maxrss would also count the
    # parent's memory, which a forked child inherits across exec.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    train_steps(run, x, y, steps)
    peak = _status_bytes("VmHWM")
    return {"step_mib": (peak - before) / 2**20, "rss_before_mib": before / 2**20}


def memory_network(network: str, args: argparse.Namespace) -> None:
    print(f"\n{network}: peak memory of a training step (1 thread, fresh process each)")
    print(f"  {'variant':<14} {'MiB':>8} {'x float':>8}  (RSS before the steps)", flush=True)
    base = 0.0
    for variant in selected(args):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", network, variant,
             "--batch-size", str(args.batch_size), "--memory-steps", str(args.memory_steps)],
            check=True, capture_output=True, text=True,
        ).stdout
        entry = json.loads(out.strip().splitlines()[-1])
        base = base or entry["step_mib"]  # float comes first
        print(f"  {variant:<14} {entry['step_mib']:8.0f} {entry['step_mib'] / base:7.2f}x  "
              f"({entry['rss_before_mib']:.0f} MiB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="steps per variant and round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--memory", action="store_true", help="also peak memory per step")
    parser.add_argument("--no-timing", action="store_true", help="only peak memory")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="only these (and float), e.g. 'QAT W8A8' 'torch.ao QAT'")
    parser.add_argument("--memory-child", nargs=2, metavar=("NETWORK", "VARIANT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args.batch_size, args.memory_steps)))
        return

    _, nni_note = variants()
    print(f"torch {torch.__version__}; {nni_note}; batch {args.batch_size}; "
          f"median of {args.rounds} rounds of {args.steps} step(s)")
    if not args.no_timing:
        malloc = "freed memory kept" if keep_freed_memory() else "glibc defaults"
        for network in args.networks:
            for threads in args.threads:
                torch.set_num_threads(threads)
                times = time_network(network, args)
                wall = {name: statistics.median(t[0] for t in v) for name, v in times.items()}
                cpu = {name: statistics.median(t[1] for t in v) for name, v in times.items()}
                print(f"\n{network}, {threads} thread(s), malloc {malloc}", flush=True)
                print(f"  {'variant':<14} {'wall s':>8} {'x float':>8} {'CPU s':>8} {'x float':>8}"
                      "  wall per round (s)")
                for name, values in times.items():
                    rounds = " ".join(f"{v[0]:.2f}" for v in values)
                    print(f"  {name:<14} {wall[name]:8.2f} {wall[name] / wall['float']:7.2f}x "
                          f"{cpu[name]:8.2f} {cpu[name] / cpu['float']:7.2f}x  {rounds}",
                          flush=True)
    if args.memory or args.no_timing:
        for network in args.networks:
            memory_network(network, args)

if __name__ == "__main__":
    main()
