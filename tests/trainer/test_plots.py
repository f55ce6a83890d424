"""Loss plots: every training run writes output_dir/loss.png from its metrics.jsonl, and a plot
that cannot be drawn is a warning, never a failed run."""
from __future__ import annotations

import json
import logging

import pytest

from kubetune.trainer.training.plots import LOSS_PLOT, bar_plot, loss_series, write_loss_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def png_size(path):
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def test_loss_series_keeps_step_order_and_the_last_value_of_a_step():
    records = [{"step": 20, "loss": 2.0}, {"step": 10, "loss": 3.0}, {"step": 20, "loss": 1.5},
               {"step": 20, "eval_loss": 1.8}, {"loss": 9.0}, {"step": 30, "loss": None}]
    assert loss_series(records, "loss") == ([10, 20], [3.0, 1.5])
    assert loss_series(records, "eval_loss") == ([20], [1.8])


def test_write_loss_plot_draws_train_and_eval_loss(tmp_path):
    write_metrics(tmp_path, [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 21)] + [{"step": 20, "eval_loss": 0.4}])
    path = write_loss_plot(tmp_path)
    assert path == tmp_path / LOSS_PLOT
    assert path.read_bytes()[:8] == PNG_MAGIC
    fmt, (width, height) = png_size(path)
    assert fmt == "PNG" and width > 200 and height > 200
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no leftovers


@pytest.mark.parametrize("case", ["missing", "garbage", "no-loss"])
def test_a_plot_that_cannot_be_drawn_is_a_warning(tmp_path, caplog, case):
    if case == "garbage":
        (tmp_path / "metrics.jsonl").write_text("{not json\n")
    elif case == "no-loss":
        write_metrics(tmp_path, [{"step": 1, "lr": 0.1}])
    with caplog.at_level(logging.WARNING, logger="kubetune.plots"):
        assert write_loss_plot(tmp_path) is None
    assert "no loss plot" in caplog.text
    assert not (tmp_path / LOSS_PLOT).exists()


def test_a_plotting_library_error_is_a_warning(tmp_path, caplog, monkeypatch):
    import matplotlib.figure

    write_metrics(tmp_path, [{"step": 1, "loss": 1.0}])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with caplog.at_level(logging.WARNING, logger="kubetune.plots"):
        assert write_loss_plot(tmp_path) is None
    assert "RuntimeError: disk full" in caplog.text and not (tmp_path / LOSS_PLOT).exists()


def test_bar_plot_writes_a_png(tmp_path):
    path = bar_plot({"base": 0.0, "pretrain": 0.02, "instruct": 0.5, "align": 0.9}, tmp_path / "acc.png", "accuracy", "acc")
    assert png_size(path)[0] == "PNG"
