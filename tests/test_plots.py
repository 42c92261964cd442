"""Plots: figures built without a GUI, titles carrying the metrics, PNGs written on request."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from torchbayes import metrics, plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def predictions():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(400, 5, generator=g) * 3, 1)
    labels = torch.randint(0, 5, (400,), generator=g)
    return probs, labels


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000


@pytest.mark.parametrize("adaptive", [False, True])
def test_reliability_diagram_shows_the_ece(predictions, tmp_path, adaptive):
    probs, labels = predictions
    path = tmp_path / "reliability.png"
    fig = plots.reliability_diagram(probs, labels, n_bins=10, adaptive=adaptive, path=path)
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    title = fig.axes[0].get_title()
    shown = float(re.search(r"ECE = ([0-9.]+)%", title).group(1))
    expected = 100 * float(metrics.expected_calibration_error(probs, labels, 10, adaptive=adaptive))
    assert shown == pytest.approx(expected, abs=0.005)
    # One accuracy bar per non-empty bin.
    counts = metrics.calibration_bins(probs, labels, 10, adaptive=adaptive).counts
    accuracy_bars = fig.axes[0].containers[0]
    assert len(accuracy_bars) == int((counts > 0).sum())
    _assert_png(path)


def test_uncertainty_histogram(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "hist.png"
    fig = plots.uncertainty_histogram(torch.rand(300, generator=g), torch.rand(100, generator=g) + 0.5,
                                      label="mutual information", bins=20, path=path)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "mutual information"
    assert [len(c) for c in ax.containers] == [20, 20]
    _assert_png(path)
    # Constant scores still give a figure.
    plots.uncertainty_histogram(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="out_scores"):
        plots.uncertainty_histogram(torch.rand(5), torch.rand(0))


def test_risk_coverage_plot(predictions, tmp_path):
    probs, labels = predictions
    conf, pred = probs.max(1)
    path = tmp_path / "rc.png"
    fig = plots.risk_coverage_plot(1 - conf, pred == labels, path=path)
    title = fig.axes[0].get_title()
    shown = float(re.search(r"AURC = ([0-9.]+)", title).group(1))
    assert shown == pytest.approx(float(metrics.area_under_risk_coverage(1 - conf, pred == labels)), abs=5e-5)
    _assert_png(path)


def test_no_file_without_a_path(predictions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plots.reliability_diagram(*predictions)
    assert list(tmp_path.iterdir()) == []
