"""Functional building blocks of mean-field Gaussian variational inference.

The posterior of every Bayesian weight is ``N(mu, sigma^2)`` with ``sigma = softplus(rho)``.
Sampling and the closed-form KL are one autograd function with analytic gradients
(:func:`posterior_draws`), so each makes a few passes over weight-sized memory instead of
recording a graph of temporaries. It draws all of a layer's parameters (weight and bias)
and computes their KL in one node: they share ``softplus(rho)`` forward and the gradient
w.r.t. sigma backward, and a small layer pays the per-call overhead once. Passes over
weight-sized memory and per-call overhead are where a Bayesian training step's cost over a
deterministic one lives. Under ``torch.compile`` / ``torch.export`` the same functions run
as plain differentiable ops, which the compiler fuses itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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
    "posterior_draws",
    "PosteriorDraws",
    "KLToken",
    "DRAW_KINDS",
]

# Below this rho, softplus(rho) = exp(rho) to float precision, so log(sigma) = rho.
_LOG_SOFTPLUS_LINEAR_BELOW = -20.0
# Above this rho, softplus(rho) does not underflow in float32, so log(sigma) is finite.
_SOFTPLUS_SAFE_LOG_ABOVE = -80.0
# torch's softplus threshold: above it softplus(rho) = rho, below it log1p(exp(rho)).
_SOFTPLUS_LINEAR_ABOVE = 20.0
# From this size on, exp then log1p_ (two vectorised passes) beats F.softplus's CPU kernel.
_TWO_PASS_SOFTPLUS_FROM = 4096

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


def _host_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s values back to Python costs no device sync (CPU tensors).

    The fast paths below read a few scalars back (range checks, scalar priors, the KL's
    incoming gradient); on accelerators they take the sync-free tensor forms instead.
    """
    return t.is_cpu


def _sigma_and_safety(rho: Tensor) -> tuple[Tensor, bool]:
    """``sigma = softplus(rho)``, and whether sigma stays clear of underflow.

    On the CPU one reduction over ``rho`` answers two questions. Where every ``rho > -80``,
    sigma does not underflow, so the plain ``log`` and ``1 / sigma`` can replace their
    slower stable forms. From ``_TWO_PASS_SOFTPLUS_FROM`` weights on (where passes, not
    per-call overhead, dominate), ``aminmax`` also tells whether every ``rho <= 20``
    (torch's softplus threshold): softplus is then ``log1p(exp(rho))`` throughout, which two
    vectorised passes compute about twice as fast as ``F.softplus``'s CPU kernel.
    Elsewhere (accelerators) the answer would cost a host sync: the stable forms are used.
    """
    if not _host_readable(rho) or rho.numel() == 0:
        return F.softplus(rho), False
    if rho.numel() < _TWO_PASS_SOFTPLUS_FROM:  # per-call overhead dominates: fewest operations
        return F.softplus(rho), float(rho.min()) > _SOFTPLUS_SAFE_LOG_ABOVE
    lo, hi = torch.aminmax(rho)
    safe = float(lo) > _SOFTPLUS_SAFE_LOG_ABOVE
    if float(hi) <= _SOFTPLUS_LINEAR_ABOVE:
        return torch.exp(rho).log1p_(), safe
    return F.softplus(rho), safe


def _sum_of_squares(t: Tensor) -> Tensor:
    # A BLAS dot reads t once and writes nothing: cheaper than square() then sum().
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = t.reshape(-1)
        return torch.dot(flat, flat)
    return t.square().sum()


def _kl_sum(
    rho: Tensor, sigma: Tensor, diff: Tensor, sigma_p: Tensor | float, safe: bool, scratch: Tensor | None = None
) -> tuple[Tensor | float, Tensor | float]:
    """Closed-form KL summed over weights, and ``1 / sigma_p^2`` for the backward pass.

    ``KL = log sigma_p - log sigma_q + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2``.
    A scalar prior comes as a Python float (CPU only, see :func:`_scalar_prior`): the three
    reductions are then read back and combined in Python, at no tensor-operation cost, and
    the KL is returned as a float. ``log(sigma)`` is written into ``scratch`` (a free
    buffer of ``rho``'s shape) when one is given, sparing a weight-sized allocation.
    """
    numel = rho.numel()
    if safe:
        log_sigma = torch.log(sigma) if scratch is None else torch.log(sigma, out=scratch)
    else:
        log_sigma = log_softplus(rho)
    log_sigma_sum = log_sigma.sum()
    if isinstance(sigma_p, float):
        inv_var_p = 1.0 / (sigma_p * sigma_p)
        quad = float(_sum_of_squares(sigma)) + float(_sum_of_squares(diff))
        return 0.5 * inv_var_p * quad - float(log_sigma_sum) + numel * (math.log(sigma_p) - 0.5), inv_var_p
    inv_var_p_t = sigma_p.square().reciprocal_()
    quad_t = torch.addcmul(sigma.square(), diff, diff)
    total = quad_t.mul_(inv_var_p_t).sum() * 0.5 + torch.log(sigma_p).expand(rho.shape).sum() - 0.5 * numel
    return total - log_sigma_sum, inv_var_p_t


def _scalar_prior(mu_p: Tensor, sigma_p: Tensor) -> tuple[Tensor | float, Tensor | float]:
    # CPU scalar priors (the default and the reference's) become Python floats.
    if sigma_p.numel() == 1 and mu_p.numel() == 1 and _host_readable(sigma_p):
        return float(mu_p), float(sigma_p)
    return mu_p, sigma_p


def _as_vector(values: list[Tensor | float], like: Tensor) -> Tensor:
    """The scalars ``values`` (floats and/or 0-d tensors) as one vector with ``like``'s dtype and device."""
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    return torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in values])


def _kl_grad_sigma(t: Tensor | None, sigma: Tensor, inv_var_p: Tensor | float, g: Tensor | float) -> Tensor:
    """``t + g * dKL/dsigma = t + g * (sigma / sigma_p^2 - 1 / sigma)`` in two passes (``t`` may be None)."""
    scale = g * inv_var_p
    if t is None:
        t = sigma * scale
    elif isinstance(scale, float):
        t.add_(sigma, alpha=scale)
    else:
        t.addcmul_(sigma, scale)
    # -g / sigma without a reciprocal temporary: addcdiv with a broadcast numerator.
    if isinstance(g, float):
        return t.addcdiv_(sigma.new_ones(()), sigma, value=-g)
    return t.addcdiv_(g, sigma, value=-1.0)


def _softplus_grad(t: Tensor, rho: Tensor) -> Tensor:
    """``t * dsoftplus/drho = t * sigmoid(rho)`` in one pass (torch's own softplus backward)."""
    return torch.ops.aten.softplus_backward(t, rho, 1.0, _SOFTPLUS_LINEAR_ABOVE)


def _stable_kl_grad_rho(rho: Tensor, sigma: Tensor, inv_var_p: Tensor | float, g: Tensor | float) -> Tensor:
    """``g * dKL/drho = g * (sigma / sigma_p^2 - 1 / sigma) * sigmoid(rho)`` where sigma may underflow."""
    sig = torch.sigmoid(rho)
    # sigmoid(rho) / softplus(rho) -> 1 as rho -> -inf, where 1/sigma alone overflows.
    ratio = torch.exp(F.logsigmoid(rho) - log_softplus(rho))
    return (sigma * sig).mul_(g * inv_var_p).sub_(ratio.mul_(g))


def _kl_grad_mu(
    diff: Tensor, inv_var_p: Tensor | float, g: Tensor | float, shape: torch.Size, grad_mu: Tensor | None
) -> Tensor:
    """``grad_mu + g * dKL/dmu = grad_mu + g * (mu - mu_p) / sigma_p^2`` (``grad_mu`` may be None)."""
    scale = g * inv_var_p
    if grad_mu is not None and diff.shape == shape:
        if isinstance(scale, float):
            return torch.add(grad_mu, diff, alpha=scale)
        if scale.numel() == 1:
            return torch.addcmul(grad_mu, diff, scale)
    kl_mu = (diff * scale).expand(shape)
    return kl_mu if grad_mu is None else kl_mu + grad_mu


def _kl_grad_scales(g_total: Tensor | None, g_parts: Tensor | None, k: int) -> list[Tensor | float | None]:
    """Each of ``k`` parameters' KL gradient ``g_total + g_parts[i]`` (None when neither was used).

    On the CPU the scalars are read back as floats, so that they scale tensors for free.
    """
    first = g_total if g_total is not None else g_parts
    if first is None:
        return [None] * k
    if _host_readable(first):
        base = 0.0 if g_total is None else float(g_total)
        return [base] * k if g_parts is None else [base + v for v in g_parts.tolist()]
    if g_parts is None:
        return [g_total] * k
    return [g_parts[i] if g_total is None else g_total + g_parts[i] for i in range(k)]


class KLToken:
    """Marks whether the KL of one :func:`posterior_draws` call has been back-propagated.

    A layer caches the KL computed with its forward draws; once backward has run through
    them, their saved tensors are gone and the cached KL must not be reused.
    """

    __slots__ = ("consumed",)

    def __init__(self) -> None:
        self.consumed = False


class _PosteriorDraw(torch.autograd.Function):
    """Draws from ``N(mu_i, softplus(rho_i)^2)`` of several parameters (see :data:`DRAW_KINDS`)
    and, optionally, their KL terms, as ONE autograd node.

    A layer's weight and bias go through one call: one node forward and backward instead of
    two. Inputs are ``kind, token, priors, mu_0, rho_0, mu_1, rho_1, ...``; outputs are the
    draws, then (with priors) the total KL and the vector of per-parameter KL terms.
    ``kind=None`` draws nothing: the KL alone (what :func:`gaussian_kl` computes).

    With ``with_means``, the means ``mu_i`` are returned too, after the draws: an estimator
    that also computes ``op(x, mu)`` (flipout, local) then gets the gradient of that use
    here, and the KL's gradient ``(mu - mu_p) / sigma_p^2`` is added to it in the same
    pass, instead of autograd summing two weight-sized gradients for ``mu``.

    Backward, per parameter, with ``g_kl = g_total + g_parts[i]``: the gradient w.r.t.
    sigma, ``t = g_out * eps`` [sample, perturbation] or ``2 sigma g_out`` [variance]
    ``+ g_kl (sigma / sigma_p^2 - 1 / sigma)``, is built in place in at most three passes,
    and one more turns it into ``dL/drho = t * sigmoid(rho)``;
    ``dL/dmu = g_out [sample] + g_kl (mu - mu_p) / sigma_p^2``.
    """

    @staticmethod
    def forward(
        ctx,
        kind: str | None,
        token: KLToken | None,
        priors: tuple[tuple[Tensor, Tensor], ...] | None,
        with_means: bool,
        *mu_rho: Tensor,
    ) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.kind, ctx.token, ctx.with_means = kind, token, with_means
        draws, kls, saved, meta = [], [], [], []
        for i in range(len(mu_rho) // 2):
            mu, rho = mu_rho[2 * i], mu_rho[2 * i + 1]
            sigma, safe = _sigma_and_safety(rho)  # a fresh tensor of ours
            # The noise's buffer serves first as the KL's scratch for log(sigma).
            eps = None if kind in (None, "variance") else torch.empty_like(rho)
            diff = inv_var_p = None
            if priors is not None:
                mu_p, sigma_p = _scalar_prior(*priors[i])
                # The default prior mean is a scalar 0: then mu itself is the difference.
                diff = mu if isinstance(mu_p, float) and mu_p == 0.0 else mu - mu_p
                kl, inv_var_p = _kl_sum(rho, sigma, diff, sigma_p, safe, eps)
                kls.append(kl)
            if kind == "variance":
                draws.append(sigma.square())
            elif eps is not None:
                noise.normal_(eps)
                draws.append(torch.addcmul(mu, sigma, eps) if kind == "sample" else sigma * eps)
            # With noise, a float prior and no underflow, backward needs sigma only in
            # dKL/dsigma = (sigma - sigma_p^2 / sigma) / sigma_p^2: sigma's buffer turns into
            # that numerator now, in one pass, saving backward a pass and a temporary.
            folded = eps is not None and safe and isinstance(inv_var_p, float)
            if folded and isinstance(inv_var_p, float):
                sigma.addcdiv_(sigma.new_ones(()), sigma, value=-1.0 / inv_var_p)
            # Float constants stay on ctx; tensors go through save_for_backward.
            meta.append((safe, inv_var_p if isinstance(inv_var_p, float) else None, folded))
            saved += [rho, sigma, eps, diff, None if isinstance(inv_var_p, float) else inv_var_p]
        ctx.meta = meta
        ctx.save_for_backward(*saved)
        if with_means:  # the means themselves, their gradient routed through this node
            draws += mu_rho[0::2]
        if priors is None:
            return tuple(draws)
        parts = _as_vector(kls, mu_rho[1])
        total = (
            torch.tensor(math.fsum(kls), dtype=parts.dtype) if all(isinstance(v, float) for v in kls) else parts.sum()
        )
        return (*draws, total, parts)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        if ctx.token is not None:
            ctx.token.consumed = True
        k = len(ctx.meta)
        num_draws = 0 if ctx.kind is None else k
        num_out = num_draws + (k if ctx.with_means else 0)
        g_kls = _kl_grad_scales(grads[num_out], grads[num_out + 1], k) if len(grads) > num_out else [None] * k
        saved = ctx.saved_tensors
        out: list[Tensor | None] = [None, None, None, None]
        for i, (safe, inv_var_float, folded) in enumerate(ctx.meta):
            rho, sigma, eps, diff, inv_var_p = saved[5 * i : 5 * i + 5]
            g_out, g_mean = grads[i] if i < num_draws else None, grads[num_draws + i] if ctx.with_means else None
            if folded:  # a float prior on the CPU: the KL's incoming gradient is a float too
                g_kl = g_kls[i]
                assert inv_var_float is not None and not isinstance(g_kl, Tensor)
                out += _folded_param_grads(ctx.kind, rho, sigma, eps, diff, inv_var_float, g_out, g_kl, g_mean)
                continue
            out += _param_grads(
                ctx.kind,
                rho,
                sigma,
                eps,
                diff,
                inv_var_float if inv_var_float is not None else inv_var_p,
                safe,
                g_out,
                g_kls[i],
                g_mean,
            )
        return tuple(out)


def _folded_param_grads(
    kind: str,
    rho: Tensor,
    kl_numerator: Tensor,
    eps: Tensor,
    diff: Tensor,
    inv_var_p: float,
    g_out: Tensor | None,
    g_kl: float | None,
    g_mean: Tensor | None,
) -> list[Tensor | None]:
    """``[dL/dmu, dL/drho]`` of one noisy parameter whose sigma was folded into
    ``kl_numerator = sigma - sigma_p^2 / sigma`` (see :class:`_PosteriorDraw`): in three
    passes, ``dL/drho = sigmoid(rho) (eps g_out + g_kl kl_numerator / sigma_p^2)``,
    written into the one tensor allocated."""
    grad_mu = g_out if kind == "sample" else None
    if g_mean is not None:
        grad_mu = g_mean if grad_mu is None else grad_mu + g_mean
    if g_kl is not None:
        grad_mu = _kl_grad_mu(diff, inv_var_p, g_kl, rho.shape, grad_mu)
    if g_out is None and g_kl is None:
        return [grad_mu, None]
    if g_out is None:
        assert g_kl is not None
        t = kl_numerator * (g_kl * inv_var_p)
    else:
        t = eps * g_out
        if g_kl is not None:
            t.add_(kl_numerator, alpha=g_kl * inv_var_p)
    return [grad_mu, torch.ops.aten.softplus_backward.grad_input(t, rho, 1.0, _SOFTPLUS_LINEAR_ABOVE, grad_input=t)]


def _param_grads(
    kind: str | None,
    rho: Tensor,
    sigma: Tensor,
    eps: Tensor | None,
    diff: Tensor | None,
    inv_var_p: Tensor | float | None,
    safe: bool,
    g_out: Tensor | None,
    g_kl: Tensor | float | None,
    g_mean: Tensor | None,
) -> list[Tensor | None]:
    """``[dL/dmu, dL/drho]`` of one parameter of :class:`_PosteriorDraw` (``g_mean``: the
    gradient of the mean output, if requested)."""
    grad_mu = g_out if g_out is not None and kind == "sample" else None
    if g_mean is not None:
        grad_mu = g_mean if grad_mu is None else grad_mu + g_mean
    # t = dL/dsigma from the draw: eps * g_out, or 2 sigma g_out for sigma^2.
    # (2 sigma g_out in one pass: addcmul onto a broadcast zero.)
    t = (
        None
        if g_out is None
        else eps * g_out
        if eps is not None
        else torch.addcmul(sigma.new_zeros(()), sigma, g_out, value=2.0)
    )
    if g_kl is None or diff is None or inv_var_p is None:
        return [grad_mu, None if t is None else _softplus_grad(t, rho)]
    grad_mu = _kl_grad_mu(diff, inv_var_p, g_kl, rho.shape, grad_mu)
    if not safe:
        grad_rho = _stable_kl_grad_rho(rho, sigma, inv_var_p, g_kl)
        return [grad_mu, grad_rho if t is None else grad_rho.add_(_softplus_grad(t, rho))]
    return [grad_mu, _softplus_grad(_kl_grad_sigma(t, sigma, inv_var_p, g_kl), rho)]


def _plain_draw(mu: Tensor, rho: Tensor, kind: str) -> Tensor:
    # Differentiable ops only: what torch.compile / torch.export trace and fuse.
    sigma = F.softplus(rho)
    if kind == "variance":
        return sigma.square()
    eps = noise.randn(rho.shape, rho)
    return mu + sigma * eps if kind == "sample" else sigma * eps


class PosteriorDraws(NamedTuple):
    """What :func:`posterior_draws` returns."""

    #: one draw per parameter (see :data:`DRAW_KINDS`)
    draws: list[Tensor]
    #: the means ``mu`` (with ``with_means=True``, else None), differentiable through the same node
    means: list[Tensor] | None
    #: the KL summed over every weight (None without priors)
    kl: Tensor | None
    #: the vector of each parameter's KL (None without priors)
    kl_parts: Tensor | None


def posterior_draws(
    params: Sequence[tuple[Tensor, Tensor]],
    kind: str = "sample",
    priors: Sequence[tuple[Tensor, Tensor]] | None = None,
    token: KLToken | None = None,
    with_means: bool = False,
) -> PosteriorDraws:
    """Posterior draws of several parameters in one autograd node, fused with their KL.

    Args:
        params: ``(mu, rho)`` pairs (``sigma = softplus(rho)``), e.g. a layer's weight and bias.
        kind: ``"sample"`` (``mu + sigma * eps``), ``"perturbation"`` (``sigma * eps``)
            or ``"variance"`` (``sigma^2``, no noise).
        priors: one Gaussian prior ``(prior_mu, prior_sigma)`` per parameter, each
            broadcastable to its ``mu``; when given, the closed-form KL is returned too,
            sharing the work. The prior gets no gradient.
        token: a :class:`KLToken` marked once backward has run through these draws.
        with_means: also return the means, for estimators that use them next to the
            draws (flipout and local use ``op(x, mu)``): their gradient then joins the
            KL's in one pass.

    Returns:
        A :class:`PosteriorDraws` ``(draws, means, kl, kl_parts)``.

    Example:
        >>> prior = (torch.tensor(0.0), torch.tensor(1.0))
        >>> (w, b), _, kl, parts = posterior_draws([(w_mu, w_rho), (b_mu, b_rho)], "sample", [prior, prior])
    """
    if kind not in DRAW_KINDS:
        raise ValueError(f"kind must be one of {DRAW_KINDS}, got {kind!r}")
    if priors is not None and len(priors) != len(params):
        raise ValueError(
            f"priors must have one (prior_mu, prior_sigma) per parameter: "
            f"got {len(priors)} for {len(params)} parameters"
        )
    k = len(params)
    if torch.compiler.is_compiling():
        draws = [_plain_draw(mu, rho, kind) for mu, rho in params]
        means = [mu for mu, _ in params] if with_means else None
        if priors is None:
            return PosteriorDraws(draws, means, None, None)
        parts = torch.stack([gaussian_kl(mu, rho, mu_p, sigma_p) for (mu, rho), (mu_p, sigma_p) in zip(params, priors)])
        return PosteriorDraws(draws, means, parts.sum(), parts)
    flat = [t for pair in params for t in pair]
    detached = None if priors is None else tuple((mu_p.detach(), sigma_p.detach()) for mu_p, sigma_p in priors)
    out = _PosteriorDraw.apply(kind, token, detached, with_means, *flat)
    means = list(out[k : 2 * k]) if with_means else None
    if priors is None:
        return PosteriorDraws(list(out[:k]), means, None, None)
    return PosteriorDraws(list(out[:k]), means, out[-2], out[-1])


def posterior_draw(
    mu: Tensor,
    rho: Tensor,
    kind: str = "sample",
    prior_mu: Tensor | None = None,
    prior_sigma: Tensor | None = None,
    token: KLToken | None = None,
) -> tuple[Tensor, Tensor | None]:
    """A draw from the posterior of one parameter, fused with the Gaussian-prior KL when a prior is given.

    Args:
        mu: posterior means.
        rho: posterior scale parameters (``sigma = softplus(rho)``), same shape.
        kind: ``"sample"``, ``"perturbation"`` or ``"variance"``, see :func:`posterior_draws`.
        prior_mu: mean of a Gaussian prior broadcastable to ``mu``; when given (with
            ``prior_sigma``), the closed-form KL summed over weights is returned too,
            sharing the work.
        prior_sigma: that prior's standard deviation.
        token: a :class:`KLToken` marked once backward has run through this draw.

    Returns:
        ``(draw, kl)`` with ``kl = None`` when no prior was given.

    Example:
        >>> w, kl = posterior_draw(mu, rho, "sample", torch.tensor(0.0), torch.tensor(1.0))
    """
    priors = None if prior_mu is None or prior_sigma is None else [(prior_mu, prior_sigma)]
    result = posterior_draws([(mu, rho)], kind, priors, token)
    return result.draws[0], result.kl


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


def gaussian_kl(mu_q: Tensor, rho_q: Tensor, mu_p: Tensor, sigma_p: Tensor, reduction: str = "sum") -> Tensor:
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
        elementwise = (
            torch.log(sigma_p)
            - log_softplus(rho_q)
            + (sigma_q.square() + (mu_q - mu_p).square()) / (2 * sigma_p.square())
            - 0.5
        )
        total = elementwise.sum()
    else:
        total = _PosteriorDraw.apply(None, None, ((mu_p.detach(), sigma_p.detach()),), False, mu_q, rho_q)[0]
    return total if reduction == "sum" else total / mu_q.numel()


def gaussian_entropy_sum(rho: Tensor) -> Tensor:
    """Sum of the entropies of ``N(mu, softplus(rho)^2)`` (independent of ``mu``)."""
    return log_softplus(rho).sum() + rho.numel() * 0.5 * math.log(2.0 * math.pi * math.e)
