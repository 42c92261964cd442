"""Regression metrics: accuracy, proper scoring rules, intervals and calibration.

Point predictions and targets are tensors of one shape ``(N, ...)`` (e.g. ``(N, D)``);
predictive distributions are given by their Gaussian components ``(S, N, ...)`` (a
mixture of ``S`` equally weighted Gaussians; ``S = 1`` for a single Gaussian), as
`torchbayes.prediction.RegressionPrediction.components` returns them. The formulas live
in `torchbayes.prediction.gaussian_mixture` (one implementation for predictions and
metrics). Metrics return a 0-D tensor (``reduction="mean"``) or one value per example.

- `rmse`;
- `gaussian_log_likelihood`, `mixture_log_likelihood`: the average test
  log-likelihood of the UCI tables (in nats; in the target's units);
- `interval_coverage`, `interval_width`: of central prediction intervals;
- `regression_calibration_curve`, `regression_calibration_error`: quantile
  calibration from the probability integral transform (PIT) ``F(y)`` of each target
  (Kuleshov et al. 2018: a calibrated model has ``P(F(Y) <= p) = p`` for every ``p``);
- `crps_gaussian`, `crps_mixture`, `crps_samples`: the continuous
  ranked probability score (lower is better; in the target's units).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchbayes.prediction.gaussian_mixture import mixture_crps, mixture_log_prob, sample_crps

__all__ = [
    "rmse",
    "gaussian_log_likelihood",
    "mixture_log_likelihood",
    "interval_coverage",
    "interval_width",
    "regression_calibration_curve",
    "regression_calibration_error",
    "crps_gaussian",
    "crps_mixture",
    "crps_samples",
]

REDUCTIONS = ("mean", "none")


def _pair(a: Tensor, b: Tensor, names: tuple[str, str], caller: str) -> None:
    for name, value in zip(names, (a, b)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{caller}: {name} must be a floating-point tensor")
    if a.shape != b.shape:
        raise ValueError(f"{caller}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} differ in shape")
    if a.numel() == 0:
        raise ValueError(f"{caller}: got no examples")


def _reduce(values: Tensor, reduction: str, caller: str) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{caller}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return values.mean() if reduction == "mean" else values


def rmse(mean: Tensor, target: Tensor) -> Tensor:
    """Root mean squared error ``sqrt(mean((mean - target)^2))`` over all elements.

    Example:
        >>> rmse(result.mean, y_test) * data.y_std   # in the target's original units
    """
    _pair(mean, target, ("mean", "target"), "rmse")
    return (mean - target).square().mean().sqrt()


def _components(means: Tensor, variances: Tensor, target: Tensor, caller: str) -> None:
    if not isinstance(means, Tensor) or not isinstance(variances, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{caller}: means, variances and target must be tensors")
    if means.dim() < 2 or means.shape[1:] != target.shape:
        raise ValueError(
            f"{caller}: means must have shape (S, *target.shape) = (S, {', '.join(map(str, target.shape))}), "
            f"got {tuple(means.shape)}"
        )
    if target.numel() == 0:
        raise ValueError(f"{caller}: got no examples")
    if bool((variances <= 0).any()):
        raise ValueError(f"{caller}: variances must be positive")


def gaussian_log_likelihood(mean: Tensor, variance: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """``log N(target; mean, variance)`` per example (summed over trailing outputs), averaged by default.

    Args:
        mean: ``(N, ...)`` predictive means.
        variance: ``(N, ...)`` predictive variances (> 0).
        target: ``(N, ...)``.
        reduction: ``"mean"`` (a 0-D tensor) or ``"none"`` (``(N,)``).
    """
    _pair(mean, target, ("mean", "target"), "gaussian_log_likelihood")
    return mixture_log_likelihood(mean.unsqueeze(0), variance.unsqueeze(0), target, reduction=reduction)


def mixture_log_likelihood(means: Tensor, variances: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """``log 1/S sum_s N(target; means[s], variances[s])`` per example, averaged by default.

    The test log-likelihood of the published UCI tables (MC dropout, ensembles, DVI),
    computed by log-sum-exp over the ``S`` components.

    Args:
        means: ``(S, N, ...)`` component means.
        variances: ``(S, N, ...)`` component variances (> 0).
        target: ``(N, ...)``.
        reduction: ``"mean"`` or ``"none"`` (``(N,)``).
    """
    _components(means, variances, target, "mixture_log_likelihood")
    if target.dim() == 1:  # (N,): one output per example
        means, variances, target = means.unsqueeze(-1), variances.unsqueeze(-1), target.unsqueeze(-1)
    return _reduce(mixture_log_prob(means, variances, target), reduction, "mixture_log_likelihood")


def _interval(lower: Tensor, upper: Tensor, caller: str) -> None:
    _pair(lower, upper, ("lower", "upper"), caller)
    if bool((lower > upper).any()):
        raise ValueError(f"{caller}: lower must not exceed upper")


def interval_coverage(lower: Tensor, upper: Tensor, target: Tensor) -> Tensor:
    """The fraction of targets inside their interval ``[lower, upper]``.

    Example:
        >>> interval_coverage(*result.interval(0.9), y_test)   # ~0.9 when calibrated
    """
    _interval(lower, upper, "interval_coverage")
    _pair(lower, target, ("lower", "target"), "interval_coverage")
    return ((target >= lower) & (target <= upper)).to(lower.dtype).mean()


def interval_width(lower: Tensor, upper: Tensor) -> Tensor:
    """The mean width ``upper - lower`` of the intervals (in the target's units)."""
    _interval(lower, upper, "interval_width")
    return (upper - lower).mean()


def _levels(num_levels: int) -> Tensor:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
    return torch.arange(1, num_levels + 1, dtype=torch.float64) / (num_levels + 1)


def _check_pit(pit: Tensor, caller: str) -> Tensor:
    if not isinstance(pit, Tensor) or not pit.is_floating_point() or pit.numel() == 0:
        raise ValueError(f"{caller}: pit must be a non-empty floating-point tensor of F(y) values")
    if bool(((pit < 0) | (pit > 1) | pit.isnan()).any()):
        raise ValueError(f"{caller}: pit values must lie in [0, 1]")
    return pit.detach().flatten().to(torch.float64)


def regression_calibration_curve(pit: Tensor, num_levels: int = 19) -> tuple[Tensor, Tensor]:
    """Expected against observed frequency of ``F(y) <= p`` at ``num_levels`` levels ``p``.

    Args:
        pit: the predictive CDF at each target, any shape (flattened), e.g.
            ``result.cdf(y_test)``.
        num_levels: levels ``p_j = j / (num_levels + 1)``, ``j = 1..num_levels``.

    Returns:
        ``(expected, observed)``, each ``(num_levels,)`` float64: ``p_j`` and the fraction
        of PIT values ``<= p_j``. A calibrated model lies on the diagonal; the observed
        frequency of the central interval of level ``c`` is
        ``observed(1/2 + c/2) - observed(1/2 - c/2)``.
    """
    values = _check_pit(pit, "regression_calibration_curve")
    levels = _levels(num_levels).to(values.device)
    observed = (values.unsqueeze(0) <= levels.unsqueeze(1)).to(torch.float64).mean(1)
    return levels, observed


def regression_calibration_error(pit: Tensor, num_levels: int = 19, *, power: int = 2) -> Tensor:
    """Quantile calibration error: ``mean_j |p_j - observed_j|^power`` over the curve's levels.

    ``power=2`` is Kuleshov et al.'s (2018) calibration error with equal weights
    ``1/num_levels``; ``power=1`` the mean absolute calibration error. 0 is perfect.

    Args:
        pit: predictive CDF values ``F(y)`` of the targets.
        num_levels: as for `regression_calibration_curve`.
        power: 1 or 2.
    """
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    expected, observed = regression_calibration_curve(pit, num_levels)
    return (expected - observed).abs().pow(power).mean()


def crps_gaussian(mean: Tensor, std: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """CRPS of ``N(mean, std^2)`` at ``target``, closed form (Gneiting et al. 2005), per element.

    ``std * (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))`` with ``z = (target - mean) / std``.

    Args:
        mean: predictive means ``(N, ...)``.
        std: predictive standard deviations ``(N, ...)`` (> 0).
        target: ``(N, ...)``.
        reduction: ``"mean"`` over all elements, or ``"none"``.
    """
    _pair(mean, target, ("mean", "target"), "crps_gaussian")
    _pair(std, target, ("std", "target"), "crps_gaussian")
    if bool((std <= 0).any()):
        raise ValueError("crps_gaussian: std must be positive")
    values = mixture_crps(mean.unsqueeze(0), std.square().unsqueeze(0), target)
    return _reduce(values, reduction, "crps_gaussian")


def crps_mixture(means: Tensor, variances: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """CRPS of the equally weighted Gaussian mixture, closed form, per element of ``target``.

    Args:
        means: ``(S, N, ...)`` component means.
        variances: ``(S, N, ...)`` component variances (> 0).
        target: ``(N, ...)``.
        reduction: ``"mean"`` or ``"none"``.
    """
    _components(means, variances, target, "crps_mixture")
    return _reduce(mixture_crps(means, variances, target), reduction, "crps_mixture")


def crps_samples(samples: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """CRPS of the empirical distribution of ``samples`` ``(S, N, ...)`` at ``target`` ``(N, ...)``
    (the ensemble CRPS of ``properscoring.crps_ensemble``), per element."""
    if not isinstance(samples, Tensor) or samples.dim() < 2 or samples.shape[1:] != getattr(target, "shape", None):
        raise ValueError("crps_samples: samples must have shape (S, *target.shape)")
    return _reduce(sample_crps(samples, target), reduction, "crps_samples")
