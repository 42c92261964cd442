"""Temperature scaling: recovers a known temperature, and calibrates a real over-confident model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchbayes import TemperatureScaling
from torchbayes.metrics import accuracy, expected_calibration_error, negative_log_likelihood


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Small models and L-BFGS on a few thousand logits gain nothing from a second thread,
    # and its wake-up stalls make them ~50x slower on a loaded machine. (Runs after the
    # conftest fixture that sets 2 threads, which restores 2 for the next test.)
    torch.set_num_threads(1)


def _sum_nll(logits: torch.Tensor, labels: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits / log_t.exp(), labels, reduction="sum")


def test_recovers_the_temperature_that_generated_the_labels():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(5_000, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(F.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    # A model that is over-confident by a factor of 3: the right temperature is 3.
    scaler = TemperatureScaling().fit(3 * true_logits, labels)
    log_t = torch.tensor(math.log(scaler.temperature), dtype=torch.float64, requires_grad=True)
    # Standard error of the maximum-likelihood log T from the observed Fisher information
    # (the NLL's curvature at the optimum); 5 standard errors allowed.
    (grad,) = torch.autograd.grad(_sum_nll(3 * true_logits, labels, log_t), log_t, create_graph=True)
    (curvature,) = torch.autograd.grad(grad, log_t)
    se = float(curvature) ** -0.5
    assert abs(math.log(scaler.temperature) - math.log(3.0)) < 5 * se
    assert abs(float(grad.detach())) < 1e-3 * float(curvature)  # at a stationary point of the NLL


def test_fit_finds_the_grid_minimum_of_the_nll():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 4, generator=g) * 4
    labels = torch.multinomial(F.softmax(logits / 2, -1), 1, generator=g).squeeze(1)
    fitted = TemperatureScaling().fit(logits, labels).temperature
    grid = torch.linspace(0.5, 10, 1901, dtype=torch.float64)  # step 0.005
    scaled = logits.double() / grid[:, None, None]
    nll = F.cross_entropy(scaled.transpose(1, 2), labels.expand(len(grid), -1), reduction="none").sum(1)
    assert 0 < nll.argmin() < len(grid) - 1  # an interior minimum
    assert abs(fitted - float(grid[nll.argmin()])) <= 0.005


def test_lowers_nll_and_ece_of_an_overconfident_model_on_held_out_data(digits):
    torch.manual_seed(0)
    # A deterministic MLP trained to near-zero loss on 200 examples is over-confident on
    # new data (seeds 0-2 all give T ~ 1.4-1.6 here).
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = digits.train_x[:200], digits.train_y[:200]
    for _ in range(400):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(digits.test_x)
    # Fit on one half of the test split, evaluate on the other.
    half = len(logits) // 2
    val_logits, val_y, held_logits, held_y = logits[:half], digits.test_y[:half], logits[half:], digits.test_y[half:]
    scaler = TemperatureScaling().fit(val_logits, val_y)
    assert scaler.temperature > 1.0  # over-confident models are cooled down
    before = F.softmax(held_logits, -1)
    with torch.no_grad():
        after = scaler.predict_proba(held_logits)
    assert negative_log_likelihood(after, held_y) < negative_log_likelihood(before, held_y)
    assert expected_calibration_error(after, held_y) < expected_calibration_error(before, held_y)
    assert accuracy(after, held_y) == accuracy(before, held_y)  # dividing by T keeps the argmax


def test_monte_carlo_logits_are_scaled_per_sample_then_averaged():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 3, generator=g) * 3
    labels = torch.randint(0, 3, (300,), generator=g)
    # S identical samples give the same predictive, hence the same temperature.
    single = TemperatureScaling().fit(logits, labels).temperature
    repeated = TemperatureScaling().fit(logits.expand(4, -1, -1), labels).temperature
    assert repeated == pytest.approx(single, rel=1e-6)
    mc = torch.randn(6, 300, 3, generator=g) * 3
    scaler = TemperatureScaling(2.0)
    with torch.no_grad():
        expected = F.softmax(mc / 2.0, -1).mean(0)
        torch.testing.assert_close(scaler.predict_proba(mc), expected)
    # Log of the MC-averaged probabilities is accepted as (N, C) logits.
    log_mean = F.softmax(mc, -1).mean(0).log()
    assert TemperatureScaling().fit(log_mean, labels).temperature > 0


def test_is_a_module_with_a_learnable_log_temperature():
    scaler = TemperatureScaling(2.0)
    assert [n for n, _ in scaler.named_parameters()] == ["log_temperature"]
    x = torch.randn(4, 3)
    torch.testing.assert_close(scaler(x), x / 2.0)
    restored = TemperatureScaling()
    restored.load_state_dict(scaler.state_dict())
    assert restored.temperature == pytest.approx(2.0)


def test_bad_inputs_leave_the_temperature_unchanged():
    scaler = TemperatureScaling(1.5)
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="labels must have shape"):
        scaler.fit(logits, labels[:4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        scaler.fit(logits, labels + 3)
    with pytest.raises(ValueError, match="empty batch"):
        scaler.fit(logits[:0], labels[:0])
    with pytest.raises(ValueError, match="NaN"):
        scaler.fit(torch.full((10, 3), float("nan")), labels)
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaling(0.0)
    assert scaler.temperature == pytest.approx(1.5)
