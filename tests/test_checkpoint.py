"""Checkpoints: round trip, rebuild from the base architecture, corruption and unsafe files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes import CheckpointError, load_checkpoint, rebuild, save_checkpoint
from torchbayes.conversion import dnn_to_bnn, moped
from torchbayes.nn import BayesConv2d, BayesLinear, posterior_mean
from torchbayes.priors import GaussianPrior, ScaleMixturePrior

PRIOR = {"prior_mu": 0.0, "prior_sigma": 0.5, "posterior_mu_init": 0.0, "posterior_rho_init": -4.0,
         "type": "Flipout", "moped_enable": False, "moped_delta": 0.5}


def base_net() -> nn.Module:
    """A small LeNet-like deterministic architecture for 8x8 digits."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                         nn.ReLU(), nn.Linear(16, 10))


def bayes_net() -> nn.Module:
    return nn.Sequential(BayesConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), BayesLinear(4 * 6 * 6, 16),
                         nn.ReLU(), BayesLinear(16, 10, estimator="local"))


def train_a_little(model: nn.Module, digits, steps: int = 3) -> None:
    """Move every parameter away from its initial value (mu and rho alike)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torchbayes.elbo_loss(F.cross_entropy(model(digits.train_x[:64]), digits.train_y[:64]),
                                    model, num_data=len(digits.train_y))
        opt.zero_grad()
        loss.backward()
        opt.step()


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k


def test_round_trip_restores_weights_estimators_priors_and_extra(tmp_path, digits):
    model = bayes_net()
    # A per-weight (MOPED-style) prior: its buffers change shape, which a fresh model must adopt.
    model[3].set_prior("weight", GaussianPrior(torch.randn(16, 144) * 0.1, 0.3))
    model[0].estimator = "flipout"
    train_a_little(model, digits)
    path = tmp_path / "bnn.pt"
    save_checkpoint(model, path, extra={"epoch": 3, "history": [0.5, 0.25], "note": "ok"})

    fresh = bayes_net()
    assert fresh[0].estimator == "reparameterization"
    extra = load_checkpoint(path, fresh)
    assert extra == {"epoch": 3, "history": [0.5, 0.25], "note": "ok"}
    assert_state_equal(fresh, state_copy(model))
    assert [m.estimator for m in (fresh[0], fresh[3], fresh[5])] == ["flipout", "reparameterization", "local"]
    assert fresh[3].weight_prior.mu.shape == (16, 144)
    assert torch.equal(torchbayes.kl_divergence(fresh), torchbayes.kl_divergence(model))
    x = digits.test_x[:32]
    with posterior_mean(model), posterior_mean(fresh):
        assert torch.equal(fresh(x), model(x))
    # Identical weights and estimators draw identically from the same noise.
    with torchbayes.noise_generator(7):
        a = model(x)
    with torchbayes.noise_generator(7):
        b = fresh(x)
    assert torch.equal(a, b)


def test_scale_mixture_hyperparameters_travel_with_the_checkpoint(tmp_path):
    model = nn.Sequential(BayesLinear(3, 2, prior=ScaleMixturePrior(0.3, 2.0, 0.01, num_samples=2)))
    save_checkpoint(model, tmp_path / "m.pt")
    fresh = nn.Sequential(BayesLinear(3, 2, prior=ScaleMixturePrior()))
    load_checkpoint(tmp_path / "m.pt", fresh)
    prior = fresh[0].weight_prior
    assert (prior.pi, prior.sigma1, prior.sigma2, prior.num_samples) == (0.3, 2.0, 0.01, 2)
    # A Gaussian-prior model is a different model: refused, not silently half-loaded.
    gaussian = nn.Sequential(BayesLinear(3, 2))
    before = state_copy(gaussian)
    with pytest.raises(CheckpointError, match="ScaleMixturePrior in the checkpoint but GaussianPrior"):
        load_checkpoint(tmp_path / "m.pt", gaussian)
    assert_state_equal(gaussian, before)


@pytest.mark.parametrize("moped_enable", [False, True])
def test_rebuild_from_base_architecture_gives_identical_outputs(tmp_path, digits, moped_enable):
    torch.manual_seed(1)
    pretrained = base_net()
    bnn = dnn_to_bnn(base_net(), {**PRIOR, "moped_enable": moped_enable}, exclude=["0"])
    if not moped_enable:
        moped(bnn, pretrained, delta=0.2)  # per-weight priors set after conversion
    train_a_little(bnn, digits)
    path = tmp_path / "bnn.pt"
    save_checkpoint(bnn, path)

    base = base_net()  # fresh random weights: all must come from the checkpoint
    base_before = state_copy(base)
    rebuilt = rebuild(path, base)
    assert_state_equal(base, base_before)  # the base model itself is not converted
    assert isinstance(rebuilt[0], nn.Conv2d) and isinstance(rebuilt[3], BayesLinear)
    assert rebuilt[5].estimator == "flipout"
    assert_state_equal(rebuilt, state_copy(bnn))
    x = digits.test_x[:64]
    with posterior_mean(bnn), posterior_mean(rebuilt):
        assert torch.equal(rebuilt(x), bnn(x))
    assert torch.equal(torchbayes.kl_divergence(rebuilt), torchbayes.kl_divergence(bnn))


def test_rebuild_needs_a_recorded_conversion(tmp_path):
    save_checkpoint(bayes_net(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="records no dnn_to_bnn conversion"):
        rebuild(tmp_path / "m.pt", base_net())


def test_wrong_architecture_is_refused_and_model_untouched(tmp_path):
    save_checkpoint(bayes_net(), tmp_path / "m.pt")
    other = nn.Sequential(BayesConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), BayesLinear(4 * 6 * 6, 32),
                          nn.ReLU(), BayesLinear(32, 10))
    before = state_copy(other)
    with pytest.raises(CheckpointError, match=r"'3.weight_mu' has shape \(16, 144\) in the checkpoint"):
        load_checkpoint(tmp_path / "m.pt", other)
    assert_state_equal(other, before)
    with pytest.raises(CheckpointError, match=r"missing keys \['6.bias', '6.weight'\]"):
        load_checkpoint(tmp_path / "m.pt", nn.Sequential(*bayes_net(), nn.Linear(10, 2)))
    with pytest.raises(CheckpointError, match="layer '0' is a BayesConv2d in the checkpoint but BayesLinear"):
        load_checkpoint(tmp_path / "m.pt", nn.Sequential(BayesLinear(3, 2)))


def test_truncated_file_gives_clear_error_and_leaves_model_untouched(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(bayes_net(), path)
    data = path.read_bytes()
    model = bayes_net()
    before = state_copy(model)
    for keep in (len(data) // 2, len(data) - 30, 10):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            load_checkpoint(path, model)
        assert_state_equal(model, before)


def test_flipped_bytes_in_tensor_data_are_detected(tmp_path):
    model = bayes_net()
    with torch.no_grad():  # a recognisable byte pattern to corrupt inside the archive
        model[5].bias_mu.copy_(torch.arange(10, dtype=torch.float32) + 1000.0)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path)
    data = bytearray(path.read_bytes())
    offset = bytes(data).find((torch.arange(10, dtype=torch.float32) + 1000.0).numpy().tobytes())
    assert offset > 0
    data[offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    target = bayes_net()
    before = state_copy(target)
    # torch.load does not check the archive's CRCs; the stored SHA-256 catches the change.
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, target)
    assert_state_equal(target, before)


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "torchbayes.checkpoint", "format_version": 1, "state_dict": {},
                "payload": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path, bayes_net())
    assert not marker.exists()
    # A pickle that is not even a torch archive is refused as well.
    with open(path, "wb") as f:
        pickle.dump(_Exploit(str(marker)), f, protocol=2)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, bayes_net())
    assert not marker.exists()


def test_plain_state_dict_file_is_not_mistaken_for_a_checkpoint(tmp_path):
    torch.save(bayes_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="not a torchbayes checkpoint"):
        load_checkpoint(tmp_path / "sd.pt", bayes_net())


def test_unsafe_extra_is_rejected_before_writing(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(bayes_net(), path, extra={"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"extra\['optimizer'\] must contain only tensors"):
        save_checkpoint(bayes_net(), path, extra={"optimizer": torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)})
    assert path.read_bytes() == before  # the previous checkpoint survives the failed save
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_optimizer_state_and_wrapped_models_round_trip(tmp_path, digits):
    model = bayes_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(digits.train_x[:32]), digits.train_y[:32]).backward()
    opt.step()
    wrapped = nn.DataParallel(model)  # a wrapper whose state_dict keys carry "module."
    save_checkpoint(wrapped, tmp_path / "m.pt", extra={"optimizer": opt.state_dict()})
    fresh = bayes_net()
    extra = load_checkpoint(tmp_path / "m.pt", fresh)
    assert_state_equal(fresh, state_copy(model))
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(extra["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_missing_file_and_newer_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt", bayes_net())
    torch.save({"format": "torchbayes.checkpoint", "format_version": 99, "state_dict": {}}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "new.pt", bayes_net())
    assert os.path.exists(tmp_path / "new.pt")
