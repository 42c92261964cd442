"""Bayesian layers: drop-in, Tensor-returning twins of ``torch.nn`` layers."""

from torchbayes.nn import functional
from torchbayes.nn.base import ESTIMATORS, BayesianModule, BayesianWeightLayer, iter_bayesian_modules
from torchbayes.nn.conv import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
)
from torchbayes.nn.likelihoods import GaussianLikelihood, HeteroscedasticGaussian, HomoscedasticGaussian
from torchbayes.nn.linear import BayesLinear
from torchbayes.nn.mode import posterior_mean, sampling
from torchbayes.nn.noise import noise_generator
from torchbayes.nn.rnn import BayesGRU, BayesLSTM

__all__ = [
    "ESTIMATORS",
    "BayesianModule",
    "BayesianWeightLayer",
    "BayesLinear",
    "GaussianLikelihood",
    "HeteroscedasticGaussian",
    "HomoscedasticGaussian",
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "BayesGRU",
    "BayesLSTM",
    "functional",
    "iter_bayesian_modules",
    "noise_generator",
    "posterior_mean",
    "sampling",
]
