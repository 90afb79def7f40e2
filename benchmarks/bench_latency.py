"""onnxruntime latency of W8A8 ResNet-18, MobileNetV2 and an MLP: float ONNX, onnxruntime's
own ``quantize_static``, and quantsearch's QDQ export, ratios measured in one process.

    python benchmarks/bench_latency.py [--networks resnet18 mobilenetv2 mlp] [--sizes 32 224]
        [--batches 1 32] [--threads 1 2] [--seconds 4] [--json out.json]

ResNet-18 and MobileNetV2 are the CIFAR-style networks of benchmarks/_networks.py at each of
``--sizes``; ``mlp`` is the latency space's 784-2048-2048-2048-10 MLP
(examples/latency_task.py) on 28x28 inputs, whatever ``--sizes`` says. All seed 0, untrained:
the latency does not depend on the weights' values. For each network and input size:

- float: the model exported by ``export_onnx`` (BatchNorm left to onnxruntime's own folding);
- quantize_static: that file through ``quant_pre_process`` and ``quantize_static`` (QDQ format,
  per-channel weights, MinMax calibration, uint8 activations and int8 weights: the U8S8 form
  onnxruntime's CPU kernels run fastest; its default int8 activations leave the ReLU convs in
  float with onnxruntime 1.32), calibrated on 4 random batches of 8;
- quantsearch: QAT W8A8 (input, weight and output of every Conv2d/Linear, every ReLU/ReLU6
  output, all 8-bit, BatchNorm folded) calibrated on the same 4 batches, then ``export_onnx``
  (its 8-bit unsigned weights written as int8: the u8s8 kernels), and again with
  ``int8_weights=False`` (uint8 weights, the u8u8 kernels).

Per batch size and thread count the three sessions are timed in rounds, one run of each per
round in turn (so a burst of load from other jobs hits all three alike), for at least 5 rounds
and ``--seconds`` seconds, after 2 warm-up runs each; medians per model and their ratios are
printed. The quality column is the SQNR (dB) of each quantized model's logits against the
float model's on 64 fresh random inputs (with untrained weights accuracy means nothing). The
load average is printed before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _networks import MobileNetV2, ResNet18
from latency_task import MnistMLP

from quantsearch.quantization import QAT_Quantizer, export_onnx, runtime_op_counts

W8A8 = [
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8,
     "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU", "ReLU6"]},
]
NETWORKS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2, "mlp": MnistMLP}
#: Networks with one input shape (channels, height, width); the others take 3 x size x size.
FIXED_INPUTS = {"mlp": (1, 28, 28)}


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _quantize_static(float_path: Path, out: Path, batches: list[torch.Tensor]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": b.numpy()} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    prepared = out.with_name("float_prepared.onnx")
    quant_pre_process(str(float_path), str(prepared))
    quantize_static(
        str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _ours(model: torch.nn.Module, out: Path, batches: list[torch.Tensor]) -> Any:
    quantizer = QAT_Quantizer(model, W8A8, dummy_input=batches[0][:1])
    compressed = quantizer.compress()
    with quantizer.calibrate():
        for batch in batches:
            compressed(batch)
    compressed.eval()
    export_onnx(compressed, out.with_name("ours_u8.onnx"), batches[0][:1], int8_weights=False)
    return export_onnx(compressed, out, batches[0][:1])


def _sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(((reference - other) ** 2).mean())
    return 10 * np.log10(float((reference**2).mean()) / max(noise, 1e-30))


def _time(sessions: dict[str, Any], inputs: np.ndarray, seconds: float) -> dict[str, list]:
    feed = {"input": inputs}
    for session in sessions.values():
        for _ in range(2):
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    started = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - started < seconds and rounds < 200):
        for name, session in sessions.items():
            begin = time.perf_counter()
            session.run(None, feed)
            times[name].append(1000 * (time.perf_counter() - begin))
        rounds += 1
    return times


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for network in args.networks:
        shapes = [FIXED_INPUTS[network]] if network in FIXED_INPUTS else [
            (3, size, size) for size in args.sizes
        ]
        for shape in shapes:
            size = shape[-1]
            torch.manual_seed(0)
            model = NETWORKS[network]().eval()
            batches = [torch.randn(8, *shape) for _ in range(4)]
            with tempfile.TemporaryDirectory() as folder:
                paths = {name: Path(folder) / f"{name}.onnx"
                         for name in ("float", "qs", "ours", "ours_u8")}
                export_onnx(model, paths["float"], batches[0][:1])
                _quantize_static(paths["float"], paths["qs"], batches)
                ours = _ours(model, paths["ours"], batches)
                ops = {name: runtime_op_counts(paths[name]) for name in ("qs", "ours", "ours_u8")}
                check = torch.randn(64, *shape).numpy()
                outputs = {n: _session(p, 1).run(None, {"input": check})[0]
                           for n, p in paths.items()}
                quality = {n: _sqnr(outputs["float"], outputs[n])
                           for n in ("qs", "ours", "ours_u8")}
                print(f"{network} {size}x{size}: ours float ops {len(ours.float_ops)}, "
                      f"folded {len(ours.folded)}; SQNR vs float: quantize_static "
                      f"{quality['qs']:.1f} dB, ours {quality['ours']:.1f} dB, ours with uint8 "
                      f"weights {quality['ours_u8']:.1f} dB", flush=True)
                for name in ("qs", "ours", "ours_u8"):
                    print(f"  {name} after onnxruntime's optimisation: {ops[name]}", flush=True)
                for threads in args.threads:
                    sessions = {n: _session(p, threads) for n, p in paths.items()}
                    for batch in args.batches:
                        inputs = np.ascontiguousarray(np.resize(check, (batch, *shape)))
                        load = os.getloadavg()[0]
                        times = _time(sessions, inputs, args.seconds)
                        med = {n: statistics.median(t) for n, t in times.items()}
                        row = {
                            "network": network, "size": size, "batch": batch, "threads": threads,
                            "float_ms": med["float"], "qs_ms": med["qs"], "ours_ms": med["ours"],
                            "qs_speedup": med["float"] / med["qs"],
                            "ours_speedup": med["float"] / med["ours"],
                            "ours_vs_qs": med["qs"] / med["ours"],
                            "ours_u8_ms": med["ours_u8"],
                            "ours_u8_speedup": med["float"] / med["ours_u8"],
                            "rounds": len(times["float"]), "load_before": load,
                            "load_after": os.getloadavg()[0],
                            "sqnr_qs_db": quality["qs"], "sqnr_ours_db": quality["ours"],
                            "ops_ours": ops["ours"], "ops_qs": ops["qs"],
                        }
                        rows.append(row)
                        print(
                            f"  batch {batch:>2}, {threads} thread(s): float {med['float']:.2f} ms"
                            f", quantize_static {med['qs']:.2f} ms ({row['qs_speedup']:.2f}x), "
                            f"ours {med['ours']:.2f} ms ({row['ours_speedup']:.2f}x; "
                            f"{row['ours_vs_qs']:.2f}x quantize_static's speed), ours uint8 "
                            f"weights {med['ours_u8']:.2f} ms ({row['ours_u8_speedup']:.2f}x), "
                            f"{row['rounds']} rounds, load {load:.1f}->{row['load_after']:.1f}",
                            flush=True,
                        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    rows = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
