"""torchbayes: Bayesian deep learning and uncertainty quantification on PyTorch."""

from torchbayes import nn, priors
from torchbayes.elbo import elbo_loss, get_kl_loss, kl_divergence
from torchbayes.nn import noise_generator, posterior_mean, sampling
from torchbayes.priors import GaussianPrior, ScaleMixturePrior

__version__ = "0.1.0"

__all__ = [
    "GaussianPrior",
    "ScaleMixturePrior",
    "elbo_loss",
    "get_kl_loss",
    "kl_divergence",
    "nn",
    "noise_generator",
    "posterior_mean",
    "priors",
    "sampling",
]
