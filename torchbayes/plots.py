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

__all__ = ["reliability_diagram", "uncertainty_histogram", "risk_coverage_plot", "referral_plot"]


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
