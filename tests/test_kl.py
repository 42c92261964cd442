"""The KL term: closed form vs independent formulas and Monte Carlo, the scale-mixture
estimator's unbiasedness, analytic gradients, and the reference's get_kl_loss numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

import torchbayes
from torchbayes.nn import BayesConv2d, BayesLinear, noise_generator
from torchbayes.nn import functional as BF
from torchbayes.priors import GaussianPrior, ScaleMixturePrior


def _randomise(layer: nn.Module, rho_range=(-4.0, -1.0)) -> None:
    """Spread mu and rho so that every KL term differs (not the init's near-constants)."""
    with torch.no_grad():
        for _, mu, rho, _ in layer.variational_parameters():
            mu.normal_(0.0, 0.5)
            rho.uniform_(*rho_range)


def test_closed_form_equals_hand_computed_sum():
    layer = BayesLinear(3, 2, prior_mu=0.1, prior_sigma=0.5)
    _randomise(layer)
    total = torch.zeros(())
    means = torch.zeros(())
    for _, mu, rho, _ in layer.variational_parameters():
        sigma = torch.log1p(torch.exp(rho))
        # KL(N(m, s^2) || N(m0, s0^2)) = log(s0/s) + (s^2 + (m - m0)^2) / (2 s0^2) - 1/2
        formula = math.log(0.5) - torch.log(sigma) + (sigma**2 + (mu - 0.1) ** 2) / (2 * 0.5**2) - 0.5
        library = D.kl_divergence(D.Normal(mu, sigma), D.Normal(0.1, 0.5))  # independent check
        torch.testing.assert_close(formula, library)
        total = total + library.sum()
        means = means + library.mean()
    torch.testing.assert_close(layer.kl_divergence(), total.detach())
    torch.testing.assert_close(layer.kl_divergence("mean"), means.detach())
    with pytest.raises(ValueError, match="reduction"):
        layer.kl_divergence("max")


def test_per_weight_prior_kl_equals_torch_distributions():
    layer = BayesConv2d(2, 3, 3)
    _randomise(layer)
    prior_mu = torch.randn_like(layer.weight_mu) * 0.1
    prior_sigma = torch.rand_like(layer.weight_mu) + 0.2
    layer.set_prior("weight", GaussianPrior(prior_mu, prior_sigma))
    sigma_w = F.softplus(layer.weight_rho)
    sigma_b = F.softplus(layer.bias_rho)
    expected = (D.kl_divergence(D.Normal(layer.weight_mu, sigma_w), D.Normal(prior_mu, prior_sigma)).sum()
                + D.kl_divergence(D.Normal(layer.bias_mu, sigma_b), D.Normal(0.0, 1.0)).sum())
    torch.testing.assert_close(layer.kl_divergence(), expected.detach(), rtol=1e-5, atol=1e-4)


def test_model_kl_is_sum_of_layers_and_zero_without_bayesian_layers():
    model = nn.Sequential(BayesLinear(4, 8), nn.ReLU(), BayesLinear(8, 2), nn.Linear(2, 2))
    expected = model[0].kl_divergence() + model[2].kl_divergence()
    torch.testing.assert_close(torchbayes.kl_divergence(model), expected)
    assert float(torchbayes.kl_divergence(nn.Linear(2, 2))) == 0.0
    assert torchbayes.get_kl_loss(nn.Linear(2, 2)) is None


def test_closed_form_equals_monte_carlo_estimate():
    layer = BayesLinear(4, 3, prior_mu=0.2, prior_sigma=0.3)
    _randomise(layer, (-2.0, 0.0))
    num = 20_000
    per_sample = torch.zeros(num, dtype=torch.float64)
    with torch.no_grad():
        for _, mu, rho, _ in layer.variational_parameters():
            q = D.Normal(mu.double(), F.softplus(rho.double()))
            w = q.sample((num,))
            per_sample += (q.log_prob(w) - D.Normal(0.2, 0.3).log_prob(w)).flatten(1).sum(1)
    estimate, stderr = per_sample.mean(), per_sample.std() / math.sqrt(num)
    # 5 standard errors of the MC mean: a false failure has probability ~6e-7.
    assert abs(layer.kl_divergence().item() - float(estimate)) < 5 * float(stderr)


def _mixture_log_prob(prior: ScaleMixturePrior, w: torch.Tensor) -> torch.Tensor:
    """log p(w) of the scale mixture written with torch.distributions (an independent formula)."""
    mixture = D.MixtureSameFamily(
        D.Categorical(torch.tensor([prior.pi, 1 - prior.pi], dtype=w.dtype)),
        D.Normal(torch.zeros(2, dtype=w.dtype), torch.tensor([prior.sigma1, prior.sigma2], dtype=w.dtype)))
    return mixture.log_prob(w)


def test_scale_mixture_kl_estimate_is_unbiased():
    prior = ScaleMixturePrior(pi=0.3, sigma1=1.0, sigma2=0.05)
    mu = torch.randn(6, dtype=torch.float64) * 0.3
    rho = torch.empty(6, dtype=torch.float64).uniform_(-4.0, -1.0)
    torch.testing.assert_close(prior.log_prob(mu), _mixture_log_prob(prior, mu))
    calls = 4000
    with torch.no_grad(), noise_generator(0):
        estimates = torch.stack([prior.kl_divergence(mu, rho) for _ in range(calls)])
    # High-sample MC of E_q[log q - log p] from torch.distributions, independent draws.
    q = D.Normal(mu, F.softplus(rho))
    w = q.sample((200_000,))
    reference = (q.log_prob(w) - _mixture_log_prob(prior, w)).sum(1)
    diff = estimates.mean() - reference.mean()
    stderr = math.sqrt(estimates.var() / calls + reference.var() / len(reference))
    # 5 combined standard errors of the two independent MC means.
    assert abs(float(diff)) < 5 * stderr
    # And the estimator is random (it is MC) but has the right sign of KL on average.
    assert estimates.std() > 0 and estimates.mean() > 0


def test_scale_mixture_kl_reductions_and_gradients():
    layer = BayesLinear(5, 4, prior=ScaleMixturePrior(0.5, 1.0, math.exp(-6)))
    with noise_generator(1):
        total = layer.kl_divergence()
    with noise_generator(1):
        mean = layer.kl_divergence("mean")
    with noise_generator(1), torch.no_grad():  # the same draws, tensor by tensor
        parts = [(prior.kl_divergence(mu, rho), mu.numel()) for _, mu, rho, prior in layer.variational_parameters()]
    torch.testing.assert_close(total.detach(), sum(p for p, _ in parts))
    torch.testing.assert_close(mean.detach(), sum(p / n for p, n in parts))
    total.backward()
    assert layer.weight_rho.grad.abs().sum() > 0 and layer.weight_mu.grad.abs().sum() > 0


def test_gaussian_kl_gradcheck_float64():
    mu_q = torch.randn(7, dtype=torch.float64, requires_grad=True)
    rho_q = torch.empty(7, dtype=torch.float64).uniform_(-5, 3).requires_grad_()
    scalar_prior = (torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    tensor_prior = (torch.randn(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64) + 0.3)
    for mu_p, sigma_p in (scalar_prior, tensor_prior):
        assert torch.autograd.gradcheck(lambda m, r: BF.gaussian_kl(m, r, mu_p, sigma_p), (mu_q, rho_q))


def test_sample_gaussian_gradcheck_with_fixed_noise():
    mu = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rho = torch.empty(6, dtype=torch.float64).uniform_(-4, 2).requires_grad_()

    def draw(m, r):
        with noise_generator(3):  # same eps on every call: a deterministic function of (m, r)
            return BF.sample_gaussian(m, r)

    def perturb(r):
        with noise_generator(3):
            return BF.sample_perturbation(r)

    assert torch.autograd.gradcheck(draw, (mu, rho))
    assert torch.autograd.gradcheck(perturb, (rho,))
    torch.testing.assert_close(draw(mu, rho) - mu, perturb(rho))


def test_layer_kl_gradient_matches_autograd_of_plain_formula():
    layer = BayesLinear(4, 3, prior_mu=-0.2, prior_sigma=0.4).double()
    _randomise(layer)
    layer.kl_divergence().backward()
    fused = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    plain = torch.zeros((), dtype=torch.float64)
    for _, mu, rho, _ in layer.variational_parameters():
        sigma = torch.log1p(torch.exp(rho))
        plain = plain + (math.log(0.4) - torch.log(sigma) + (sigma**2 + (mu + 0.2) ** 2) / (2 * 0.16) - 0.5).sum()
    plain.backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)


# -------------------------------------------------------------- reference
def _reference_get_kl_loss(reference):
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    return get_kl_loss


@pytest.mark.parametrize("kind", ["Reparameterization", "Flipout"])
def test_get_kl_loss_equals_reference(reference, kind):
    ref_model = nn.Sequential(
        getattr(reference.layers, f"Conv2d{kind}")(2, 3, 3, prior_mean=0.1, prior_variance=0.5),
        getattr(reference.layers, f"Linear{kind}")(12, 4, prior_mean=0.1, prior_variance=0.5))
    ours = nn.Sequential(
        BayesConv2d(2, 3, 3, prior_mu=0.1, prior_sigma=0.5, estimator=kind),
        BayesLinear(12, 4, prior_mu=0.1, prior_sigma=0.5, estimator=kind))
    with torch.no_grad():
        for ref_layer, layer in zip(ref_model, ours):
            ref_w = "mu_kernel" if hasattr(ref_layer, "mu_kernel") else "mu_weight"
            layer.weight_mu.copy_(getattr(ref_layer, ref_w))
            layer.weight_rho.copy_(getattr(ref_layer, ref_w.replace("mu", "rho")))
            layer.bias_mu.copy_(ref_layer.mu_bias)
            layer.bias_rho.copy_(ref_layer.rho_bias)
    expected = _reference_get_kl_loss(reference)(ref_model)
    # Same float32 formula up to summation order: a few ulps of a value ~10.
    torch.testing.assert_close(torchbayes.get_kl_loss(ours), expected.detach(), rtol=1e-5, atol=1e-5)
    # The ELBO's KL is not that number: it sums over weights instead of averaging.
    assert torchbayes.kl_divergence(ours).item() > 10 * expected.item()
