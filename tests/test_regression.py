"""Regression: Gaussian heads, their ELBOs (Monte Carlo and sampling-free), the predictive
mixture (density, CDF, quantiles, intervals, CRPS) for every prediction method, and the
regression metrics, against scipy, properscoring, torch.nn twins and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes import metrics
from torchbayes.elbo import regression_elbo_loss
from torchbayes.nn import BayesLinear, HeteroscedasticGaussian, HomoscedasticGaussian
from torchbayes.prediction import gaussian_mixture
from torchbayes.prediction.moments import expected_log_likelihood

stats = pytest.importorskip("scipy.stats")
properscoring = pytest.importorskip("properscoring")


def _mixture(seed: int, s: int = 7, b: int = 50, d: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(s, b, d, generator=g, dtype=torch.float64) * 2
    variances = torch.rand(s, b, d, generator=g, dtype=torch.float64) + 0.05
    target = torch.randn(b, d, generator=g, dtype=torch.float64) * 2
    return means, variances, target


# ----------------------------------------------------------------------------- heads
def test_heads_log_likelihood_equals_scipy_and_torch_gaussian_nll() -> None:
    g = torch.Generator().manual_seed(0)
    features, y = torch.randn(40, 2, generator=g, dtype=torch.float64), torch.randn(40, 1, generator=g).double()
    het = HeteroscedasticGaussian(1, min_variance=1e-3)
    out = het(features)
    variance = F.softplus(features[:, 1:]) + 1e-3
    assert torch.allclose(out[:, 1:].exp(), variance)
    expected = stats.norm.logpdf(y.numpy(), features[:, :1].numpy(), variance.sqrt().numpy())
    assert np.allclose(het.log_likelihood(out, y).numpy(), expected.ravel())
    # the torch.nn twin: GaussianNLLLoss(full=True) is the mean negative log density
    twin = nn.GaussianNLLLoss(full=True, eps=0.0)(features[:, :1], y, variance)
    assert torch.allclose(het.nll(out, y), twin)
    homo = HomoscedasticGaussian(1, init_std=0.7).double()
    out = homo(features[:, :1])
    expected = stats.norm.logpdf(y.numpy(), features[:, :1].numpy(), math.sqrt(0.49 + 1e-6))
    assert np.allclose(homo.log_likelihood(out, y.squeeze(1)).detach().numpy(), expected.ravel())


def test_heads_check_shapes_and_arguments() -> None:
    with pytest.raises(ValueError, match="expects inputs"):
        HeteroscedasticGaussian(2)(torch.randn(3, 2))
    with pytest.raises(ValueError, match="target must have shape"):
        HomoscedasticGaussian(1).log_likelihood(torch.randn(3, 2), torch.randn(4, 1))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="out_features"):
            HomoscedasticGaussian(bad)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_variance"):
            HeteroscedasticGaussian(1, min_variance=bad)
    with pytest.raises(ValueError, match="init_std"):
        HomoscedasticGaussian(1, init_std=0.0)
    assert "min_variance" in repr(HeteroscedasticGaussian(3))


def _linear_model(head: nn.Module, width: int, rho: float = -2.0) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(BayesLinear(4, width, posterior_rho_init=rho, estimator="local"), head).double()


@pytest.mark.parametrize("kind", ["homoscedastic", "heteroscedastic"])
def test_expected_log_likelihood_equals_monte_carlo_for_a_linear_layer(kind: str) -> None:
    """One Bayesian linear layer: its outputs are exactly Gaussian and the mean and raw-variance
    channels are independent (different weight rows), so the closed form is exact."""
    head = HomoscedasticGaussian(1, init_std=0.5) if kind == "homoscedastic" else HeteroscedasticGaussian(1)
    model = _linear_model(head, 1 if kind == "homoscedastic" else 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    closed = expected_log_likelihood(model, x, y).detach()
    with torch.no_grad():  # local reparameterization: every row of the tiled batch is an independent draw
        draws = head.log_likelihood(model(x.repeat(20000, 1)), y.repeat(20000, 1)).view(20000, 6)
    se = draws.std(0) / math.sqrt(len(draws))
    # 5 standard errors of the 20000-draw mean (plus the 32-node quadrature's ~1e-6)
    assert torch.all((closed - draws.mean(0)).abs() < 5 * se + 1e-5), (closed, draws.mean(0), se)


def test_expected_log_likelihood_tends_to_the_deterministic_one_as_sigma_goes_to_zero() -> None:
    model = nn.Sequential(
        BayesLinear(4, 8, posterior_rho_init=-30.0),
        nn.ReLU(),
        BayesLinear(8, 2, posterior_rho_init=-30.0),
        HeteroscedasticGaussian(1),
    ).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    with torchbayes.posterior_mean(model), torch.no_grad():
        exact = model[-1].log_likelihood(model(x), y)
    assert torch.allclose(expected_log_likelihood(model, x, y), exact, atol=1e-9)


def test_sampling_free_gradients_match_finite_differences() -> None:
    model = nn.Sequential(BayesLinear(3, 5), nn.ReLU(), BayesLinear(5, 2), HeteroscedasticGaussian(1)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 1, dtype=torch.float64)
    params = [model[0].weight_rho, model[0].weight_mu, model[2].bias_mu]

    class Loss(nn.Module):  # functional_call swaps the parameters of a module's call
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> torch.Tensor:
            return regression_elbo_loss(self.model, x, y, 100, method="moments")

    names = ("model.0.weight_rho", "model.0.weight_mu", "model.2.bias_mu")

    def loss(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(Loss(), dict(zip(names, values)), ())

    assert torch.autograd.gradcheck(loss, [p.detach().clone().requires_grad_() for p in params])


def test_regression_elbo_loss_moments_is_the_mean_of_monte_carlo_for_a_linear_layer() -> None:
    model = _linear_model(HeteroscedasticGaussian(1), 2)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    closed = float(regression_elbo_loss(model, x, y, 50, method="moments").detach())
    kl_term = float(torchbayes.kl_divergence(model).detach()) / 50
    with torch.no_grad():  # 5000 independent draws per example in one tiled batch (local reparameterization)
        draws = -model[-1].log_likelihood(model(x.repeat(5000, 1)), y.repeat(5000, 1)).view(5000, 6).mean(1)
        assert math.isfinite(float(regression_elbo_loss(model, x, y, 50)))  # the MC front door runs
    # the likelihood parts agree within 5 standard errors of the 5000-draw mean
    assert abs(closed - kl_term - float(draws.mean())) < 5 * float(draws.std()) / math.sqrt(5000)
    with pytest.raises(ValueError, match="method"):
        regression_elbo_loss(model, x, y, 50, method="laplace")
    with pytest.raises(ValueError, match="Gaussian head"):
        regression_elbo_loss(nn.Sequential(BayesLinear(4, 1)), x, y, 50)


def test_expected_log_likelihood_needs_the_head_last() -> None:
    model = nn.Sequential(BayesLinear(4, 2), HeteroscedasticGaussian(1), nn.Identity(), nn.ReLU())
    with pytest.raises(ValueError, match="last operation"):
        expected_log_likelihood(model, torch.randn(3, 4), torch.randn(3, 1))


# ----------------------------------------------------------------------------- mixture
def test_mixture_density_and_cdf_equal_scipy() -> None:
    means, variances, target = _mixture(0)
    stds = variances.sqrt().numpy()
    dens = stats.norm.pdf(target.numpy()[None], means.numpy(), stds).mean(0)
    assert np.allclose(gaussian_mixture.mixture_log_prob(means, variances, target).numpy(), np.log(dens).ravel())
    cdf = stats.norm.cdf(target.numpy()[None], means.numpy(), stds).mean(0)
    assert np.allclose(gaussian_mixture.mixture_cdf(means, variances, target).numpy(), cdf)


@pytest.mark.parametrize("q", [0.025, 0.3, 0.5, 0.975])
def test_mixture_quantile_inverts_the_cdf_and_is_the_gaussian_one_for_one_component(q: float) -> None:
    means, variances, _ = _mixture(1)
    quantile = gaussian_mixture.mixture_quantile(means, variances, q)
    # bisection to float64 resolution: the CDF there is q up to rounding
    assert torch.allclose(gaussian_mixture.mixture_cdf(means, variances, quantile), torch.full_like(quantile, q))
    one = gaussian_mixture.mixture_quantile(means[:1], variances[:1], q)
    assert np.allclose(one.numpy(), stats.norm.ppf(q, means[0].numpy(), variances[0].sqrt().numpy()))
    with pytest.raises(ValueError, match="levels"):
        gaussian_mixture.mixture_quantile(means, variances, 1.0)


def test_crps_equals_properscoring_and_numerical_integration() -> None:
    means, variances, target = _mixture(2, s=4, b=6)
    mine = gaussian_mixture.mixture_crps(means[:1], variances[:1], target)
    reference = properscoring.crps_gaussian(target.numpy(), means[0].numpy(), variances[0].sqrt().numpy())
    assert np.allclose(mine.numpy(), reference)
    # mixture: integral of (F(x) - 1{x >= y})^2, by scipy's adaptive quadrature
    from scipy.integrate import quad

    for i in range(3):
        m, s, y = means[:, i, 0].numpy(), variances[:, i, 0].sqrt().numpy(), float(target[i, 0])

        def integrand(x: float, m: np.ndarray = m, s: np.ndarray = s, y: float = y) -> float:
            return float((stats.norm.cdf(x, m, s).mean() - (x >= y)) ** 2)

        value = quad(integrand, -40, y, limit=200)[0] + quad(integrand, y, 40, limit=200)[0]
        assert abs(float(gaussian_mixture.mixture_crps(means, variances, target)[i, 0]) - value) < 1e-7
    samples = torch.randn(31, 20, 2, dtype=torch.float64)
    y = torch.randn(20, 2, dtype=torch.float64)
    reference = properscoring.crps_ensemble(y.numpy(), np.moveaxis(samples.numpy(), 0, -1))
    assert np.allclose(gaussian_mixture.sample_crps(samples, y).numpy(), reference)


# ----------------------------------------------------------------------------- metrics
def test_regression_metrics_equal_closed_forms() -> None:
    means, variances, target = _mixture(3, s=1, b=200)
    mean, variance = means[0], variances[0]
    assert torch.isclose(metrics.rmse(mean, target), ((mean - target) ** 2).mean().sqrt())
    ll = stats.norm.logpdf(target.numpy(), mean.numpy(), variance.sqrt().numpy()).mean()
    assert math.isclose(float(metrics.gaussian_log_likelihood(mean, variance, target)), ll, rel_tol=1e-12)
    assert metrics.mixture_log_likelihood(means, variances, target, reduction="none").shape == (200,)
    assert math.isclose(
        float(metrics.crps_gaussian(mean, variance.sqrt(), target)),
        properscoring.crps_gaussian(target.numpy(), mean.numpy(), variance.sqrt().numpy()).mean(),
        rel_tol=1e-10,
    )
    lower, upper = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([0.5, 3.0, 1.0])
    assert float(metrics.interval_coverage(lower, upper, y)) == pytest.approx(2 / 3)
    assert float(metrics.interval_width(lower, upper)) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="lower must not exceed"):
        metrics.interval_width(upper, lower)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.rmse(mean, target[:3])
    with pytest.raises(ValueError, match="variances must be positive"):
        metrics.mixture_log_likelihood(means, torch.zeros_like(variances), target)


def test_calibration_error_is_small_for_a_calibrated_model_and_large_for_an_overconfident_one() -> None:
    g = torch.Generator().manual_seed(4)
    y = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    calibrated = torch.from_numpy(stats.norm.cdf(y.numpy()))
    overconfident = torch.from_numpy(stats.norm.cdf(y.numpy(), scale=0.5))
    expected, observed = metrics.regression_calibration_curve(calibrated, 9)
    assert torch.allclose(expected, torch.arange(1, 10, dtype=torch.float64) / 10)
    # observed frequencies of 20000 uniform draws: SE <= 0.0035, so 5 SE
    assert torch.all((observed - expected).abs() < 0.018)
    assert float(metrics.regression_calibration_error(calibrated, power=1)) < 0.018
    assert float(metrics.regression_calibration_error(overconfident, power=1)) > 0.1
    assert float(metrics.regression_calibration_error(overconfident)) > 0.01  # Kuleshov's (squared)
    with pytest.raises(ValueError, match="pit"):
        metrics.regression_calibration_error(torch.tensor([1.5]))


# ----------------------------------------------------------------------------- prediction
def _bayes_net(head_kind: str) -> nn.Module:
    torch.manual_seed(5)
    width = 2 if head_kind == "heteroscedastic" else 1
    head = HeteroscedasticGaussian(1) if head_kind == "heteroscedastic" else HomoscedasticGaussian(1)
    return nn.Sequential(BayesLinear(4, 16), nn.ReLU(), BayesLinear(16, width), head)


def _plain_net(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2), HeteroscedasticGaussian(1))


@pytest.mark.parametrize("method", ["mc", "moments", "dropout", "ensemble", "bayes-ensemble", "homoscedastic"])
def test_every_method_gives_the_regression_summary(method: str) -> None:
    x, y = torch.randn(13, 4), torch.randn(13, 1)
    kwargs: dict = {"seed": 0}
    if method in ("mc", "homoscedastic"):
        model = _bayes_net("heteroscedastic" if method == "mc" else "homoscedastic")
    elif method == "moments":
        model, kwargs = _bayes_net("heteroscedastic"), {"method": "moments"}
    elif method == "dropout":
        model, kwargs["dropout"] = _plain_net(0.2), True
    elif method == "ensemble":
        model = torchbayes.Ensemble([_plain_net() for _ in range(3)])
    else:
        model = torchbayes.Ensemble([_bayes_net("heteroscedastic") for _ in range(2)])
    result = torchbayes.predict(model, x, 6, task="regression", **kwargs)
    assert result.predictive == ("gaussian" if method == "moments" else "mixture")
    assert result.mean.shape == result.std.shape == (13, 1)
    assert result.log_likelihood(y).shape == (13,) and torch.isfinite(result.log_likelihood(y)).all()
    lower, upper = result.interval(0.8)
    assert (
        lower.shape == (13, 1) and torch.all(lower < result.quantile(0.5)) and torch.all(result.quantile(0.5) < upper)
    )
    assert torch.allclose(result.cdf(upper) - result.cdf(lower), torch.full((13, 1), 0.8), atol=1e-5)
    assert result.crps(y).shape == (13, 1)
    # same as passing the layout by hand
    manual = torchbayes.predict(model, x, 6, task="regression", output_variance="log_variance", **kwargs)
    assert torch.equal(manual.mean, result.mean)
    means, variances = result.components()
    assert torch.allclose(
        result.log_likelihood(y),
        torch.logsumexp(torch.distributions.Normal(means, variances.sqrt()).log_prob(y)[..., 0], 0)
        - math.log(means.shape[0]),
        atol=1e-5,
    )


def test_ensemble_of_heteroscedastic_members_is_their_gaussian_mixture() -> None:
    members = [_plain_net() for _ in range(4)]
    x, y = torch.randn(9, 4), torch.randn(9, 1)
    result = torchbayes.predict(torchbayes.Ensemble(members), x, task="regression")
    with torch.no_grad():
        outs = [m(x) for m in members]
    log_dens = torch.stack([members[0][-1].log_likelihood(o, y) for o in outs])
    assert torch.allclose(result.log_likelihood(y), torch.logsumexp(log_dens, 0) - math.log(4), atol=1e-5)
    assert torch.allclose(result.aleatoric_variance, torch.stack([o[:, 1:].exp() for o in outs]).mean(0), atol=1e-6)


def test_prediction_without_variances_refuses_densities_and_a_head_refuses_other_layouts() -> None:
    model = nn.Sequential(BayesLinear(4, 1))
    result = torchbayes.predict(model, torch.randn(3, 4), 4, task="regression")
    assert result.sample_variances is None
    with pytest.raises(ValueError, match="no predicted variances"):
        result.interval(0.9)
    with pytest.raises(ValueError, match="Gaussian head"):
        torchbayes.predict(_bayes_net("heteroscedastic"), torch.randn(3, 4), 4, task="regression", output_variance=None)
    with pytest.raises(ValueError, match="level"):
        torchbayes.predict(_bayes_net("heteroscedastic"), torch.randn(3, 4), 4, task="regression").interval(1.0)


def test_moments_prediction_of_a_head_has_the_exact_expected_variance() -> None:
    """The log-variance half of method='moments' is moment-matched so that E[variance] is exact."""
    model = _bayes_net("heteroscedastic").double()
    x = torch.randn(5, 4, dtype=torch.float64)
    moments = torchbayes.predict(model, x, method="moments", task="regression")
    mc = torchbayes.predict(model, x, 20000, task="regression", seed=0)
    # ReLU moment matching is approximate for the mean channel, exact for what follows
    # given its input; 5% covers the 20000-draw error (< 1%) and that approximation.
    assert torch.allclose(moments.aleatoric_variance, mc.aleatoric_variance, rtol=0.05)
