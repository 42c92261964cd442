"""Checkpoint interchange with Bayesian-Torch (the reference, 0.5.0).

A model that Bayesian-Torch's ``dnn_to_bnn`` converted and that torchbayes'
:func:`~torchbayes.dnn_to_bnn` converted from the same deterministic architecture have
the same module names; only the parameter names inside each Bayesian layer differ:

==========================================  =====================================
Bayesian-Torch                              torchbayes
==========================================  =====================================
``mu_weight`` / ``rho_weight`` (linear)     ``weight_mu`` / ``weight_rho``
``mu_kernel`` / ``rho_kernel`` (conv)       ``weight_mu`` / ``weight_rho``
``mu_bias`` / ``rho_bias``                  ``bias_mu`` / ``bias_rho``
``prior_weight_mu`` / ``prior_weight_sigma``  ``weight_prior.mu`` / ``weight_prior.sigma``
``prior_bias_mu`` / ``prior_bias_sigma``    ``bias_prior.mu`` / ``bias_prior.sigma``
==========================================  =====================================

Both use ``sigma = softplus(rho)``, so the numbers carry over unchanged. Bayesian-Torch
keeps its priors in non-persistent buffers: they are absent from its ``state_dict()``,
so the torchbayes model keeps the priors it was converted with unless the reference
*model* (not its state dict) is given.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from torchbayes.conversion import _outermost_bayesian
from torchbayes.nn.base import BayesianModule
from torchbayes.nn.conv import _BayesConvNd
from torchbayes.nn.linear import BayesLinear
from torchbayes.validation import check_flag

__all__ = ["load_reference_state_dict", "reference_state_dict"]

_PRIOR_KEYS = ("weight_prior.mu", "weight_prior.sigma", "bias_prior.mu", "bias_prior.sigma")


def _layer_names(layer: BayesianModule, name: str) -> dict[str, str]:
    """torchbayes key -> Bayesian-Torch key, within one layer."""
    if isinstance(layer, _BayesConvNd):
        weight = "kernel"
    elif isinstance(layer, BayesLinear):
        weight = "weight"
    else:
        raise NotImplementedError(
            f"checkpoint interchange supports linear and convolution layers; {name!r} is a {type(layer).__name__}"
        )
    table = {
        "weight_mu": f"mu_{weight}",
        "weight_rho": f"rho_{weight}",
        "weight_prior.mu": "prior_weight_mu",
        "weight_prior.sigma": "prior_weight_sigma",
    }
    if "bias" in layer.variational_names:
        table.update(
            {
                "bias_mu": "mu_bias",
                "bias_rho": "rho_bias",
                "bias_prior.mu": "prior_bias_mu",
                "bias_prior.sigma": "prior_bias_sigma",
            }
        )
    return table


def _key_table(model: nn.Module) -> dict[str, str]:
    """Full torchbayes key -> full Bayesian-Torch key, for every Bayesian layer of ``model``."""
    table = {}
    for name, layer in _outermost_bayesian(model):
        prefix = f"{name}." if name else ""
        for ours, theirs in _layer_names(layer, name).items():
            table[prefix + ours] = prefix + theirs
    return table


def _is_prior(key: str) -> bool:
    return key.endswith(_PRIOR_KEYS)


def _mean_of(prior_key: str) -> str:
    """``"fc.weight_prior.sigma"`` -> ``"fc.weight_mu"``: the parameter a prior belongs to."""
    return prior_key.rsplit("_prior.", 1)[0] + "_mu"


def _compact(prior: Tensor) -> Tensor:
    # The reference fills full-size prior buffers with one value; keep such a prior scalar.
    flat = prior.reshape(-1)
    return flat[0].clone() if flat.numel() > 0 and bool((flat == flat[0]).all()) else prior


def load_reference_state_dict(
    model: nn.Module, source: nn.Module | Mapping[str, Tensor], *, strict: bool = True
) -> nn.Module:
    """Load a Bayesian-Torch checkpoint into the equivalent torchbayes model.

    Args:
        model: the torchbayes model, converted by :func:`~torchbayes.dnn_to_bnn` from
            the deterministic architecture the reference model was converted from.
        source: the reference model's ``state_dict()`` (e.g. ``torch.load(path,
            weights_only=True)``), or the reference model itself, in which case its
            priors (non-persistent buffers) are loaded too.
        strict: as in ``nn.Module.load_state_dict``: every key of ``model`` (priors
            excepted) must be present and no unexpected key may appear.

    Returns:
        ``model``. Nothing is written before every key and shape has been checked,
        so on error ``model`` is unchanged.

    Example:
        >>> model = dnn_to_bnn(make_cnn(), same_dict_as_reference)
        >>> load_reference_state_dict(model, torch.load("ref.pt", weights_only=True))
    """
    check_flag("strict", strict)
    if isinstance(source, nn.Module):
        state = dict(source.state_dict())
        # The reference's priors are not in its state_dict: read its buffers instead.
        state.update(
            {k: v for k, v in source.named_buffers() if k.rsplit(".", 1)[-1].startswith("prior_") and v is not None}
        )
    elif isinstance(source, Mapping):
        state = dict(source)
    else:
        raise TypeError(f"source must be a Bayesian-Torch model or its state_dict, got {type(source).__name__}")
    to_ours = {theirs: ours for ours, theirs in _key_table(model).items()}
    own = model.state_dict()
    incoming = {to_ours.get(k, k): v for k, v in state.items()}
    unexpected = [k for k in state if to_ours.get(k, k) not in own]
    missing = [k for k in own if k not in incoming and not _is_prior(k)]
    if strict and (unexpected or missing):
        raise KeyError(
            f"load_reference_state_dict: unexpected keys {unexpected[:8]}, missing keys "
            f"{missing[:8]} (in torchbayes names); is it the same architecture?"
        )
    merged = dict(own)
    for key, value in incoming.items():
        if key not in own:
            continue
        if _is_prior(key):
            value = _compact(value)
            param = own[_mean_of(key)]
            try:
                ok = torch.broadcast_shapes(value.shape, param.shape) == param.shape
            except RuntimeError:
                ok = False
        else:
            ok = value.shape == own[key].shape
        if not ok:
            raise ValueError(
                f"load_reference_state_dict: {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
        merged[key] = value
    model.load_state_dict(merged, strict=True)
    return model


def reference_state_dict(model: nn.Module, *, include_priors: bool = False) -> dict[str, Tensor]:
    """The state dict a Bayesian-Torch model of the same architecture loads.

    Args:
        model: a torchbayes model converted by :func:`~torchbayes.dnn_to_bnn`.
        include_priors: also emit ``prior_weight_mu``... at full parameter size. The
            reference's ``load_state_dict`` rejects them (its priors are non-persistent
            buffers), so leave this off unless you copy the priors yourself.

    Returns:
        A new dict of tensors (Bayesian-Torch names; other keys unchanged), ready for
        ``torch.save`` and ``reference_model.load_state_dict``.

    Example:
        >>> torch.save(reference_state_dict(model), "for_bayesian_torch.pt")
    """
    to_theirs = _key_table(model)
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in own.items():
        if key not in to_theirs:
            out[key] = value
        elif not _is_prior(key):
            out[to_theirs[key]] = value
        elif check_flag("include_priors", include_priors):
            param = own[_mean_of(key)]
            out[to_theirs[key]] = value.expand(param.shape).clone()
    return out
