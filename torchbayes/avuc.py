"""Accuracy versus Uncertainty Calibration (AvUC), vectorized.

Krishnan & Tickoo, *Improving model calibration with accuracy versus uncertainty
optimization*, NeurIPS 2020 (https://arxiv.org/abs/2012.07923). An example is
*certain* when its uncertainty is at most a threshold ``u_th`` and *uncertain* otherwise;
with the counts ``n_AC`` (accurate and certain), ``n_AU``, ``n_IC``, ``n_IU``::

    AvU = (n_AC + n_IU) / (n_AC + n_AU + n_IC + n_IU)

is high when the model is right where it is sure and unsure where it is wrong. The AvUC
loss makes the counts differentiable: each example counts with weight ``c (1 - tanh u)``
(accurate, certain), ``c tanh u`` (accurate, uncertain), ``(1 - c)(1 - tanh u)``
(inaccurate, certain) or ``(1 - c) tanh u`` (inaccurate, uncertain), where ``c`` is the
confidence (top probability) and ``u`` the uncertainty, and the loss is
``-beta * log(AvU + eps)``. It is added to the ELBO: ``loss = elbo + AvULoss(beta)(...)``.

Everything here computes the same numbers as Bayesian-Torch 0.5.0's
``bayesian_torch.utils.avuc_loss`` (same eps, same threshold grid, same float64
threshold comparisons), without its Python loop over examples and without printing.

Choosing the threshold ``u_th``: the official AvUC training code sets it, during the
first epochs, to the midpoint between the mean uncertainty of the correct and of the
incorrect predictions on held-out data; a simpler choice is the mean uncertainty of the
first epoch. :func:`uncertainty_threshold` computes either.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes.metrics.classification import _check_logits, _check_logits_labels, _wide_dtype

__all__ = [
    "AvULoss",
    "AUAvULoss",
    "accuracy_vs_uncertainty",
    "eval_avu",
    "avu_uncertainty",
    "uncertainty_threshold",
]

#: Added to AvU's denominator and inside its log, as in the reference.
_EPS = 1e-10
#: The reference's threshold grid: 21 equally spaced fractions of [min u, max u].
_NUM_THRESHOLDS = 21


def _entropy_from_log_probs(log_probs: Tensor) -> Tensor:
    # Entropy over the last dim from log-probabilities, for the differentiable loss: its
    # gradient stays finite where a softmax probability underflows to 0, whereas
    # torchbayes.uncertainty's xlogy(p, p) on probabilities has a log(0) gradient there.
    return -(log_probs.exp() * log_probs).sum(-1)


def _check_type(type: int, logits: Tensor, caller: str) -> None:
    if type not in (0, 1):
        raise ValueError(f"{caller}: type must be 0 (predictive entropy) or 1 (mutual information), got {type!r}")
    if type == 1 and logits.dim() != 3:
        raise ValueError(
            f"{caller}: type=1 (model uncertainty, mutual information) needs "
            f"Monte Carlo logits of shape (S, N, C); got {tuple(logits.shape)}"
        )


def _log_predictive(logits: Tensor) -> Tensor:
    """Log of the (Monte Carlo averaged) predictive probabilities, shape (N, C)."""
    log_probs = F.log_softmax(logits, dim=-1)
    if logits.dim() == 2:
        return log_probs
    return torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])


def _uncertainty(logits: Tensor, log_predictive: Tensor, type: int) -> Tensor:
    predictive_entropy = _entropy_from_log_probs(log_predictive)
    if type == 0:
        return predictive_entropy
    expected_entropy = _entropy_from_log_probs(F.log_softmax(logits, dim=-1)).mean(0)
    return predictive_entropy - expected_entropy


def avu_uncertainty(logits: Tensor, type: int = 0) -> Tensor:
    """The uncertainty AvUC uses, per example.

    Args:
        logits: ``(N, C)`` logits of one forward pass, or ``(S, N, C)`` logits of ``S``
            Monte Carlo samples (averaged in probability space).
        type: ``0``: predictive entropy ``H[mean_s p_s]`` (the reference's default);
            ``1``: model uncertainty, the mutual information
            ``H[mean_s p_s] - mean_s H[p_s]`` (needs ``(S, N, C)`` logits).

    Returns:
        Uncertainties, shape ``(N,)``, in nats; differentiable.

    Example:
        >>> u = avu_uncertainty(torch.stack([model(x) for _ in range(8)]), type=1)
    """
    _check_logits(logits, "avu_uncertainty")
    _check_type(type, logits, "avu_uncertainty")
    return _uncertainty(logits, _log_predictive(logits), type)


def _avu(
    uncertainty: Tensor,
    correct: Tensor,
    thresholds: Tensor,
    certain_weight: Tensor | float,
    uncertain_weight: Tensor | float,
    eps: float,
) -> Tensor:
    """AvU at each threshold, shape (T,), from per-example weights.

    An example counts ``certain_weight`` when ``u <= threshold`` and ``uncertain_weight``
    when ``u > threshold`` (NaN uncertainties count nowhere, as in the reference); the
    numerator keeps accurate-certain and inaccurate-uncertain examples.
    """
    u = uncertainty.to(thresholds.dtype)
    certain = (u.unsqueeze(0) <= thresholds.unsqueeze(1)).to(uncertainty.dtype)  # (T, N)
    uncertain = (u.unsqueeze(0) > thresholds.unsqueeze(1)).to(uncertainty.dtype)
    wc = torch.as_tensor(certain_weight, dtype=uncertainty.dtype, device=uncertainty.device).expand_as(uncertainty)
    wu = torch.as_tensor(uncertain_weight, dtype=uncertainty.dtype, device=uncertainty.device).expand_as(uncertainty)
    correct = correct.to(uncertainty.dtype)
    # Broadcast-and-sum rather than matmul: a (T, N) @ (N,) BLAS gemv is no faster at
    # these sizes and its thread pool stalls badly on a busy CPU.
    numerator = (certain * (wc * correct)).sum(-1) + (uncertain * (wu * (1 - correct))).sum(-1)
    denominator = (certain * wc).sum(-1) + (uncertain * wu).sum(-1)
    return numerator / (denominator + eps)


def _threshold_grid(uncertainty: Tensor, num_thresholds: int) -> Tensor:
    """``min u + t (max u - min u)`` for ``t`` in ``linspace(0, 1, num_thresholds)``.

    The spread is computed in the uncertainty's dtype and the sum in float64, exactly
    as the reference's mixed float32/float64 arithmetic, so that ties break the same way.
    """
    wide = _wide_dtype(uncertainty.device)
    umin, umax = uncertainty.min(), uncertainty.max()
    fractions = torch.linspace(0, 1, num_thresholds, dtype=wide, device=uncertainty.device)
    return umin.to(wide) + fractions * (umax - umin).to(wide)


def _soft_avu_inputs(logits: Tensor, labels: Tensor, type: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    log_pred = _log_predictive(logits)
    unc = _uncertainty(logits, log_pred, type)
    confidence, prediction = log_pred.max(dim=-1)
    confidence = confidence.exp()
    correct = prediction == labels
    tanh_u = torch.tanh(unc)
    # accurate: c (1 - tanh u) / c tanh u; inaccurate: (1 - c)(1 - tanh u) / (1 - c) tanh u.
    weight = torch.where(correct, confidence, 1 - confidence)
    return unc, correct, weight * (1 - tanh_u), weight * tanh_u


class _AvUCLoss(nn.Module):
    """Shared by the two AvUC losses: the weight ``beta`` and the reference's eps."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"{type(self).__name__}: beta must be a finite number >= 0, got {beta!r}")
        self.beta = float(beta)
        self.eps = _EPS

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class AvULoss(_AvUCLoss):
    """Accuracy versus Uncertainty Calibration loss with a fixed uncertainty threshold.

    ``-beta * log(AvU + 1e-10)`` with the differentiable AvU described in the module
    docstring; equal (to float tolerance) to Bayesian-Torch's ``AvULoss``.

    Args:
        beta: weight of the loss (the AvUC paper uses 3).

    Shape:
        - logits: ``(N, C)`` or Monte Carlo ``(S, N, C)``; labels: ``(N,)`` integers.
        - output: scalar (the reference returns shape ``(1,)``).

    Example:
        >>> avuc = AvULoss(beta=3.0)
        >>> loss = elbo_loss(F.cross_entropy(out, y), model, n) + avuc(out, y, u_th)
    """

    def forward(
        self, logits: Tensor, labels: Tensor, optimal_uncertainty_threshold: float | Tensor, type: int = 0
    ) -> Tensor:
        """Args:
            logits: model outputs (pre-softmax).
            labels: true classes.
            optimal_uncertainty_threshold: ``u_th``; see :func:`uncertainty_threshold`.
            type: ``0`` predictive entropy, ``1`` mutual information (MC logits only).

        Returns:
            The scalar loss, differentiable in ``logits``.
        """
        _check_logits_labels(logits, labels, "AvULoss")
        _check_type(type, logits, "AvULoss")
        # torch.tensor(x) like the reference: a Python float becomes the default dtype.
        threshold = torch.as_tensor(optimal_uncertainty_threshold).detach()
        if threshold.numel() != 1 or not torch.isfinite(threshold).all():
            raise ValueError(
                "AvULoss: optimal_uncertainty_threshold must be one finite number, "
                f"got {optimal_uncertainty_threshold!r}"
            )
        unc, correct, w_certain, w_uncertain = _soft_avu_inputs(logits, labels, type)
        threshold = threshold.reshape(1).to(device=logits.device, dtype=_wide_dtype(logits.device))
        avu = _avu(unc, correct, threshold, w_certain, w_uncertain, self.eps)[0]
        return -self.beta * torch.log(avu + self.eps)


class AUAvULoss(_AvUCLoss):
    """AvUC loss without a threshold: ``-beta * log(area under AvU(threshold))``.

    AvU is computed at 21 thresholds spread evenly between the smallest and the largest
    uncertainty of the batch, and integrated with the trapezoidal rule over
    ``t in [0, 1]`` (what the reference computes with ``sklearn.metrics.auc``). Unlike the
    reference's ``AUAvULoss.forward``, which raises in 0.5.0, the area is differentiable.
    (The thresholds themselves carry no gradient, as in the reference.)

    Args:
        beta: weight of the loss.

    Shape:
        logits ``(N, C)`` or ``(S, N, C)``, labels ``(N,)``; returns two scalars.

    Example:
        >>> loss, area = AUAvULoss(beta=3.0)(out, y)
    """

    def forward(self, logits: Tensor, labels: Tensor, type: int = 0) -> tuple[Tensor, Tensor]:
        """Returns ``(loss, area)``: the scalar loss and the area under the AvU curve."""
        _check_logits_labels(logits, labels, "AUAvULoss")
        _check_type(type, logits, "AUAvULoss")
        unc, correct, w_certain, w_uncertain = _soft_avu_inputs(logits, labels, type)
        thresholds = _threshold_grid(unc.detach(), _NUM_THRESHOLDS)
        avu = _avu(unc, correct, thresholds, w_certain, w_uncertain, self.eps)
        fractions = torch.linspace(0, 1, _NUM_THRESHOLDS, dtype=avu.dtype, device=avu.device)
        area = torch.trapezoid(avu, fractions)
        return -self.beta * torch.log(area + self.eps), area


def _as_hard_inputs(pred_label: Any, true_label: Any, uncertainty: Any, caller: str) -> tuple[Tensor, Tensor]:
    unc = torch.as_tensor(uncertainty)
    pred = torch.as_tensor(pred_label, device=unc.device)
    true = torch.as_tensor(true_label, device=unc.device)
    if not unc.is_floating_point():
        unc = unc.to(torch.get_default_dtype())
    if unc.dim() != 1 or unc.numel() == 0:
        raise ValueError(f"{caller}: uncertainty must be a non-empty 1-D array, got shape {tuple(unc.shape)}")
    if pred.shape != unc.shape or true.shape != unc.shape:
        raise ValueError(
            f"{caller}: pred_label {tuple(pred.shape)}, true_label {tuple(true.shape)} and "
            f"uncertainty {tuple(unc.shape)} must have the same shape (N,)"
        )
    return unc, pred == true


def accuracy_vs_uncertainty(pred_label: Any, true_label: Any, uncertainty: Any, optimal_threshold: float) -> Tensor:
    """The AvU metric (hard counts) at one uncertainty threshold.

    ``(n_AC + n_IU) / N``; equal to the reference's ``accuracy_vs_uncertainty``.

    Args:
        pred_label: predicted classes, shape ``(N,)`` (tensor or array).
        true_label: true classes, shape ``(N,)``.
        uncertainty: uncertainties, shape ``(N,)``.
        optimal_threshold: ``u_th``; ``u <= u_th`` counts as certain.

    Returns:
        A 0-D float64 tensor in ``[0, 1]`` on the inputs' device.

    Example:
        >>> accuracy_vs_uncertainty(probs.argmax(1), y, predictive_entropy(probs), 0.5)
    """
    unc, correct = _as_hard_inputs(pred_label, true_label, uncertainty, "accuracy_vs_uncertainty")
    # NumPy semantics, as in the reference: a Python int/float is compared at the
    # uncertainty's precision; an array, NumPy scalar or tensor at the wider of the two.
    if type(optimal_threshold) in (int, float):
        threshold = torch.tensor(float(optimal_threshold), dtype=unc.dtype, device=unc.device)
    else:
        threshold = torch.as_tensor(optimal_threshold, device=unc.device)
    if threshold.numel() != 1 or threshold.is_complex():
        raise ValueError(f"accuracy_vs_uncertainty: optimal_threshold must be one number, got {optimal_threshold!r}")
    precision = torch.promote_types(unc.dtype, threshold.dtype)
    threshold = threshold.to(precision).to(_wide_dtype(unc.device)).reshape(1)
    return _hard_avu(unc.to(precision), correct, threshold)[0]


def _hard_avu(unc: Tensor, correct: Tensor, thresholds: Tensor) -> Tensor:
    # Hard counts: every example weighs 1; compared and counted at float64 like the reference.
    return _avu(unc.to(thresholds.dtype), correct, thresholds, 1.0, 1.0, 0.0)


def eval_avu(pred_label: Any, true_label: Any, uncertainty: Any) -> tuple[Tensor, Tensor]:
    """AvU (hard counts) at 21 thresholds from the smallest to the largest uncertainty.

    Equal to the reference's ``eval_avu``; the best threshold of a validation set is
    ``thresholds[avu.argmax()]``.

    Args:
        pred_label: predicted classes, shape ``(N,)``.
        true_label: true classes, shape ``(N,)``.
        uncertainty: uncertainties, shape ``(N,)``.

    Returns:
        ``(avu, thresholds)``, both float64 tensors of shape ``(21,)`` (the reference
        returns NumPy arrays; ``.numpy()`` gives them).

    Example:
        >>> avu, th = eval_avu(pred, y, u); u_th = th[avu.argmax()]
    """
    unc, correct = _as_hard_inputs(pred_label, true_label, uncertainty, "eval_avu")
    thresholds = _threshold_grid(unc, _NUM_THRESHOLDS)
    return _hard_avu(unc, correct, thresholds), thresholds


def uncertainty_threshold(uncertainty: Tensor, correct: Tensor | None = None) -> float:
    """Pick AvUC's uncertainty threshold ``u_th`` from uncertainties seen so far.

    Compute the uncertainties (:func:`avu_uncertainty`) of held-out data, or of the
    training data during the first epoch(s), and pass them here.

    Args:
        uncertainty: uncertainties, shape ``(N,)``.
        correct: optional booleans ``(N,)``, whether each prediction was right. When
            given, returns the midpoint between the mean uncertainty of the correct and
            of the incorrect predictions (what the official AvUC code does during the
            first epochs); without it (or if all predictions are right or all wrong),
            the mean uncertainty.

    Returns:
        The threshold, a Python float.

    Example:
        >>> u = avu_uncertainty(val_logits); u_th = uncertainty_threshold(u, val_logits.argmax(-1) == val_y)
    """
    unc = torch.as_tensor(uncertainty).detach()
    if unc.dim() != 1 or unc.numel() == 0 or not unc.is_floating_point():
        raise ValueError(
            f"uncertainty_threshold: uncertainty must be a non-empty 1-D float tensor, got shape {tuple(unc.shape)}"
        )
    if correct is None:
        return float(unc.mean())
    correct = torch.as_tensor(correct, device=unc.device)
    if correct.shape != unc.shape or correct.dtype != torch.bool:
        raise ValueError(f"uncertainty_threshold: correct must be a bool tensor of shape {tuple(unc.shape)}")
    if correct.all() or not correct.any():
        return float(unc.mean())
    return float((unc[correct].mean() + unc[~correct].mean()) / 2)
