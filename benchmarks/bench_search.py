"""Search quality, measured: how close each strategy gets to the exhaustive front.

    python benchmarks/bench_search.py                  # enumerate once (cached), then compare
    python benchmarks/bench_search.py --enumerate-only

The space: the digits CNN, ptq trials (weights only, per-tensor affine, min/max), each of its
4 weighted layers at 2, 3, 4, 6 or 8 bits or float: 6^4 = 1,296 configs. A weight-only ptq
trial has nothing to calibrate, so its result is a function of its config alone: every config
is evaluated once with the pipeline's own trial function (``run_trial``, mode ``ptq``) and
cached in ``--table``; every strategy then runs the study's own setup (its baselines, the
sensitivity's ``enqueue_seeds``, the sampler ``run_study`` makes) in an in-memory Optuna study
whose trials are answered from the table.

For 3 seeds and budgets of 10, 20, 40 and 80 trials (a separate study per budget), the
hypervolume of the study's trials (1 - validation accuracy, size / float size, reference 1:
the report's) as a fraction of the exhaustive front's, for: the default (sensitivity-seeded
NSGA-II), NSGA-II alone, TPE alone, random search, the sensitivity Pareto set alone, and
variants of the default; and how many configs of the exhaustive front each tried. Nothing is
asserted; the tables are printed (and written as Markdown with ``--markdown``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("conv1", "conv2", "fc1", "fc2")
BITS: tuple[int | str, ...] = (2, 3, 4, 6, 8, "float")
BUDGETS = (10, 20, 40, 80)
SEEDS = (0, 1, 2)
FLOAT_TRAIN = {"epochs": 10, "batch_size": 64, "optimizer": "adam", "lr": 0.003}


def space(pretrained: str, storage: str, **changes: Any) -> dict[str, Any]:
    """The benchmark's search space as YAML data."""
    out: dict[str, Any] = {
        "study_name": "bench-search",
        "task": {"name": "digits", "pretrained": pretrained},
        "algorithm": "ptq",
        "seed": 0,
        "calibration": {"batches": 1},
        "n_trials": 40,
        "storage": storage,
        "baselines": {"float": True},
        "quantize": {"weight": {"op_types": ["default"]}},
        "per_layer": {
            "op_types": ["default"],
            "weight_bits": {"_type": "choice", "_value": list(BITS)},
        },
        "sensitivity": {"method": "loss"},
    }
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def table_key(config_list: list[dict[str, Any]]) -> str:
    return json.dumps(config_list, sort_keys=True)


def float_model(folder: Path) -> Path:
    """The float model every trial starts from, trained once (as a study would)."""
    from quantsearch.pipeline import make_float_model
    from quantsearch.search._objective import build_task, train_config
    from quantsearch.search._space import TaskSpec

    path = folder / "bench_search_float.pt"
    if not path.exists():
        task = build_task(TaskSpec(name="digits"), 0)
        made = make_float_model(
            task, pretrained=None, train=train_config(task, FLOAT_TRAIN), seed=0, out=path
        )
        print(f"float model: val {made.val_accuracy:.4f}, test {made.test_accuracy:.4f}")
    return path


def enumerate_space(weights: Path, table_path: Path) -> dict[str, Any]:
    """Every config of the space through ``run_trial``; resumes a partly written table."""
    from quantsearch.pipeline import trial_mode
    from quantsearch.search import TrialJob, parse_space, prepare, run_trial

    spec = parse_space(
        space(str(weights), "sqlite:///unused.db", sensitivity=None), source="bench_search"
    )
    context = prepare(spec)
    table: dict[str, Any] = {}
    if table_path.exists():
        table = json.loads(table_path.read_text())
    rows = table.setdefault("rows", {})
    started = time.perf_counter()
    points = list(itertools.product(BITS, repeat=len(LAYERS)))
    for index, bits in enumerate(points):
        values = context.plan.values(
            {f"{layer}.weight_bits": b for layer, b in zip(LAYERS, bits, strict=True)}
        )
        config_list = context.plan.config_list(values)
        key = table_key(config_list)
        if key in rows:
            continue
        outcome = run_trial(
            TrialJob(
                number=index,
                seed=1,
                task=spec.task,
                task_seed=spec.seed,
                algorithm=spec.algorithm,
                mode=trial_mode(spec.algorithm, config_list, from_scratch=False),
                train=dict(spec.train),
                config_list=config_list,
                objectives=spec.objectives,
                float_weights=str(weights),
                calibration_batches=spec.calibration_batches,
            )
        )
        assert outcome.state == "COMPLETE", outcome.record.fail_reason
        rows[key] = {
            "bits": list(bits),
            "values": list(outcome.values),
            "record": outcome.record.model_dump(exclude_none=True),
        }
        if len(rows) % 50 == 0:
            table_path.write_text(json.dumps(table))
            elapsed = time.perf_counter() - started
            print(f"  {len(rows)}/{len(points)} configs, {elapsed:.0f} s", flush=True)
    table["float_size_bytes"] = context.float_size_bytes
    table_path.write_text(json.dumps(table))
    return table


STRATEGIES: dict[str, dict[str, Any]] = {
    "default (sensitivity + NSGA-II)": {"sensitivity": {"method": "loss"}},
    "NSGA-II alone": {"sensitivity": None},
    "TPE alone": {"sensitivity": None, "sampler": "tpe"},
    "random": {"sensitivity": None, "sampler": "random"},
    "sensitivity Pareto set alone": {"sensitivity": {"method": "loss"}, "alone": True},
}
# Variants of the default, tried on the way to it.
VARIANTS: dict[str, dict[str, Any]] = {
    "seeds spread by size + NSGA-II": {"sensitivity": {"method": "loss", "spread": "size"}},
    "sensitivity + TPE": {"sensitivity": {"method": "loss"}, "sampler": "tpe"},
    "a quarter of the trials seeded + NSGA-II": {
        "sensitivity": {"method": "loss"},
        "quarter": True,
    },
    "Hessian sensitivity + NSGA-II": {"sensitivity": {"method": "hessian"}},
}


def measured_sensitivity(weights: Path, method: str = "loss") -> Any:
    """The space's sensitivity, measured once (per method) for every strategy and budget."""
    from quantsearch.pipeline import load_state
    from quantsearch.search import parse_space, prepare
    from quantsearch.search._sensitivity import measure_sensitivity

    if method not in _SENSITIVITY_CACHE:
        data = space(str(weights), "sqlite:///unused.db", sensitivity={"method": method})
        context = prepare(parse_space(data, source="bench_search"))
        _SENSITIVITY_CACHE[method] = measure_sensitivity(
            context.spec,
            context.task,
            context.plan,
            load_state(weights),
            float_size_bytes=context.float_size_bytes,
        )
    return _SENSITIVITY_CACHE[method]


_SENSITIVITY_CACHE: dict[str, Any] = {}


def run_strategy(
    weights: Path, table: dict[str, Any], strategy: dict[str, Any], budget: int, seed: int
) -> tuple[float, set[str]]:
    """(hypervolume of the study's trials, the configs it tried) for one strategy, budget and
    seed.

    The study is the one ``run_study`` opens, in memory and answered from the table: the
    baselines queued first, then the sensitivity's seed configs (``enqueue_seeds``), then the
    space's sampler as the study makes it (``seed`` replaces the study seed in the sampler
    only; the data split stays that of seed 0).
    """
    from dataclasses import replace

    import optuna

    from quantsearch.pipeline import TrialRecord
    from quantsearch.report._objectives import hypervolume
    from quantsearch.search import parse_space, prepare
    from quantsearch.search._sensitivity import enqueue_seeds, predicted_front
    from quantsearch.search._study import _sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    changes = {k: v for k, v in strategy.items() if k not in ("alone", "quarter")}
    n_trials = budget
    options = strategy.get("sensitivity")
    sensitivity = measured_sensitivity(weights, options["method"]) if options else None
    if strategy.get("quarter"):
        changes["sensitivity"] = {**options, "seeds": min(10, budget // 4)}
    if strategy.get("alone"):
        # Only the predicted set (and the float baseline): no sampled trial at all.
        size = min(budget - 1, len(predicted_front(sensitivity)))
        changes["sensitivity"] = {"method": "loss", "seeds": size}
        n_trials = size + 1
    data = space(str(weights), "sqlite:///unused.db", n_trials=n_trials, **changes)
    context = prepare(parse_space(data, source="bench_search"))
    spec, plan = context.spec, context.plan
    study = optuna.create_study(
        directions=context.directions, sampler=_sampler(replace(spec, seed=seed), 0)
    )
    for label in spec.baselines.labels:
        attrs = TrialRecord(baseline=label).model_dump(include={"baseline"})
        study.enqueue_trial(plan.baseline_params(label), user_attrs=attrs)
    if sensitivity is not None:
        enqueue_seeds(study, spec, plan, sensitivity)
    rows = table["rows"]
    tried: set[str] = set()
    for _ in range(n_trials):
        trial = study.ask(plan.distributions)
        baseline = TrialRecord.from_attrs(trial.user_attrs).baseline
        config_list = [] if baseline == "float" else plan.config_list(plan.values(trial.params))
        study.tell(trial, rows[table_key(config_list)]["values"])
        tried.add(table_key(config_list))
    float_size = table["float_size_bytes"]
    points = np.array(
        [[1 - t.values[0], t.values[1] / float_size] for t in study.trials if t.values]
    )
    return hypervolume(points), tried


def reference_front(table: dict[str, Any]) -> set[str]:
    """The configs on the exhaustive Pareto front."""
    from quantsearch.report._objectives import front_mask

    float_size = table["float_size_bytes"]
    keys = list(table["rows"])
    points = np.array(
        [[1 - r["values"][0], r["values"][1] / float_size] for r in table["rows"].values()]
    )
    return {key for key, on in zip(keys, front_mask(points), strict=True) if on}


def reference_hypervolume(table: dict[str, Any]) -> float:
    from quantsearch.report._objectives import hypervolume

    float_size = table["float_size_bytes"]
    points = np.array(
        [[1 - r["values"][0], r["values"][1] / float_size] for r in table["rows"].values()]
    )
    return hypervolume(points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--table", type=Path, default=REPO / "benchmarks" / ".cache" / "bench_search_digits.json"
    )
    parser.add_argument("--enumerate-only", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = float_model(args.table.parent)
    table = enumerate_space(weights, args.table)
    print(f"{len(table['rows'])} configs enumerated")
    if args.enumerate_only:
        return
    reference = reference_hypervolume(table)
    print(f"reference (exhaustive) hypervolume {reference:.4f}")
    results: dict[str, dict[int, list[float]]] = {}
    found: dict[str, dict[int, list[int]]] = {}
    best = reference_front(table)
    started = time.perf_counter()
    every = {**STRATEGIES, **VARIANTS}
    for name in every:
        for budget in BUDGETS:
            for seed in SEEDS:
                volume, tried = run_strategy(weights, table, every[name], budget, seed)
                results.setdefault(name, {}).setdefault(budget, []).append(volume / reference)
                found.setdefault(name, {}).setdefault(budget, []).append(len(tried & best))
            shown = results[name][budget]
            elapsed = time.perf_counter() - started
            print(
                f"  {name:<34} {budget:>3} trials: {np.mean(shown):.2%} "
                f"({', '.join(f'{v:.3f}' for v in shown)})  [{elapsed:.0f} s]",
                flush=True,
            )
    lines = [
        "| strategy | " + " | ".join(f"{b} trials" for b in BUDGETS) + " |",
        "|---|" + "---:|" * len(BUDGETS),
    ]
    for name in every:
        if name == next(iter(VARIANTS)):
            lines.append("| *variants of the default* |" + " |" * len(BUDGETS))
        cells = []
        for budget in BUDGETS:
            values = results[name][budget]
            cells.append(f"{np.mean(values):.2%} (min {min(values):.2%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    from quantsearch.search._sensitivity import predicted_front

    sensitivity = measured_sensitivity(weights)
    front = predicted_front(sensitivity)
    lines += [
        "",
        f"Configs of the exhaustive front ({len(best)}) among the trials, mean over the seeds:",
        "",
        "| strategy | " + " | ".join(f"{b} trials" for b in BUDGETS) + " |",
        "|---|" + "---:|" * len(BUDGETS),
    ]
    for name in every:
        cells = [f"{np.mean(found[name][budget]):.1f}" for budget in BUDGETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Reference hypervolume {reference:.4f} (all {len(table['rows'])} configs); the "
        f"sensitivity pass took {sensitivity.seconds:.1f} s and predicts "
        f"{len(front)} Pareto configs. Mean over seeds {', '.join(map(str, SEEDS))} of the "
        "fraction of the reference hypervolume (worst seed in brackets).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
