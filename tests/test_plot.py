"""training_loss.png: what is drawn is visible, also when only one row was logged."""

from __future__ import annotations

import pytest

from llmneo import plot

ONE_ROW = [{"step": 1, "loss": 2.0, "ce_loss": 2.5, "kd_loss": 1.5}]


def _distance_to_colour_near(fig, ax, x: float, y: float, rgb: list[int]) -> int:
    """How far the closest pixel within 2 px of data point (x, y) is from `rgb`, as the Agg canvas drew it."""
    import numpy as np

    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)
    px, py = ax.transData.transform((x, y))
    row, col = int(round(pixels.shape[0] - py)), int(round(px))
    window = pixels[row - 2:row + 3, col - 2:col + 3]
    return int(np.abs(window - np.array(rgb)).max(axis=-1).min())


@pytest.mark.parametrize("rows", [ONE_ROW, ONE_ROW + [{"step": 2, "loss": 1.0, "ce_loss": 1.2, "kd_loss": 0.8}]])
def test_every_logged_point_is_drawn(rows):
    """The pixel at each logged (step, loss) has its line's colour: a one-row log shows a marker."""
    pytest.importorskip("matplotlib")
    import matplotlib.colors as colors

    plt = plot._pyplot()
    fig = plot.loss_figure(plt, rows, "t")
    ax = fig.axes[0]
    try:
        for line in ax.get_lines():
            want = [round(255 * c) for c in colors.to_rgb(line.get_color())]
            key = line.get_label()
            for row in rows:
                assert _distance_to_colour_near(fig, ax, row["step"], row[key], want) <= 20, (key, row["step"])
    finally:
        plt.close(fig)


def test_one_row_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot.training_loss(ONE_ROW, tmp_path / "training_loss.png")
    assert (tmp_path / "training_loss.png").stat().st_size > 1000
