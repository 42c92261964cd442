"""End to end: a Bayesian MLP trained with the ELBO learns scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.nn import BayesLinear


def test_bayesian_mlp_trained_with_elbo_reaches_95_percent_on_digits(digits):
    torch.set_num_threads(1)  # ~900 tiny steps: thread hand-offs would dominate (conftest restores)
    x_train, y_train = digits.train_x.flatten(1), digits.train_y
    x_test, y_test = digits.test_x.flatten(1), digits.test_y
    kwargs = {"estimator": "local", "posterior_rho_init": -5.0, "prior_sigma": 1.0}
    model = nn.Sequential(BayesLinear(64, 128, **kwargs), nn.ReLU(), BayesLinear(128, 10, **kwargs))
    epochs, batch_size, num_data = 40, 64, len(x_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    kl_start = torchbayes.kl_divergence(model).item()
    for _ in range(epochs):
        for idx in torch.randperm(num_data).split(batch_size):
            nll = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss = torchbayes.elbo_loss(nll, model, num_data)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    with torch.no_grad():
        probs = torch.stack([F.softmax(model(x_test), -1) for _ in range(20)]).mean(0)
        accuracy = (probs.argmax(-1) == y_test).float().mean().item()
        with torchbayes.posterior_mean(model):
            mean_accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    # Measured 0.960-0.964 over seeds 0-3 (the test's seed is fixed); a plain MLP gets ~0.97.
    assert accuracy >= 0.95, accuracy
    assert mean_accuracy >= 0.95, mean_accuracy
    # The KL term was optimised too: the posterior moved towards the prior.
    assert torchbayes.kl_divergence(model).item() < kl_start


def test_elbo_loss_is_nll_plus_kl_over_num_data_and_validates():
    model = nn.Sequential(BayesLinear(3, 2))
    nll = torch.tensor(0.7)
    expected = nll + torchbayes.kl_divergence(model) / 100
    torch.testing.assert_close(torchbayes.elbo_loss(nll, model, 100), expected)
    torch.testing.assert_close(torchbayes.elbo_loss(nll, model, 100, kl_weight=0.0), nll)
    with pytest.raises(ValueError, match="num_data"):
        torchbayes.elbo_loss(nll, model, 0)
    with pytest.raises(ValueError, match="nll"):
        torchbayes.elbo_loss(torch.ones(3), model, 10)
