"""Functional building blocks of mean-field Gaussian variational inference.

The posterior of every Bayesian weight is ``N(mu, sigma^2)`` with ``sigma = softplus(rho)``.
Sampling and the closed-form KL are autograd functions with analytic gradients, so each
makes a few passes over weight-sized memory instead of recording a graph of temporaries.
:func:`posterior_draw` goes further and computes a draw and the KL together: they share
``softplus(rho)`` forward and ``sigmoid(rho)`` backward, which is where most of a Bayesian
training step's overhead over a deterministic one lives. Under ``torch.compile`` /
``torch.export`` the same functions run as plain differentiable ops, which the compiler
fuses itself.
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
    "gaussian_entropy_sum",
    "posterior_draw",
    "KLToken",
    "DRAW_KINDS",
]

# Below this rho, softplus(rho) = exp(rho) to float precision, so log(sigma) = rho.
_LOG_SOFTPLUS_LINEAR_BELOW = -20.0
# Above this rho, softplus(rho) does not underflow in float32, so log(sigma) is finite.
_SOFTPLUS_SAFE_LOG_ABOVE = -80.0

#: What :func:`posterior_draw` returns: a weight sample ``mu + sigma * eps``, a zero-mean
#: ``perturbation`` ``sigma * eps`` (flipout), or the ``variance`` ``sigma^2`` (local).
DRAW_KINDS: tuple[str, ...] = ("sample", "perturbation", "variance")


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
        sigma: non-negative standard deviations.
        min_sigma: floor applied before inversion.

    Returns:
        ``rho`` of the same shape and dtype.

    Example:
        >>> rho = inverse_softplus(torch.tensor([0.0, 1e-3, 50.0]))
    """
    s = sigma.clamp_min(min_sigma)
    return s + torch.log(-torch.expm1(-s))


def _log_sigma_is_safe(rho: Tensor) -> bool:
    # One cheap reduction tells whether softplus(rho) stays away from underflow (the usual
    # case), so the plain log and 1/sigma can be used instead of their slower stable forms.
    return rho.device.type == "cpu" and rho.numel() > 0 and float(rho.min()) > _SOFTPLUS_SAFE_LOG_ABOVE


def _sum_of_squares(t: Tensor) -> Tensor:
    # A BLAS dot reads t once and writes nothing: cheaper than square() then sum().
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = t.reshape(-1)
        return torch.dot(flat, flat)
    return t.square().sum()


def _kl_sum(rho: Tensor, sigma: Tensor, diff: Tensor, sigma_p: Tensor | float,
            safe: bool) -> tuple[Tensor, Tensor | float]:
    """Closed-form KL summed over weights, and ``1 / sigma_p^2`` for the backward pass.

    ``KL = log sigma_p - log sigma_q + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2``.
    A scalar prior comes as a Python float: its constants then cost no tensor operations.
    """
    numel = rho.numel()
    log_sigma_sum = (torch.log(sigma) if safe else log_softplus(rho)).sum()
    if isinstance(sigma_p, float):  # reduce first, scale once
        inv_var_p = 1.0 / (sigma_p * sigma_p)
        quad = _sum_of_squares(sigma).add_(_sum_of_squares(diff))
        return quad.mul_(0.5 * inv_var_p).sub_(log_sigma_sum).add_(numel * (math.log(sigma_p) - 0.5)), inv_var_p
    inv_var_p_t = sigma_p.square().reciprocal_()
    quad = torch.addcmul(sigma.square(), diff, diff)
    total = (quad.mul_(inv_var_p_t).sum() * 0.5
             + torch.log(sigma_p).expand(rho.shape).sum() - 0.5 * numel)
    return total - log_sigma_sum, inv_var_p_t


def _scalar_prior(mu_p: Tensor, sigma_p: Tensor) -> tuple[Tensor | float, Tensor | float]:
    # CPU scalar priors (the default and the reference's) become Python floats.
    if sigma_p.numel() == 1 and mu_p.numel() == 1 and sigma_p.device.type == "cpu":
        return float(mu_p), float(sigma_p)
    return mu_p, sigma_p


def _kl_grad_rho(rho: Tensor, sigma: Tensor, inv_var_p: Tensor, g: Tensor, sig: Tensor,
                 safe: bool, draw_term: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """``g * dKL/drho = g * (sigma / sigma_p^2 - 1 / sigma) * sigmoid(rho)``, ``sig = sigmoid(rho)``.

    ``draw_term = (a, b, v)``, if given, adds the draw's own gradient
    ``v * a * b * sigmoid(rho)``, folded into the same passes over memory.
    """
    if safe:
        grad = sigma.reciprocal().mul_(-g).addcmul_(sigma, g * inv_var_p)
        if draw_term is not None:
            grad.addcmul_(draw_term[0], draw_term[1], value=draw_term[2])
        return grad.mul_(sig)
    # sigmoid(rho) / softplus(rho) -> 1 as rho -> -inf, where 1/sigma alone overflows.
    ratio = torch.exp(F.logsigmoid(rho) - log_softplus(rho))
    grad = (sigma * sig).mul_(g * inv_var_p).sub_(ratio.mul_(g))
    if draw_term is not None:
        grad.addcmul_(draw_term[0] * draw_term[1], sig, value=draw_term[2])
    return grad


class KLToken:
    """Marks whether the KL of one :func:`posterior_draw` has been back-propagated.

    A layer caches the KL computed with its forward draw; once backward has run through
    that draw, its saved tensors are gone and the cached KL must not be reused.
    """

    __slots__ = ("consumed",)

    def __init__(self) -> None:
        self.consumed = False


class _PosteriorDraw(torch.autograd.Function):
    """A draw from ``N(mu, softplus(rho)^2)`` (see :data:`DRAW_KINDS`) and, optionally, the KL.

    Backward: with ``s = sigmoid(rho)``,
    ``dL/dmu  = g_out [sample] + g_kl (mu - mu_p) / sigma_p^2`` and
    ``dL/drho = s * (g_out * eps [sample, perturbation] or 2 sigma g_out [variance]
    + g_kl (sigma / sigma_p^2 - 1 / sigma))``.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, rho: Tensor, mu_p: Tensor | None, sigma_p: Tensor | None,  # type: ignore[override]
                kind: str, token: KLToken | None) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        sigma = F.softplus(rho)
        eps = None
        if kind == "variance":
            out = sigma.square()
        else:
            eps = noise.randn(rho.shape, rho)
            out = torch.addcmul(mu, sigma, eps) if kind == "sample" else sigma * eps
        kl = diff = inv_var_p = None
        ctx.safe = True
        if sigma_p is not None:
            mu_p, sigma_p = _scalar_prior(mu_p, sigma_p)
            # The default prior mean is a scalar 0: then mu itself is the difference.
            diff = mu if isinstance(mu_p, float) and mu_p == 0.0 else mu - mu_p
            ctx.safe = _log_sigma_is_safe(rho)
            kl, inv_var_p = _kl_sum(rho, sigma, diff, sigma_p, ctx.safe)
        ctx.kind, ctx.token = kind, token
        ctx.inv_var_p = inv_var_p if isinstance(inv_var_p, float) else None
        ctx.save_for_backward(rho, sigma, eps, diff, None if ctx.inv_var_p is not None else inv_var_p)
        return out, kl

    @staticmethod
    def backward(ctx, g_out: Tensor | None, g_kl: Tensor | None):  # type: ignore[override]
        rho, sigma, eps, diff, inv_var_p = ctx.saved_tensors
        if ctx.inv_var_p is not None:
            inv_var_p = ctx.inv_var_p
        if ctx.token is not None:
            ctx.token.consumed = True
        sig = torch.sigmoid(rho)
        # The draw's own gradient w.r.t. sigma, v * a * b (times sigmoid(rho) for rho).
        draw_term = None
        if g_out is not None:
            draw_term = (eps, g_out, 1.0) if eps is not None else (sigma, g_out, 2.0)
        grad_mu = g_out if g_out is not None and ctx.kind == "sample" else None
        if g_kl is None or diff is None:
            grad_rho = None
            if draw_term is not None:
                grad_rho = (draw_term[0] * draw_term[1]).mul_(sig)
                if draw_term[2] != 1.0:
                    grad_rho.mul_(draw_term[2])
            return grad_mu, grad_rho, None, None, None, None
        scale = g_kl * inv_var_p
        if grad_mu is not None and scale.numel() == 1 and diff.shape == rho.shape:
            grad_mu = torch.addcmul(grad_mu, diff, scale)
        else:
            kl_mu = (diff * scale).expand(rho.shape)
            grad_mu = kl_mu if grad_mu is None else kl_mu + grad_mu
        grad_rho = _kl_grad_rho(rho, sigma, inv_var_p, g_kl, sig, ctx.safe, draw_term)
        return grad_mu, grad_rho, None, None, None, None


def _plain_draw(mu: Tensor, rho: Tensor, kind: str) -> Tensor:
    # Differentiable ops only: what torch.compile / torch.export trace and fuse.
    sigma = F.softplus(rho)
    if kind == "variance":
        return sigma.square()
    eps = noise.randn(rho.shape, rho)
    return mu + sigma * eps if kind == "sample" else sigma * eps


def posterior_draw(mu: Tensor, rho: Tensor, kind: str = "sample", prior_mu: Tensor | None = None,
                   prior_sigma: Tensor | None = None, token: KLToken | None = None
                   ) -> tuple[Tensor, Tensor | None]:
    """A draw from the posterior, fused with the Gaussian-prior KL when a prior is given.

    Args:
        mu: posterior means.
        rho: posterior scale parameters (``sigma = softplus(rho)``), same shape.
        kind: ``"sample"`` (``mu + sigma * eps``), ``"perturbation"`` (``sigma * eps``)
            or ``"variance"`` (``sigma^2``, no noise).
        prior_mu, prior_sigma: a Gaussian prior broadcastable to ``mu``; when given, the
            closed-form KL summed over weights is returned too, sharing the work.
        token: a :class:`KLToken` marked once backward has run through this draw.

    Returns:
        ``(draw, kl)`` with ``kl = None`` when no prior was given.

    Example:
        >>> w, kl = posterior_draw(mu, rho, "sample", torch.tensor(0.0), torch.tensor(1.0))
    """
    if kind not in DRAW_KINDS:
        raise ValueError(f"kind must be one of {DRAW_KINDS}, got {kind!r}")
    if torch.compiler.is_compiling():
        draw = _plain_draw(mu, rho, kind)
        kl = None if prior_sigma is None else gaussian_kl(mu, rho, prior_mu, prior_sigma)
        return draw, kl
    if prior_sigma is not None:
        prior_mu, prior_sigma = prior_mu.detach(), prior_sigma.detach()
    return _PosteriorDraw.apply(mu, rho, prior_mu, prior_sigma, kind, token)


def sample_gaussian(mu: Tensor, rho: Tensor) -> Tensor:
    """One reparameterized draw ``mu + softplus(rho) * eps`` from the posterior.

    Args:
        mu: posterior means.
        rho: posterior scale parameters, same shape as ``mu``.

    Returns:
        A sample with gradients flowing to ``mu`` and ``rho``.
    """
    return posterior_draw(mu, rho, "sample")[0]


def sample_perturbation(rho: Tensor) -> Tensor:
    """One draw of the zero-mean perturbation ``softplus(rho) * eps`` (used by flipout)."""
    return posterior_draw(rho, rho, "perturbation")[0]


class _GaussianKL(torch.autograd.Function):
    """Closed-form ``sum KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2))``, ``sigma_q = softplus(rho_q)``.

    Gradients: ``d/dmu_q = (mu_q - mu_p) / sigma_p^2`` and
    ``d/drho_q = (sigma_q / sigma_p^2 - 1 / sigma_q) * sigmoid(rho_q)``.
    The prior is fixed (no gradient), as in empirical Bayes and the reference.
    """

    @staticmethod
    def forward(ctx, mu_q: Tensor, rho_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:  # type: ignore[override]
        sigma_q = F.softplus(rho_q)
        mu_p, sigma_p = _scalar_prior(mu_p, sigma_p)
        diff = mu_q - mu_p
        ctx.safe = _log_sigma_is_safe(rho_q)
        total, inv_var_p = _kl_sum(rho_q, sigma_q, diff, sigma_p, ctx.safe)
        ctx.inv_var_p = inv_var_p if isinstance(inv_var_p, float) else None
        ctx.save_for_backward(rho_q, sigma_q, diff, None if ctx.inv_var_p is not None else inv_var_p)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rho_q, sigma_q, diff, inv_var_p = ctx.saved_tensors
        if ctx.inv_var_p is not None:
            inv_var_p = ctx.inv_var_p
        grad_mu = grad_rho = None
        if ctx.needs_input_grad[0]:
            grad_mu = diff * (grad * inv_var_p)
            if grad_mu.shape != rho_q.shape:
                grad_mu = grad_mu.expand(rho_q.shape)
        if ctx.needs_input_grad[1]:
            grad_rho = _kl_grad_rho(rho_q, sigma_q, inv_var_p, grad, torch.sigmoid(rho_q), ctx.safe)
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
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if torch.compiler.is_compiling():
        sigma_q = F.softplus(rho_q)
        elementwise = (torch.log(sigma_p) - log_softplus(rho_q)
                       + (sigma_q.square() + (mu_q - mu_p).square()) / (2 * sigma_p.square()) - 0.5)
        total = elementwise.sum()
    else:
        total = _GaussianKL.apply(mu_q, rho_q, mu_p.detach(), sigma_p.detach())
    return total if reduction == "sum" else total / mu_q.numel()


def gaussian_entropy_sum(rho: Tensor) -> Tensor:
    """Sum of the entropies of ``N(mu, softplus(rho)^2)`` (independent of ``mu``)."""
    return log_softplus(rho).sum() + rho.numel() * 0.5 * math.log(2.0 * math.pi * math.e)
