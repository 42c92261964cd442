"""IVON's posterior as torchbayes Bayesian layers, and back.

:func:`ivon_to_bnn` turns a network trained by :class:`~torchbayes.optim.IVON` into a model
of Bayesian layers (``BayesLinear``, ``BayesConv*``, ``BayesConvTranspose*``, ``BayesLSTM``,
``BayesGRU``: everything `torchbayes.dnn_to_bnn` converts) whose posterior is the
optimizer's: mean = the weight, ``sigma = 1 / sqrt(ess * (h + weight_decay))``. The result
is an ordinary torchbayes model, so `torchbayes.predict` (vectorized Monte Carlo with the
deterministic prefix run once, ``method="moments"``), checkpoints, reports, INT8 and export
all take it.

Parameters of modules without a Bayesian twin (BatchNorm, LayerNorm, embeddings, a bare
``nn.Parameter``) keep their posterior MEAN: the converted model samples only the weights
of its Bayesian layers. IVON learned a variance for those parameters too; it is dropped
(their share of the predictive spread is usually small: normalisation layers have few
parameters). ``optimizer.sampled_params()`` samples them as well, if that matters.

:func:`bnn_to_ivon` goes back: the posterior means become the weights of a plain network
and each posterior standard deviation sets the optimizer's Hessian, so a Bayesian model
(converted from IVON or trained by the ELBO) can be fine-tuned with IVON.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.conversion import Selector, bnn_to_dnn, conversion_history, dnn_to_bnn
from torchbayes.nn import functional as BF
from torchbayes.nn.base import BayesianModule
from torchbayes.optim.ivon import IVON
from torchbayes.priors import GaussianPrior

__all__ = ["bnn_to_ivon", "ivon_to_bnn"]


def _qualified(layer: str, name: str) -> str:
    return f"{layer}.{name}" if layer else name


def ivon_to_bnn(
    model: nn.Module,
    optimizer: IVON,
    *,
    estimator: str = "reparameterization",
    prior_sigma: float | None = None,
    include: Selector = None,
    exclude: Selector = None,
) -> nn.Module:
    """A Bayesian copy of ``model`` whose posterior is the one ``optimizer`` learned.

    Every layer that `torchbayes.dnn_to_bnn` converts becomes its Bayesian twin with
    posterior ``N(w, sigma^2)``, ``w`` the trained weight and ``sigma`` the optimizer's
    `IVON.posterior_std`. Other parameters (BatchNorm, LayerNorm, embeddings...) keep
    their values, the posterior means, and are not sampled. Call it outside any
    ``sampled_params`` block (the parameters must hold the means).

    Args:
        model: the trained network; not modified.
        optimizer: the `IVON` that trained it; every parameter of a layer to convert
            must be one of its parameters.
        estimator: the Monte Carlo estimator of the Bayesian layers (``"reparameterization"``,
            ``"flipout"`` or ``"local"``): how they sample if trained further by the ELBO.
        prior_sigma: the prior standard deviation of every weight (for the KL, e.g. to
            fine-tune by the ELBO); ``None``: IVON's own prior ``N(0, 1 / (ess *
            weight_decay))`` of each parameter's group (1.0 where ``weight_decay`` is 0).
        include: as in `torchbayes.dnn_to_bnn`: the layers that may be converted.
        exclude: as in `torchbayes.dnn_to_bnn`: layers left deterministic (at their mean).

    Returns:
        A new model (a deep copy, with Bayesian layers; its `torchbayes.conversion_history`
        names them).

    Raises:
        TypeError: ``optimizer`` is not an `IVON` or ``model`` not a module.
        ValueError: a parameter of a layer to convert is not the optimizer's, or the
            optimizer is inside a ``sampled_params`` block.

    Example:
        >>> bayes = ivon_to_bnn(model, optimizer)
        >>> prediction = torchbayes.predict(bayes, x, num_samples=32)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ivon_to_bnn: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, IVON):
        raise TypeError(f"ivon_to_bnn: optimizer must be a torchbayes.optim.IVON, got {type(optimizer).__name__}")
    if optimizer._inside:
        raise ValueError("ivon_to_bnn: the optimizer is inside a sampled_params block (the weights are a sample)")
    if prior_sigma is not None and (
        isinstance(prior_sigma, bool)
        or not isinstance(prior_sigma, (int, float))
        or not math.isfinite(prior_sigma)
        or prior_sigma <= 0
    ):
        raise ValueError(f"ivon_to_bnn: prior_sigma must be a positive finite float or None, got {prior_sigma!r}")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    stds: dict[str, Tensor] = {}
    priors: dict[str, float] = {}
    for name, p in model.named_parameters():
        if id(p) in owned:
            stds[name] = optimizer.posterior_std(p)
            group = optimizer._group_of(p)
            wd = group["weight_decay"]
            priors[name] = (
                prior_sigma if prior_sigma is not None else (1.0 / math.sqrt(group["ess"] * wd) if wd > 0 else 1.0)
            )
    bayes = dnn_to_bnn(
        copy.deepcopy(model),
        estimator=estimator,
        moped=False,
        posterior_mu_init=0.0,
        prior_mu=0.0,
        prior_sigma=1.0,
        include=include,
        exclude=exclude,
    )
    converted = conversion_history(bayes)[-1].converted
    layers = {name: bayes.get_submodule(name) for name in converted}
    missing = [
        _qualified(name, v)
        for name, layer in layers.items()
        if isinstance(layer, BayesianModule)
        for v in layer.variational_names
        if _qualified(name, v) not in stds
    ]
    if missing:
        raise ValueError(f"ivon_to_bnn: parameters {missing} are not the optimizer's (exclude their layers)")
    with torch.no_grad():
        for layer_name, layer in layers.items():
            assert isinstance(layer, BayesianModule)
            for name, _, rho, _ in layer.variational_parameters():
                key = _qualified(layer_name, name)
                rho.copy_(BF.inverse_softplus(stds[key].to(rho)))
                layer.set_prior(name, GaussianPrior(0.0, priors[key]))
    return bayes


def bnn_to_ivon(model: nn.Module, lr: float, ess: float, **ivon_kwargs: Any) -> tuple[nn.Module, IVON]:
    """A plain network and an `IVON` that continue from a Bayesian model's posterior.

    The network is `torchbayes.bnn_to_dnn` of ``model`` (weights = posterior means); the
    optimizer's Hessian is set so that its posterior standard deviations are the layers'
    ``softplus(rho)`` (see `IVON.set_posterior_std`: a sigma wider than IVON's prior
    ``1 / sqrt(ess * weight_decay)`` is narrowed to it). Parameters outside Bayesian
    layers start from ``hess_init``.

    Args:
        model: a model with torchbayes Bayesian layers; not modified.
        lr: the optimizer's learning rate.
        ess: its effective sample size (the training set's size).
        **ivon_kwargs: any other `IVON` argument (``weight_decay``, ``hess_init``...).

    Returns:
        ``(network, optimizer)``, the optimizer over all of the network's parameters.

    Example:
        >>> network, optimizer = bnn_to_ivon(bayes, lr=0.05, ess=len(train_set))
    """
    plain = bnn_to_dnn(model)
    optimizer = IVON(plain.parameters(), lr=lr, ess=ess, **ivon_kwargs)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BayesianModule)]
    done: list[str] = []
    for layer_name, layer in layers:
        if any(layer_name.startswith(d + ".") or d == "" for d in done):
            continue  # inside an outer Bayesian module already handled
        done.append(layer_name)
        twin = plain.get_submodule(layer_name) if layer_name else plain
        for name, _, rho, _ in layer.variational_parameters():
            optimizer.set_posterior_std(twin.get_parameter(name), BF.softplus(rho.detach()))
    return plain, optimizer
