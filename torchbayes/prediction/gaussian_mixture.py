r"""The predictive distribution of a regression: an equally weighted Gaussian mixture.

``S`` posterior samples (Monte Carlo draws, MC dropout masks, ensemble members), each
predicting a Gaussian ``N(m_s, v_s)``, give the predictive density
``p(y | x) = 1/S sum_s N(y; m_s, v_s)`` (Lakshminarayanan et al. 2017 for ensembles; the
published UCI test log-likelihoods are this mixture's). Moment propagation gives one
Gaussian, the ``S = 1`` case. Every function takes component means and variances
``(S, B, D)`` and treats the ``D`` outputs of one example as independent given the
sample (the heads' diagonal Gaussian): densities are joint over ``D``, CDFs, quantiles
and CRPS marginal per output.

Used by `torchbayes.prediction.RegressionPrediction` and `torchbayes.metrics.regression`
(one implementation of each formula).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mixture_cdf", "mixture_crps", "mixture_log_prob", "mixture_quantile", "sample_crps"]

_SQRT2 = math.sqrt(2.0)
#: Bisection steps of `mixture_quantile`: the bracket shrinks by 2**-60, below float64's resolution.
BISECTION_STEPS = 60


def _components(means: Tensor, variances: Tensor, target: Tensor | None, caller: str) -> tuple[Tensor, Tensor]:
    if not isinstance(means, Tensor) or not isinstance(variances, Tensor):
        raise TypeError(f"{caller}: means and variances must be tensors")
    if means.dim() < 2:
        raise ValueError(f"{caller}: means must have shape (S, B, ...) with S samples, got {tuple(means.shape)}")
    variances = variances.expand_as(means)
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"{caller}: target must be a tensor, got {type(target).__name__}")
        if target.shape != means.shape[1:]:
            raise ValueError(
                f"{caller}: target must have the prediction's shape {tuple(means.shape[1:])}, got {tuple(target.shape)}"
            )
    return means, variances


def mixture_log_prob(means: Tensor, variances: Tensor, target: Tensor) -> Tensor:
    """``log 1/S sum_s prod_d N(y_d; m_sd, v_sd)`` of each example, ``(B,)``.

    Args:
        means: ``(S, B, D)`` component means.
        variances: ``(S, B, D)`` component variances (> 0).
        target: ``(B, D)``.

    Returns:
        ``(B,)`` log densities in nats (log-sum-exp over samples: no underflow).
    """
    means, variances = _components(means, variances, target, "mixture_log_prob")
    per_sample = -0.5 * (math.log(2 * math.pi) + variances.log() + (target - means).square() / variances)
    per_sample = per_sample.flatten(2).sum(-1)  # (S, B): joint over the outputs
    return torch.logsumexp(per_sample, 0) - math.log(means.shape[0])


def mixture_cdf(means: Tensor, variances: Tensor, target: Tensor) -> Tensor:
    """``P(Y <= y) = 1/S sum_s Phi((y - m_s) / sqrt(v_s))`` per output, ``(B, D)`` (the PIT values)."""
    means, variances = _components(means, variances, target, "mixture_cdf")
    return _cdf(means, variances, target)


def _cdf(means: Tensor, variances: Tensor, value: Tensor) -> Tensor:
    z = (value - means) / (variances * 2).sqrt().clamp_min(torch.finfo(means.dtype).tiny)
    return (0.5 * torch.erfc(-z)).mean(0)


def mixture_quantile(means: Tensor, variances: Tensor, q: float | Tensor) -> Tensor:
    """The ``q``-quantile of each output's mixture, ``(B, D)``, by bisection.

    The quantile lies between the smallest and the largest component quantile (the
    mixture CDF is their average), so bisection on that bracket converges to it; after
    `BISECTION_STEPS` halvings the bracket is below the dtype's resolution.

    Args:
        means: ``(S, B, D)``.
        variances: ``(S, B, D)``.
        q: a level in ``(0, 1)``, or a tensor of levels broadcastable to ``(B, D)``.

    Returns:
        ``(B, D)`` quantiles.
    """
    means, variances = _components(means, variances, None, "mixture_quantile")
    q_t = torch.as_tensor(q, dtype=means.dtype, device=means.device)
    if not bool(((q_t > 0) & (q_t < 1)).all()):
        raise ValueError(f"mixture_quantile: levels must lie in (0, 1), got {q!r}")
    z = _SQRT2 * torch.erfinv(2 * q_t - 1)  # the standard normal quantile
    component = means + variances.sqrt() * z
    low, high = component.min(0).values, component.max(0).values
    if means.shape[0] == 1:
        return low
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        below = _cdf(means, variances, middle) < q_t
        low = torch.where(below, middle, low)
        high = torch.where(below, high, middle)
    return (low + high) / 2


def _expected_abs(mean: Tensor, variance: Tensor) -> Tensor:
    """``E|Z|`` for ``Z ~ N(mean, variance)``: ``2 s phi(m/s) + m (2 Phi(m/s) - 1)``."""
    std = variance.sqrt().clamp_min(torch.finfo(mean.dtype).tiny)
    a = mean / std
    return std * math.sqrt(2 / math.pi) * torch.exp(-0.5 * a.square()) + mean * torch.erf(a / _SQRT2)


def mixture_crps(means: Tensor, variances: Tensor, target: Tensor, *, chunk: int = 4096) -> Tensor:
    """Continuous ranked probability score of the mixture per output, ``(B, D)``, in closed form.

    ``CRPS = E|X - y| - 1/2 E|X - X'|`` with ``X, X'`` independent draws of the mixture
    (Gneiting & Raftery 2007); both expectations are sums of ``E|N(mu, s^2)|`` terms
    (Grimit et al. 2006), ``O(S^2)`` per output (computed ``chunk`` examples at a time).
    ``S = 1`` is the Gaussian's closed form ``s (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))``.
    """
    means, variances = _components(means, variances, target, "mixture_crps")
    parts = []
    for start in range(0, means.shape[1], chunk):
        m, v, y = means[:, start : start + chunk], variances[:, start : start + chunk], target[start : start + chunk]
        accuracy = _expected_abs(m - y, v).mean(0)
        spread = _expected_abs(m.unsqueeze(0) - m.unsqueeze(1), v.unsqueeze(0) + v.unsqueeze(1)).mean((0, 1))
        parts.append(accuracy - 0.5 * spread)
    return torch.cat(parts)


def sample_crps(samples: Tensor, target: Tensor) -> Tensor:
    """CRPS of the empirical distribution of ``samples`` ``(S, B, ...)`` per output, ``(B, ...)``.

    ``mean_s |x_s - y| - 1/2 mean_{s,t} |x_s - x_t|`` (the "ensemble" CRPS of
    ``properscoring.crps_ensemble``), the spread term from the sorted samples in
    ``O(S log S)``: ``sum_{s,t} |x_s - x_t| = 2 sum_i (2 i - S - 1) x_(i)``.
    """
    if not isinstance(samples, Tensor) or samples.dim() < 2:
        raise ValueError("sample_crps: samples must be a tensor of shape (S, B, ...)")
    if not isinstance(target, Tensor) or target.shape != samples.shape[1:]:
        raise ValueError(f"sample_crps: target must have shape {tuple(samples.shape[1:])}")
    count = samples.shape[0]
    accuracy = (samples - target).abs().mean(0)
    ordered = samples.sort(0).values
    rank = torch.arange(1, count + 1, dtype=samples.dtype, device=samples.device)
    rank = (2 * rank - count - 1).view(-1, *([1] * (samples.dim() - 1)))
    spread = 2 * (rank * ordered).sum(0) / count**2
    return accuracy - 0.5 * spread
