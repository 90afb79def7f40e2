"""Studies built trial by trial with optuna's public API, shaped like quantsearch's own."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
# Parameters per layer of the float model (4 bytes each).
LAYER_PARAMS = {"conv1": 160, "conv2": 4_640, "fc1": 18_496, "fc2": 650}
FLOAT_SIZE = 4 * sum(LAYER_PARAMS.values())
BITS_CHOICES = ["float", 2, 4, 8]
BITS_DISTRIBUTION = CategoricalDistribution(BITS_CHOICES)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _config_list(bits: dict[str, int | str]) -> list[dict]:
    return [
        {"quant_types": ["weight"], "quant_bits": {"weight": b}, "op_names": [layer]}
        for layer, b in bits.items()
        if b != "float"
    ]


def _size(bits: dict[str, int | str]) -> int:
    total = 0
    for layer, b in bits.items():
        n = LAYER_PARAMS[layer]
        total += 4 * n if b == "float" else (n * int(b) + 7) // 8 + 8
    return total


def _complete(
    number_hint: int,
    bits: dict[str, int | str],
    accuracy: float,
    *,
    baseline: str | None = None,
    constraint: float = 0.0,
) -> optuna.trial.FrozenTrial:
    size = _size(bits)
    attrs: dict = {
        "config_list": _config_list(bits),
        "val_accuracy": accuracy,
        "test_accuracy": round(accuracy - 0.004, 6),
        "size_bytes": size,
        "float_size_bytes": FLOAT_SIZE,
        "compression_ratio": FLOAT_SIZE / size,
        "train_seconds": 1.5 + 0.01 * number_hint,
        "algorithm": "qat",
        "layer_bits": {
            layer: {"weight": int(b), "output": 8} for layer, b in bits.items() if b != "float"
        },
        "checkpoint": f"demo_artifacts/demo/trial_{number_hint}.pt",
    }
    if baseline is not None:
        attrs["baseline"] = baseline
    return create_trial(
        values=[accuracy, float(size)],
        params=dict(bits),
        distributions={layer: BITS_DISTRIBUTION for layer in bits},
        user_attrs=attrs,
        system_attrs={"constraints": [constraint]},
    )


def build_study(
    storage: str | None = None,
    *,
    name: str = "demo",
    n_random: int = 24,
    failed: int = 2,
) -> optuna.Study:
    """A study with float and uniform baselines, searched trials, infeasible and failed ones."""
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "size_bytes"])
    study.set_user_attr("task", "digits")
    study.set_user_attr("algorithm", "qat")
    study.set_user_attr("float_size_bytes", FLOAT_SIZE)
    study.set_user_attr("layers", LAYERS)
    study.set_user_attr("space_hash", "0123abcd")
    study.add_trial(_complete(0, dict.fromkeys(LAYERS, "float"), 0.9722, baseline="float"))
    study.add_trial(_complete(1, dict.fromkeys(LAYERS, 8), 0.9694, baseline="uniform-8"))
    study.add_trial(_complete(2, dict.fromkeys(LAYERS, 4), 0.9500, baseline="uniform-4"))
    rng = np.random.default_rng(7)
    penalty = {"float": 0.0, 8: 0.001, 4: 0.012, 2: 0.08}
    for i in range(n_random):
        bits = {layer: BITS_CHOICES[int(rng.integers(len(BITS_CHOICES)))] for layer in LAYERS}
        accuracy = 0.9722 - sum(penalty[b] for b in bits.values()) - float(rng.uniform(0, 0.01))
        accuracy = round(max(accuracy, 0.1), 4)
        # A constraint of at most 10 points of accuracy drop from the float model.
        constraint = round((0.9722 - accuracy) - 0.10, 4)
        study.add_trial(_complete(3 + i, bits, accuracy, constraint=constraint))
    for i in range(failed):
        attrs = {"fail_reason": "DivergedError: loss became nan at epoch 2, step 17"}
        if i == 0:
            attrs["size_bytes"] = 9_000
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=attrs))
    return study
