"""The KL term of a whole model and the evidence lower bound (ELBO).

For a data set of ``N`` examples and a minibatch ``B`` of it, the negative ELBO per
example, whose minimisation is variational inference, is estimated without bias by::

    loss = mean_{i in B} NLL(y_i | x_i, w) + KL(q || p) / N,     w ~ q

(Blundell et al., 2015). ``KL`` is the SUM over every weight of the model. Dividing the
KL by the batch size instead of ``N``, or averaging it per weight (what
Bayesian-Torch's ``get_kl_loss`` returns), changes the objective and the posterior.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchbayes.nn.base import BayesianModule, iter_bayesian_modules

__all__ = ["kl_divergence", "get_kl_loss", "elbo_loss", "regression_elbo_loss"]

REGRESSION_OBJECTIVES = ("mc", "moments")


def _bayesian_modules(model: nn.Module, caller: str) -> list[BayesianModule]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    return [m for _, m in iter_bayesian_modules(model)]


def kl_divergence(model: nn.Module) -> Tensor:
    """``KL(q || p)`` summed over every weight of every Bayesian module in ``model``.

    Args:
        model: any module; modules that are not Bayesian contribute nothing.

    Returns:
        A scalar tensor (``0.`` for a model without Bayesian modules), differentiable in
        the posterior parameters.

    Example:
        >>> loss = F.cross_entropy(model(x), y) + kl_divergence(model) / len(train_set)
    """
    modules = _bayesian_modules(model, "kl_divergence")
    if not modules:
        return torch.zeros(())
    return torch.stack([m.kl_divergence("sum") for m in modules]).sum()


def get_kl_loss(model: nn.Module) -> Tensor | None:
    """Bayesian-Torch's ``get_kl_loss``, reproduced exactly for compatibility.

    The reference averages the KL over each weight tensor and sums these means over
    tensors. That number is NOT the KL of the ELBO (it ignores how many weights each
    tensor has); use :func:`kl_divergence` for training. Kept so that code ported from
    Bayesian-Torch computes the same loss.

    Args:
        model: any module.

    Returns:
        A scalar tensor, or ``None`` when the model has no Bayesian modules (as the
        reference returns).
    """
    modules = _bayesian_modules(model, "get_kl_loss")
    if not modules:
        return None
    return torch.stack([m.kl_divergence("mean") for m in modules]).sum()


def elbo_loss(nll: Tensor, model: nn.Module, num_data: int, *, kl_weight: float = 1.0) -> Tensor:
    """Negative ELBO per training example: ``nll + kl_weight * KL(model) / num_data``.

    Args:
        nll: the minibatch's MEAN negative log-likelihood (e.g. ``F.cross_entropy(out, y)``).
        model: the Bayesian model whose KL enters the bound.
        num_data: number of examples in the whole training set (not the batch).
        kl_weight: multiplier on the KL (1.0 is the ELBO; < 1 "tempers" the posterior,
            e.g. for KL warm-up).

    Returns:
        A scalar loss to minimise.

    Example:
        >>> loss = elbo_loss(F.cross_entropy(model(x), y), model, num_data=60_000)
        >>> loss.backward()
    """
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data must be a positive int (training-set size), got {num_data!r}")
    if not isinstance(nll, Tensor) or nll.dim() != 0:
        raise ValueError("nll must be a scalar tensor (the minibatch's mean negative log-likelihood)")
    kl = kl_divergence(model).to(nll.device)
    return nll + kl_weight * kl / num_data


def regression_elbo_loss(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    num_data: int,
    *,
    method: str = "mc",
    kl_weight: float = 1.0,
) -> Tensor:
    """Negative ELBO per example of a model ending in a Gaussian head (`torchbayes.nn.likelihoods`).

    The expected negative log-likelihood term is estimated in one of two ways; the KL
    term and the scaling are `elbo_loss`'s:

    - ``"mc"``: one forward pass of ``model`` (its Bayesian layers sample weights, as in
      training), scored by the head's Gaussian log-likelihood;
    - ``"moments"``: sampling-free, in closed form from the propagated mean and variance
      of the head's input (`torchbayes.prediction.moments.expected_log_likelihood`;
      Wu et al. 2019). No gradient noise from weight draws; the model runs in eval mode.

    Args:
        model: a network whose last module is a Gaussian head.
        x: the minibatch's inputs ``(B, ...)``.
        target: its targets ``(B, D)`` (``(B,)`` when ``D = 1``).
        num_data: the training set's size.
        method: ``"mc"`` or ``"moments"``.
        kl_weight: multiplier on the KL term.

    Returns:
        A scalar loss to minimise.

    Example:
        >>> loss = regression_elbo_loss(model, x, y, num_data=len(train_x), method="moments")
        >>> loss.backward()
    """
    from torchbayes.nn.likelihoods import find_likelihood
    from torchbayes.prediction.moments import expected_log_likelihood

    if method not in REGRESSION_OBJECTIVES:
        raise ValueError(f"method must be one of {REGRESSION_OBJECTIVES}, got {method!r}")
    head = find_likelihood(model) if isinstance(model, nn.Module) else None
    if head is None:
        raise ValueError(
            "regression_elbo_loss needs a model ending in a Gaussian head "
            "(torchbayes.nn.HomoscedasticGaussian or HeteroscedasticGaussian)"
        )
    if method == "moments":
        nll = -expected_log_likelihood(model, x, target).mean()
    else:
        out = model(x)
        nll = head.nll(out[0] if isinstance(out, tuple) else out, target)
    return elbo_loss(nll, model, num_data, kl_weight=kl_weight)
