"""The three Monte Carlo estimators draw from the right output distribution.

For a layer linear in its weights, with independent Gaussian weights, each output is
Gaussian with mean ``op(x, mu) + b_mu`` and variance ``op(x^2, sigma^2) + sigma_b^2``
(per position for convolutions). Reparameterization, flipout and local
reparameterization must all reproduce these marginals.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchbayes.nn import ESTIMATORS, BayesConv2d, BayesConvTranspose1d, BayesLinear


def _spread(layer):
    with torch.no_grad():
        for _, mu, rho, _ in layer.variational_parameters():
            mu.normal_(0.0, 0.5)
            rho.uniform_(-2.0, 0.0)  # sigma in [0.13, 0.69]: noise comparable to the mean
    return layer


def _draws(layer, x, num):
    """``num`` independent output draws for input ``x``, stacked on dim 0."""
    with torch.no_grad():
        if layer.estimator != "local":
            # Reparameterization shares one weight sample across the batch; flipout's
            # examples are uncorrelated but share the perturbation (so within-batch
            # variance estimates a conditional variance): draw forward by forward.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # thousands of tiny ops: thread hand-offs would dominate
            try:
                return torch.stack([layer(x) for _ in range(num)])
            finally:
                torch.set_num_threads(threads)
        # local reparameterization draws each output independently: one big batch
        batch = x.unsqueeze(0).expand(num, *x.shape)
        return layer(batch.reshape(num * x.shape[0], *x.shape[1:])).reshape(num, x.shape[0], -1)


def _assert_gaussian_moments(samples, mean, var):
    num = samples.shape[0]
    samples = samples.reshape(num, -1).double()
    mean, var = mean.reshape(-1).double(), var.reshape(-1).double()
    # Standard errors of Gaussian samples: sqrt(var/n) for the mean and
    # var*sqrt(2/(n-1)) for the variance. 5 of them: with ~100 outputs compared, a false
    # failure has probability ~1e-4 (and the seeds are fixed).
    mean_err = (samples.mean(0) - mean).abs() / (var / num).sqrt()
    var_err = (samples.var(0) - var).abs() / (var * math.sqrt(2 / (num - 1)))
    assert mean_err.max() < 5, float(mean_err.max())
    assert var_err.max() < 5, float(var_err.max())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_linear_output_distribution(estimator):
    layer = _spread(BayesLinear(4, 3, estimator=estimator))
    x = torch.randn(5, 4)
    num = 20_000 if estimator == "local" else 3000
    samples = _draws(layer, x, num)
    sigma_w, sigma_b = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    mean = F.linear(x, layer.weight_mu, layer.bias_mu)
    var = F.linear(x.square(), sigma_w.square(), sigma_b.square())
    _assert_gaussian_moments(samples, mean.detach(), var.detach())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_conv_per_position_marginals(estimator):
    layer = _spread(BayesConv2d(2, 3, 3, padding=1, estimator=estimator))
    x = torch.randn(1, 2, 4, 4)
    num = 8000 if estimator == "local" else 2000
    samples = _draws(layer, x, num)
    sigma_w, sigma_b = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    mean = F.conv2d(x, layer.weight_mu, layer.bias_mu, padding=1)
    # zero padding contributes nothing, so border positions have smaller variance
    var = F.conv2d(x.square(), sigma_w.square(), sigma_b.square(), padding=1)
    _assert_gaussian_moments(samples, mean.detach(), var.detach())


@pytest.mark.parametrize("estimator", ["flipout", "local"])
def test_transposed_conv_per_position_marginals(estimator):
    layer = _spread(BayesConvTranspose1d(2, 3, 3, stride=2, estimator=estimator))
    x = torch.randn(1, 2, 5)
    samples = _draws(layer, x, 8000 if estimator == "local" else 2000)
    sigma_w, sigma_b = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    mean = F.conv_transpose1d(x, layer.weight_mu, layer.bias_mu, stride=2)
    var = F.conv_transpose1d(x.square(), sigma_w.square(), sigma_b.square(), stride=2)
    _assert_gaussian_moments(samples, mean.detach(), var.detach())


def test_flipout_and_local_decorrelate_examples_reparameterization_does_not():
    # Two identical examples in one batch: one shared weight sample makes their outputs
    # equal (reparameterization); flipout and local give them independent noise.
    x = torch.randn(1, 4).expand(2, 4)
    torch.set_num_threads(1)  # 4000 tiny forwards; conftest restores the count per test
    correlations = {}
    for estimator in ESTIMATORS:
        torch.manual_seed(0)
        layer = _spread(BayesLinear(4, 1, estimator=estimator))
        with torch.no_grad():
            pairs = torch.stack([layer(x)[:, 0] for _ in range(4000)])
        correlations[estimator] = float(torch.corrcoef(pairs.T)[0, 1])
    assert correlations["reparameterization"] > 0.999
    # The sample correlation of independent pairs has std ~1/sqrt(4000) = 0.016; 5 of them.
    assert abs(correlations["flipout"]) < 0.08
    assert abs(correlations["local"]) < 0.08
