"""Time the report of a large synthetic study: trials_frame and write_report, in-memory and SQLite.

python benchmarks/bench_report.py --trials 100 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState, create_trial

from quantsearch.report import trials_frame, write_report

LAYERS = [f"layer{i}" for i in range(12)]
PARAMS_PER_LAYER = 20_000
FLOAT_SIZE = 4 * PARAMS_PER_LAYER * len(LAYERS)


def synthetic_study(n_trials: int, storage: str | None) -> optuna.Study:
    """A study shaped like quantsearch's: per-layer bits, constraints, a few failures."""
    rng = np.random.default_rng(0)
    study = optuna.create_study(
        study_name="bench", storage=storage, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "size_bytes"])
    study.set_user_attr("layers", LAYERS)
    study.set_user_attr("float_size_bytes", FLOAT_SIZE)
    trials = []
    for number in range(n_trials):
        if number % 25 == 24:
            trials.append(
                create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "diverged"})
            )
            continue
        bits = rng.choice([2, 4, 8, 32], size=len(LAYERS))
        size = int(sum(PARAMS_PER_LAYER * b // 8 for b in bits))
        accuracy = float(0.98 - sum({2: 0.03, 4: 0.005, 8: 0.001, 32: 0.0}[b] for b in bits))
        accuracy -= float(rng.uniform(0, 0.02))
        trials.append(
            create_trial(
                values=[accuracy, float(size)],
                user_attrs={
                    "config_list": [
                        {"quant_types": ["weight"], "quant_bits": int(b), "op_names": [layer]}
                        for layer, b in zip(LAYERS, bits, strict=True)
                        if b != 32
                    ],
                    "layer_bits": {
                        layer: {"weight": int(b)}
                        for layer, b in zip(LAYERS, bits, strict=True)
                        if b != 32
                    },
                    "test_accuracy": accuracy - 0.003,
                    "size_bytes": size,
                    "compression_ratio": FLOAT_SIZE / size,
                    "algorithm": "qat",
                },
                system_attrs={"constraints": [0.9 - accuracy]},
            )
        )
    study.add_trials(trials)
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{'trials':>7} {'storage':>8} {'trials_frame s':>15} {'write_report s':>15}")
    for n in args.trials:
        with tempfile.TemporaryDirectory() as tmp:
            for kind, storage in (("memory", None), ("sqlite", f"sqlite:///{tmp}/bench.db")):
                study = synthetic_study(n, storage)
                start = time.perf_counter()
                trials_frame(study)
                frame_seconds = time.perf_counter() - start
                start = time.perf_counter()
                write_report(study, Path(tmp) / f"report_{kind}")
                report_seconds = time.perf_counter() - start
                print(f"{n:>7} {kind:>8} {frame_seconds:>15.2f} {report_seconds:>15.2f}")


if __name__ == "__main__":
    main()
