"""Trials per minute with ``--jobs 2`` against ``--jobs 1``, on the same space.

    python benchmarks/bench_study_jobs.py                    # search_spaces/qat.yaml
    python benchmarks/bench_study_jobs.py --repeats 3

Each run is a fresh study (see bench_study.py). Throughput counts trials between the first
trial's start and the last one's end, so process start-up and the space check are left out.
The two runs sample different points (workers ask before earlier trials finish), so the
trials differ a little in cost; repeats average that out.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

from bench_study import REPO, describe_machine, time_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=REPO / "search_spaces" / "qat.yaml")
    parser.add_argument("--n-trials", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for jobs in (1, 2):
            timing = time_study(args.space, jobs=jobs, n_trials=args.n_trials)
            rates[jobs].append(timing.trials_per_minute)
            print(
                f"--jobs {jobs}: {timing.trials} trials in {timing.trial_span_seconds:.1f} s "
                f"({timing.wall_seconds:.1f} s for the command): "
                f"{timing.trials_per_minute:.1f} trials/min"
            )
    print(f"machine after: {describe_machine()}")
    ratio = mean(rates[2]) / mean(rates[1])
    print(f"--jobs 2 / --jobs 1 trials per minute: {ratio:.2f}x")


if __name__ == "__main__":
    main()
