"""dnn_to_bnn's native form: keywords, partial dictionaries, one place for the defaults, prior objects."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from torchbayes import conversion, conversion_history, dnn_to_bnn, kl_divergence, rebuild, save_checkpoint
from torchbayes.conversion import (
    DEFAULT_SETTINGS,
    REFERENCE_PRIOR_PARAMETERS,
    ConversionReport,
    ConversionSettings,
    normalize_prior_parameters,
)
from torchbayes.nn import BayesConv2d, BayesianModule, BayesLinear, noise_generator
from torchbayes.priors import GaussianPrior, ScaleMixturePrior


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def bayesian_layers(model: nn.Module) -> list[BayesianModule]:
    return [m for m in model.modules() if isinstance(m, BayesianModule)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------- the bars
def test_keywords_and_partial_dictionary_both_give_flipout() -> None:
    by_keywords = dnn_to_bnn(small_cnn(), estimator="flipout", prior_sigma=0.1)
    by_dict = dnn_to_bnn(small_cnn(), {"type": "Flipout"})
    for model in (by_keywords, by_dict):
        layers = bayesian_layers(model)
        assert [type(m) for m in layers] == [BayesConv2d, BayesLinear]
        assert all(m.estimator == "flipout" for m in layers)
    assert all(float(m.weight_prior.sigma) == pytest.approx(0.1) for m in bayesian_layers(by_keywords))


def test_keywords_build_what_the_full_dictionary_builds() -> None:
    full = dict(REFERENCE_PRIOR_PARAMETERS, type="Flipout", prior_mu=0.05, prior_sigma=0.3,
                posterior_mu_init=0.01, posterior_rho_init=-4.0, moped_enable=True, moped_delta=0.2)
    from_dict = dnn_to_bnn(small_cnn(), full)
    from_keywords = dnn_to_bnn(small_cnn(), estimator="Flipout", prior_mu=0.05, prior_sigma=0.3,
                               posterior_mu_init=0.01, posterior_rho_init=-4.0, moped=True, moped_delta=0.2)
    a, b = state(from_dict), state(from_keywords)
    assert a.keys() == b.keys()
    for key in a:  # MOPED: per-weight priors and scales, every one identical
        assert torch.equal(a[key], b[key]), key
    assert conversion_history(from_dict)[-1] == conversion_history(from_keywords)[-1]
    x = torch.randn(4, 1, 6, 6)
    with noise_generator(7):
        out_dict = from_dict(x)
    with noise_generator(7):
        out_keywords = from_keywords(x)
    assert torch.equal(out_dict, out_keywords)


def test_partial_dictionary_and_omitted_keywords_take_the_one_default(monkeypatch) -> None:
    # DEFAULT_SETTINGS is the one place: replacing it changes every omitted setting.
    custom = ConversionSettings(estimator="local", prior_mu=0.2, prior_sigma=0.7, posterior_mu_init=0.0,
                                posterior_rho_init=-5.0, moped=False, moped_delta=0.3)
    monkeypatch.setattr(conversion, "DEFAULT_SETTINGS", custom)
    for model in (dnn_to_bnn(small_cnn(), {"prior_sigma": 0.4}), dnn_to_bnn(small_cnn(), prior_sigma=0.4)):
        layer = bayesian_layers(model)[-1]
        assert layer.estimator == "local"
        assert float(layer.weight_prior.mu) == pytest.approx(0.2)
        assert float(layer.weight_prior.sigma) == pytest.approx(0.4)
        assert torch.all(layer.weight_rho == -5.0)
        assert conversion_history(model)[-1].prior_parameters == dict(custom.reference_dict(), prior_sigma=0.4)
    assert normalize_prior_parameters(None) == custom.reference_dict()


def test_full_reference_dictionary_is_unchanged_by_the_defaults(monkeypatch) -> None:
    monkeypatch.setattr(conversion, "DEFAULT_SETTINGS", ConversionSettings(estimator="local", prior_sigma=0.7))
    model = dnn_to_bnn(small_cnn(), REFERENCE_PRIOR_PARAMETERS)
    layer = bayesian_layers(model)[-1]
    assert layer.estimator == "reparameterization" and float(layer.weight_prior.sigma) == 1.0
    assert normalize_prior_parameters(REFERENCE_PRIOR_PARAMETERS) == dict(REFERENCE_PRIOR_PARAMETERS,
                                                                          type="reparameterization")


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs,error,match", [
    ({"prior_sgima": 0.1}, TypeError, r"unknown keyword\(s\) 'prior_sgima' \(did you mean 'prior_sigma'\?\)"),
    ({"type": "flipout"}, TypeError, r"unknown keyword\(s\) 'type'.*valid: estimator, prior_mu"),
    ({"bnn_prior_parameters": {"typ": "Flipout"}}, KeyError, r"'typ' \(did you mean 'type'\?\).*moped_enable"),
    ({"bnn_prior_parameters": {"estimator": "flipout"}}, KeyError, r"unknown key\(s\) 'estimator'.*keywords"),
    ({"bnn_prior_parameters": {"type": "Flipout"}, "estimator": "local"}, TypeError, r"\['estimator'\] given both"),
    ({"bnn_prior_parameters": {"moped_enable": True}, "moped": True}, TypeError, r"\['moped'\] given both"),
    ({"estimator": "bayes"}, ValueError, "estimator must be"),
    ({"prior_sigma": 0.0}, ValueError, "prior_sigma must be > 0"),
    ({"moped_delta": float("inf")}, ValueError, "moped_delta must be a finite"),
    ({"moped": 1}, ValueError, "moped must be True or False"),
    ({"posterior_rho_init": "-3"}, ValueError, "posterior_rho_init must be a finite"),
    ({"prior": GaussianPrior(0.0, 1.0), "prior_sigma": 0.1}, ValueError, r"either prior= or \['prior_sigma'\]"),
    ({"prior": ScaleMixturePrior(), "moped": True}, ValueError, "cannot be combined with prior="),
    ({"prior": 0.1}, TypeError, "prior must be a torchbayes.priors.Prior"),
])
def test_bad_keywords_are_refused_by_name_and_leave_the_model(kwargs, error, match) -> None:
    model = small_cnn()
    before = state(model)
    with pytest.raises(error, match=match):
        dnn_to_bnn(model, **kwargs)
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert conversion_history(model) == ()


def test_settings_check_themselves() -> None:
    assert ConversionSettings(estimator="Flipout", prior_sigma=1).estimator == "flipout"
    assert isinstance(ConversionSettings(prior_sigma=1).prior_sigma, float)
    with pytest.raises(ValueError, match="prior_sigma"):
        ConversionSettings(prior_sigma=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_SETTINGS.prior_sigma = 2.0  # type: ignore[misc]


# ---------------------------------------------------------------- prior objects
def test_prior_object_reaches_every_layer_and_is_replayed(tmp_path) -> None:
    mixture = ScaleMixturePrior(0.25, 1.5, 0.01, num_samples=2)
    model = dnn_to_bnn(small_cnn(), estimator="flipout", prior=mixture)
    layers = bayesian_layers(model)
    priors = [p for layer in layers for _, _, _, p in layer.variational_parameters()]
    assert len(priors) == 4 and all(type(p) is ScaleMixturePrior for p in priors)
    assert all((p.pi, p.sigma1, p.sigma2, p.num_samples) == (0.25, 1.5, 0.01, 2) for p in priors)
    assert all(p is not mixture for p in priors)  # each layer holds its own copy
    report = conversion_history(model)[-1]
    assert report.prior == {"class": "ScaleMixturePrior", "pi": 0.25, "sigma1": 1.5, "sigma2": 0.01,
                            "num_samples": 2}
    assert ConversionReport.from_dict(report.to_dict()) == report
    # A checkpoint rebuilds the same model: same prior objects, same weights, same KL under one noise seed.
    save_checkpoint(model, tmp_path / "bnn.pt")
    again = rebuild(tmp_path / "bnn.pt", small_cnn())
    assert [type(p) for layer in bayesian_layers(again) for _, _, _, p in layer.variational_parameters()] == \
        [ScaleMixturePrior] * 4
    with noise_generator(3):
        kl_model = kl_divergence(model)
    with noise_generator(3):
        kl_again = kl_divergence(again)
    torch.testing.assert_close(kl_again, kl_model, rtol=0, atol=0)


def test_gaussian_prior_object_equals_prior_mu_sigma() -> None:
    by_object = dnn_to_bnn(small_cnn(), prior=GaussianPrior(0.1, 0.2))
    by_numbers = dnn_to_bnn(small_cnn(), prior_mu=0.1, prior_sigma=0.2)
    assert torch.equal(kl_divergence(by_object), kl_divergence(by_numbers))
    assert conversion_history(by_object)[-1].prior == {"class": "GaussianPrior", "mu": pytest.approx(0.1),
                                                       "sigma": pytest.approx(0.2)}


def test_custom_prior_class_is_used_but_not_replayable() -> None:
    class Laplace(GaussianPrior):
        pass

    model = dnn_to_bnn(copy.deepcopy(small_cnn()), prior=Laplace(0.0, 1.0))
    report = conversion_history(model)[-1]
    assert type(bayesian_layers(model)[0].weight_prior) is Laplace
    with pytest.raises(ValueError, match=r"cannot rebuild a .*Laplace prior"):
        ConversionReport.from_dict(report.to_dict()).reapply(small_cnn())


def test_an_explicit_prior_mean_or_object_turns_the_default_moped_off(monkeypatch) -> None:
    monkeypatch.setattr(conversion, "DEFAULT_SETTINGS", ConversionSettings(moped=True, moped_delta=0.3))
    base = small_cnn()

    def moped_on(**kwargs) -> bool:
        return conversion_history(dnn_to_bnn(copy.deepcopy(base), **kwargs))[-1].prior_parameters["moped_enable"]

    assert moped_on() and moped_on(prior_sigma=0.5)  # MOPED uses prior_sigma: stays on
    assert not moped_on(prior_mu=0.1) and not moped_on(prior=ScaleMixturePrior())
    assert not moped_on(bnn_prior_parameters={"prior_mu": 0.1})
    assert moped_on(prior_mu=0.1, moped=True)  # explicit: the reference's MOPED ignores prior_mu too
    layer = bayesian_layers(dnn_to_bnn(copy.deepcopy(base), prior_mu=0.1))[0]
    assert float(layer.weight_prior.mu) == pytest.approx(0.1)
