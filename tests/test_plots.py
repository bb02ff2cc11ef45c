"""common.plots: the training-curves figure has its panels and draws the logged values."""

import json

import pytest
from PIL import Image

from common.plots import PANELS, curves_figure, read_metrics, save_training_curves, smoothed


def records(n: int = 12) -> list[dict]:
    """metrics.jsonl records of n steps, with distinct values per key."""
    return [
        {"step": s, "loss": 1.0 + (-1) ** s * 0.1, "lr": 1e-4 * s, "padding_ratio": 0.02 * s,
         "tokens_per_second": 100.0 + s, "grad_norm": 0.5, "epoch": 0}
        for s in range(1, n + 1)
    ]  # fmt: skip


def test_smoothed_loss_is_a_debiased_moving_average():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    values = smoothed([1.0, 0.0], weight=0.5)
    assert values == pytest.approx([1.0, (0.5 * 0.5) / (1 - 0.25)])


def test_figure_has_one_panel_per_curve_with_the_logged_values():
    logged = records()
    figure = curves_figure(logged)
    axes = figure.axes
    assert [axis.get_title(loc="left") for axis in axes] == [title for title, _ in PANELS]
    loss, smooth = axes[0].get_lines()
    assert list(loss.get_ydata()) == [r["loss"] for r in logged]
    assert list(smooth.get_ydata()) == pytest.approx(smoothed([r["loss"] for r in logged]))
    for axis, key in zip(axes[1:], ("lr", "padding_ratio", "tokens_per_second"), strict=True):
        (line,) = axis.get_lines()
        assert list(line.get_xdata()) == list(range(1, 13))
        assert list(line.get_ydata()) == [r[key] for r in logged]


def test_save_writes_a_png_and_skips_an_empty_log(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert save_training_curves(metrics, tmp_path / "a.png") is None  # no log yet
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records()))
    assert read_metrics(metrics) == records()
    out = save_training_curves(metrics, tmp_path / "curves.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 900)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temporary file left


@pytest.mark.parametrize("peak", [1e-4, 3e-6])
def test_tick_labels_of_every_panel_stay_inside_the_figure(peak):
    """Learning rates such as 1e-4 with warm-up drew labels like '−0.000025' past the left edge of the PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    logged = [
        {"step": s, "loss": 0.5 + 0.01 * (s % 7), "lr": peak * min(1.0, s / 100), "padding_ratio": 0.1 + 1e-4 * s,
         "tokens_per_second": 12345.0 + 100.0 * s}
        for s in range(1, 1001)
    ]  # fmt: skip
    figure = curves_figure(logged)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    for axis in figure.axes:
        labels = [label for label in axis.get_yticklabels() if label.get_text()]
        assert labels, axis.get_title(loc="left")
        for label in labels:
            box = label.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= figure.bbox.width, (axis.get_title(loc="left"), label.get_text())
    lr_axis = figure.axes[[title for title, _ in PANELS].index("learning rate")]
    assert lr_axis.get_ylim()[0] == 0  # a learning rate is never negative
