"""Plots of calibration and uncertainty (extra ``plot``: matplotlib).

Figures are built with matplotlib's object-oriented API on the Agg canvas: no GUI, no
``pyplot`` global state, safe in scripts, tests and servers. Every function returns the
:class:`matplotlib.figure.Figure` and, given ``path``, also writes a PNG there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from torchbayes.metrics import calibration_bins, referral_curve, risk_coverage_curve

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "reliability_diagram",
    "uncertainty_histogram",
    "risk_coverage_plot",
    "referral_plot",
    "coverage_calibration_plot",
    "prediction_interval_plot",
    "error_uncertainty_plot",
    "set_size_plot",
]


def _new_figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("torchbayes.plots needs matplotlib: pip install 'torchbayes[plot]'") from e
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: rendering and savefig without any GUI backend
    return fig


def _finish(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=120)
    return fig


def reliability_diagram(
    probs: Tensor,
    labels: Tensor,
    n_bins: int = 15,
    *,
    adaptive: bool = False,
    title: str = "Reliability diagram",
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Accuracy against confidence per bin, with the ECE in the title.

    Bars show each bin's accuracy, red "gap" boxes the difference to its mean confidence;
    a calibrated model follows the diagonal. A lower panel shows how many examples fall
    in each bin.

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.
        n_bins: number of bins (as in :func:`torchbayes.metrics.calibration_bins`).
        adaptive: equal-mass bins instead of equal-width ones.
        title: start of the title; ``"(ECE = ...)"`` is appended.
        path: if given, a PNG is written there.

    Returns:
        The figure.

    Example:
        >>> reliability_diagram(probs, y, path="reliability.png")
    """
    bins = calibration_bins(probs, labels, n_bins, adaptive=adaptive)
    ece = float(bins.expected_calibration_error)
    edges = bins.edges.detach().cpu().double().numpy()
    widths = edges[1:] - edges[:-1]
    acc = bins.accuracy.detach().cpu().double().numpy()
    conf = bins.confidence.detach().cpu().double().numpy()
    counts = bins.counts.detach().cpu().double().numpy()
    filled = counts > 0
    fig = _new_figure((5.0, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(
        edges[:-1][filled],
        acc[filled],
        width=widths[filled],
        align="edge",
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    top.bar(
        edges[:-1][filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=widths[filled],
        align="edge",
        edgecolor="tab:red",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title} (ECE = {100 * ece:.2f}%)")
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black", color="tab:gray")
    bottom.set(xlabel="confidence", ylabel="count")
    return _finish(fig, path)


def uncertainty_histogram(
    in_scores: Tensor,
    out_scores: Tensor,
    *,
    label: str = "predictive entropy",
    bins: int = 30,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Histograms of an uncertainty score for in- and out-of-distribution inputs.

    Densities share the same bins so the two can be compared; a good OOD detector
    separates them.

    Args:
        in_scores: ``(N,)`` scores of in-distribution inputs (e.g. predictive entropy or
            mutual information).
        out_scores: ``(M,)`` scores of OOD inputs.
        label: name of the score, for the x axis.
        bins: number of histogram bins.
        path: if given, a PNG is written there.

    Returns:
        The figure.

    Example:
        >>> uncertainty_histogram(mutual_information(mc_test), mutual_information(mc_ood), label="mutual information")
    """
    for name, s in (("in_scores", in_scores), ("out_scores", out_scores)):
        if not isinstance(s, Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"uncertainty_histogram: {name} must be a non-empty 1-D tensor")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"uncertainty_histogram: bins must be a positive int, got {bins!r}")
    a = in_scores.detach().cpu().double().numpy()
    b = out_scores.detach().cpu().double().numpy()
    both = torch.cat([in_scores.detach().cpu().double(), out_scores.detach().cpu().double()])
    lo, hi = float(both.min()), float(both.max())
    edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1).tolist()
    fig = _new_figure((5.5, 4.0))
    ax = fig.subplots()
    ax.hist(a, bins=edges, density=True, alpha=0.55, color="tab:blue", label=f"in-distribution (n={a.size})")
    ax.hist(b, bins=edges, density=True, alpha=0.55, color="tab:orange", label=f"out-of-distribution (n={b.size})")
    ax.set(xlabel=label, ylabel="density", title=f"{label}: in- vs out-of-distribution")
    ax.legend()
    return _finish(fig, path)


def risk_coverage_plot(uncertainty: Tensor, correct: Tensor, *, path: str | os.PathLike[str] | None = None) -> Figure:
    """Risk (error rate) against coverage when answering only the most certain inputs.

    The title gives the area under the curve (AURC, lower is better).

    Args:
        uncertainty: ``(N,)`` uncertainty scores.
        correct: ``(N,)`` bools, whether each prediction is right.
        path: if given, a PNG is written there.

    Returns:
        The figure.

    Example:
        >>> risk_coverage_plot(entropy, probs.argmax(1) == y, path="risk_coverage.png")
    """
    coverage_t, risk_t = risk_coverage_curve(uncertainty, correct)
    coverage, risk = coverage_t.cpu().numpy(), risk_t.cpu().numpy()
    fig = _new_figure((5.0, 4.0))
    ax = fig.subplots()
    ax.plot(coverage, risk, color="tab:blue")
    full_risk = float(risk[-1])
    ax.axhline(full_risk, color="gray", linestyle="--", linewidth=1, label=f"full coverage risk = {full_risk:.3f}")
    ax.set(
        xlim=(0, 1),
        ylim=(0, max(1e-3, float(risk.max()) * 1.05)),
        xlabel="coverage",
        ylabel="risk (error rate)",
        title=f"Risk-coverage curve (AURC = {float(risk.mean()):.4f})",
    )
    ax.legend()
    return _finish(fig, path)


#: Referred fractions of :func:`referral_plot` by default: 0%, 1%, ..., 50%.
DEFAULT_REFERRAL_FRACTIONS: tuple[float, ...] = tuple(i / 100 for i in range(51))


def referral_plot(
    curves: Mapping[str, tuple[Tensor, Tensor]],
    fractions: Sequence[float] = DEFAULT_REFERRAL_FRACTIONS,
    *,
    title: str = "Referral curve",
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Accuracy on the kept cases against the fraction referred, for several uncertainty scores.

    Each curve refers the most uncertain cases first (:func:`torchbayes.metrics.referral_curve`);
    a dashed line of the same colour is random referral of the same predictions, whose
    expected accuracy is the accuracy without referral. The higher a curve rises above
    its line, the better the uncertainty tells which cases need a second opinion.

    Args:
        curves: per legend label, ``(uncertainty, correct)``: ``(N,)`` scores and
            ``(N,)`` bools (whether each prediction is right).
        fractions: fractions referred, in ``[0, 1)`` (default 0 to 50% in steps of 1%).
        title: the figure's title.
        path: if given, a PNG is written there.

    Returns:
        The figure.

    Example:
        >>> referral_plot({"Bayesian, entropy": (entropy, correct), "deterministic, 1 - confidence":
        ...                (1 - confidence, det_correct)}, path="referral.png")
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("referral_plot: curves must be a non-empty mapping label -> (uncertainty, correct)")
    x = 100 * torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    fig = _new_figure((5.5, 4.0))
    ax = fig.subplots()
    random_seen: set[tuple[bool, ...]] = set()
    for i, (label, (uncertainty, correct)) in enumerate(curves.items()):
        color = f"C{i}"
        accuracy = referral_curve(uncertainty, correct, fractions).cpu()
        ax.plot(x.numpy(), accuracy.numpy(), color=color, marker="." if len(x) <= 11 else None, label=label)
        key = tuple(correct.cpu().tolist())
        if key not in random_seen:  # one random line per distinct set of predictions
            random_seen.add(key)
            ax.axhline(
                float(correct.double().mean()),
                color=color,
                linestyle="--",
                linewidth=1,
                label=f"random referral ({label.split(',')[0]})",
            )
    ax.set(
        xlim=(float(x.min()), float(x.max())),
        xlabel="cases referred (%)",
        ylabel="accuracy on the kept cases",
        title=title,
    )
    ax.legend(fontsize="small")
    return _finish(fig, path)


def coverage_calibration_plot(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "Calibration of the prediction intervals",
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Observed against expected coverage of central prediction intervals (regression).

    A calibrated model's ``p`` intervals hold a share ``p`` of the targets: its curve
    follows the diagonal; below it the intervals are too narrow (overconfident).

    Args:
        curves: per label, ``(levels, observed)``: nominal levels in (0, 1) and the share of
            targets inside the intervals of each level.
        title: the figure's title.
        path: if given, a PNG is written there.

    Returns:
        The figure.

    Example:
        >>> coverage_calibration_plot({"ensemble": ([0.5, 0.9], [0.47, 0.86])}, path="calibration.png")
    """
    fig = _new_figure((5.0, 5.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for label, (levels, observed) in curves.items():
        ax.plot(list(levels), list(observed), marker="o", markersize=3, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="expected coverage (interval level)", ylabel="observed coverage")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return _finish(fig, path)


def prediction_interval_plot(
    target: Tensor,
    mean: Tensor,
    lower: Tensor,
    upper: Tensor,
    *,
    level: float = 0.9,
    title: str = "Predicted against true",
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Predicted means against true values, with each prediction's central interval.

    Points whose interval misses the diagonal (the true value) are drawn in red.

    Args:
        target: ``(N,)`` true values.
        mean: ``(N,)`` predictive means.
        lower: ``(N,)`` lower interval bounds.
        upper: ``(N,)`` upper interval bounds.
        level: the intervals' probability (for the legend).
        title: the figure's title.
        path: if given, a PNG is written there.

    Returns:
        The figure.
    """
    y, m, lo, hi = (t.detach().cpu().double().flatten().numpy() for t in (target, mean, lower, upper))
    inside = (lo <= y) & (y <= hi)
    fig = _new_figure((5.0, 5.0))
    ax = fig.subplots()
    for mask, color, label in ((inside, "tab:blue", "interval holds the truth"), (~inside, "tab:red", "misses it")):
        if mask.any():
            ax.errorbar(
                y[mask],
                m[mask],
                yerr=[m[mask] - lo[mask], hi[mask] - m[mask]],
                fmt="o",
                markersize=2.5,
                elinewidth=0.6,
                alpha=0.7,
                color=color,
                label=label,
            )
    low, high = float(min(y.min(), lo.min())), float(max(y.max(), hi.max()))
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="true value", ylabel=f"predicted mean and {100 * level:.0f}% interval")
    ax.set_title(f"{title} ({100 * float(inside.mean()):.1f}% covered)")
    ax.legend(loc="upper left", fontsize="small")
    return _finish(fig, path)


def error_uncertainty_plot(
    target: Tensor,
    mean: Tensor,
    std: Tensor,
    *,
    title: str = "Error against predicted uncertainty",
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Absolute error against the predicted standard deviation, one point per example.

    A model whose uncertainty means something makes larger errors where it predicts a
    larger spread; the dashed line ``|error| = 1.645 std`` bounds 90% of the errors of a
    calibrated Gaussian prediction.

    Args:
        target: ``(N,)`` true values.
        mean: ``(N,)`` predictive means.
        std: ``(N,)`` predictive standard deviations.
        title: the figure's title.
        path: if given, a PNG is written there.

    Returns:
        The figure.
    """
    y, m, s = (t.detach().cpu().double().flatten().numpy() for t in (target, mean, std))
    error = abs(y - m)
    fig = _new_figure((5.0, 5.0))
    ax = fig.subplots()
    ax.scatter(s, error, s=6, alpha=0.6, color="tab:blue")
    top = float(s.max()) if len(s) else 1.0
    ax.plot([0, top], [0, 1.645 * top], color="grey", linestyle="--", linewidth=1, label="90% of a calibrated Gaussian")
    ax.set(xlabel="predicted standard deviation", ylabel="absolute error", xlim=(0, None), ylim=(0, None))
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return _finish(fig, path)


def set_size_plot(
    curves: Mapping[str, Sequence[float]],
    *,
    quantity: str = "mean set size",
    uncertainty: str = "predictive entropy",
    title: str = "Conformal set size against uncertainty",
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Mean conformal set size (or interval width) per equal-mass bin of predicted uncertainty.

    A model whose uncertainty means something gives small sets where it is sure and
    large ones where it is not: its curve rises from left to right. The bins are each
    model's own quantiles (``torchbayes.metrics.size_by_uncertainty``), so models with
    different uncertainty scales share one axis.

    Args:
        curves: per legend label, the mean size in each bin, lowest uncertainty first.
        quantity: the y axis label.
        uncertainty: what the bins are of (the x axis label).
        title: the figure's title.
        path: if given, a PNG is written there.

    Returns:
        The figure.

    Example:
        >>> set_size_plot({"Bayesian, APS": strata.size.tolist()}, path="conformal-size.png")
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("set_size_plot: curves must be a non-empty mapping label -> sizes per bin")
    fig = _new_figure((5.5, 4.0))
    ax = fig.subplots()
    for i, (label, sizes) in enumerate(curves.items()):
        values = [float("nan") if v is None else float(v) for v in sizes]
        ax.plot(range(1, len(values) + 1), values, color=f"C{i}", marker="o", label=label)
    bins = max(len(v) for v in curves.values())
    ax.set(
        xticks=list(range(1, bins + 1)),
        xlabel=f"{uncertainty}: equal-mass bin (1 = most certain)",
        ylabel=quantity,
        title=title,
    )
    ax.legend(fontsize="small")
    return _finish(fig, path)
