"""Moment propagation (predict(method="moments")): exact layer moments, nonlinearities, end to end, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import torchbayes
from torchbayes import predict
from torchbayes.cli.models import build_model
from torchbayes.layers import LinearReparameterization
from torchbayes.nn import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesianWeightLayer,
    BayesLinear,
)
from torchbayes.prediction.moments import (
    Moments,
    UnsupportedOperationError,
    propagate_moments,
    register_moment_rule,
)

# Monte Carlo comparisons: with exact moments, each z below is ~N(0, 1) (CLT, N >= 4000);
# a test compares at most a few hundred statistics, so P(any |z| > 5) < 300 * 5.7e-7 < 2e-4,
# while a wrong formula (a missing term, a squared weight too many) is off by many SEs.
Z_BOUND = 5.0


def assert_moments_match_draws(moments: Moments, draws: torch.Tensor) -> None:
    """The exact moments lie within Z_BOUND standard errors of the draws' mean and variance."""
    x = draws.double().flatten(1)
    mean, variance = moments.mean.double().flatten(), moments.variance_or_zeros().double().flatten()
    sample_mean, sample_var = x.mean(0), x.var(0)
    z_mean = (sample_mean - mean) / (sample_var / len(x) + 1e-30).sqrt()
    # Standard error of a sample variance: sqrt((m4 - var^2) / N), m4 the 4th central moment.
    m4 = ((x - sample_mean) ** 4).mean(0)
    z_var = (sample_var - variance) / ((m4 - sample_var**2) / len(x) + 1e-30).sqrt()
    assert z_mean.abs().max() < Z_BOUND, f"means differ: max |z| = {z_mean.abs().max():.2f}"
    assert z_var.abs().max() < Z_BOUND, f"variances differ: max |z| = {z_var.abs().max():.2f}"
    assert (sample_var > 0).any(), "degenerate comparison: nothing varies"


class InjectVariance(nn.Module):
    """Test helper: the identity on tensors, and adds a fixed variance under method="moments"
    (registered below with the public registry, as a user would for their own module)."""

    def __init__(self, variance: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("variance", variance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_moment_rule(InjectVariance)
def _inject_variance(module: InjectVariance, x: Moments) -> Moments:
    return Moments(x.mean, x.variance_or_zeros() + module.variance)


def moments_of(module: nn.Module, mean: torch.Tensor, variance: torch.Tensor) -> Moments:
    """``module``'s output moments for an independent Gaussian input N(mean, variance)."""
    return propagate_moments(nn.Sequential(InjectVariance(variance), module), mean)


def _weight_layer(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    opts = {"posterior_rho_init": -1.0, "dtype": torch.float64}
    layers = {
        "linear": (BayesLinear(5, 3, **opts), (2, 5)),
        "conv1d": (BayesConv1d(2, 3, 3, stride=2, padding=1, **opts), (2, 2, 7)),
        "conv2d": (BayesConv2d(4, 4, 3, padding=1, dilation=1, groups=2, **opts), (1, 4, 4, 4)),
        "conv2d-reflect": (BayesConv2d(2, 2, 3, padding=1, padding_mode="reflect", **opts), (1, 2, 4, 4)),
        "conv3d": (BayesConv3d(2, 2, 2, **opts), (1, 2, 3, 3, 3)),
        "convtranspose1d": (BayesConvTranspose1d(2, 3, 3, stride=2, output_padding=1, **opts), (2, 2, 4)),
        "convtranspose2d": (BayesConvTranspose2d(2, 2, 2, stride=2, **opts), (1, 2, 3, 3)),
        "convtranspose3d": (BayesConvTranspose3d(2, 2, 2, **opts), (1, 2, 2, 2, 2)),
        "nn.linear": (nn.Linear(5, 3, dtype=torch.float64), (2, 5)),
        "nn.conv2d": (nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=torch.float64), (1, 2, 5, 5)),
        "nn.convtranspose2d": (nn.ConvTranspose2d(2, 2, 3, stride=2, dtype=torch.float64), (1, 2, 3, 3)),
    }
    return layers[name]


def _sampled_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward with a fresh weight draw from the posterior, written out by hand."""
    if not isinstance(layer, BayesianWeightLayer):
        return layer(x)
    weight = layer.weight_mu + layer.posterior_sigma("weight") * torch.randn_like(layer.weight_mu)
    bias = None
    if layer.bias_mu is not None:
        bias = layer.bias_mu + layer.posterior_sigma("bias") * torch.randn_like(layer.bias_mu)
    return layer._op(x, weight, bias)


@pytest.mark.parametrize("name", ["linear", "conv1d", "conv2d", "conv2d-reflect", "conv3d", "convtranspose1d",
                                  "convtranspose2d", "convtranspose3d", "nn.linear", "nn.conv2d",
                                  "nn.convtranspose2d"])
def test_weight_layer_moments_match_monte_carlo(name: str) -> None:
    layer, shape = _weight_layer(name)
    mean = torch.randn(shape, dtype=torch.float64)
    variance = torch.rand(shape, dtype=torch.float64) * 0.5
    moments = moments_of(layer, mean, variance)
    # The plain loop: each draw takes a fresh input AND a fresh weight (independent of each other).
    with torch.no_grad():
        draws = torch.stack([_sampled_forward(layer, mean + variance.sqrt() * torch.randn_like(mean))
                             for _ in range(4000)])
    assert moments.mean.shape == draws.shape[1:]
    assert_moments_match_draws(moments, draws)


def test_bayes_linear_moments_equal_the_closed_form() -> None:
    layer = BayesLinear(6, 4, posterior_rho_init=-1.0, dtype=torch.float64)
    m, v = torch.randn(3, 6, dtype=torch.float64), torch.rand(3, 6, dtype=torch.float64)
    out = moments_of(layer, m, v)
    mu, s2 = layer.weight_mu, layer.posterior_sigma("weight") ** 2
    b_mu, b_s2 = layer.bias_mu, layer.posterior_sigma("bias") ** 2
    # Element by element: E[w x] = mu m, Var[w x] = (mu^2 + s2)(m^2 + v) - mu^2 m^2.
    expected_var = torch.zeros(3, 4, dtype=torch.float64)
    for n in range(3):
        for j in range(4):
            expected_var[n, j] = b_s2[j] + sum((mu[j, i] ** 2 + s2[j, i]) * (m[n, i] ** 2 + v[n, i])
                                               - mu[j, i] ** 2 * m[n, i] ** 2 for i in range(6))
    torch.testing.assert_close(out.mean, m @ mu.T + b_mu)
    torch.testing.assert_close(out.variance, expected_var)


def _jacobian_variance(fn, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact moments of a linear map of independent inputs: ``Var = J^2 v`` from its Jacobian."""
    jac = torch.autograd.functional.jacobian(fn, mean)
    out = fn(mean)
    jac = jac.reshape(out.numel(), mean.numel())
    return out, (jac.square() @ variance.flatten()).reshape(out.shape)


@pytest.mark.parametrize("module", [
    nn.AvgPool2d(3, stride=2, padding=1),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
    nn.AvgPool2d(2, divisor_override=3),
    nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False),
    nn.AvgPool3d(2, stride=1),
    nn.AdaptiveAvgPool2d((3, 2)),
    nn.AdaptiveAvgPool1d(4),
    nn.Flatten(),
    nn.Dropout(0.5),
    nn.BatchNorm2d(3),
    nn.Conv2d(3, 2, 3, padding=1, groups=1),
])
def test_linear_modules_are_exact(module: nn.Module) -> None:
    module = module.double()
    if isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.normal_()
            module.bias.normal_()
    module.eval()
    d = 1 if "1d" in type(module).__name__ else 3 if "3d" in type(module).__name__ else 2
    shape = (2, 3) + (7,) * d
    mean, variance = torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    out = moments_of(module, mean, variance)
    expected_mean, expected_var = _jacobian_variance(module, mean, variance)
    torch.testing.assert_close(out.mean, expected_mean)
    torch.testing.assert_close(out.variance, expected_var)


def test_mean_cat_and_arithmetic_are_exact() -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x[:, :2] * 3.0 - x[:, 2:4] / 2.0
            b = torch.cat([a, x.mean(1, keepdim=True), -x[:, 4:]], dim=1)
            return (b + 1.0).flatten(1)

    mean, variance = torch.randn(4, 6, dtype=torch.float64), torch.rand(4, 6, dtype=torch.float64)
    out = moments_of(Net(), mean, variance)
    expected_mean, expected_var = _jacobian_variance(Net(), mean, variance)
    torch.testing.assert_close(out.mean, expected_mean)
    torch.testing.assert_close(out.variance, expected_var)


def test_product_of_independent_values_is_exact() -> None:
    # Var[a b] = va vb + va mb^2 + vb ma^2 for independent a, b.
    class Product(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :3] * x[:, 3:]

    mean, variance = torch.randn(5000, 6, dtype=torch.float64), torch.rand(5000, 6, dtype=torch.float64)
    out = moments_of(Product(), mean[:1], variance[:1])
    draws = Product()(mean[:1] + variance[:1].sqrt() * torch.randn(5000, 6, dtype=torch.float64))
    assert_moments_match_draws(out, draws.unsqueeze(1))


# Reference moments of f(x), x ~ N(m, s^2), by the trapezoid rule on a fine grid (+-12 sd;
# the rule's error is ~1e-10 here, far below every tolerance below).
def _integrated_moments(fn, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    weight = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    values = fn(mean[:, None] + std[:, None] * z)
    expectation = (values * weight).sum(1)
    return expectation, ((values - expectation[:, None]) ** 2 * weight).sum(1)


# (module, mean tolerance, relative variance tolerance): the closed forms are exact, so only
# the trapezoid rule's error at the ReLU kink (~1e-8 at this grid step) remains: 1e-6. The
# quadrature rules' worst errors over this grid (std <= 2) were measured at 4e-4 (tanh
# mean) and 8e-3 (tanh variance) with 32 nodes, so they get 1e-3 and 2e-2.
NONLINEARITIES = [
    (nn.ReLU(), 1e-6, 1e-6),
    (nn.LeakyReLU(0.1), 1e-6, 1e-6),
    (nn.GELU(), 1e-3, 2e-2),
    (nn.SiLU(), 1e-3, 2e-2),
    (nn.Sigmoid(), 1e-3, 2e-2),
    (nn.Tanh(), 1e-3, 2e-2),
    (nn.Softplus(), 1e-3, 2e-2),
]


@pytest.mark.parametrize("module, mean_tol, var_tol", NONLINEARITIES,
                         ids=[type(m).__name__ for m, _, _ in NONLINEARITIES])
def test_nonlinearity_moments_match_numerical_integration(module: nn.Module, mean_tol: float,
                                                          var_tol: float) -> None:
    m, s = torch.meshgrid(torch.linspace(-4, 4, 17, dtype=torch.float64),
                          torch.tensor([0.05, 0.3, 1.0, 2.0], dtype=torch.float64), indexing="ij")
    m, s = m.flatten(), s.flatten()
    out = moments_of(module, m, s**2)
    expected_mean, expected_var = _integrated_moments(module, m, s)
    assert (out.mean - expected_mean).abs().max() < mean_tol
    assert ((out.variance - expected_var).abs() / (expected_var + 1e-6)).max() < var_tol


def test_exp_is_lognormal() -> None:
    m, v = torch.linspace(-2, 2, 9, dtype=torch.float64), torch.full((9,), 0.3, dtype=torch.float64)

    class Exp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x)

    out = moments_of(Exp(), m, v)
    expected_mean, expected_var = _integrated_moments(torch.exp, m, v.sqrt())
    torch.testing.assert_close(out.mean, expected_mean)
    torch.testing.assert_close(out.variance, expected_var)


def test_max_of_two_is_exact_and_larger_windows_are_close() -> None:
    # Clark's formulas are the exact first two moments of the max of TWO independent Gaussians.
    mean = torch.randn(1, 3, 8, dtype=torch.float64)
    variance = torch.rand(1, 3, 8, dtype=torch.float64) + 0.1
    out = moments_of(nn.MaxPool1d(2), mean, variance)
    # Independent draws stacked along the batch dimension: one pooling call for all of them.
    draws = F.max_pool1d((mean + variance.sqrt() * torch.randn(20000, 3, 8, dtype=torch.float64)), 2).unsqueeze(1)
    assert_moments_match_draws(out, draws)
    # Folding pairwise over a 3x3 window treats each partial maximum as Gaussian: an
    # approximation. Measured here: errors below 0.05 sd in the mean and 25 % in the variance.
    mean, variance = torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.rand(1, 2, 6, 6, dtype=torch.float64)
    out = moments_of(nn.MaxPool2d(3, stride=2, padding=1), mean, variance)
    draws = F.max_pool2d(mean + variance.sqrt() * torch.randn(20000, 2, 6, 6, dtype=torch.float64), 3, 2, 1)
    sd = draws.std(0)
    assert ((out.mean - draws.mean(0)).abs() / sd).max() < 0.15
    assert (out.variance / draws.var(0)).log().abs().max() < math.log(1.5)


@pytest.mark.parametrize("config", [
    {"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 3, "stride": 2, "ceil_mode": True}, {"kernel_size": 2, "stride": 1, "dilation": 2},
    {"kernel_size": 3, "stride": 3, "padding": 1, "ceil_mode": True}])
def test_max_pool_windows_match_torch_without_variance(config: dict) -> None:
    # With zero variance every Clark step is an exact max, so the windowing (padding, ceil
    # mode, dilation) must reproduce torch's max pooling exactly.
    mean = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    out = moments_of(nn.MaxPool2d(**config), mean, torch.zeros_like(mean))
    torch.testing.assert_close(out.mean, F.max_pool2d(mean, **config))
    assert out.variance.abs().max() == 0


def _cli_model(name: str, estimator: str = "flipout") -> nn.Module:
    shape = (1, 28, 28)
    model = torchbayes.dnn_to_bnn(build_model(name, shape, 10), {
        "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -4.0,
        "type": estimator, "moped_enable": False, "moped_delta": 0.5})
    return model.eval()


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_sigma_to_zero_equals_deterministic_forward(name: str) -> None:
    model = _cli_model(name)
    x = torch.rand(4, 1, 28, 28)
    twin = torchbayes.bnn_to_dnn(_copy(model)).eval()
    with torch.no_grad():
        expected = twin(x)
        for layer in model.modules():
            if isinstance(layer, BayesianWeightLayer):
                for _, _, rho, _ in layer.variational_parameters():
                    rho.fill_(-30.0)  # sigma = softplus(-30) ~ 1e-13
    out = propagate_moments(model, x)
    torch.testing.assert_close(out.mean, expected, rtol=1e-5, atol=1e-5)
    assert out.variance.max() < 1e-12
    with torchbayes.posterior_mean(model):  # posterior-mean mode: no variance at all
        out = propagate_moments(model, x)
    torch.testing.assert_close(out.mean, expected, rtol=1e-5, atol=1e-5)
    assert out.variance is None


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_resnet18_runs_and_collapses_to_its_deterministic_twin() -> None:
    torch.manual_seed(0)
    model = torchbayes.dnn_to_bnn(torchvision.models.resnet18(num_classes=10)).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 32, 32)
    result = predict(model, x, method="moments", seed=0)
    assert result.mean.shape == (2, 10) and torch.isfinite(result.mutual_information).all()
    assert (result.mutual_information > 0).all()
    with torchbayes.posterior_mean(model):
        out = propagate_moments(model, x)
        expected = model(x)
    torch.testing.assert_close(out.mean, expected, rtol=1e-4, atol=1e-4)


def test_reference_style_model_returning_out_and_kl() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = LinearReparameterization(4, 8), LinearReparameterization(8, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h, kl1 = self.fc1(x)
            out, kl2 = self.fc2(F.relu(h))
            return out, kl1 + kl2

    model, x = Net(), torch.randn(5, 4)
    out = propagate_moments(model, x)
    draws = torch.stack([model(x)[0] for _ in range(4000)]).detach()
    # Layer 2 sees the relu's moments, matched exactly; but its inputs are correlated
    # (one weight draw of layer 1 feeds all of them), which the moments ignore: compare
    # the means at 5 SE and the variances within 30 % (measured: < 10 %).
    se = (draws.var(0) / len(draws)).sqrt()
    assert ((out.mean - draws.mean(0)).abs() / se).max() < Z_BOUND
    assert (out.variance / draws.var(0)).log().abs().max() < math.log(1.3)


def _train_digits_mlp(digits) -> nn.Module:
    torch.manual_seed(0)
    model = torchbayes.dnn_to_bnn(build_model("mlp", digits.input_shape, digits.num_classes), {
        "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
        "type": "flipout", "moped_enable": False, "moped_delta": 0.5})
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for idx in torch.randperm(len(digits.train_x)).split(64):
            nll = F.cross_entropy(model(digits.train_x[idx]), digits.train_y[idx])
            loss = torchbayes.elbo_loss(nll, model, num_data=len(digits.train_x))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_end_to_end_matches_monte_carlo_on_a_trained_model(digits) -> None:
    model = _train_digits_mlp(digits)
    x, y = digits.test_x, digits.test_y
    moments = predict(model, x, 256, method="moments", seed=0)
    mc = predict(model, x, 256, seed=1)
    # Accuracy: each MC-256 class probability has sd <= 0.5 / 16 = 0.03 around the exact
    # predictive, so only near-ties can flip; allow 1.5 points on 360 images (measured: 0.3).
    acc_moments = (moments.predicted_class == y).double().mean()
    acc_mc = (mc.predicted_class == y).double().mean()
    assert abs(acc_moments - acc_mc) < 0.015
    # Probabilities: mean absolute difference per class entry, MC error ~0.01 at most;
    # the independence approximation adds to it (measured 0.004); bound 0.02.
    assert (moments.mean - mc.mean).abs().mean() < 0.02
    # Uncertainties rank the inputs alike (Spearman-like: Pearson on ranks).
    for field in ("predictive_entropy", "mutual_information"):
        a, b = getattr(moments, field).argsort().argsort().double(), getattr(mc, field).argsort().argsort().double()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8, field


class _HeteroscedasticMLP(nn.Module):
    """Two heads: a mean, and a variance through softplus (exercises cat and softplus)."""

    def __init__(self, log_head: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(BayesLinear(3, 16, posterior_rho_init=-3.0), nn.ReLU())
        self.mean_head = BayesLinear(16, 2, posterior_rho_init=-3.0)
        self.var_head = BayesLinear(16, 2, posterior_rho_init=-3.0)
        self.log_head = log_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        second = self.var_head(h) if self.log_head else F.softplus(self.var_head(h))
        return torch.cat([self.mean_head(h), second], dim=-1)


@pytest.mark.parametrize("output_variance", ["variance", "log_variance"])
def test_regression_with_variance_head_matches_monte_carlo(output_variance: str) -> None:
    torch.manual_seed(0)
    model = _HeteroscedasticMLP(log_head=output_variance == "log_variance")
    x = torch.randn(6, 3)
    result = predict(model, x, method="moments", task="regression", output_variance=output_variance)
    mc = predict(model, x, 8000, task="regression", output_variance=output_variance, seed=0)
    assert result.samples.shape == (2, 6, 4) and result.mean.shape == (6, 2)
    torch.testing.assert_close(result.variance, result.aleatoric_variance + result.epistemic_variance)
    # Means at 5 MC standard errors; the variances' MC error is a few percent at S = 8000,
    # the independence approximation (the heads share h) adds a few more: 20 % (measured < 6 %).
    se = (mc.variance / 8000).sqrt()
    assert ((result.mean - mc.mean).abs() / se).max() < Z_BOUND
    for field in ("aleatoric_variance", "epistemic_variance"):
        ratio = getattr(result, field) / getattr(mc, field)
        assert ratio.log().abs().max() < math.log(1.2), (field, ratio)


def test_deterministic_prefix_without_rules_is_computed_exactly() -> None:
    # A module without a rule (Hardswish) is fine while its input has no variance yet.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardswish(), nn.Flatten(), BayesLinear(18, 3))
    out = propagate_moments(model, torch.rand(2, 1, 5, 5))
    assert out.mean.shape == (2, 3) and (out.variance > 0).all()


def test_unsupported_operations_name_themselves_and_point_to_mc() -> None:
    model = nn.Sequential(BayesLinear(4, 4), nn.Hardswish(), BayesLinear(4, 2))
    message = r"'1' \(torch\.nn\.modules\.activation\.Hardswish\).*method='mc'"
    with pytest.raises(UnsupportedOperationError, match=message):
        predict(model, torch.randn(2, 4), method="moments")

    class Softmaxed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = BayesLinear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.fc(x), -1)

    with pytest.raises(UnsupportedOperationError, match=r"log_softmax.*method='mc'"):
        predict(Softmaxed(), torch.randn(2, 4), method="moments")

    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = BayesLinear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(UnsupportedOperationError, match=r"torch\.fx.*method='mc'"):
        predict(Branching(), torch.randn(2, 4), method="moments")
    with pytest.raises(UnsupportedOperationError, match="BatchNorm1d without running statistics"):
        propagate_moments(nn.Sequential(BayesLinear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)),
                          torch.randn(3, 4))


def test_bad_arguments() -> None:
    model = nn.Sequential(BayesLinear(4, 3))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        predict(model, x, method="moment")
    with pytest.raises(ValueError, match="no torchbayes Bayesian layers"):
        predict(nn.Linear(4, 3), x, method="moments")
    with pytest.raises(ValueError, match="dtype"):
        predict(model, x.double(), method="moments")
    with pytest.raises(ValueError, match="chunk_size=4 applies to method='mc' only"):
        predict(model, x, method="moments", chunk_size=4)
    with pytest.raises(ValueError, match="shared_weights"):
        predict(model, x, method="moments", shared_weights=True)
    with pytest.raises(ValueError, match="probabilities"):
        predict(model, x, method="moments", outputs="probabilities")
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_moment_rule(int)
    assert model.training  # modes restored after the failed and successful calls
    result = predict(model, x, 16, method="moments", seed=3)
    again = predict(model, x, 16, method="moments", seed=3)
    torch.testing.assert_close(result.samples, again.samples)  # seeded logit draws
    assert model.training


# ====================================================================== issue 22, section 4 (reliab-ens)
class _Doubled(nn.Linear):
    """A subclass whose own forward changes the math: nn.Linear's rule must not serve it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _AlwaysDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True)


class _TaggedLinear(nn.Linear):
    """A subclass that keeps nn.Linear's forward (only adds an attribute): the rule still serves it."""

    tag = "head"


class _DoubledReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.relu(x)


@pytest.mark.parametrize("module", [_Doubled(8, 3), _AlwaysDropout(0.3), _DoubledReLU()], ids=type)
def test_subclass_with_own_forward_is_refused_not_given_the_parent_rule(module: nn.Module) -> None:
    model = nn.Sequential(BayesLinear(4, 8), nn.Tanh(), module)
    with pytest.raises(UnsupportedOperationError, match=rf"{type(module).__qualname__} overrides forward\(\).*register"):
        predict(model, torch.randn(6, 4), method="moments")
    # Before the first Bayesian layer (no variance yet) it is computed exactly, by its own forward.
    first = nn.Sequential(_Doubled(4, 4), BayesLinear(4, 3))
    out = propagate_moments(first, x := torch.randn(5, 4))
    with torchbayes.posterior_mean(first):
        torch.testing.assert_close(out.mean, first.eval()(x))


def test_subclass_with_its_own_rule_and_subclass_keeping_forward_are_served() -> None:
    x = torch.randn(6, 4)
    kept = nn.Sequential(BayesLinear(4, 8), _TaggedLinear(8, 3))
    plain = nn.Sequential(kept[0], nn.Linear(8, 3))
    plain[1].load_state_dict(kept[1].state_dict())
    a, b = propagate_moments(kept, x), propagate_moments(plain, x)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.variance, b.variance)

    class Tripled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 3 * super().forward(x)

    @register_moment_rule(Tripled)
    def _tripled(module: nn.Module, x: Moments) -> Moments:
        out = _linear_rule(module, x)
        return Moments(3 * out.mean, 9 * out.variance)

    _linear_rule = torchbayes.prediction.moments._RULES[nn.Linear]
    model = nn.Sequential(BayesLinear(4, 8), Tripled(8, 3))
    got = propagate_moments(model, x)
    reference = nn.Sequential(model[0], nn.Linear(8, 3))
    reference[1].load_state_dict(model[1].state_dict())
    expected = propagate_moments(reference, x)
    torch.testing.assert_close(got.mean, 3 * expected.mean)
    torch.testing.assert_close(got.variance, 9 * expected.variance)


class _KeywordCalls(nn.Module):
    def __init__(self, keywords: bool) -> None:
        super().__init__()
        self.fc = BayesLinear(4, 3)
        self.head = nn.Linear(3, 3)
        self.keywords = keywords

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.keywords:  # every form a user may write: keywords for positional parameters
            s = torch.mul(torch.sigmoid(input=h), other=2)
            t = torch.add(h.tanh(), other=1.0, alpha=2.0)
            u = F.relu(input=h, inplace=False).mean(dim=1, keepdim=True)
            v = torch.cat(tensors=[s, t], dim=1).flatten(start_dim=1)
            return self.head(input=v[:, :3] + u) + torch.exp(input=-h)
        s = torch.mul(torch.sigmoid(h), 2)
        t = torch.add(h.tanh(), 1.0, alpha=2.0)
        u = F.relu(h, False).mean(1, True)
        v = torch.cat([s, t], 1).flatten(1)
        return self.head(v[:, :3] + u) + torch.exp(-h)


def test_keyword_arguments_reach_rules_like_positional_ones() -> None:
    torch.manual_seed(0)
    keyword, positional = _KeywordCalls(True), _KeywordCalls(False)
    positional.load_state_dict(keyword.state_dict())
    x = torch.randn(5, 4)
    a, b = propagate_moments(keyword, x), propagate_moments(positional, x)
    torch.testing.assert_close(a.mean, b.mean)  # the same rules ran on the same values
    torch.testing.assert_close(a.variance, b.variance)
    assert bool((a.variance > 0).all())


class _Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda x: None, "returned None"),
        (lambda x: x.mean * 3, "returned a plain Tensor"),
        (lambda x: (x.mean * 3, x.variance), "returned a plain Tensor"),
        (lambda x: (1, 2), "returned a tuple without Moments"),
        (lambda x: (x, x), r"returned a tuple, but .* uses it as one value"),
        (lambda x: Moments(x.mean, x.variance[:1]), "variance"),
        (lambda x: Moments(x.mean.tolist()), "mean list"),
    ],
    ids=["None", "tensor", "tensor-tuple", "int-tuple", "tuple-as-value", "bad-shape", "list-mean"],
)
def test_rule_results_are_checked_and_the_rule_named(returned, message: str) -> None:
    class Local(_Scale):
        pass

    @register_moment_rule(Local)
    def local_rule(module: nn.Module, x: Moments):  # noqa: ANN202 - returns what the test gives
        return returned(x)

    model = nn.Sequential(BayesLinear(4, 3), Local(), nn.ReLU())
    with pytest.raises(UnsupportedOperationError, match=rf"local_rule for module '1'.*{message}"):
        propagate_moments(model, torch.randn(2, 4))


def test_rule_that_cannot_take_the_call_is_named() -> None:
    class Local(_Scale):
        pass

    @register_moment_rule(Local)
    def narrow_rule(module: nn.Module) -> Moments:  # forgot the input
        raise AssertionError("not called")

    with pytest.raises(UnsupportedOperationError, match="narrow_rule for module '1'.*does not accept"):
        propagate_moments(nn.Sequential(BayesLinear(4, 3), Local()), torch.randn(2, 4))


@pytest.mark.parametrize(
    ("rho", "message"),
    [(1e20, "overflows float32"), (1e30, "overflows float32"), (3.5e38, "overflows float32"),
     (-104.0, "is 0 in float32"), (-1e20, "is 0 in float32")],
)
def test_overflowing_posterior_scale_is_refused_where_it_is_set(rho: float, message: str) -> None:
    with pytest.raises(ValueError, match=f"posterior_rho_init=.*{message}"):
        BayesLinear(4, 3, posterior_rho_init=rho)
    with pytest.raises(ValueError, match=f"posterior_rho_init=.*{message}"):
        torchbayes.dnn_to_bnn(nn.Sequential(nn.Linear(4, 3)), posterior_rho_init=rho)
    with pytest.raises(ValueError, match=f"posterior_rho_init=.*{message}"):
        LinearReparameterization(4, 3, posterior_rho_init=rho)
    BayesLinear(4, 3, posterior_rho_init=1e18)  # large but representable: accepted here, checked at prediction
    BayesLinear(4, 3, posterior_rho_init=-100.0)  # sigma 3.7e-44: tiny but not 0


@pytest.mark.parametrize(("rho", "method"), [(1e20, "mc"), (1e20, "moments"), (1e19, "moments")])
def test_overflowing_scales_from_a_file_or_training_are_refused_at_prediction(rho: float, method: str) -> None:
    # sigma 1e19 keeps MC samples finite (if useless); its variance 1e38 overflows in the moments.
    model = nn.Sequential(BayesLinear(4, 16), nn.ReLU(), BayesLinear(16, 16), nn.ReLU(), BayesLinear(16, 3))
    with torch.no_grad():  # as a crafted checkpoint or a diverged training would leave them
        model[2].weight_rho.fill_(rho)
    with pytest.raises(ValueError, match=r"posterior scales overflow \(largest sigma 1e\+(20|19), in 2\.weight_rho\)"):
        predict(model, torch.randn(6, 4), 8, method=method, seed=0)
    # A large but harmless scale still predicts (finite samples).
    with torch.no_grad():
        model[2].weight_rho.fill_(8.0)
    assert bool(torch.isfinite(predict(model, torch.randn(6, 4), 8, method=method, seed=0).samples).all())
