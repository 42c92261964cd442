"""Functional building blocks of mean-field Gaussian variational inference.

The posterior of every Bayesian weight is ``N(mu, sigma^2)`` with ``sigma = softplus(rho)``.
Sampling and the closed-form KL are written as autograd functions with analytic
gradients: each makes one pass over weight-sized memory forward and one backward, with
no autograd graph of intermediate temporaries. This is where most of a Bayesian
training step's overhead over a deterministic one lives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from torchbayes.nn import noise

__all__ = [
    "softplus",
    "log_softplus",
    "inverse_softplus",
    "sample_gaussian",
    "sample_perturbation",
    "gaussian_kl",
]

# Below this rho, softplus(rho) = exp(rho) to float precision, so log(sigma) = rho.
_LOG_SOFTPLUS_LINEAR_BELOW = -20.0


def softplus(rho: Tensor) -> Tensor:
    """``sigma = log(1 + exp(rho))``, evaluated without overflow for any ``rho``."""
    return F.softplus(rho)


def log_softplus(rho: Tensor) -> Tensor:
    """``log(softplus(rho))`` that stays finite where ``softplus(rho)`` underflows to 0."""
    return torch.where(rho < _LOG_SOFTPLUS_LINEAR_BELOW, rho, torch.log(F.softplus(rho)))


def inverse_softplus(sigma: Tensor, min_sigma: float = 1e-12) -> Tensor:
    """The ``rho`` with ``softplus(rho) = sigma``, stable for tiny and large ``sigma``.

    Uses ``rho = sigma + log(-expm1(-sigma))``, which neither overflows for large sigma
    nor loses precision for small sigma. ``sigma`` is clamped below at ``min_sigma`` so
    that a zero (e.g. MOPED's ``delta * |w|`` at ``w = 0``) maps to a finite rho whose
    softplus equals ``min_sigma``.

    Args:
        sigma: positive standard deviations.
        min_sigma: floor applied before inversion.

    Returns:
        ``rho`` of the same shape and dtype.
    """
    s = sigma.clamp_min(min_sigma)
    return s + torch.log(-torch.expm1(-s))


class _GaussianSample(torch.autograd.Function):
    """``w = mu + softplus(rho) * eps`` with ``eps ~ N(0, I)``; ``mu`` may be omitted.

    Backward: ``dL/dmu = g`` and ``dL/drho = g * eps * sigmoid(rho)``.
    """

    @staticmethod
    def forward(ctx, mu: Tensor | None, rho: Tensor) -> Tensor:  # type: ignore[override]
        eps = noise.randn(rho.shape, rho)
        sigma = F.softplus(rho)
        out = sigma.mul_(eps) if mu is None else torch.addcmul(mu, sigma, eps)
        ctx.save_for_backward(rho, eps)
        ctx.has_mu = mu is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rho, eps = ctx.saved_tensors
        grad_rho = None
        if ctx.needs_input_grad[1]:
            grad_rho = torch.sigmoid(rho).mul_(eps).mul_(grad)
        grad_mu = grad if ctx.has_mu and ctx.needs_input_grad[0] else None
        return grad_mu, grad_rho


def sample_gaussian(mu: Tensor, rho: Tensor) -> Tensor:
    """One reparameterized draw ``mu + softplus(rho) * eps`` from the posterior.

    Args:
        mu: posterior means.
        rho: posterior scale parameters, same shape as ``mu``.

    Returns:
        A sample with gradients flowing to ``mu`` and ``rho``.
    """
    return _GaussianSample.apply(mu, rho)


def sample_perturbation(rho: Tensor) -> Tensor:
    """One draw of the zero-mean perturbation ``softplus(rho) * eps`` (used by flipout)."""
    return _GaussianSample.apply(None, rho)


class _GaussianKL(torch.autograd.Function):
    """Closed-form ``sum KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2))``, ``sigma_q = softplus(rho_q)``.

    ``KL = log sigma_p - log sigma_q + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2``.
    Gradients: ``d/dmu_q = (mu_q - mu_p) / sigma_p^2`` and
    ``d/drho_q = (sigma_q / sigma_p^2 - 1 / sigma_q) * sigmoid(rho_q)``.
    The prior is fixed (no gradient), as in empirical Bayes and the reference.
    """

    @staticmethod
    def forward(ctx, mu_q: Tensor, rho_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:  # type: ignore[override]
        sigma_q = F.softplus(rho_q)
        diff = mu_q - mu_p
        quad = torch.addcmul(sigma_q.square(), diff, diff)
        inv_two_var_p = sigma_p.square().reciprocal_().mul_(0.5)
        numel = mu_q.numel()
        if inv_two_var_p.numel() == 1:
            total = quad.sum().mul(inv_two_var_p.reshape(())) + numel * (
                torch.log(sigma_p).reshape(()) - 0.5
            )
        else:
            total = (quad.mul_(inv_two_var_p).sum()
                     + torch.log(sigma_p).expand_as(mu_q).sum() - 0.5 * numel)
        total = total - log_softplus(rho_q).sum()
        ctx.save_for_backward(rho_q, sigma_q, diff, inv_two_var_p)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rho_q, sigma_q, diff, inv_two_var_p = ctx.saved_tensors
        inv_var_p = inv_two_var_p * 2.0
        grad_mu = grad_rho = None
        if ctx.needs_input_grad[0]:
            grad_mu = diff.mul(inv_var_p).mul_(grad)
        if ctx.needs_input_grad[1]:
            dsigma = (sigma_q * inv_var_p).sub_(sigma_q.reciprocal())
            grad_rho = dsigma.mul_(torch.sigmoid(rho_q)).mul_(grad)
        return grad_mu, grad_rho, None, None


def gaussian_kl(
    mu_q: Tensor, rho_q: Tensor, mu_p: Tensor, sigma_p: Tensor, reduction: str = "sum"
) -> Tensor:
    """KL divergence from the Gaussian posterior to a Gaussian prior, in closed form.

    Args:
        mu_q: posterior means.
        rho_q: posterior scale parameters (``sigma_q = softplus(rho_q)``).
        mu_p: prior means, broadcastable to ``mu_q``.
        sigma_p: prior standard deviations (> 0), broadcastable to ``mu_q``.
        reduction: ``"sum"`` (the ELBO's KL) or ``"mean"`` (per-weight average, as the
            reference Bayesian-Torch reports it).

    Returns:
        A scalar tensor.

    Example:
        >>> mu, rho = torch.zeros(3), torch.zeros(3)
        >>> gaussian_kl(mu, rho, torch.tensor(0.0), torch.tensor(1.0))
    """
    total = _GaussianKL.apply(mu_q, rho_q, mu_p.detach(), sigma_p.detach())
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mu_q.numel()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def gaussian_entropy_sum(rho: Tensor) -> Tensor:
    """Sum of the entropies of ``N(mu, softplus(rho)^2)`` (independent of ``mu``)."""
    return log_softplus(rho).sum() + rho.numel() * 0.5 * math.log(2.0 * math.pi * math.e)
