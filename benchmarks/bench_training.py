"""Float training of the digits task: accuracy and seconds of ``TrainConfig()`` and of the
task's default settings, over several seeds (the README's "Measured" line under Tasks).

    python benchmarks/bench_training.py [--seeds 5] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from quantsearch.tasks import TrainConfig, evaluate, fit, get_task, make_optimizer, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("digits")
    for label, config in (("TrainConfig()", TrainConfig()),
                          ("task default", task.default_train_config)):
        vals, tests, seconds = [], [], []
        for seed in range(args.seeds):
            seed_everything(seed)
            model = task.build_model()
            result = fit(model, task, make_optimizer(model.parameters(), config), config,
                         seed=seed)
            vals.append(result.val_accuracy)
            tests.append(evaluate(model, task.test_set))
            seconds.append(result.train_seconds)
        print(f"{label:>13} ({config.epochs} epochs, lr {config.lr:g}): "
              f"val {min(vals):.3f}-{max(vals):.3f}, test {min(tests):.3f}-{max(tests):.3f}, "
              f"{min(seconds):.2f}-{max(seconds):.2f} s per run (seeds 0-{args.seeds - 1}, "
              f"{args.threads} thread(s))")


if __name__ == "__main__":
    main()
