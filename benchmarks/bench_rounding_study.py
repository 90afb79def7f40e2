"""A mixed-precision ptq study on MobileNetV2 (real MNIST) with the rounding searched, against
the same study with nearest rounding only: each front's hypervolume and its smallest model
within 1 point of float.

    python benchmarks/bench_ptq_methods.py --networks mobilenetv2 --threads 1   # the weights
    OMP_NUM_THREADS=1 python benchmarks/bench_rounding_study.py --trials 16

Both studies start from the float weights ``bench_ptq_methods.py`` trained and cached
(``--weights``), quantize every Conv2d/Linear weight per channel at 2, 3, 4 or 8 bits per layer
(the sampler picks) with its input at 8 bits, calibrate on 8 training batches, and
are scored on ``--eval-images`` validation and test images. The searched study also picks
``rounding`` from nearest, GPTQ and AdaRound (``--adaround-iters``); both use the same seed and
sampler. Writes the two spaces, the database and one report per study under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _study_bench import parser, ptq_study, run_space

from quantsearch.report import ReportData, write_report


def space(args: argparse.Namespace, name: str, rounding: list[str]) -> dict[str, Any]:
    return {
        "study_name": f"mobilenetv2-{name}",
        **ptq_study(args, "mobilenetv2"),
        "n_trials": args.trials,
        "storage": str((args.out / "rounding.db").resolve()),
        "baselines": {"float": True, "uniform_bits": [8]},
        "sampler": {"name": "tpe"},
        "quantize": {"weight": {"op_types": ["Conv2d", "Linear"]},
                     "input": {"op_types": ["Conv2d", "Linear"]}},
        "params": {
            "input_bits": 8,
            "quant_scheme": "per_channel_symmetric",
            "quant_dtype": "int",
            "rounding": rounding[0] if len(rounding) == 1 else {"_type": "choice",
                                                                 "_value": rounding},
            "adaround_iters": args.adaround_iters,
        },
        "per_layer": {"op_types": ["Conv2d", "Linear"],
                      "weight_bits": {"_type": "choice", "_value": [2, 3, 4, 8]}},
    }


def summary(study: Any, out: Path, seconds: float) -> dict[str, Any]:
    write_report(study, out)
    data = ReportData.of(study)
    frame = data.frame[data.frame["state"] == "COMPLETE"]
    float_accuracy = float(data.record.float_model.val_accuracy)
    within = frame[frame["accuracy"] >= float_accuracy - 0.01]
    smallest = within.sort_values("size_bytes").iloc[0] if len(within) else None
    return {
        "study": study.study_name,
        "trials": len(frame),
        "seconds": round(seconds),
        "hypervolume": data.hypervolume,
        "float_val_accuracy": float_accuracy,
        "front": len(data.front),
        "smallest_within_1_point": None if smallest is None else {
            "number": int(smallest["number"]), "size_bytes": int(smallest["size_bytes"]),
            "val_accuracy": float(smallest["accuracy"]),
            "test_accuracy": float(smallest["test_accuracy"]),
            "rounding": smallest.get("params.rounding", "nearest"),
        },
    }


def main() -> None:
    arguments = parser(__doc__.split("\n\n")[0], weights="ptq-methods-mobilenetv2-6400.pt",
                       out="/tmp/rounding-study", trials=16)
    arguments.add_argument("--adaround-iters", type=int, default=100)
    args = arguments.parse_args()
    rows = []
    for name, rounding in (("nearest", ["nearest"]), ("rounding", ["nearest", "gptq",
                                                                   "adaround"])):
        study, seconds = run_space(space(args, name, rounding), args.out / f"{name}.yaml")
        rows.append(summary(study, args.out / f"report-{name}", seconds))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
