"""The per-layer latency table against measurement, on a space's network, without training.

    python benchmarks/bench_latency_table.py --space search_spaces/latency_cnn.yaml \
        --data-dir /path/to/mnist [--configs 8] [--seed 0]

Measures the space's latency table (``latency: {table: true}``'s pass: the float model, then
each layer at each setting alone quantized, timed in turn with the float model), then draws
``--configs`` random configs of the space (plus its uniform-8 and all-4-bit weights points),
times each one's export as a trial's latency is timed (``measure_latency`` with the float
model in the same loop) and prints the prediction beside the measurement: the median and
largest absolute relative error and Spearman's rank correlation. The weights are the
untrained model's (latency does not depend on their values); activation ranges come from one
calibration batch. The load average is printed before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import pandas as pd

from quantsearch.pipeline import build_compressed, measure_latency
from quantsearch.report import prediction_error
from quantsearch.search import load_space, prepare
from quantsearch.search._config_builder import FLOAT
from quantsearch.search._latency_table import measure_latency_table, reference_key
from quantsearch.search._objective import train_config
from quantsearch.tasks import batches_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--configs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    spec = load_space(args.space).with_overrides(data_dir=args.data_dir)
    context = prepare(spec)
    task, plan = context.task, context.plan
    started = time.perf_counter()
    table = measure_latency_table(spec, task, plan, None, log=print)
    print(f"table: {len(table.entries)} entries in {time.perf_counter() - started:.0f} s")
    rng = random.Random(args.seed)
    distributions = plan.distributions
    points = [plan.baseline_params("uniform-8"), plan.baseline_params("uniform-4")]
    points += [
        {k: rng.choice(d.choices) for k, d in distributions.items()}  # type: ignore[attr-defined]
        for _ in range(args.configs)
    ]
    config = train_config(task, spec.train)
    rows = []
    for number, raw in enumerate(points):
        values = plan.values(raw)
        config_list = plan.config_list(values)
        compressed = build_compressed(task, spec.algorithm, config_list)
        assert compressed.quantizer is not None
        batches = batches_of(task.train_set, config, shuffle=False, task=task)
        with compressed.quantizer.calibrate():
            task.output(compressed.model, next(iter(batches)))
        measured = measure_latency(
            compressed.model.eval(),
            task.dummy_input,
            spec.latency,
            reference=task.build_model().eval(),
            reference_key=reference_key(spec),
        )
        layer_bits = compressed.quantizer.layer_bits()
        predicted = table.predict(layer_bits)
        weights = " ".join(
            str(values.get(f"{layer}.weight_bits", FLOAT)) for layer in plan.per_layer_names
        )
        rows.append(
            {
                "number": number,
                "state": "COMPLETE",
                "attr.latency_ms": measured.median_ms,
                "attr.latency_predicted_ms": predicted,
                "weights": weights,
                "float_ms": measured.reference_ms,
            }
        )
        print(
            f"config {number} (weights {weights}): measured {measured.median_ms:.2f} ms "
            f"(float {measured.reference_ms:.2f} in the same loop), predicted {predicted:.2f} ms"
        )
    error = prediction_error(pd.DataFrame(rows))
    assert error is not None
    print(
        f"{error.count} configs: median absolute relative error {error.median_relative:.1%}, "
        f"largest {error.max_relative:.1%} (config {error.worst_trial}), Spearman "
        f"{error.spearman:.2f}; float in the table {table.float_ms:.2f} ms"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
