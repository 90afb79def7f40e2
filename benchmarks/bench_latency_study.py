"""A latency-aware ptq study on ResNet-18 (real MNIST): accuracy, size and onnxruntime latency,
three objectives, and whether its front holds a trial at least 2x faster than float within
1 point of float accuracy.

    python benchmarks/bench_ptq_methods.py --networks resnet18 --bits 8 --methods gptq  # weights
    OMP_NUM_THREADS=1 python benchmarks/bench_latency_study.py --trials 12

The study starts from the float weights ``bench_ptq_methods.py`` trained and cached
(``--weights``). Every Conv2d/Linear has its input, weight and output quantized and every ReLU
output (the W8A8 form onnxruntime runs on its integer kernels); each layer's weight picks 8
bits, 4 bits or float; ptq calibrated on 8 training batches, scored on ``--eval-images``
validation and test images. A trial's latency is its ONNX export's median ms per batch of
``--batch`` in onnxruntime on ``--threads`` threads, measured where the trial ran. Writes the
space, the database, the report and ``summary.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd
from _study_bench import parser, ptq_study, run_space

from quantsearch.report import ReportData, write_report


def space(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "study_name": "resnet18-latency",
        **ptq_study(args, "resnet18"),
        "objectives": ["accuracy", "size", "latency"],
        "latency": {"batch_size": args.batch, "threads": args.threads,
                    "provider": "CPUExecutionProvider", "repeats": args.repeats},
        "n_trials": args.trials,
        "storage": str((args.out / "latency.db").resolve()),
        "baselines": {"float": True, "uniform_bits": [8]},
        "sampler": {"name": "tpe"},
        "quantize": {"weight": {"op_types": ["Conv2d", "Linear"]},
                     "input": {"op_types": ["Conv2d", "Linear"]},
                     "output": {"op_types": ["Conv2d", "Linear", "ReLU"]}},
        "params": {"input_bits": 8, "output_bits": 8},
        "per_layer": {"op_types": ["Conv2d", "Linear"],
                      "weight_bits": {"_type": "choice", "_value": [8, 4, "float"]}},
    }


def summary(study: Any, out: Path, seconds: float) -> dict[str, Any]:
    write_report(study, out)
    data = ReportData.of(study)
    frame = data.frame[data.frame["state"] == "COMPLETE"]
    float_accuracy = float(data.record.float_model.val_accuracy)
    fast = frame[(frame["accuracy"] >= float_accuracy - 0.01)
                 & (frame["attr.latency_speedup"] >= 2.0)]
    front = data.front.sort_values("latency")
    return {
        "study": study.study_name,
        "trials": len(frame),
        "seconds": round(seconds),
        "float_val_accuracy": float_accuracy,
        "front": [
            {"number": int(row["number"]), "val_accuracy": float(row["accuracy"]),
             "test_accuracy": float(row["test_accuracy"]), "size_bytes": int(row["size_bytes"]),
             "latency_ms": float(row["latency"]),
             "speedup": float(row["attr.latency_speedup"]),
             "integer": None if pd.isna(row["attr.latency_integer"])
             else bool(row["attr.latency_integer"])}
            for _, row in front.iterrows()
        ],
        "at_least_2x_within_1_point": [int(n) for n in fast["number"]],
    }


def main() -> None:
    arguments = parser(__doc__.split("\n\n")[0], weights="ptq-methods-resnet18-6400.pt",
                       out="/tmp/latency-study", trials=12)
    arguments.add_argument("--batch", type=int, default=1)
    arguments.add_argument("--threads", type=int, default=1)
    arguments.add_argument("--repeats", type=int, default=30)
    args = arguments.parse_args()
    study, seconds = run_space(space(args), args.out / "latency.yaml")
    result = summary(study, args.out / "report", seconds)
    (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
