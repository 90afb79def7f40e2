"""Every bundled search space is valid; NNI's example workloads run on tiny files."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest

from quantsearch.cli import main
from tests.tasks.conftest import cifar_batch, write_mnist_files

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
NEEDS_DATA = {"bnn_cifar10.yaml", "latency.yaml", "latency_cnn.yaml", "qat_mnist.yaml",
              "qat_mnist_finetune.yaml",
              # MNIST files, and the MiniLM package (not in .[test]): their slow tests run them.
              "mnist_segmentation.yaml", "minilm_embeddings.yaml"}


@pytest.mark.parametrize(
    "space", sorted(p.name for p in SPACES.glob("*.yaml") if p.name not in NEEDS_DATA)
)
def test_bundled_digits_spaces_validate(space: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--space", str(SPACES / space)]) == 0
    assert f"{space}: valid" in capsys.readouterr().out


def _repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *spaces: str) -> Path:
    """A copy of the repository's layout (search_spaces/ with ``spaces``) under ``tmp_path``,
    run from another folder: the spaces' ../data and ../studies are the copy's."""
    root = tmp_path / "repo"
    (root / "search_spaces").mkdir(parents=True)
    for space in spaces:
        shutil.copy(SPACES / space, root / "search_spaces" / space)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return root


def _write_cifar(directory: Path) -> None:
    directory.mkdir(parents=True)
    names = [f"data_batch_{n}" for n in range(1, 6)] + ["test_batch"]
    for offset, name in enumerate(names):
        with (directory / name).open("wb") as handle:
            pickle.dump(cifar_batch((np.arange(8) + offset) % 10), handle, protocol=2)


def test_bnn_cifar10_space_validates_on_cifar_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _repository(tmp_path, monkeypatch, "bnn_cifar10.yaml")
    space = str(root / "search_spaces" / "bnn_cifar10.yaml")
    assert main(["validate", "--space", space]) == 2
    # data_dir: ../data/cifar10, from the space's folder (the message names the resolved path)
    assert f"data directory {root / 'data' / 'cifar10'} does not exist" in capsys.readouterr().err
    _write_cifar(root / "data" / "cifar10")
    assert main(["validate", "--space", space]) == 0
    out = capsys.readouterr().out
    assert "classifier.0, classifier.3" in out and "baselines  float, uniform-1" in out
    assert f"storage sqlite:///{root / 'studies' / 'bnn_cifar10.db'})" in out
    assert not (root / "studies").exists()  # validate writes nothing


@pytest.mark.slow
def test_bnn_cifar10_uniform_baseline_is_the_nni_example_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _repository(tmp_path, monkeypatch, "bnn_cifar10.yaml")
    _write_cifar(root / "data" / "cifar10")
    args = ["study", "--space", str(root / "search_spaces" / "bnn_cifar10.yaml"), "--n-trials",
            "2", "--quiet", "--no-report"]
    assert main(args) == 0
    storage = f"sqlite:///{root / 'studies' / 'bnn_cifar10.db'}"
    study = optuna.load_study(study_name="bnn-cifar10", storage=storage)
    example_trial = next(t for t in study.trials if t.user_attrs.get("baseline") == "uniform-1")
    config_list = example_trial.user_attrs["config_list"]
    names = {
        role: sorted(n for e in config_list if e["quant_types"] == [role] for n in e["op_names"])
        for role in ("weight", "output")
    }
    weights, outputs = names["weight"], names["output"]
    assert weights == sorted(["features.0", "features.3", "features.7", "features.10",
                              "features.14", "features.17", "classifier.0", "classifier.3"])
    assert outputs == sorted(["features.6", "features.9", "features.13", "features.16",
                              "features.20", "classifier.2", "classifier.5"])


@pytest.mark.parametrize(
    ("space", "per_layer"),
    [("latency.yaml", "input_bits: choice [8, 'float'] on fc1, fc2, fc3, fc4"),
     ("latency_cnn.yaml", "weight_bits: choice [8, 4, 'float'] on conv1, conv2, conv3, conv4, fc")],
)
def test_latency_spaces_validate_on_idx_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    space: str, per_layer: str,
) -> None:
    root = _repository(tmp_path, monkeypatch, space)
    (root / "examples").mkdir()  # its task: the built-in MNIST data, its own network
    shutil.copy(SPACES.parent / "examples" / "latency_task.py", root / "examples")
    write_mnist_files(root / "data" / "mnist")
    assert main(["validate", "--space", str(root / "search_spaces" / space)]) == 0
    out = capsys.readouterr().out
    assert "objectives accuracy (maximize), size_bytes (minimize), latency (minimize)" in out
    assert f"per layer  {per_layer}" in out


def test_qat_mnist_space_validates_on_idx_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _repository(tmp_path, monkeypatch, "qat_mnist.yaml")
    write_mnist_files(root / "data" / "mnist")
    assert main(["validate", "--space", str(root / "search_spaces" / "qat_mnist.yaml")]) == 0
    assert "layers     conv1, conv2, fc1, fc2" in capsys.readouterr().out


def test_qat_mnist_finetune_space_runs_from_a_data_dir_given_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _repository(tmp_path, monkeypatch, "qat_mnist_finetune.yaml")
    write_mnist_files(tmp_path / "cwd" / "elsewhere")  # --data-dir: relative to the working folder
    space = str(root / "search_spaces" / "qat_mnist_finetune.yaml")
    assert main(["validate", "--space", space]) == 2
    assert f"data directory {root / 'data' / 'mnist'} does not exist" in capsys.readouterr().err
    assert main(["validate", "--space", space, "--data-dir", "elsewhere"]) == 0
    args = ["study", "--space", space, "--data-dir", "elsewhere", "--n-trials", "3", "--quiet",
            "--no-report", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "float model: training 3 epochs (once per study) ..." in out
    storage = f"sqlite:///{root / 'studies' / 'qat_mnist_finetune.db'}"
    study = optuna.load_study(study_name="qat-mnist-finetune", storage=storage)
    modes = [(t.user_attrs["mode"], t.user_attrs["steps"]) for t in study.trials]
    assert modes == [("float", 0), ("finetune", 150), ("finetune", 150)]
