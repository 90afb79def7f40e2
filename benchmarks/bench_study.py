"""Time a whole study from the command line, on a fresh database.

    python benchmarks/bench_study.py                         # search_spaces/qat.yaml, --jobs 1
    python benchmarks/bench_study.py --space search_spaces/mixed.yaml --jobs 2

Runs ``quantsearch study --space SPACE --storage <temp>/bench.db --quiet`` (report included,
into the temp folder) and prints the wall time of the command, the trials it trained and the
trials per minute between the first trial's start and the last one's end. Nothing is asserted:
the figures depend on the machine, and on whoever else uses its cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StudyTiming:
    jobs: int
    wall_seconds: float
    trials: int
    trained: int
    trial_span_seconds: float

    @property
    def trials_per_minute(self) -> float:
        return 60.0 * self.trials / self.trial_span_seconds


def time_study(space: Path, *, jobs: int, n_trials: int | None = None) -> StudyTiming:
    """Run one study in a fresh temporary folder and measure it."""
    with tempfile.TemporaryDirectory(prefix="bench-study-") as folder:
        storage = f"sqlite:///{Path(folder) / 'bench.db'}"
        command = [
            sys.executable, "-m", "quantsearch", "study",
            "--space", str(space),
            "--storage", storage,
            "--jobs", str(jobs),
            "--quiet",
            "--report-dir", str(Path(folder) / "report"),
        ]  # fmt: skip
        if n_trials is not None:
            command += ["--n-trials", str(n_trials)]
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        (name,) = optuna.get_all_study_names(storage)
        study = optuna.load_study(study_name=name, storage=storage)
        trials = [t for t in study.get_trials() if t.datetime_complete is not None]
        span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
        return StudyTiming(
            jobs=jobs,
            wall_seconds=wall,
            trials=len(trials),
            trained=sum("duplicate_of" not in t.user_attrs for t in trials),
            trial_span_seconds=span.total_seconds(),
        )


def describe_machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cores} cores, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=REPO / "search_spaces" / "qat.yaml")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--n-trials", type=int, default=None)
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    timing = time_study(args.space, jobs=args.jobs, n_trials=args.n_trials)
    print(f"machine after: {describe_machine()}")
    print(
        f"{args.space.name} --jobs {timing.jobs}: {timing.wall_seconds:.1f} s for the command, "
        f"{timing.trials} trials ({timing.trained} trained, the rest reused), "
        f"{timing.trials_per_minute:.1f} trials/min"
    )


if __name__ == "__main__":
    main()
