"""INTERIM stand-ins used by the command-line tool only until the library modules land.

Each function here mirrors the expected API of a module being written in parallel
(``torchbayes.conversion``, ``torchbayes.prediction``). The tool imports the real
module first and falls back to these; this file is deleted once they exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.nn import BayesConv2d, BayesLinear
from torchbayes.nn.functional import inverse_softplus
from torchbayes.priors import GaussianPrior

__all__ = ["dnn_to_bnn", "predict"]


def dnn_to_bnn(model: nn.Module, bnn_prior_parameters: dict[str, Any]) -> nn.Module:
    """Replace ``nn.Linear``/``nn.Conv2d`` in place by Bayesian twins (MOPED optional)."""
    p = bnn_prior_parameters
    kw = dict(prior_mu=p["prior_mu"], prior_sigma=p["prior_sigma"], posterior_mu_init=p["posterior_mu_init"],
              posterior_rho_init=p["posterior_rho_init"], estimator=p["type"])
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                new: nn.Module = BayesLinear(child.in_features, child.out_features, child.bias is not None, **kw)
            elif isinstance(child, nn.Conv2d):
                new = BayesConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, child.dilation, child.groups, child.bias is not None,
                                  child.padding_mode, **kw)
            else:
                continue
            if p.get("moped_enable"):
                with torch.no_grad():
                    for pname in new.variational_names:
                        w = getattr(child, pname).detach()
                        getattr(new, f"{pname}_mu").copy_(w)
                        getattr(new, f"{pname}_rho").copy_(inverse_softplus(p["moped_delta"] * w.abs()))
                        new.set_prior(pname, GaussianPrior(w.clone(), p["prior_sigma"]))
            setattr(parent, name, new)
    return model


@dataclass
class _Prediction:
    samples: Tensor
    mean: Tensor
    predictive_entropy: Tensor
    mutual_information: Tensor


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, num_samples: int = 32) -> _Prediction:
    """Monte Carlo class probabilities by a loop of ``num_samples`` forward passes."""
    probs = torch.stack([model(x).softmax(-1) for _ in range(num_samples)])
    mean = probs.mean(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
    expected = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0)
    return _Prediction(probs, mean, entropy, (entropy - expected).clamp_min(0))
