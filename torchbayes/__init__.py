"""torchbayes: Bayesian deep learning and uncertainty quantification on PyTorch."""

from torchbayes import avuc, calibration, layers, metrics, nn, priors
from torchbayes.avuc import AUAvULoss, AvULoss, accuracy_vs_uncertainty, eval_avu
from torchbayes.calibration import TemperatureScaling
from torchbayes.elbo import elbo_loss, get_kl_loss, kl_divergence
from torchbayes.nn import noise_generator, posterior_mean, sampling
from torchbayes.priors import GaussianPrior, ScaleMixturePrior

__version__ = "0.1.0"

__all__ = [
    "AUAvULoss",
    "AvULoss",
    "TemperatureScaling",
    "accuracy_vs_uncertainty",
    "avuc",
    "calibration",
    "eval_avu",
    "metrics",
    "GaussianPrior",
    "ScaleMixturePrior",
    "elbo_loss",
    "get_kl_loss",
    "kl_divergence",
    "layers",
    "nn",
    "noise_generator",
    "posterior_mean",
    "priors",
    "sampling",
]
