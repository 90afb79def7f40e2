"""Search quality, measured: how close each strategy gets to the best front there is.

    python benchmarks/bench_search.py                  # digits: enumerate once (cached)
    python benchmarks/bench_search.py --enumerate-only
    python benchmarks/bench_search.py --task mnist --data-dir ../shared/data/mnist

The space: the task's CNN (digits: the bundled one; mnist: NNI's QAT example network on real
MNIST), ptq trials (weights only, per-tensor affine, min/max), each of its 4 weighted layers at
2, 3, 4, 6 or 8 bits or float: 6^4 = 1,296 configs. A weight-only ptq trial has nothing to
calibrate, so its result is a function of its config alone: a config is evaluated once the way
``run_trial`` evaluates a ptq trial (``build_compressed``, ``adapt``, ``model_size_bytes``;
the test split, which nothing here reads, left out) and cached in ``--table``.
Digits enumerates every config first and the reference front is the exhaustive one; on mnist
configs are evaluated as the strategies ask for them and the reference is the front of every
config any run tried. Every strategy runs the study's own setup (its baselines, the
sensitivity's ``SeedGuide``, the sampler ``run_study`` makes) in an in-memory Optuna study
whose trials are answered from the table.

For 3 seeds and budgets of 10, 20, 40 and 80 trials (a separate study per budget), the
hypervolume of the study's trials (1 - validation accuracy, size / float size, reference 1:
the report's) as a fraction of the reference front's, for: the default (sensitivity-guided
NSGA-II), NSGA-II alone, TPE alone, random search, the sensitivity Pareto set alone, and
variants of the default; and how many configs of the reference front each tried. Nothing is
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
# The float model of each task, as its bundled space trains it once.
FLOAT_TRAIN = {
    "digits": {"epochs": 10, "batch_size": 64, "optimizer": "adam", "lr": 0.003},
    "mnist": {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.001},
}
# Set by main: the task the benchmark runs on.
TASK: dict[str, Any] = {"name": "digits"}


def space(pretrained: str, storage: str, **changes: Any) -> dict[str, Any]:
    """The benchmark's search space as YAML data."""
    out: dict[str, Any] = {
        "study_name": "bench-search",
        "task": {**TASK, "pretrained": pretrained},
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
    from quantsearch.search._spec import TaskSpec

    name = TASK["name"]
    path = folder / f"bench_search_{name}_float.pt"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        task = build_task(TaskSpec(**TASK), 0)
        train = train_config(task, FLOAT_TRAIN[name])
        made = make_float_model(task, pretrained=None, train=train, seed=0, out=path)
        print(f"float model: val {made.val_accuracy:.4f}, test {made.test_accuracy:.4f}")
    return path


class Table:
    """Each config's trial result, by its config_list: evaluated once, kept in a JSON file
    with the SHA-256 of the float model it was measured on (another model starts afresh)."""

    def __init__(self, weights: Path, path: Path) -> None:
        from quantsearch.pipeline import load_state, state_sha256
        from quantsearch.search import parse_space, prepare

        self.weights, self.path = weights, path
        self.spec = parse_space(
            space(str(weights), "sqlite:///unused.db", sensitivity=None), source="bench_search"
        )
        self.context = prepare(self.spec)
        self.float_sha256 = state_sha256(load_state(weights))
        data = json.loads(path.read_text()) if path.exists() else {}
        if data and data.get("float_sha256") != self.float_sha256:
            print(f"{path}: results of another float model, evaluated again")
            data = {}
        self.rows: dict[str, Any] = data.get("rows", {})
        self.float_size_bytes = self.context.float_size_bytes
        self._unsaved = 0
        self._state: dict[str, Any] | None = None

    def values(self, config_list: list[dict[str, Any]]) -> list[float]:
        key = table_key(config_list)
        if key not in self.rows:
            self.rows[key] = self._run(config_list)
            self._unsaved += 1
            if self._unsaved >= 20:
                self.save()
        return self.rows[key]["values"]

    def _run(self, config_list: list[dict[str, Any]]) -> dict[str, Any]:
        """What ``run_trial`` measures of a ptq trial, less the test split nobody reads here:
        the same ``build_compressed``, ``adapt`` and ``model_size_bytes``."""
        from quantsearch.pipeline import adapt, build_compressed, load_state, trial_mode
        from quantsearch.quantization import model_size_bytes
        from quantsearch.search._objective import train_config

        spec, task = self.spec, self.context.task
        if self._state is None:
            self._state = load_state(self.weights)
        compressed = build_compressed(task, spec.algorithm, config_list, float_state=self._state)
        adapted = adapt(
            compressed,
            task,
            trial_mode(spec.algorithm, config_list, from_scratch=False),
            train_config(task, spec.train),
            seed=1,
            calibration_batches=spec.calibration_batches,
        )
        size = model_size_bytes(compressed.model)
        record = {"val_accuracy": adapted.val_accuracy, "size_bytes": size}
        return {"values": [adapted.val_accuracy, float(size)], "record": record}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "rows": self.rows,
            "float_size_bytes": self.float_size_bytes,
            "float_sha256": self.float_sha256,
        }
        self.path.write_text(json.dumps(data))
        self._unsaved = 0

    def enumerate(self) -> None:
        """Every config of the space."""
        started = time.perf_counter()
        points = list(itertools.product(BITS, repeat=len(LAYERS)))
        for index, bits in enumerate(points):
            values = self.context.plan.values(
                {f"{layer}.weight_bits": b for layer, b in zip(LAYERS, bits, strict=True)}
            )
            self.values(self.context.plan.config_list(values))
            if (index + 1) % 100 == 0:
                elapsed = time.perf_counter() - started
                print(f"  {index + 1}/{len(points)} configs, {elapsed:.0f} s", flush=True)
        self.save()

    def points(self, keys: Any = None) -> tuple[list[str], np.ndarray]:
        """(keys, [1 - accuracy, size / float size]) of the given keys (default: all)."""
        keys = list(self.rows) if keys is None else list(keys)
        values = [self.rows[k]["values"] for k in keys]
        return keys, np.array([[1 - v[0], v[1] / self.float_size_bytes] for v in values])


STRATEGIES: dict[str, dict[str, Any]] = {
    "default (sensitivity-guided NSGA-II)": {"sensitivity": {"method": "loss"}},
    "NSGA-II alone": {"sensitivity": None},
    "TPE alone": {"sensitivity": None, "sampler": "tpe"},
    "random": {"sensitivity": None, "sampler": "random"},
    "sensitivity Pareto set alone": {"sensitivity": {"method": "loss"}, "alone": True},
}
# Variants of the default, tried on the way to it.
VARIANTS: dict[str, dict[str, Any]] = {
    "every seed first (patience 0) + NSGA-II": {"sensitivity": {"method": "loss", "patience": 0}},
    "half the trials seeded + NSGA-II (the previous default's share)": {
        "sensitivity": {"method": "loss", "patience": 0},
        "half": True,
    },
    "seeds spread by size + NSGA-II": {"sensitivity": {"method": "loss", "spread": "size"}},
    "sensitivity-guided TPE": {"sensitivity": {"method": "loss"}, "sampler": "tpe"},
    "Hessian sensitivity-guided NSGA-II": {"sensitivity": {"method": "hessian"}},
}


def measured_sensitivity(weights: Path, method: str = "loss") -> Any:
    """The space's sensitivity, measured once (per method) for every strategy and budget."""
    from quantsearch.search import parse_space, prepare
    from quantsearch.search._sensitivity_measure import measure_sensitivity

    if method not in _SENSITIVITY_CACHE:
        data = space(str(weights), "sqlite:///unused.db", sensitivity={"method": method})
        context = prepare(parse_space(data, source="bench_search"))
        _SENSITIVITY_CACHE[method] = measure_sensitivity(
            context.spec,
            context.task,
            context.plan,
            weights,
            float_size_bytes=context.float_size_bytes,
        )
    return _SENSITIVITY_CACHE[method]


_SENSITIVITY_CACHE: dict[str, Any] = {}


def run_strategy(
    table: Table, strategy: dict[str, Any], budget: int, seed: int
) -> tuple[np.ndarray, set[str]]:
    """(the study's points, the configs it tried) for one strategy, budget and
    seed.

    The study is the one ``run_study`` opens, in memory and answered from the table: the
    baselines queued first, the sensitivity's ``SeedGuide`` queueing before each ask, then the
    space's sampler as the study makes it (``seed`` replaces the study seed in the sampler
    only; the data split stays that of seed 0).
    """
    from dataclasses import replace

    import optuna

    from quantsearch.pipeline import TrialRecord
    from quantsearch.search import SeedGuide, parse_space, prepare
    from quantsearch.search._storage import initialise, study_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    changes = {k: v for k, v in strategy.items() if k not in ("alone", "half")}
    n_trials = budget
    options = strategy.get("sensitivity")
    sensitivity = measured_sensitivity(table.weights, options["method"]) if options else None
    if strategy.get("half"):
        changes["sensitivity"] = {**options, "seeds": budget // 2}
    if strategy.get("alone"):
        # Only the predicted set (and the float baseline): no sampled trial at all.
        changes["sensitivity"] = {**options, "patience": 0}
    data = space(str(table.weights), "sqlite:///unused.db", n_trials=n_trials, **changes)
    context = prepare(parse_space(data, source="bench_search"))
    spec, plan = context.spec, context.plan
    guide = SeedGuide.of(spec, plan, sensitivity) if sensitivity is not None else None
    if strategy.get("alone"):
        assert guide is not None
        n_trials = min(budget, len(guide.configs) + len(spec.baselines.labels))
    study = optuna.create_study(
        directions=context.directions, sampler=study_sampler(replace(spec, seed=seed), 0)
    )
    initialise(study, context)  # the study's attributes and its baselines, queued first
    tried: set[str] = set()
    for _ in range(n_trials):
        if guide is not None:
            guide.queue_next(study, study.get_trials(deepcopy=False))
        trial = study.ask(plan.distributions)
        queued = TrialRecord.from_attrs(trial.user_attrs)
        config_list = (
            [] if queued.baseline == "float" else plan.config_list(plan.values(trial.params))
        )
        values = table.values(config_list)
        row = table.rows[table_key(config_list)]["record"]
        # What the guide reads of a finished trial: its validation accuracy and size.
        record = TrialRecord(
            val_accuracy=row["val_accuracy"],
            size_bytes=row["size_bytes"],
            val_samples=len(table.context.task.val_set),  # type: ignore[arg-type]
        )
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        study.tell(trial, values)
        tried.add(table_key(config_list))
    float_size = table.float_size_bytes
    points = np.array(
        [[1 - t.values[0], t.values[1] / float_size] for t in study.trials if t.values]
    )
    return points, tried


def reference_front(table: Table) -> set[str]:
    """The configs on the reference Pareto front (of every config in the table)."""
    from quantsearch.report._objectives import front_mask

    keys, points = table.points()
    return {key for key, on in zip(keys, front_mask(points), strict=True) if on}


def reference_hypervolume(table: Table) -> float:
    from quantsearch.report._objectives import hypervolume

    return hypervolume(table.points()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--data-dir", help="the MNIST IDX files (--task mnist)")
    parser.add_argument("--table", type=Path, help="the cache of trial results")
    parser.add_argument(
        "--float-model",
        type=Path,
        help="the float model's state dict (default: trained once into benchmarks/.cache)",
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--strategies", nargs="+", help="names of strategies to run (default all)")
    parser.add_argument("--enumerate-only", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    TASK.update({"name": args.task, **({"data_dir": args.data_dir} if args.data_dir else {})})
    cache = REPO / "benchmarks" / ".cache"
    weights = args.float_model or float_model(cache)
    table = Table(weights, args.table or cache / f"bench_search_{args.task}.json")
    exhaustive = args.task == "digits"
    if exhaustive:
        table.enumerate()
        print(f"{len(table.rows)} configs enumerated")
    if args.enumerate_only:
        return
    every = {**STRATEGIES, **VARIANTS}
    unknown = set(args.strategies or ()) - set(every)
    if unknown:
        parser.error(f"unknown strategies: {', '.join(sorted(unknown))}")
    names = [name for name in every if not args.strategies or name in args.strategies]
    runs: dict[tuple[str, int], list[tuple[np.ndarray, set[str]]]] = {}
    started = time.perf_counter()
    for name in names:
        for budget in args.budgets:
            for seed in SEEDS:
                runs.setdefault((name, budget), []).append(
                    run_strategy(table, every[name], budget, seed)
                )
            elapsed = time.perf_counter() - started
            print(
                f"  {name:<44} {budget:>3} trials  [{elapsed:.0f} s, "
                f"{len(table.rows)} configs evaluated]",
                flush=True,
            )
    table.save()
    text = summary(table, runs, names, args.budgets, exhaustive=exhaustive)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


def summary(
    table: Table,
    runs: dict[tuple[str, int], list[tuple[np.ndarray, set[str]]]],
    names: list[str],
    budgets: list[int],
    *,
    exhaustive: bool,
) -> str:
    """The two Markdown tables: share of the reference hypervolume, front configs found."""
    from quantsearch.report._objectives import hypervolume
    from quantsearch.search._predicted_front import predicted_front

    reference = reference_hypervolume(table)
    best = reference_front(table)
    header = [
        "| strategy | " + " | ".join(f"{b} trials" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    lines = list(header)
    first_variant = next((n for n in names if n in VARIANTS), None)
    for name in names:
        if name == first_variant:
            lines.append("| *variants of the default* |" + " |" * len(budgets))
        cells = []
        for budget in budgets:
            shares = [hypervolume(points) / reference for points, _ in runs[name, budget]]
            cells.append(f"{np.mean(shares):.2%} (min {min(shares):.2%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Configs of the reference front ({len(best)}) among the trials, mean over the seeds:",
        "",
        *header,
    ]
    for name in names:
        cells = [
            f"{np.mean([len(tried & best) for _, tried in runs[name, b]]):.1f}" for b in budgets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sensitivity = measured_sensitivity(table.weights)
    source = (
        f"all {len(table.rows)} configs"
        if exhaustive
        else f"the front of the {len(table.rows)} configs any run tried"
    )
    lines += [
        "",
        f"Reference hypervolume {reference:.4f} ({source}); the sensitivity pass took "
        f"{sensitivity.seconds:.1f} s and predicts {len(predicted_front(sensitivity))} Pareto "
        f"configs. Mean over seeds {', '.join(map(str, SEEDS))} of the fraction of the "
        "reference hypervolume (worst seed in brackets).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
