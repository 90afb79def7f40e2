"""Fine-tune and post-training trials against a trial trained from scratch, on real MNIST.

    python benchmarks/bench_finetune.py --data-dir ../shared/data/mnist --threads 1

In one process, with the stated torch threads, on NNI's QAT example network (two 5x5 convs,
two linear layers) and W8A8 (8-bit conv/linear weights and ReLU6 outputs):

1. trains the float model for ``--epochs`` epochs (what a study does once, ``float_train``);
2. runs one QAT trial from scratch for the same epochs (what every trial did before);
3. runs one QAT fine-tune trial of ``--steps`` steps from the float model;
4. runs one ptq trial (``--calibration-batches`` batches of min/max calibration).

Each trial goes through ``run_trial``, exactly as a study runs it (test evaluation and
checkpoint included), and prints its seconds, its accuracies and its cost against the
from-scratch trial. Nothing is asserted: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from quantsearch.search import TrialJob, run_trial
from quantsearch.search._objective import build_task
from quantsearch.search._spec import TaskSpec
from quantsearch.tasks import TrainConfig, evaluate, fit, make_optimizer, seed_everything

W8A8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="float model and scratch trial")
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate")
    parser.add_argument("--calibration-batches", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = TaskSpec(name="mnist", data_dir=args.data_dir)
    task = build_task(spec, 0)
    print(
        f"mnist: {len(task.train_set)} train / {len(task.val_set)} val / "  # type: ignore[arg-type]
        f"{len(task.test_set)} test images, {args.threads} torch thread(s)"  # type: ignore[arg-type]
    )

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as folder:
        started = time.perf_counter()
        seed_everything(0)
        model = task.build_model()
        config = TrainConfig(epochs=args.epochs, lr=1e-3)
        fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
        float_seconds = time.perf_counter() - started
        float_val = evaluate(model, task.val_set)
        float_test = evaluate(model, task.test_set)
        weights = Path(folder) / "float.pt"
        torch.save(model.state_dict(), weights)
        print(
            f"float model   {float_seconds:7.1f} s  val {float_val:.4f}  test {float_test:.4f}"
            f"  ({args.epochs} epochs, trained once per study)"
        )

        def job(name: str, **fields: object) -> TrialJob:
            values: dict = {
                "number": 0,
                "seed": 1,
                "task": spec,
                "task_seed": 0,
                "algorithm": "qat",
                "mode": "finetune",
                "train": {},
                "config_list": W8A8,
                "objectives": ("accuracy", "size_bytes"),
                "float_weights": str(weights),
                "calibration_batches": args.calibration_batches,
                "checkpoint": str(Path(folder) / f"{name}.pt"),
                **fields,
            }
            return TrialJob(**values)

        jobs = {
            f"scratch QAT ({args.epochs} epochs)": job(
                "scratch", mode="scratch", train={"epochs": args.epochs, "lr": 1e-3}
            ),
            f"fine-tune QAT ({args.steps} steps)": job(
                "finetune", train={"steps": args.steps, "lr": args.lr}
            ),
            f"ptq ({args.calibration_batches} batches)": job("ptq", algorithm="ptq", mode="ptq"),
        }
        baseline = None
        for name, trial in jobs.items():
            outcome = run_trial(trial)
            record = outcome.record
            if outcome.state != "COMPLETE":
                print(f"{name:<28} {outcome.state}: {record.fail_reason}")
                continue
            seconds = record.train_seconds or 0.0
            baseline = baseline or seconds
            drop = (float_val - (record.val_accuracy or 0.0)) * 100
            print(
                f"{name:<28} {seconds:7.1f} s  val {record.val_accuracy:.4f}  "
                f"test {record.test_accuracy:.4f}  ({drop:+.2f} points below float val; "
                f"{baseline / seconds:5.1f}x cheaper than scratch)"
            )


if __name__ == "__main__":
    main()
