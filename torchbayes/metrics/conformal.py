"""Measures of prediction sets: coverage, size, and coverage and size by uncertainty.

What `torchbayes.conformal` reports, usable on any sets: empirical coverage (the
fraction of labels inside) and mean set size; and, for sets or intervals, the two in
equal-mass bins of a predicted uncertainty (is coverage held where the model is unsure,
and do the sets grow there?). Interval coverage and width are
`torchbayes.metrics.interval_coverage` and `torchbayes.metrics.interval_width`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["UncertaintyStrata", "set_coverage", "set_size", "size_by_uncertainty"]


def _check_sets(sets: Tensor, caller: str) -> None:
    if not isinstance(sets, Tensor) or sets.dtype != torch.bool or sets.dim() != 2 or sets.shape[0] == 0:
        raise ValueError(f"{caller}: sets must be a non-empty (N, C) bool tensor")


def set_coverage(sets: Tensor, labels: Tensor) -> Tensor:
    """Fraction of examples whose label is in their prediction set.

    Args:
        sets: ``(N, C)`` bools.
        labels: ``(N,)`` class indices.

    Returns:
        0-D float64 tensor in ``[0, 1]``.

    Example:
        >>> set_coverage(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]))
        tensor(0.5000, dtype=torch.float64)
    """
    _check_sets(sets, "set_coverage")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != (sets.shape[0],):
        raise ValueError(f"set_coverage: labels must be ({sets.shape[0]},) class indices")
    if labels.min() < 0 or labels.max() >= sets.shape[1]:
        raise ValueError(f"set_coverage: labels must be in [0, {sets.shape[1] - 1}]")
    return sets.gather(1, labels.unsqueeze(1)).double().mean()


def set_size(sets: Tensor) -> Tensor:
    """Mean number of classes per prediction set.

    Args:
        sets: ``(N, C)`` bools.

    Returns:
        0-D float64 tensor.

    Example:
        >>> set_size(torch.tensor([[True, False], [True, True]]))
        tensor(1.5000, dtype=torch.float64)
    """
    _check_sets(sets, "set_size")
    return sets.sum(1).double().mean()


@dataclass
class UncertaintyStrata:
    """Coverage and size in equal-mass bins of a predicted uncertainty (lowest first).

    Attributes:
        edges: ``(num_bins + 1,)`` uncertainty at the bins' boundaries (first the minimum,
            last the maximum).
        counts: ``(num_bins,)`` examples per bin.
        coverage: ``(num_bins,)`` fraction covered per bin (NaN where empty).
        size: ``(num_bins,)`` mean set size or interval width per bin (NaN where empty).
    """

    edges: Tensor
    counts: Tensor
    coverage: Tensor
    size: Tensor

    def as_dict(self) -> dict[str, list[float]]:
        """Plain lists for JSON (NaN as ``None``)."""

        def plain(t: Tensor) -> list[float]:
            return [None if v != v else float(v) for v in t.tolist()]  # type: ignore[misc]

        return {
            "edges": plain(self.edges),
            "counts": plain(self.counts),
            "coverage": plain(self.coverage),
            "size": plain(self.size),
        }


def size_by_uncertainty(sizes: Tensor, covered: Tensor, uncertainty: Tensor, num_bins: int = 5) -> UncertaintyStrata:
    """Coverage and size in ``num_bins`` equal-mass bins of ``uncertainty``.

    Examples are sorted by uncertainty (stable) and cut into bins of ``N / num_bins``
    (+-1) in that order, so ties may straddle two bins.

    Args:
        sizes: ``(N,)`` set sizes or interval widths.
        covered: ``(N,)`` bools, whether each label is inside.
        uncertainty: ``(N,)`` the predicted uncertainty (e.g. predictive entropy or std).
        num_bins: number of bins, ``>= 1``.

    Returns:
        An `UncertaintyStrata`.

    Example:
        >>> size_by_uncertainty(sets.sum(1), covered, prediction.predictive_entropy, 5).size
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"size_by_uncertainty: num_bins must be a positive int, got {num_bins!r}")
    n = sizes.shape[0] if isinstance(sizes, Tensor) and sizes.dim() == 1 else -1
    if n <= 0 or covered.shape != (n,) or covered.dtype != torch.bool:
        raise ValueError("size_by_uncertainty: sizes (N,) with N > 0 and covered (N,) bools are needed")
    if not isinstance(uncertainty, Tensor) or uncertainty.shape != (n,) or torch.isnan(uncertainty).any():
        raise ValueError(f"size_by_uncertainty: uncertainty must be a ({n},) tensor without NaN")
    device = sizes.device
    uncertainty = uncertainty.to(device, torch.float64)
    values, order = uncertainty.sort(stable=True)
    bin_index = torch.arange(n, device=device) * num_bins // n
    counts = torch.zeros(num_bins, dtype=torch.float64, device=device).index_add_(
        0, bin_index, torch.ones(n, dtype=torch.float64, device=device)
    )
    hit = torch.zeros_like(counts).index_add_(0, bin_index, covered.to(device)[order].double())
    total = torch.zeros_like(counts).index_add_(0, bin_index, sizes.double()[order])
    starts = (torch.arange(1, num_bins, device=device) * n + num_bins - 1) // num_bins
    inner = values[starts.clamp_max(n - 1)]
    edges = torch.cat([values[:1], inner, values[-1:]])
    nan = torch.full_like(counts, float("nan"))
    return UncertaintyStrata(
        edges,
        counts,
        torch.where(counts > 0, hit / counts.clamp_min(1), nan),
        torch.where(counts > 0, total / counts.clamp_min(1), nan),
    )
