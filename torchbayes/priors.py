"""Priors over the weights of Bayesian layers.

A prior is a small ``nn.Module`` attached to each variational parameter of a layer
(``layer.weight_prior``, ``layer.bias_prior``), so per-weight priors such as MOPED's
empirical-Bayes means travel with ``state_dict()`` and checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.nn import functional as BF

__all__ = ["Prior", "GaussianPrior", "ScaleMixturePrior", "check_prior_sigma", "smallest_prior_sigma"]


def smallest_prior_sigma(dtype: torch.dtype = torch.float32) -> float:
    """The smallest prior standard deviation accepted for tensors of ``dtype``.

    The Gaussian KL has the term ``(sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2)`` per
    weight. Keeping ``1 / sigma_p^2`` below the square root of the largest float leaves
    the other square root as headroom for the numerator and the sum over weights, so the
    KL and its gradients stay finite: ``sigma_p >= max ** -0.25`` (about ``2.3e-10`` in
    float32, ``8.6e-78`` in float64; half precisions use the float32 bound, as the KL
    is not meant to be summed in them).

    Args:
        dtype: a floating dtype.

    Returns:
        The bound, a float.
    """
    return float(torch.finfo(torch.promote_types(dtype, torch.float32)).max) ** -0.25


def check_prior_sigma(sigma: Tensor, name: str = "prior_sigma") -> None:
    """Raise ``ValueError`` unless every value of ``sigma`` is finite and at least
    :func:`smallest_prior_sigma` of its dtype (tensors on the meta device are not checked).

    Args:
        sigma: prior standard deviations.
        name: what to call them in the message.
    """
    if sigma.is_meta:
        return
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError(f"{name} must be finite, got non-finite values")
    low = smallest_prior_sigma(sigma.dtype)
    smallest = float(sigma.min()) if sigma.numel() else low
    if not smallest >= low:
        raise ValueError(
            f"{name} must be >= {low:.3g} in {str(sigma.dtype).removeprefix('torch.')} "
            f"(the KL term 1/(2 sigma^2) would overflow), got {smallest:g}"
        )


def _as_tensor(value: float | Tensor, name: str) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a Tensor, got {type(value).__name__}")
    # A float is made on the CPU even under a `with torch.device("meta")` block: it is
    # checked here and moved to the layer's device by register_variational.
    t = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(float(value), device="cpu")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if not t.is_meta and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got non-finite values")
    return t


class Prior(nn.Module):
    """Base class of weight priors: subclasses give the KL from a Gaussian posterior."""

    def kl_divergence(self, mu: Tensor, rho: Tensor, reduction: str = "sum") -> Tensor:
        """``KL(q || p)`` for ``q = N(mu, softplus(rho)^2)`` (independent per weight).

        Args:
            mu: posterior means.
            rho: posterior scale parameters.
            reduction: ``"sum"`` over weights, or ``"mean"`` per weight.

        Returns:
            A scalar tensor, differentiable in ``mu`` and ``rho``.
        """
        raise NotImplementedError

    def check_shape(self, shape: torch.Size, name: str) -> None:
        """Raise ``ValueError`` unless this prior broadcasts to a parameter of ``shape``."""


class GaussianPrior(Prior):
    """Independent Gaussian prior ``N(mu, sigma^2)``; its KL is exact (closed form).

    Args:
        mu: prior mean, a float or a tensor broadcastable to the parameter's shape
            (a per-weight tensor is what MOPED / empirical Bayes uses).
        sigma: prior standard deviation (> 0), float or broadcastable tensor.

    Example:
        >>> prior = GaussianPrior(0.0, 0.1)
        >>> prior.kl_divergence(torch.zeros(10), torch.full((10,), -3.0))
    """

    mu: Tensor
    sigma: Tensor

    def __init__(self, mu: float | Tensor = 0.0, sigma: float | Tensor = 1.0) -> None:
        super().__init__()
        mu_t = _as_tensor(mu, "prior_mu")
        sigma_t = _as_tensor(sigma, "prior_sigma")
        if not sigma_t.is_meta and not bool((sigma_t > 0).all()):
            raise ValueError(f"prior_sigma must be > 0, got min {float(sigma_t.min()):g}")
        check_prior_sigma(sigma_t)
        self.register_buffer("mu", mu_t)
        self.register_buffer("sigma", sigma_t.to(mu_t.dtype))
        # Per-weight priors may replace scalar ones (MOPED): let a checkpoint set the shape.
        self._register_load_state_dict_pre_hook(self._adopt_checkpoint_shapes)

    def _adopt_checkpoint_shapes(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("mu", "sigma"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, Tensor) and incoming.shape != current.shape:
                setattr(self, name, torch.empty_like(current).resize_(incoming.shape))

    def check_shape(self, shape: torch.Size, name: str) -> None:
        for attr in ("mu", "sigma"):
            t = getattr(self, attr)
            try:
                torch.broadcast_shapes(t.shape, shape)
            except RuntimeError:
                raise ValueError(
                    f"prior_{attr} of shape {tuple(t.shape)} does not broadcast to "
                    f"{name} of shape {tuple(shape)}; give a float, or set a per-parameter "
                    f"prior with layer.set_prior({name!r}, GaussianPrior(...))"
                ) from None
            if torch.broadcast_shapes(t.shape, shape) != shape:
                raise ValueError(f"prior_{attr} of shape {tuple(t.shape)} is larger than {name} {tuple(shape)}")

    def kl_divergence(self, mu: Tensor, rho: Tensor, reduction: str = "sum") -> Tensor:
        return BF.gaussian_kl(mu, rho, self.mu, self.sigma, reduction)

    def log_prob(self, w: Tensor) -> Tensor:
        """Elementwise log density of ``w``."""
        z = (w - self.mu) / self.sigma
        return -0.5 * z * z - torch.log(self.sigma) - 0.5 * math.log(2 * math.pi)

    def extra_repr(self) -> str:
        def show(t: Tensor) -> str:
            if t.is_meta:  # no values to show on the meta device
                return f"Tensor{tuple(t.shape)}(meta)"
            return f"{t.item():g}" if t.numel() == 1 else f"Tensor{tuple(t.shape)}"

        return f"mu={show(self.mu)}, sigma={show(self.sigma)}"


class ScaleMixturePrior(Prior):
    """Scale mixture of two zero-mean Gaussians (Blundell et al., 2015).

    ``p(w) = pi * N(w; 0, sigma1^2) + (1 - pi) * N(w; 0, sigma2^2)``. The KL from a
    Gaussian posterior has no closed form; it is estimated without bias as
    ``-H(q) - log p(w)`` with ``w ~ q`` reparameterized: the posterior's entropy is exact
    and only the cross-entropy term is sampled, which lowers the estimator's variance.

    Args:
        pi: mixture weight of the first component, in (0, 1).
        sigma1: standard deviation of the first (wide) component, > 0.
        sigma2: standard deviation of the second (narrow) component, > 0.
        num_samples: Monte Carlo draws per KL estimate.

    Example:
        >>> layer = BayesLinear(4, 2, prior=ScaleMixturePrior(0.5, 1.0, math.exp(-6)))
    """

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = 0.0025, num_samples: int = 1) -> None:
        super().__init__()
        if not 0.0 < pi < 1.0:
            raise ValueError(f"pi must be in (0, 1), got {pi}")
        for name, value in (("sigma1", sigma1), ("sigma2", sigma2)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
            check_prior_sigma(torch.tensor(float(value), device="cpu"), name)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.pi, self.sigma1, self.sigma2 = float(pi), float(sigma1), float(sigma2)
        self.num_samples = int(num_samples)

    def log_prob(self, w: Tensor) -> Tensor:
        """Elementwise log density of ``w`` under the mixture."""
        comps = []
        for weight, sigma in ((self.pi, self.sigma1), (1.0 - self.pi, self.sigma2)):
            comps.append(math.log(weight) - 0.5 * (w / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi))
        return torch.logaddexp(comps[0], comps[1])

    def kl_divergence(self, mu: Tensor, rho: Tensor, reduction: str = "sum") -> Tensor:
        cross_entropy = (
            sum(-self.log_prob(BF.sample_gaussian(mu, rho)).sum() for _ in range(self.num_samples)) / self.num_samples
        )
        total = cross_entropy - BF.gaussian_entropy_sum(rho)
        if reduction == "sum":
            return total
        if reduction == "mean":
            return total / mu.numel()
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

    def extra_repr(self) -> str:
        return f"pi={self.pi:g}, sigma1={self.sigma1:g}, sigma2={self.sigma2:g}"
