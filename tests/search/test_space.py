"""Search-space files: parsing, defaults, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantsearch.quantization import QUANTIZERS
from quantsearch.search import NniParam, SpaceError, load_space, parse_space
from quantsearch.search._spec import changed_keys

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {"algorithm": "qat", "params": {"quant_bits": {"_type": "choice", "_value": [4, 8]}}}


def _parse(data: dict) -> object:
    return parse_space(data, source="space.yaml", default_name="space")


def _error(data: object) -> SpaceError:
    with pytest.raises(SpaceError) as caught:
        parse_space(data, source="space.yaml")
    return caught.value


def test_minimal_space_fills_the_defaults() -> None:
    spec = _parse(MINIMAL)
    assert spec.study_name == "space"
    assert spec.task.name == "digits"
    assert spec.algorithm == "qat"
    assert spec.seed == 0
    assert spec.train == {}
    assert spec.objectives == ("accuracy", "size_bytes")
    assert (spec.from_scratch, spec.float_train, spec.calibration_batches) == (False, {}, 32)
    assert spec.sampler.name == "nsga2"
    assert spec.n_trials == 16
    assert spec.storage == "sqlite:///studies/space.db"
    assert spec.baselines.labels == ["float"]
    assert not spec.constraints
    assert spec.hopeless is None
    assert spec.quantize["weight"].op_types == ("default",)
    assert spec.params["quant_bits"] == NniParam("choice", (4, 8))
    assert spec.per_layer is None


def test_full_space_is_read(tmp_path: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(
        """
study_name: full
task: {name: mnist, data_dir: ~/data/mnist, options: {limit: 100}}
algorithm: qat
seed: 3
train: {epochs: 2, batch_size: 32, optimizer: sgd, lr: 1e-2, momentum: 0.8}
objectives: [accuracy, size]
sampler: {name: tpe, n_startup_trials: 5}
n_trials: 9
storage: sqlite:///x/y.db
baselines: {float: false, uniform_bits: [8]}
constraints: {min_accuracy: 0.5, max_size_bytes: 20000}
hopeless: {after_epoch: 1, margin: 0.1}
quantize:
  weight: {op_types: [Conv2d, Linear]}
  output: {op_types: [ReLU6], op_names: [relu1]}
params:
  output_bits: 8
  quant_start_step: {_type: randint, _value: [0, 100]}
  lr: {_type: loguniform, _value: [1e-4, 1e-2]}
per_layer:
  op_types: [Conv2d, Linear]
  weight_bits: {_type: choice, _value: [2, 4, 8, float]}
"""
    )
    spec = load_space(path)
    assert spec.source == str(path)
    assert spec.task.data_dir == str(Path.home() / "data" / "mnist")  # ~ expanded
    assert spec.task.options == {"limit": 100}
    # YAML 1.1 reads 1e-2 as a string; the space reads it as the number it means.
    assert spec.train["lr"] == 0.01
    assert spec.params["lr"] == NniParam("loguniform", (1e-4, 1e-2))
    assert spec.params["output_bits"] == 8
    assert spec.sampler.options == {"n_startup_trials": 5}
    assert spec.baselines.labels == ["uniform-8"]
    assert spec.constraints.min_accuracy == 0.5
    assert spec.constraints.max_size_bytes == 20000
    assert spec.hopeless.after_epoch == 1
    assert spec.quantize["output"].op_names == ("relu1",)
    assert spec.per_layer.params["weight_bits"].value == (2, 4, 8, "float")
    assert spec.storage == f"sqlite:///{tmp_path}/x/y.db"  # relative to the file's folder


def test_a_plain_storage_path_is_a_sqlite_file() -> None:
    assert _parse({**MINIMAL, "storage": "runs/a.db"}).storage == "sqlite:///runs/a.db"


def test_hash_ignores_name_trials_and_storage_but_not_the_search() -> None:
    base = _parse(MINIMAL)
    grown = _parse({**MINIMAL, "n_trials": 50, "storage": "o.db", "study_name": "z"})
    assert grown.space_hash == base.space_hash
    changed = _parse({**MINIMAL, "train": {"epochs": 9}})
    assert changed.space_hash != base.space_hash
    assert changed_keys(base.search_dict(), changed.search_dict()) == ["train.epochs"]


def test_overrides_from_the_command_line() -> None:
    spec = _parse(MINIMAL).with_overrides(storage="other.db", n_trials=3)
    assert spec.storage == "sqlite:///other.db"
    assert spec.n_trials == 3
    with pytest.raises(SpaceError, match="--n-trials: 0 is fewer than the 1 baseline"):
        _parse(MINIMAL).with_overrides(n_trials=0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "space.yaml: the file is empty"),
        ([1, 2], "space.yaml: (top level): expected a mapping"),
        ({**MINIMAL, "epochs": 3}, "space.yaml: epochs: unknown key 'epochs'; allowed: study_name"),
        (
            {"params": {}},
            "space.yaml: algorithm: missing; allowed: naive, qat, dorefa, bnn, lsq, ptq",
        ),
        ({**MINIMAL, "algorithm": "qta"}, "algorithm: 'qta' is not an algorithm; allowed: naive"),
        ({**MINIMAL, "train": {"epochs": 0}}, "train.epochs: 0 is not an integer >= 1"),
        ({**MINIMAL, "train": {"optimizer": "rms"}}, "train.optimizer: 'rms' is not one of sgd"),
        ({**MINIMAL, "train": {"lr": -1}}, "train.lr: -1 is not a number > 0"),
        ({**MINIMAL, "train": {"lrate": 1}}, "train.lrate: unknown key 'lrate'"),
        ({**MINIMAL, "n_trials": 0}, "n_trials: 0 is not an integer >= 1"),
        (
            {**MINIMAL, "n_trials": 1, "baselines": {"uniform_bits": [8]}},
            "n_trials: 1 is fewer than the 2 baseline trials (float, uniform-8)",
        ),
        ({**MINIMAL, "sampler": {"name": "cmaes"}}, "sampler.name: 'cmaes' is not a sampler"),
        (
            {**MINIMAL, "sampler": {"name": "tpe", "population_size": 4}},
            "sampler.population_size: 4: population_size is an integer >= 2, for the nsga2",
        ),
        (
            {**MINIMAL, "objectives": ["accuracy"]},
            "objectives: ['accuracy'] is not a list of two or three metrics; known metrics: "
            "accuracy, size_bytes, bitops",
        ),
        (
            {**MINIMAL, "objectives": ["accuracy", "throughput"]},
            "objectives[1]: 'throughput' is not a metric; known metrics: accuracy, size_bytes, "
            "bitops, agreement, kl, sqnr_db, cosine",
        ),
        (
            {**MINIMAL, "objectives": ["size", "size_bytes"]},
            "objectives[1]: 'size_bytes' is listed twice",
        ),
        ({**MINIMAL, "from_scratch": "yes"}, "from_scratch: 'yes' is not true or false"),
        (
            {**MINIMAL, "algorithm": "ptq", "from_scratch": True},
            "from_scratch: a ptq trial only calibrates, so it needs trained float weights",
        ),
        ({**MINIMAL, "float_train": {"steps": 0}}, "float_train.steps: 0 is not an integer >= 1"),
        ({**MINIMAL, "calibration": {"batches": 0}}, "calibration.batches: 0 is not an integer"),
        ({**MINIMAL, "task": {"name": "digits", "pretrained": 3}}, "task.pretrained: 3 is not"),
        (
            {**MINIMAL, "constraints": {"min_accuracy": 2}},
            "constraints.min_accuracy: 2 is not an accuracy in [0, 1]",
        ),
        ({**MINIMAL, "storage": "://nope"}, "storage: '://nope' is not a database URL"),
        ({**MINIMAL, "quantize": {"bias": {}}}, "quantize.bias: unknown key 'bias'"),
        ({**MINIMAL, "quantize": {"weight": {}}}, "quantize.weight: needs op_types and/or"),
        (
            {**MINIMAL, "quantize": {"weight": {"op_types": "Conv2d"}}},
            "quantize.weight.op_types: 'Conv2d' is not a non-empty list of names",
        ),
        (
            {"algorithm": "qat", "quantize": {"output": {"op_types": ["ReLU"]}}},
            "quantize.output: output is quantized but no bit width is given",
        ),
        ({**MINIMAL, "params": {"bits": 4}}, "params.bits: unknown key 'bits'; allowed:"),
        (
            {"algorithm": "qat", "params": {"quant_bits": 40}},
            "params.quant_bits: 40 is not an integer 1..16 or 'float'",
        ),
        (
            {"algorithm": "qat", "params": {"quant_bits": {"_type": "choice", "_value": [4, 0]}}},
            "params.quant_bits._value[1]: 0 is not an integer 1..16 or 'float'",
        ),
        (
            {"algorithm": "qat", "params": {"quant_bits": {"_type": "uniform", "_value": [2, 8]}}},
            "params.quant_bits._value: uniform [2, 8] gives non-integer values",
        ),
        (
            {"algorithm": "qat", "params": {"quant_bits": {"_type": "randint", "_value": [2, 40]}}},
            "params.quant_bits._value: randint [2, 40] reaches 39",
        ),
        (
            {**MINIMAL, "algorithm": "lsq", "params": {"quant_bits": 8, "quant_start_step": 5}},
            "params.quant_start_step: only the qat algorithm has quant_start_step, not lsq",
        ),
        (
            {**MINIMAL, "algorithm": "naive", "params": {"quant_bits": 8, "quant_scheme": "x"}},
            "params.quant_scheme: only the qat and ptq algorithms have quant_scheme, not naive",
        ),
        (
            {**MINIMAL, "params": {"quant_bits": 8, "quant_start_step": {"_type": "uniform",
                                                                          "_value": [0, 9]}}},
            "params.quant_start_step._value: uniform [0, 9] gives non-integer values",
        ),
        (
            {**MINIMAL, "params": {"quant_bits": 8, "quant_scheme": "per_layer"}},
            "params.quant_scheme: 'per_layer' is not one of ['per_tensor_affine', ",
        ),
        (
            {**MINIMAL, "train": {"device": "cuda:x"}},
            "train.device: 'cuda:x' is not one of cpu, cuda, cuda:N, auto",
        ),
        (
            {**MINIMAL, "baselines": {"uniform_bits": [16]}},
            "baselines.uniform_bits: 16 is not a value of params.quant_bits (choice [4, 8])",
        ),
        ({**MINIMAL, "per_layer": {"op_types": ["Conv2d"]}}, "per_layer: names no parameter"),
        (
            {**MINIMAL, "per_layer": {"op_types": ["Conv2d"], "lr": 1}},
            "per_layer.lr: unknown key 'lr'",
        ),
        ({**MINIMAL, "hopeless": {"after_epoch": 0}}, "hopeless.after_epoch: 0 is not an integer"),
        ({**MINIMAL, "task": {"data_dir": "x"}}, "task.name: None is not a task name"),
    ],
)
def test_errors_name_file_key_value_and_what_is_allowed(data: object, message: str) -> None:
    error = _error(data)
    assert message in str(error)
    assert str(error).startswith("space.yaml: ")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=r"missing\.yaml: no such file"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: qat\nparams: {quant_bits: [\n")
    with pytest.raises(SpaceError, match=r"bad\.yaml: not valid YAML: line \d+, column \d+"):
        load_space(bad)
    with pytest.raises(SpaceError, match="is a folder"):
        load_space(tmp_path)


@pytest.mark.parametrize("name", ["qat", "mixed", "naive", "dorefa", "bnn", "lsq"])
def test_shipped_spaces_parse(name: str) -> None:
    spec = load_space(REPO / "search_spaces" / f"{name}.yaml")
    assert spec.task.name == "digits"
    assert spec.params or spec.per_layer


def test_every_algorithm_has_a_shipped_space() -> None:
    algorithms = {load_space(p).algorithm for p in (REPO / "search_spaces").glob("*.yaml")}
    assert algorithms == set(QUANTIZERS)
