"""Checkpoint interchange with Bayesian-Torch: its trained checkpoints load into torchbayes and back."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchbayes import dnn_to_bnn, get_kl_loss, load_reference_state_dict, reference_state_dict
from torchbayes.nn import posterior_mean


def params(type_: str = "Reparameterization", prior_sigma: float = 1.0) -> dict:
    return {"prior_mu": 0.0, "prior_sigma": prior_sigma, "posterior_mu_init": 0.0,
            "posterior_rho_init": -3.0, "type": type_, "moped_enable": False, "moped_delta": 0.5}


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 10),
    )


@pytest.fixture(params=["Reparameterization", "Flipout"])
def trained_reference(request, reference, digits) -> nn.Module:
    """A CNN converted by Bayesian-Torch's own dnn_to_bnn, trained for a few steps."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn as reference_dnn_to_bnn
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss as reference_kl

    model = cnn()
    reference_dnn_to_bnn(model, params(request.param, prior_sigma=0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = digits.train_x[:128], digits.train_y[:128]
    for _ in range(5):
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + reference_kl(model) / len(x)).backward()
        optimizer.step()
    model.type_ = request.param
    return model


def reference_posterior_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's output with every sigma -> 0 exactly: softplus(-1e4) = 0 in float32."""
    frozen = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in frozen.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("rho_"):
                p.fill_(-1e4)
        return frozen(x)


def test_reference_checkpoint_loads_into_torchbayes(trained_reference, digits, tmp_path) -> None:
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss as reference_kl

    torch.save(trained_reference.state_dict(), tmp_path / "reference.pt")
    state = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert "6.mu_weight" in state and "0.mu_kernel" in state and "0.prior_weight_mu" not in state

    ours = dnn_to_bnn(cnn(), params(trained_reference.type_, prior_sigma=0.5))
    load_reference_state_dict(ours, state)
    assert torch.equal(ours[0].weight_mu, state["0.mu_kernel"])
    assert torch.equal(ours[8].bias_rho, state["8.rho_bias"])
    assert torch.equal(ours[1].running_var, state["1.running_var"])

    x = digits.test_x[:64]
    with posterior_mean(ours.eval()), torch.no_grad():
        torch.testing.assert_close(ours(x), reference_posterior_mean(trained_reference, x))
    # Same priors (from the same dictionary), same posterior: the same KL.
    torch.testing.assert_close(get_kl_loss(ours), reference_kl(trained_reference), rtol=1e-6, atol=0)

    # ... and back: a fresh reference model loads our state dict (strictly) and has
    # exactly the trained parameters and statistics.
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn as reference_dnn_to_bnn

    torch.save(reference_state_dict(ours), tmp_path / "back.pt")
    fresh = cnn()
    reference_dnn_to_bnn(fresh, params(trained_reference.type_, prior_sigma=0.5))
    fresh.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True))
    for key, value in trained_reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_reference_model_as_source_brings_its_priors(trained_reference) -> None:
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss as reference_kl

    # Our model was converted with other priors (sigma 1): the reference model, unlike its
    # state dict, carries its priors (sigma 0.5) and they are loaded, kept scalar.
    ours = dnn_to_bnn(cnn(), params(trained_reference.type_, prior_sigma=1.0))
    load_reference_state_dict(ours, trained_reference)
    assert ours[0].weight_prior.sigma.shape == () and float(ours[0].weight_prior.sigma) == 0.5
    torch.testing.assert_close(get_kl_loss(ours), reference_kl(trained_reference), rtol=1e-6, atol=0)
    with_priors = reference_state_dict(ours, include_priors=True)
    assert torch.equal(with_priors["6.prior_weight_sigma"], torch.full((16, 72), 0.5))


def test_bad_checkpoints_leave_model_unchanged(reference) -> None:
    ours = dnn_to_bnn(cnn())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    good = reference_state_dict(ours)
    good = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in good.items()}

    missing = {k: v for k, v in good.items() if k != "6.mu_weight"}
    with pytest.raises(KeyError, match="6.weight_mu"):
        load_reference_state_dict(ours, missing)
    with pytest.raises(KeyError, match="extra"):
        load_reference_state_dict(ours, dict(good, extra=torch.zeros(1)))
    wrong = dict(good, **{"8.mu_weight": torch.zeros(10, 15)})
    with pytest.raises(ValueError, match=r"'8.weight_mu' has shape \(10, 15\)"):
        load_reference_state_dict(ours, wrong)
    with pytest.raises(TypeError, match="source"):
        load_reference_state_dict(ours, [1, 2])
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Non-strict: unknown keys are ignored, the rest is loaded.
    load_reference_state_dict(ours, dict(missing, extra=torch.zeros(1)), strict=False)
    assert torch.equal(ours[6].weight_mu, before["6.weight_mu"])
    assert torch.equal(ours[8].weight_mu, good["8.mu_weight"])
