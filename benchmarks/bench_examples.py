"""Run the examples of docs/examples.md in full, each from its bundled space, and print the
figures the documentation quotes.

    OMP_NUM_THREADS=1 python benchmarks/bench_examples.py                  # every example
    OMP_NUM_THREADS=1 python benchmarks/bench_examples.py char_lm segmentation

Each example runs ``quantsearch study --space search_spaces/<space> --storage <temp>/bench.db
--quiet --report-dir <temp>/report`` from the repository root (the space's own data paths,
``n_trials`` and training settings, unchanged) and then prints: the study's wall time, the
float model's validation and test metric, the front (trial, metric, size, compression) and the
target trial. Nothing is asserted: the times depend on the machine and on whoever shares it.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: example name -> (space file, the metric its report is about)
EXAMPLES = {
    "regression": ("regression_diabetes.yaml", "mae"),
    "char_lm": ("char_lm_stdlib.yaml", "perplexity"),
    "segmentation": ("mnist_segmentation.yaml", "miou"),
    "lightning": ("regression_lightning.yaml", "mae"),
    "minilm": ("minilm_embeddings.yaml", "recall10"),
}


def run_example(name: str) -> None:
    space, metric = EXAMPLES[name]
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as folder:
        report = Path(folder) / "report"
        command = [
            sys.executable, "-m", "quantsearch", "study",
            "--space", str(REPO / "search_spaces" / space),
            "--storage", f"sqlite:///{Path(folder) / 'bench.db'}",
            "--quiet", "--report-dir", str(report),
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(f"{name}: failed after {wall:.0f} s\n{done.stderr[-3000:]}")
            return
        rows = [
            r for r in csv.DictReader((report / "trials.csv").open()) if r["state"] == "COMPLETE"
        ]
        float_row = next(r for r in rows if r.get("baseline") == "float")
        float_size = float(float_row["size_bytes"])
        print(f"== {name}: {space}, {len(rows)} complete trials, study {wall:.0f} s")
        print(
            f"float model: val {metric} {float(float_row[metric]):.4g}, "
            f"test {float(float_row['test_' + metric]):.4g}, {float_size:,.0f} bytes"
        )
        front = sorted((r for r in rows if r["pareto"] == "True"),
                       key=lambda r: float(r["size_bytes"]))
        for r in front:
            size = float(r["size_bytes"])
            print(
                f"  front trial {r['number']:>3}: val {metric} {float(r[metric]):.4g}, "
                f"test {float(r['test_' + metric]):.4g}, {size:,.0f} bytes "
                f"({float_size / size:.2f}x)"
                f"{'  [' + r['baseline'] + ']' if r.get('baseline') else ''}"
            )
        target = [line for line in done.stdout.splitlines() if line.startswith("target:")]
        print("\n".join(target) or "target: none reached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("examples", nargs="*", help=f"some of {', '.join(EXAMPLES)} (all)")
    args = parser.parse_args()
    unknown = sorted(set(args.examples) - set(EXAMPLES))
    if unknown:
        parser.error(f"unknown example(s) {unknown}; choose from {', '.join(EXAMPLES)}")
    for name in args.examples or EXAMPLES:
        run_example(name)


if __name__ == "__main__":
    main()
