from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna._hypervolume import compute_hypervolume

from quantsearch.report import (
    bits_heatmap_figure,
    format_size,
    history_figure,
    hypervolume_2d,
    hypervolume_history,
    pareto_figure,
    pareto_frame,
    trials_frame,
)

from ._studies import FLOAT_SIZE, LAYERS


def _collection(ax, label: str):
    matches = [c for c in ax.collections if c.get_label() == label]
    assert len(matches) == 1, [c.get_label() for c in ax.collections]
    return matches[0]


def _line(ax, label: str):
    matches = [line for line in ax.lines if line.get_label() == label]
    assert len(matches) == 1, [line.get_label() for line in ax.lines]
    return matches[0]


def _sorted_points(points) -> list[tuple[float, float]]:
    return sorted((float(x), float(y)) for x, y in np.asarray(points))


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(512, "512 B"), (1_000, "1 KB"), (12_345, "12.3 KB"), (1_500_000, "1.5 MB"), (2e9, "2 GB")],
)
def test_format_size(num_bytes: float, text: str) -> None:
    assert format_size(num_bytes) == text


def test_pareto_figure_plots_every_trial_where_the_frame_says(make_study) -> None:
    frame = trials_frame(make_study())
    ax = pareto_figure(frame).axes[0]
    complete = frame[frame["state"] == "COMPLETE"]
    searched = complete[complete["baseline"].isna()]

    feasible = searched[searched["feasible"]]
    assert _sorted_points(_collection(ax, "trials").get_offsets()) == sorted(
        zip(feasible["size_bytes"], feasible["accuracy"], strict=True)
    )
    infeasible = searched[~searched["feasible"]]
    hollow = _collection(ax, f"infeasible ({len(infeasible)})")
    assert _sorted_points(hollow.get_offsets()) == sorted(
        zip(infeasible["size_bytes"], infeasible["accuracy"], strict=True)
    )
    assert hollow.get_facecolors().size == 0  # hollow markers

    front = pareto_frame(frame)
    line = _line(ax, "Pareto front")
    assert line.get_drawstyle() == "steps-post"
    np.testing.assert_array_equal(line.get_xdata(), front["size_bytes"])
    np.testing.assert_array_equal(line.get_ydata(), front["accuracy"])

    # Failed trials: both counted, the one with a known size drawn on the bottom edge.
    failed = _collection(ax, "failed (2)")
    np.testing.assert_array_equal(np.asarray(failed.get_offsets())[:, 0], [9_000])


def test_pareto_figure_labels_the_baselines(make_study) -> None:
    frame = trials_frame(make_study())
    ax = pareto_figure(frame).axes[0]
    by_gid = {c.get_gid(): c for c in ax.collections if c.get_gid()}
    assert set(by_gid) == {"baseline:float", "baseline:uniform-8", "baseline:uniform-4"}
    for label, collection in by_gid.items():
        row = frame[frame["baseline"] == label.split(":", 1)[1]].iloc[0]
        assert _sorted_points(collection.get_offsets()) == [(row.size_bytes, row.accuracy)]
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("float\n97.2%") for t in texts)
    assert any(t.startswith("uniform-8\n") for t in texts)
    assert any(t.startswith("uniform-4\n") for t in texts)
    float_line = _line(ax, "float accuracy")
    assert float_line.get_ydata()[0] == pytest.approx(0.9722)


def test_pareto_figure_size_axis_is_log_with_byte_units(make_study) -> None:
    fig = pareto_figure(trials_frame(make_study()))
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "10 KB" in labels
    assert "100 KB" in labels
    assert all(label.endswith(("B", "KB", "MB")) for label in labels)


def test_bits_heatmap_holds_the_fronts_bits(make_study) -> None:
    frame = trials_frame(make_study())
    front = pareto_frame(frame)
    fig = bits_heatmap_figure(frame, layers=LAYERS)
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == [f"{layer} ({t})" for layer in LAYERS for t in ("weight", "output")]
    assert image.shape == (len(rows), len(front))
    for i, layer in enumerate(LAYERS):
        expected = front[f"bits.{layer}.weight"].to_numpy()
        got = image[2 * i]
        np.testing.assert_array_equal(np.ma.getmaskarray(got), np.isnan(expected))
        np.testing.assert_array_equal(got.compressed(), expected[~np.isnan(expected)])
    columns = [t.get_text() for t in ax.get_xticklabels()]
    assert [c.split("\n")[0] for c in columns] == [f"#{n}" for n in front["number"]]


def test_bits_heatmap_adds_a_float_row_for_layers_never_quantized(make_study) -> None:
    frame = trials_frame(make_study())
    ax = bits_heatmap_figure(frame, layers=["stem", *LAYERS]).axes[0]
    assert ax.get_yticklabels()[0].get_text() == "stem (weight)"
    assert np.ma.getmaskarray(ax.images[0].get_array()[0]).all()


def test_bits_heatmap_without_bits_says_so() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1000.0]))
    ax = bits_heatmap_figure(trials_frame(study)).axes[0]
    assert not ax.images
    assert ax.texts[0].get_text() == "no per-layer bit widths were recorded"


def test_hypervolume_2d_known_areas() -> None:
    assert hypervolume_2d([], []) == 0.0
    assert hypervolume_2d([0.9], [0.25]) == pytest.approx(0.75 * 0.9)
    assert hypervolume_2d([0.9, 0.95], [0.25, 0.5]) == pytest.approx(0.25 * 0.9 + 0.5 * 0.95)
    # A dominated point and a point no smaller than the float model add nothing.
    assert hypervolume_2d([0.9, 0.8, 0.99], [0.25, 0.3, 1.0]) == pytest.approx(0.75 * 0.9)


def test_hypervolume_2d_agrees_with_optuna() -> None:
    rng = np.random.default_rng(3)
    accuracy = rng.uniform(0.1, 1.0, 40)
    ratio = rng.uniform(0.01, 0.99, 40)
    losses = np.stack([-accuracy, ratio], axis=1)
    expected = compute_hypervolume(losses, np.array([0.0, 1.0]))
    assert hypervolume_2d(accuracy, ratio) == pytest.approx(expected)


def test_history_ends_at_the_studys_front(make_study) -> None:
    study = make_study()
    frame = trials_frame(study)
    history = hypervolume_history(frame, float_size_bytes=FLOAT_SIZE)
    assert history["number"].tolist() == frame["number"].tolist()
    assert (np.diff(history["hypervolume"]) >= -1e-12).all()
    assert history["front_size"].iloc[-1] == len(study.best_trials)
    # Brute force: after each trial, count the feasible points no other point dominates.
    points: list[tuple[float, float]] = []
    for row, front_size in zip(frame.itertuples(), history["front_size"], strict=True):
        if row.state == "COMPLETE" and row.feasible:
            points.append((row.accuracy, row.size_bytes))
        nondominated = [
            p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)
        ]
        assert front_size == len(nondominated)
    front = pareto_frame(frame)
    assert history["hypervolume"].iloc[-1] == pytest.approx(
        hypervolume_2d(front["accuracy"], front["size_bytes"] / FLOAT_SIZE)
    )

    fig = history_figure(frame, float_size_bytes=FLOAT_SIZE)
    hv_line = _line(fig.axes[0], "hypervolume")
    np.testing.assert_allclose(hv_line.get_ydata(), history["hypervolume"])
    front_line = _line(fig.axes[1], "front size")
    np.testing.assert_array_equal(front_line.get_ydata(), history["front_size"])


def test_figures_do_not_touch_pyplot_state(make_study) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    frame = trials_frame(make_study())
    pareto_figure(frame)
    bits_heatmap_figure(frame)
    history_figure(frame)
    assert plt.get_fignums() == before
