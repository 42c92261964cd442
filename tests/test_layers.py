"""Native Bayesian layers: shapes and values against their torch.nn twins, gradients,
input validation, reproducible noise, and numerically stable softplus."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchbayes
from torchbayes.nn import (
    ESTIMATORS,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesLinear,
    noise_generator,
    posterior_mean,
)
from torchbayes.nn import functional as BF

# (Bayesian class, torch twin, constructor args, constructor kwargs, input shape)
CASES = [
    (BayesLinear, nn.Linear, (5, 3), {}, (4, 5)),
    (BayesLinear, nn.Linear, (5, 3), {"bias": False}, (2, 3, 5)),
    (BayesLinear, nn.Linear, (5, 3), {}, (5,)),
    (BayesConv1d, nn.Conv1d, (4, 6, 3), {"stride": 2, "padding": 1, "groups": 2}, (2, 4, 11)),
    (BayesConv1d, nn.Conv1d, (4, 6, 3), {"padding": "same", "dilation": 2, "padding_mode": "reflect"}, (2, 4, 9)),
    (BayesConv2d, nn.Conv2d, (4, 6, (3, 2)),
     {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2, "padding_mode": "circular"}, (2, 4, 9, 8)),
    (BayesConv2d, nn.Conv2d, (3, 4, 3), {"bias": False}, (3, 7, 7)),  # unbatched input
    (BayesConv3d, nn.Conv3d, (2, 4, 3), {"padding": 1, "padding_mode": "replicate", "stride": (1, 2, 1)}, (2, 2, 5, 6, 4)),
    (BayesConvTranspose1d, nn.ConvTranspose1d, (4, 6, 3),
     {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2}, (2, 4, 7)),
    (BayesConvTranspose2d, nn.ConvTranspose2d, (3, 4, (3, 2)),
     {"stride": 2, "output_padding": (1, 0), "dilation": (1, 2)}, (2, 3, 5, 4)),
    (BayesConvTranspose3d, nn.ConvTranspose3d, (2, 4, 3),
     {"stride": 2, "padding": 1, "output_padding": 1, "bias": False}, (1, 2, 3, 4, 3)),
]
IDS = [f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)]


def _twins(case, **bayes_kwargs):
    """A Bayesian layer and its torch twin sharing the twin's weights as posterior means."""
    cls, torch_cls, args, kwargs, _ = case
    twin = torch_cls(*args, **kwargs)
    layer = cls(*args, **kwargs, **bayes_kwargs)
    with torch.no_grad():
        layer.weight_mu.copy_(twin.weight)
        if twin.bias is not None:
            layer.bias_mu.copy_(twin.bias)
    return layer, twin


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sigma_to_zero_reproduces_torch_twin(case, estimator):
    # rho = -30: sigma = softplus(-30) ~ 1e-13, so every estimator's noise is far below
    # float32 resolution, except local's std floor sqrt(1e-16) = 1e-8; hence atol 1e-5.
    layer, twin = _twins(case, posterior_rho_init=-30.0, estimator=estimator)
    x = torch.randn(case[4])
    expected = twin(x)
    out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_posterior_mean_equals_torch_twin_and_restores_sampling(case):
    layer, twin = _twins(case)  # default rho = -3: sampling visibly differs from the twin
    model = nn.Sequential(layer)
    x = torch.randn(case[4])
    with posterior_mean(model):
        torch.testing.assert_close(model(x), twin(x), rtol=1e-6, atol=1e-6)
    assert not layer.deterministic
    assert not torch.allclose(model(x), twin(x), atol=1e-4)
    torchbayes.posterior_mean(model)  # plain call: stays on
    torch.testing.assert_close(model(x), twin(x), rtol=1e-6, atol=1e-6)


def test_transposed_output_size_matches_torch():
    case = CASES[9]
    layer, twin = _twins(case)
    x = torch.randn(case[4])
    size = [x.shape[2] * 2 + 1, x.shape[3] * 2 + 2]
    with posterior_mean(layer):
        torch.testing.assert_close(layer(x, output_size=size), twin(x, output_size=size))
    assert layer(x, output_size=size).shape == twin(x, output_size=size).shape


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_reach_mu_and_rho(case, estimator):
    layer, _ = _twins(case, estimator=estimator)
    x = torch.randn(case[4])
    layer(x).square().sum().backward()
    for name, mu, rho, _ in layer.variational_parameters():
        for p in (mu, rho):
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_kl_gradient_reaches_mu_and_rho():
    layer = BayesLinear(4, 3)
    layer.kl_divergence().backward()
    assert layer.weight_mu.grad.abs().sum() > 0 and layer.weight_rho.grad.abs().sum() > 0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, argument", [
    ({"prior_sigma": 0.0}, "prior_sigma"),
    ({"prior_sigma": -1.0}, "prior_sigma"),
    ({"prior_sigma": math.inf}, "prior_sigma"),
    ({"prior_mu": math.nan}, "prior_mu"),
    ({"prior_mu": math.inf}, "prior_mu"),
    ({"prior_mu": torch.tensor([0.0, math.nan])}, "prior_mu"),
    ({"estimator": "bogus"}, "estimator"),
    ({"posterior_rho_init": math.nan}, "posterior_rho_init"),
])
@pytest.mark.parametrize("cls, args", [(BayesLinear, (4, 2)), (BayesConv2d, (2, 3, 3))])
def test_bad_constructor_argument_is_named(cls, args, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(*args, **kwargs)


@pytest.mark.parametrize("value", [-1, 2.5, "3", True])
def test_bad_in_features_is_named(value):
    with pytest.raises(ValueError, match="in_features"):
        BayesLinear(value, 2)


def test_prior_of_wrong_shape_is_named():
    with pytest.raises(ValueError, match="prior_mu"):
        BayesLinear(4, 2, prior_mu=torch.zeros(3))


@pytest.mark.parametrize("layer, bad_input, words", [
    (BayesLinear(4, 2), torch.randn(3, 5), "in_features"),
    (BayesConv2d(3, 4, 3), torch.randn(8, 8), "4-D"),
    (BayesConv2d(3, 4, 3), torch.randn(1, 2, 3, 8, 8), "4-D"),
    (BayesConv2d(3, 4, 3), torch.randn(2, 5, 8, 8), "in_channels"),
    (BayesConv1d(3, 4, 3), torch.randn(2, 2, 8), "in_channels"),
    (BayesConvTranspose3d(2, 4, 3), torch.randn(2, 3, 4, 4, 4), "in_channels"),
])
def test_bad_input_shape_is_named(layer, bad_input, words):
    with pytest.raises(ValueError, match=words):
        layer(bad_input)


def test_non_tensor_input_is_rejected():
    with pytest.raises(TypeError, match="Tensor"):
        BayesLinear(2, 2)([1.0, 2.0])


# --------------------------------------------------------- reproducible noise
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_noise_generator_reproduces_draws_without_touching_global_rng(estimator):
    model = nn.Sequential(BayesConv2d(2, 3, 3, estimator=estimator), nn.Flatten(),
                          BayesLinear(3 * 4 * 4, 2, estimator=estimator))
    x = torch.randn(5, 2, 6, 6)
    state = torch.get_rng_state()
    with noise_generator(7):
        first = model(x)
    with noise_generator(torch.Generator().manual_seed(7)):
        again = model(x)
    with noise_generator(8):
        other = model(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # Outside the context the global generator is used again (seeded -> reproducible).
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), a)


def test_noise_generator_rejects_bad_seed():
    with pytest.raises(TypeError, match="seed_or_generator"):
        with noise_generator("7"):
            pass


# -------------------------------------------------------------- softplus
def test_softplus_and_log_softplus_stable_over_rho_range():
    rho = torch.linspace(-100, 100, 2001, dtype=torch.float64)
    sigma = BF.softplus(rho)
    assert torch.isfinite(sigma).all() and (sigma > 0).all()
    # Reference values from the textbook formulas, valid in float64 on this range.
    torch.testing.assert_close(sigma, torch.log1p(torch.exp(rho)))
    torch.testing.assert_close(BF.log_softplus(rho), torch.log(torch.log1p(torch.exp(rho))))
    rho32 = rho.float()  # float32: softplus(-100) = 3.7e-44 is subnormal; log must stay finite
    log_sigma32 = BF.log_softplus(rho32)
    assert torch.isfinite(log_sigma32).all()
    torch.testing.assert_close(log_sigma32[:200], rho32[:200], rtol=1e-6, atol=1e-6)


def test_inverse_softplus_roundtrip_and_zero_sigma():
    # Below rho = log(1e-12) ~ -27.6 the min_sigma floor applies, so round-trip from -25.
    rho = torch.linspace(-25, 100, 1001, dtype=torch.float64)
    torch.testing.assert_close(BF.inverse_softplus(BF.softplus(rho)), rho, rtol=1e-9, atol=1e-9)
    zero = BF.inverse_softplus(torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(zero).all()
    torch.testing.assert_close(BF.softplus(zero), torch.full((3,), 1e-12, dtype=torch.float64))
    big = BF.inverse_softplus(torch.tensor([1e4, 1e30]))
    assert torch.isfinite(big).all()


def test_sampling_gradients_finite_at_extreme_rho():
    rho = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0], requires_grad=True)
    mu = torch.zeros(5, requires_grad=True)
    BF.sample_gaussian(mu, rho).sum().backward()
    assert torch.isfinite(rho.grad).all() and torch.isfinite(mu.grad).all()


def test_kl_gradient_finite_at_extreme_rho():
    rho = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0], requires_grad=True)
    mu = torch.zeros(5, requires_grad=True)
    BF.gaussian_kl(mu, rho, torch.tensor(0.0), torch.tensor(1.0)).backward()
    assert torch.isfinite(rho.grad).all() and torch.isfinite(mu.grad).all()
    # d/drho [-log softplus(rho)] -> -1 as rho -> -inf; the sigma^2 term vanishes there.
    torch.testing.assert_close(rho.grad[0], torch.tensor(-1.0))


def test_fused_draw_and_kl_gradient_finite_at_extreme_rho():
    # The training path draws weights and computes the KL in one fused function.
    rho = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0], requires_grad=True)
    mu = torch.zeros(5, requires_grad=True)
    draw, kl = BF.posterior_draw(mu, rho, "sample", torch.tensor(0.0), torch.tensor(1.0))
    (draw.sum() + kl).backward()
    assert torch.isfinite(kl) and torch.isfinite(rho.grad).all() and torch.isfinite(mu.grad).all()
