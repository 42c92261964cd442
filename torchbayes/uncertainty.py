"""Decomposing predictive uncertainty from Monte Carlo samples.

Classification, from ``S`` sampled class-probability vectors ``p_s`` per input:

* predictive entropy (total): ``H[mean_s p_s]``;
* expected entropy (aleatoric): ``mean_s H[p_s]``;
* mutual information (epistemic): their difference, the information the label would
  give about the weights. It is ~0 when all samples agree and grows as they disagree.

Regression, from ``S`` sampled predicted means ``m_s`` (and variances ``v_s`` for a
heteroscedastic model): by the law of total variance the predictive variance is
``mean_s v_s`` (aleatoric) ``+ var_s m_s`` (epistemic).

The classification functions accept what Bayesian-Torch's functions of the same name
accept (NumPy arrays of shape ``(S, ..., C)``) and return the same values, NumPy for
NumPy; torch tensors give tensors. Entropies use ``0 log 0 = 0``, so probabilities of
exactly 0 and 1 are safe.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "VarianceDecomposition",
    "entropy_decomposition",
    "expected_entropy",
    "mutual_information",
    "predictive_entropy",
    "variance_decomposition",
]

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def _as_tensor(mc_probs: Tensor | np.ndarray, name: str) -> Tensor:
    if isinstance(mc_probs, np.ndarray):
        t = torch.from_numpy(mc_probs)
    elif isinstance(mc_probs, Tensor):
        t = mc_probs
    else:
        raise TypeError(f"{name} must be a NumPy array or a torch Tensor, got {type(mc_probs).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must hold floating-point probabilities, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (num_samples, ..., num_classes), got {tuple(t.shape)}")
    return t


def _like(result: Tensor, original: Tensor | np.ndarray) -> Tensor | np.ndarray:
    return result.numpy() if isinstance(original, np.ndarray) else result


def _entropy(probs: Tensor) -> Tensor:
    # xlogy gives 0 * log 0 = 0: one-hot probabilities have entropy 0, not NaN.
    return -torch.special.xlogy(probs, probs).sum(-1)


def predictive_entropy(mc_probs: ArrayT) -> ArrayT:
    """Entropy of the mean predictive distribution (total uncertainty), in nats.

    Args:
        mc_probs: class probabilities of ``S`` Monte Carlo samples, shape ``(S, ..., C)``.

    Returns:
        Shape ``(...)``; a NumPy array for NumPy input, else a tensor.

    Example:
        >>> predictive_entropy(np.array([[[0.5, 0.5]], [[1.0, 0.0]]]))   # array([0.5623...])
    """
    t = _as_tensor(mc_probs, "mc_probs")
    return _like(_entropy(t.mean(0)), mc_probs)  # type: ignore[return-value]


def expected_entropy(mc_probs: ArrayT) -> ArrayT:
    """Mean over samples of each sample's entropy (aleatoric uncertainty), in nats.

    Args:
        mc_probs: shape ``(S, ..., C)``.

    Returns:
        Shape ``(...)``, NumPy for NumPy input.

    Example:
        >>> expected_entropy(torch.full((8, 4, 3), 1 / 3))   # log 3 for each of 4 inputs
    """
    t = _as_tensor(mc_probs, "mc_probs")
    return _like(_entropy(t).mean(0), mc_probs)  # type: ignore[return-value]


def mutual_information(mc_probs: ArrayT) -> ArrayT:
    """Mutual information between the prediction and the weights (epistemic), in nats.

    ``predictive_entropy - expected_entropy``, clamped at 0 against rounding (it is >= 0
    by Jensen's inequality).

    Args:
        mc_probs: shape ``(S, ..., C)``.

    Returns:
        Shape ``(...)``, NumPy for NumPy input.

    Example:
        >>> mutual_information(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))   # array([0.6931...]) = log 2
    """
    t = _as_tensor(mc_probs, "mc_probs")
    return _like(entropy_decomposition(t)[2], mc_probs)  # type: ignore[return-value]


def entropy_decomposition(mc_probs: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Predictive entropy, expected entropy and mutual information, sharing the work.

    Args:
        mc_probs: class probabilities of ``S`` samples, shape ``(S, ..., C)``.
        mean: ``mc_probs.mean(0)``, if the caller has it already.

    Returns:
        ``(predictive_entropy, expected_entropy, mutual_information)``, each ``(...)``.

    Example:
        >>> total, aleatoric, epistemic = entropy_decomposition(torch.full((8, 4, 3), 1 / 3))
    """
    predictive = _entropy(mc_probs.mean(0) if mean is None else mean)
    expected = _entropy(mc_probs).mean(0)
    return predictive, expected, (predictive - expected).clamp_min(0.0)


class VarianceDecomposition(NamedTuple):
    """Predictive variance of a regression model and its two parts (``total = aleatoric + epistemic``)."""

    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def variance_decomposition(mc_means: Tensor, mc_variances: Tensor | None = None) -> VarianceDecomposition:
    """Law-of-total-variance decomposition of ``S`` sampled regression predictions.

    The variances are those of the equally weighted mixture of the ``S`` sampled
    predictive distributions: ``epistemic = mean_s (m_s - mean m)^2`` (divided by ``S``,
    not ``S - 1``), so ``total`` is exactly the mixture's variance.

    Args:
        mc_means: predicted means, shape ``(S, ...)``.
        mc_variances: predicted (aleatoric) variances of the same shape, or ``None`` for
            a model that predicts a mean only (aleatoric part 0).

    Returns:
        :class:`VarianceDecomposition` of tensors of shape ``(...)``.

    Example:
        >>> total, aleatoric, epistemic = variance_decomposition(means, variances)
    """
    if not isinstance(mc_means, Tensor) or mc_means.dim() < 1:
        raise ValueError("mc_means must be a tensor of shape (num_samples, ...)")
    epistemic = mc_means.var(0, correction=0)
    if mc_variances is None:
        aleatoric = torch.zeros_like(epistemic)
    else:
        if not isinstance(mc_variances, Tensor) or mc_variances.shape != mc_means.shape:
            raise ValueError(f"mc_variances must be a tensor of mc_means' shape {tuple(mc_means.shape)}")
        aleatoric = mc_variances.mean(0)
    return VarianceDecomposition(aleatoric + epistemic, aleatoric, epistemic)
