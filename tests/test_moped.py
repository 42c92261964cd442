"""MOPED (Krishnan et al., AAAI 2020): empirical-Bayes priors and posteriors from pretrained weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchbayes import dnn_to_bnn, moped, noise_generator
from torchbayes.nn import BayesianModule, posterior_mean
from torchbayes.nn.functional import softplus
from torchbayes.priors import ScaleMixturePrior


def moped_params(delta: float, type_: str = "Reparameterization", prior_sigma: float = 1.0) -> dict:
    return {"prior_mu": 0.0, "prior_sigma": prior_sigma, "posterior_mu_init": 0.0,
            "posterior_rho_init": -3.0, "type": type_, "moped_enable": True, "moped_delta": delta}


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def assert_moped_layer(layer: BayesianModule, pretrained: dict[str, torch.Tensor], delta: float,
                       prior_sigma: float) -> None:
    for name, mu, rho, prior in layer.variational_parameters():
        w = pretrained[name]
        assert torch.equal(mu, w)
        assert torch.isfinite(rho).all()
        # sigma = delta |w|; where w = 0 it is floored at 1e-12 (a finite rho), hence atol.
        torch.testing.assert_close(softplus(rho), delta * w.abs(), rtol=1e-5, atol=1e-11)
        assert torch.equal(prior.mu, w)  # empirical Bayes: the prior is centred on w
        assert float(prior.sigma) == pytest.approx(prior_sigma)


def test_dnn_to_bnn_moped_sets_posterior_and_prior(reference) -> None:
    from bayesian_torch.utils.util import get_rho

    model = cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 0.0  # exact zeros: softplus must be inverted stably
        model[4].bias[3] = 0.0
    pretrained = copy.deepcopy(model)
    dnn_to_bnn(model, moped_params(0.3, "Flipout", prior_sigma=0.7))
    for index in (0, 4):
        assert_moped_layer(model[index], dict(pretrained[index].named_parameters()), 0.3, 0.7)
    # Same posterior sigma as the reference's get_rho (away from w = 0, where its
    # log(expm1(x) + 1e-20) is accurate in float32).
    w = pretrained[4].weight.detach()
    nonzero = w.abs() > 1e-3
    torch.testing.assert_close(softplus(model[4].weight_rho)[nonzero],
                               softplus(get_rho(w, 0.3))[nonzero], rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def trained_mlp(digits) -> tuple[nn.Module, torch.Tensor]:
    """A small MLP trained on the digits' training split; returns it and the test inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = digits.train_x, digits.train_y
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # full batch; reaches ~95% test accuracy
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), digits.test_x


def mc_agreement(bnn: nn.Module, det: nn.Module, x: torch.Tensor, samples: int = 32) -> float:
    with torch.no_grad(), noise_generator(0):
        probs = torch.stack([F.softmax(bnn(x), -1) for _ in range(samples)]).mean(0)
        return (probs.argmax(-1) == det(x).argmax(-1)).float().mean().item()


def test_moped_prediction_agrees_with_deterministic_model(trained_mlp, digits) -> None:
    det, x = trained_mlp
    accuracy = (det(x).argmax(-1) == digits.test_y).float().mean().item()
    assert accuracy > 0.9
    agreement = {delta: mc_agreement(dnn_to_bnn(copy.deepcopy(det), moped_params(delta)), det, x)
                 for delta in (0.1, 0.5)}
    print(f"MOPED MC-32 agreement with the deterministic argmax: {agreement}")
    # Measured (seeded): 0.998 for delta = 0.1 and 0.982 for delta = 0.5, on n = 450 test
    # inputs. delta = 0.1 perturbs each weight by ~10% of itself, so only inputs whose
    # top-2 logits nearly tie can flip. The thresholds sit > 3 binomial standard errors
    # (sqrt(p (1 - p) / n) <= 0.8% at p = 0.97, 1.4% at p = 0.9) below the measurements.
    assert agreement[0.1] >= 0.97
    assert agreement[0.5] >= 0.90
    # More posterior noise cannot make the averaged prediction agree more (within ~1 SE).
    assert agreement[0.5] <= agreement[0.1] + 0.01
    # In posterior-mean mode MOPED is exactly the deterministic model.
    bnn = dnn_to_bnn(copy.deepcopy(det), moped_params(0.5))
    with posterior_mean(bnn), torch.no_grad():
        torch.testing.assert_close(bnn(x), det(x))


def test_standalone_moped_on_a_bayesian_model() -> None:
    pretrained = cnn()
    pretrained[1].running_mean.uniform_()
    pretrained[1].running_var.uniform_(0.5, 2.0)
    # A Bayesian twin converted from another random initialisation, prior sigma 0.7.
    bnn = dnn_to_bnn(cnn(), dict(moped_params(0.5), moped_enable=False, prior_sigma=0.7))
    moped(bnn, pretrained.state_dict(), delta=0.2)
    for index in (0, 4):
        assert_moped_layer(bnn[index], dict(pretrained[index].named_parameters()), 0.2, 0.7)
    for key in ("weight", "bias", "running_mean", "running_var"):  # BatchNorm copied too
        assert torch.equal(getattr(bnn[1], key), getattr(pretrained[1], key))
    # A module works as the source, and prior_sigma may be set.
    moped(bnn, pretrained, delta=0.1, prior_sigma=0.3)
    assert_moped_layer(bnn[4], dict(pretrained[4].named_parameters()), 0.1, 0.3)


def test_standalone_moped_bad_input_leaves_model_unchanged() -> None:
    bnn = dnn_to_bnn(cnn())
    before = {k: v.clone() for k, v in bnn.state_dict().items()}

    wrong_shape = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                nn.Linear(4 * 6 * 6, 7))
    with pytest.raises(ValueError, match=r"'4.weight' has shape \(7, 144\)"):
        moped(bnn, wrong_shape)
    missing_layer = {k: v for k, v in cnn().state_dict().items() if not k.startswith("4.")}
    with pytest.raises(KeyError, match="no '4.weight'"):
        moped(bnn, missing_layer)
    missing_bn = {k: v for k, v in cnn().state_dict().items() if not k.startswith("1.")}
    with pytest.raises(ValueError, match="1.running_mean"):
        moped(bnn, missing_bn)
    for delta in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="delta"):
            moped(bnn, cnn(), delta=delta)
    with pytest.raises(ValueError, match="no Bayesian layers"):
        moped(cnn(), cnn())
    bnn[4].set_prior("weight", ScaleMixturePrior())  # (a prior without buffers)
    with pytest.raises(TypeError, match="ScaleMixturePrior prior"):
        moped(bnn, cnn())
    after = bnn.state_dict()
    for key, value in before.items():
        if not key.startswith("4.weight_prior"):
            assert torch.equal(after[key], value), key
    # Without the deterministic part, only the Bayesian layers are needed.
    moped(bnn, {k: v for k, v in cnn().state_dict().items() if not k.startswith("1.")},
          load_deterministic=False, prior_sigma=1.0)
