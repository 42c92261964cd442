"""dnn_to_bnn / bnn_to_dnn: conversion by type, settings kept, atomic failure, summary."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes import bnn_to_dnn, conversion_history, dnn_to_bnn, get_kl_loss, model_summary
from torchbayes.conversion import DEFAULT_SETTINGS, ConversionReport, register_conversion
from torchbayes.nn import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesianModule,
    BayesLinear,
    noise_generator,
    posterior_mean,
)

torchvision = pytest.importorskip("torchvision")


def readme_params(type_: str = "Reparameterization", moped: bool = False) -> dict:
    # The dictionary exactly as in Bayesian-Torch's README.
    return {
        "prior_mu": 0.0,
        "prior_sigma": 1.0,
        "posterior_mu_init": 0.0,
        "posterior_rho_init": -3.0,
        "type": type_,
        "moped_enable": moped,
        "moped_delta": 0.5,
    }


def snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def assert_unchanged(model: nn.Module, before) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    for k in state:
        assert torch.equal(state[k], before[1][k]), k


def train_lowers_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> None:
    """Two Adam steps on a fixed batch lower the README's loss (CE + KL / batch size).

    Every evaluation uses the same weight noise (common random numbers): the steps then
    descend one fixed, smooth function, so a small step must lower it whenever the
    gradients through mu and rho are right. With fresh noise per step, a batch of 2
    and MOPED's large sigmas, Monte Carlo noise could hide the decrease.
    """
    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(x), y) + get_kl_loss(model) / x.shape[0]

    model.train()
    with noise_generator(123), torch.no_grad():
        before = loss_fn().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        with noise_generator(123):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
    with noise_generator(123), torch.no_grad():
        after = loss_fn().item()
    assert math.isfinite(before) and after < before, (before, after)


# ---------------------------------------------------------------- the README
@pytest.mark.parametrize("type_", ["Reparameterization", "Flipout"])
@pytest.mark.parametrize("moped", [False, True])
def test_readme_snippet_resnet18(type_: str, moped: bool) -> None:
    model = torchvision.models.resnet18(num_classes=10)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    original = copy.deepcopy(model)
    dnn_to_bnn(model, readme_params(type_, moped))

    bayes = [m for m in model.modules() if isinstance(m, BayesianModule)]
    assert sum(isinstance(m, BayesConv2d) for m in bayes) == n_conv == 20
    assert isinstance(model.fc, BayesLinear)
    assert len(bayes) == n_conv + 1
    assert all(m.estimator == type_.lower() for m in bayes)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())

    # Batch 4 at 64x64: layer4's BatchNorm sees 16 values per channel (with 2 values it
    # outputs +-1 and the loss is nearly discontinuous in the weights).
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    # Posterior means start at the deterministic weights: same function in eval mode.
    model.eval(), original.eval()
    with posterior_mean(model), torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    out = model.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 10)  # Tensor only, no (out, kl)
    kl = get_kl_loss(model)
    assert torch.isfinite(kl) and kl > 0
    train_lowers_loss(model, x, y)


def test_readme_snippet_resnet18_last_layer_only() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    total = sum(p.numel() for p in model.parameters())
    dnn_to_bnn(model, readme_params(), include=["fc"])
    bayes = [n for n, m in model.named_modules() if isinstance(m, BayesianModule)]
    assert bayes == ["fc"]
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20
    summary = model_summary(model)
    fc = 512 * 10 + 10  # hand count: weight + bias of the final layer
    assert summary.bayesian_layers == 1
    assert summary.bayesian_weights == fc
    assert summary.variational_parameters == 2 * fc
    assert summary.deterministic_parameters == total - fc
    assert conversion_history(model)[-1].converted == ("fc",)
    # Batch 4 at 64x64: layer4's BatchNorm sees 16 values per channel (with 2 values it
    # outputs +-1 and the loss is nearly discontinuous in the weights).
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    assert model(x).shape == (4, 10)
    assert torch.isfinite(get_kl_loss(model))
    train_lowers_loss(model, x, y)


@pytest.mark.parametrize("type_", ["local", "LOCAL", "flipout", "reparameterization"])
def test_type_accepts_local_and_any_case(type_: str) -> None:
    model = dnn_to_bnn(nn.Sequential(nn.Linear(3, 4)), readme_params(type_))
    assert model[0].estimator == type_.lower()
    assert model(torch.randn(5, 3)).shape == (5, 4)


def test_none_means_the_default_settings() -> None:
    model = dnn_to_bnn(nn.Sequential(nn.Linear(3, 4)))
    layer, defaults = model[0], DEFAULT_SETTINGS
    assert layer.estimator == defaults.estimator
    if defaults.prior is None and not defaults.moped:
        assert float(layer.weight_prior.mu) == defaults.prior_mu
        assert float(layer.weight_prior.sigma) == pytest.approx(defaults.prior_sigma)
        assert torch.all(layer.weight_rho == defaults.posterior_rho_init)
    assert conversion_history(model)[-1].prior_parameters == defaults.reference_dict()


def test_dictionary_values_reach_the_layers() -> None:
    base = nn.Sequential(nn.Linear(3, 4))
    params = dict(readme_params("Flipout"), prior_mu=0.1, prior_sigma=0.5, posterior_mu_init=0.25,
                  posterior_rho_init=-4.0)
    model = dnn_to_bnn(copy.deepcopy(base), params)
    layer = model[0]
    assert layer.estimator == "flipout"
    for name in ("weight", "bias"):
        prior = getattr(layer, f"{name}_prior")
        assert float(prior.mu) == pytest.approx(0.1) and float(prior.sigma) == pytest.approx(0.5)
        assert torch.all(getattr(layer, f"{name}_rho") == -4.0)
        # posterior_mu_init shifts the pretrained weights (0 by default).
        torch.testing.assert_close(getattr(layer, f"{name}_mu"), getattr(base[0], name) + 0.25)


# ----------------------------------------------------------- matching by type
class LinearLookalike(nn.Module):
    """Named like a linear layer, but is not one (the reference converts it by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class ConvLookalike(LinearLookalike):
    pass


class ScaledLinear(nn.Linear):
    """A real nn.Linear subclass."""


def test_conversion_is_by_type_not_by_name() -> None:
    model = nn.Sequential(LinearLookalike(), ConvLookalike(), ScaledLinear(4, 3), nn.ReLU())
    dnn_to_bnn(model)
    assert type(model[0]) is LinearLookalike and type(model[1]) is ConvLookalike
    assert isinstance(model[2], BayesLinear)
    assert conversion_history(model)[-1].converted == ("2",)
    assert model(torch.randn(2, 4)).shape == (2, 3)


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(self.encoder(h)))


def test_attention_layers_are_left_and_reported() -> None:
    model = AttentionNet().eval()
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="attn.out_proj") as record:
        dnn_to_bnn(model)
    message = str(record[0].message)
    for name in ("encoder.self_attn.out_proj", "encoder.linear1", "encoder.linear2"):
        assert repr(name) in message
    report = conversion_history(model)[-1]
    assert report.converted == ("head",)
    assert set(report.skipped) == {"attn.out_proj", "encoder.self_attn.out_proj",
                                   "encoder.linear1", "encoder.linear2"}
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    tokens = torch.randint(0, 20, (3, 5))
    with posterior_mean(model), torch.no_grad():  # eval: TransformerEncoderLayer's fast path
        torch.testing.assert_close(model(tokens), original(tokens))
    model.train()
    assert model(tokens).shape == (3, 5, 3)


def test_excluding_the_attention_layers_silences_the_warning() -> None:
    model = AttentionNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dnn_to_bnn(model, exclude=["attn", "encoder"])
    assert conversion_history(model)[-1].skipped == {}


def test_norms_and_embeddings_untouched_and_working() -> None:
    embed, bn, ln = nn.Embedding(10, 6), nn.BatchNorm1d(6), nn.LayerNorm(6)
    model = nn.Sequential(embed, nn.Flatten(0, -1), nn.Unflatten(0, (4, 6)), ln, nn.Linear(6, 6), bn)
    original = copy.deepcopy(model).eval()
    dnn_to_bnn(model)
    assert model[0] is embed and model[3] is ln and model[5] is bn
    tokens = torch.randint(0, 10, (4,))
    model.train()(tokens).sum().backward()
    assert bn.weight.grad is not None and embed.weight.grad is not None
    model.eval()
    original.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("0.", "3.", "5."))},
                             strict=False)  # same BatchNorm statistics after the training pass
    with posterior_mean(model), torch.no_grad():
        torch.testing.assert_close(model(tokens), original(tokens))


# -------------------------------------------------------- constructor arguments
LAYERS = [
    (nn.Linear(5, 3, bias=False, dtype=torch.float64), BayesLinear, (2, 5)),
    (nn.Linear(5, 3), BayesLinear, (2, 7, 5)),
    (nn.Conv1d(4, 6, 3, padding="same", dilation=2, padding_mode="circular", groups=2), BayesConv1d, (2, 4, 11)),
    (nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 2), groups=2, padding_mode="reflect"), BayesConv2d,
     (2, 4, 9, 8)),
    (nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, bias=False, padding_mode="replicate"), BayesConv3d,
     (1, 2, 5, 6, 4)),
    (nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1, dilation=2, padding=1), BayesConvTranspose1d,
     (2, 4, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=(2, 3), output_padding=(1, 0), groups=2), BayesConvTranspose2d,
     (2, 4, 5, 5)),
    (nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False), BayesConvTranspose3d, (1, 2, 3, 3, 3)),
]
HYPERPARAMETERS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                   "padding", "dilation", "groups", "padding_mode", "output_padding")


@pytest.mark.parametrize("layer,bayes_type,shape", LAYERS, ids=lambda v: type(v).__name__)
def test_constructor_arguments_kept(layer: nn.Module, bayes_type: type, shape: tuple) -> None:
    x = torch.randn(shape, dtype=layer.weight.dtype)
    model = dnn_to_bnn(nn.Sequential(copy.deepcopy(layer)))
    converted = model[0]
    assert type(converted) is bayes_type
    assert converted.weight_mu.dtype == layer.weight.dtype
    assert (converted.bias_mu is None) == (layer.bias is None)
    for name in HYPERPARAMETERS:
        if hasattr(layer, name):
            assert getattr(converted, name) == getattr(layer, name), name
    with posterior_mean(model), torch.no_grad():
        torch.testing.assert_close(model(x), layer(x))
    # ... and back: a plain torch layer of the same type computing the same thing.
    plain = bnn_to_dnn(model)[0]
    assert type(plain) is type(layer)
    for name in HYPERPARAMETERS:
        if hasattr(layer, name):
            assert getattr(plain, name) == getattr(layer, name), name
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x))


def test_a_bare_layer_returns_its_twin() -> None:
    layer = nn.Conv2d(3, 4, 3)
    converted = dnn_to_bnn(layer)
    assert isinstance(converted, BayesConv2d) and type(layer) is nn.Conv2d
    assert isinstance(bnn_to_dnn(converted), nn.Conv2d)


def test_shared_module_stays_shared_and_tied_weights_are_left() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    dnn_to_bnn(model)
    assert isinstance(model[0], BayesLinear) and model[0] is model[2]

    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # tied weights: converting either would untie them
    tied = nn.Sequential(a, b, nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="shared with"):
        dnn_to_bnn(tied)
    assert type(tied[0]) is nn.Linear and type(tied[1]) is nn.Linear and isinstance(tied[2], BayesLinear)


# ------------------------------------------------------------ include/exclude
def test_include_exclude_forms() -> None:
    def converted(**kw) -> list[str]:
        return list(conversion_history(dnn_to_bnn(torchvision.models.resnet18(num_classes=10), **kw))[-1].converted)

    assert converted(include="layer4.1") == ["layer4.1.conv1", "layer4.1.conv2"]
    assert converted(include=["layer*.0.conv1"]) == [f"layer{i}.0.conv1" for i in range(1, 5)]
    assert converted(include=lambda name, m: isinstance(m, nn.Linear)) == ["fc"]
    stem_kept = converted(exclude=["conv1", "layer1"])
    assert len(stem_kept) == 21 - 1 - 4 and not any(n.startswith(("conv1", "layer1.")) for n in stem_kept)
    assert converted(include="layer4", exclude="layer4.0") == ["layer4.1.conv1", "layer4.1.conv2"]


# ------------------------------------------------------------------ bad input
def _bad(key: str, value) -> dict:
    params = readme_params()
    if value is KeyError:
        del params[key]
    else:
        params[key] = value
    return params


@pytest.mark.parametrize("params,error,match", [
    (_bad("prior_variance", 1.0), KeyError, "prior_variance"),
    (_bad("prior_sigm", 1.0), KeyError, r"'prior_sigm' \(did you mean 'prior_sigma'\?\)"),
    (_bad("type", "MCDropout"), ValueError, "'type'"),
    (_bad("moped_delta", 0.0), ValueError, "moped_delta"),
    (_bad("moped_delta", -0.5), ValueError, "moped_delta"),
    (_bad("prior_sigma", 0.0), ValueError, "prior_sigma"),
    (_bad("posterior_rho_init", float("nan")), ValueError, "posterior_rho_init"),
    (_bad("moped_enable", "yes"), ValueError, "moped_enable"),
    ([("type", "Flipout")], TypeError, "bnn_prior_parameters"),
])
def test_bad_dictionary_names_the_key_and_leaves_model(params, error, match) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        dnn_to_bnn(model, params)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"include": ["fcc"]}, ValueError, "include: 'fcc' matches no module"),
    ({"exclude": "nope"}, ValueError, "exclude: 'nope'"),
    ({"include": [3]}, TypeError, "include must be"),
    ({"include": ["0"], "exclude": ["0"]}, ValueError, "nothing to convert"),
])
def test_bad_selection_leaves_model(kwargs, error, match) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        dnn_to_bnn(model, **kwargs)
    assert_unchanged(model, before)


def test_nothing_to_convert_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to convert"):
        dnn_to_bnn(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3), nn.Embedding(3, 3)))
    model = dnn_to_bnn(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="nothing to convert"):
        dnn_to_bnn(model)  # already Bayesian
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dnn_to_bnn("resnet")


def test_failure_part_way_leaves_model_unchanged() -> None:
    # The first layer converts fine; the second (an uninitialised lazy layer) cannot.
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LazyLinear(2))
    before = snapshot(nn.Sequential(model[0], model[1]))
    with pytest.raises(ValueError, match=r"'2'.*lazy"):
        dnn_to_bnn(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.LazyLinear
    assert_unchanged(nn.Sequential(model[0], model[1]), before)
    assert conversion_history(model) == ()


# ------------------------------------------------------------------ bnn_to_dnn
def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.ReLU()), nn.Flatten(), nn.Linear(36, 5))


def test_bnn_to_dnn_returns_plain_copy_with_posterior_means() -> None:
    model = dnn_to_bnn(small_cnn(), readme_params("Flipout", True))
    model[1].running_mean.uniform_()  # a non-trivial deterministic part is copied as it is
    before = snapshot(model)
    plain = bnn_to_dnn(model)
    assert not any(isinstance(m, BayesianModule) for m in plain.modules())
    assert type(plain[5]) is nn.Linear and type(plain[3][0]) is nn.Conv2d and type(plain[0]) is nn.Conv2d
    assert conversion_history(plain) == ()
    assert_unchanged(model, before)  # the input is untouched
    x = torch.randn(3, 1, 8, 8)
    model.eval(), plain.eval()
    with posterior_mean(model), torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
    with pytest.raises(ValueError, match="no Bayesian layers"):
        bnn_to_dnn(plain)


def test_state_dict_round_trip_loses_nothing(tmp_path) -> None:
    base = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model = dnn_to_bnn(copy.deepcopy(base), readme_params("Flipout", moped=True))  # per-weight priors
    model[0].weight_rho.data.uniform_(-5, -2)
    torch.save(model.state_dict(), tmp_path / "bnn.pt")
    fresh = dnn_to_bnn(copy.deepcopy(base), readme_params("Flipout"))  # scalar priors
    fresh.load_state_dict(torch.load(tmp_path / "bnn.pt", weights_only=True))
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh[0].weight_prior.mu.shape == (3, 1, 3, 3)
    assert torch.equal(torchbayes.kl_divergence(fresh), torchbayes.kl_divergence(model))


def test_conversion_history_records_settings_and_replays() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    dnn_to_bnn(model, readme_params("Flipout"), include="layer4")
    dnn_to_bnn(model, dict(readme_params("local"), prior_sigma=0.1), include="fc")
    history = conversion_history(model)
    assert [r.prior_parameters["type"] for r in history] == ["flipout", "local"]
    assert history[1].converted == ("fc",) and len(history[0].converted) == 5
    # Plain types only: JSON / weights_only friendly, and replayable on a fresh model.
    restored = [ConversionReport.from_dict(r.to_dict()) for r in history]
    assert restored == list(history)
    fresh = torchvision.models.resnet18(num_classes=10)
    for report in restored:
        report.reapply(fresh)
    assert [(n, type(m)) for n, m in fresh.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    fresh.load_state_dict(model.state_dict())
    assert fresh.fc.estimator == "local" and float(fresh.fc.weight_prior.sigma) == pytest.approx(0.1)


def test_register_conversion(monkeypatch) -> None:
    class Affine(nn.Linear):
        pass

    class BayesAffine(BayesLinear):
        _torch_cls = Affine

    from torchbayes import conversion
    monkeypatch.setattr(conversion, "_CONVERSIONS", dict(conversion._CONVERSIONS))
    register_conversion(Affine, BayesAffine)
    model = dnn_to_bnn(nn.Sequential(Affine(2, 3), nn.Linear(3, 1)))
    assert type(model[0]) is BayesAffine and type(model[1]) is BayesLinear
    assert type(bnn_to_dnn(model)[0]) is Affine
    with pytest.raises(TypeError, match="bayes_type"):
        register_conversion(nn.GRU, nn.Linear)


# --------------------------------------------------------------------- summary
def test_summary_counts_match_hand_counts() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    conv, bn, fc = 4 * 1 * 9 + 4, 4 + 4, 144 * 10 + 10
    plain = model_summary(model)
    assert (plain.bayesian_weights, plain.deterministic_parameters) == (0, conv + bn + fc)

    dnn_to_bnn(model, moped=False, include=["0"])  # scalar priors (MOPED's are per weight, below)
    s = model_summary(model)
    assert s.bayesian_layers == 1
    assert s.bayesian_weights == conv and s.variational_parameters == 2 * conv
    assert s.deterministic_parameters == bn + fc
    assert s.total_parameters == 2 * conv + bn + fc
    assert s.prior_elements == 4  # scalar mu and sigma for weight and bias
    assert s.bayesian_bytes == 2 * conv * 4 and s.deterministic_bytes == (bn + fc) * 4
    assert s.prior_bytes == 4 * 4
    assert s.buffer_bytes == (4 + 4) * 4 + 8  # running mean/var (float32), num_batches_tracked (int64)
    assert [(r.name, r.bayesian_weights, r.deterministic_parameters) for r in s.layers] == [
        ("0", conv, 0), ("1", 0, bn), ("3", 0, fc)]
    assert "Bayesian layers: 1" in str(s)

    moped_model = dnn_to_bnn(nn.Sequential(nn.Linear(3, 2)), readme_params(moped=True))
    # MOPED: per-weight prior means (6 + 2), scalar prior sigmas (2).
    assert model_summary(moped_model).prior_elements == 6 + 2 + 2
