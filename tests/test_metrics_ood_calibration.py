"""Classwise ECE, SmoothECE, adaptive ECE, FPR at 95% TPR, energy and max-logit scores and
selective risk, against torchmetrics, scikit-learn, relplot (the SmoothECE authors'
package) and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchbayes import metrics

torchmetrics_cls = pytest.importorskip("torchmetrics.functional.classification")
sk_metrics = pytest.importorskip("sklearn.metrics")


def _dirichlet(
    n: int, c: int, concentration: float, seed: int, sharpen: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels drawn from ``probs ** sharpen`` (renormalised): a miscalibrated
    model for ``sharpen != 1``."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch._standard_gamma(torch.full((n, c), concentration, dtype=torch.float64), generator=g)
    probs = gamma / gamma.sum(1, keepdim=True)
    truth = probs**sharpen / (probs**sharpen).sum(1, keepdim=True)
    return probs, torch.multinomial(truth, 1, generator=g).squeeze(1)


# ----------------------------------------------------------------------------- classwise ECE
@pytest.mark.parametrize("n_bins", [5, 15])
def test_classwise_ece_is_the_mean_of_torchmetrics_binary_ece(n_bins):
    probs, labels = _dirichlet(1500, 4, 0.7, seed=0, sharpen=2.0)
    assert probs.max() < 1.0  # torchmetrics puts exactly 1.0 in a bin of its own
    expected = torch.stack(
        [
            torchmetrics_cls.binary_calibration_error(probs[:, c].contiguous(), (labels == c).long(), n_bins=n_bins)
            for c in range(4)
        ]
    ).mean()
    torch.testing.assert_close(metrics.classwise_calibration_error(probs, labels, n_bins), expected.double())


def test_classwise_ece_of_two_classes_hand_computed():
    # p_0 = [0.2, 0.4, 0.6, 0.8], labels [1, 0, 0, 0]; 2 bins of each class's probability.
    probs = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 0])
    # class 0: bin [0, .5] = {0.2 (no), 0.4 (yes)}: |0.5 - 0.3| = 0.2;
    #          bin (.5, 1] = {0.6, 0.8} both yes: |1 - 0.7| = 0.3
    # class 1: bin [0, .5] = {0.4, 0.2} none: |0 - 0.3| = 0.3; bin (.5, 1] = {0.8 yes, 0.6 no}: |0.5 - 0.7| = 0.2
    expected = (0.5 * 0.2 + 0.5 * 0.3 + 0.5 * 0.3 + 0.5 * 0.2) / 2
    torch.testing.assert_close(
        metrics.classwise_calibration_error(probs, labels, 2), torch.tensor(expected, dtype=torch.float64)
    )


def test_adaptive_ece_hand_computed():
    """Nixon et al. 2019: equal-mass bins of the sorted confidences, then the ECE formula."""
    probs = torch.tensor(
        [[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9], [0.55, 0.45], [0.35, 0.65]], dtype=torch.float64
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # confidences 0.6, 0.7, 0.8, 0.9, 0.55, 0.65; correct 1, 0, 1, 1, 0, 1
    # sorted: 0.55 (0), 0.6 (1), 0.65 (1) | 0.7 (0), 0.8 (1), 0.9 (1)
    # bin 1: acc 2/3, conf 0.6 -> 0.0667; bin 2: acc 2/3, conf 0.8 -> 0.1333; ECE = (0.0667 + 0.1333) / 2 = 0.1
    torch.testing.assert_close(
        metrics.expected_calibration_error(probs, labels, 2, adaptive=True), torch.tensor(0.1, dtype=torch.float64)
    )
    # and classwise with adaptive bins runs the same binning per class
    value = metrics.classwise_calibration_error(probs, labels, 2, adaptive=True)
    assert 0 <= float(value) <= 1


# ----------------------------------------------------------------------------- SmoothECE
def test_smooth_ece_closed_form():
    """Constant confidence 0.5, always right: the residual is 0.5 everywhere, so smECE_s = 0.5 for
    every width and the fixed point is s* = 0.5 (bisection to 2**-16)."""
    probs = torch.tensor([[0.5, 0.5]] * 40, dtype=torch.float64)
    labels = torch.zeros(40, dtype=torch.long)
    for s in (0.02, 0.1, 0.7):
        torch.testing.assert_close(
            metrics.smooth_calibration_error(probs, labels, s), torch.tensor(0.5, dtype=torch.float64)
        )
    torch.testing.assert_close(metrics.smooth_calibration_error(probs, labels), torch.tensor(0.5, dtype=torch.float64))


def test_smooth_ece_is_small_for_a_calibrated_model_and_large_for_an_overconfident_one():
    calibrated = _dirichlet(2000, 3, 1.0, seed=1)
    overconfident = _dirichlet(2000, 3, 1.0, seed=1, sharpen=0.3)
    small = metrics.smooth_calibration_error(*calibrated, 0.1)
    large = metrics.smooth_calibration_error(*overconfident, 0.1)
    # Calibrated: only sampling noise, about sqrt(0.25 / (2000 * 0.2)) ~ 0.025 per kernel window,
    # averaged in |.| over windows; overconfident: a gap of ~0.2 at every confidence.
    assert float(small) < 0.04 < 0.1 < float(large)


@pytest.mark.parametrize("seed", [2])
def test_smooth_ece_equals_relplot(seed):
    relplot = pytest.importorskip("relplot")
    probs, labels = _dirichlet(1000, 5, 0.5, seed=seed, sharpen=0.6)
    confidence, predicted = probs.max(1)
    f, y = confidence.numpy(), (predicted == labels).double().numpy()
    # relplot rounds the confidences to a grid of ~1000 points (linear split of the mass) and adds
    # 1e-4 to the density: the two differ by ~1e-4 at a fixed width.
    for s in (0.03, 0.1, 0.3):
        assert abs(float(metrics.smooth_calibration_error(probs, labels, s)) - relplot.smECE_sigma(f, y, s)) < 1e-3
    # relplot's bandwidth search stops at 2**-10, ours at 2**-16; smECE moves by at most ~1e-3 there.
    assert abs(float(metrics.smooth_calibration_error(probs, labels)) - relplot.smECE(f, y)) < 3e-3


# ----------------------------------------------------------------------------- OOD
def test_fpr_at_95_tpr_equals_scikit_learn_roc_curve():
    g = torch.Generator().manual_seed(4)
    for in_scores, out_scores in (
        (torch.randn(900, generator=g), torch.randn(300, generator=g) + 1.5),  # continuous
        (
            torch.randint(0, 12, (500,), generator=g).double(),
            torch.randint(4, 20, (200,), generator=g).double(),
        ),  # ties
    ):
        is_in = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
        fpr, tpr, _ = sk_metrics.roc_curve(
            is_in, -np.r_[in_scores.numpy(), out_scores.numpy()], drop_intermediate=False
        )
        for level in (0.95, 0.8, 1.0):
            expected = fpr[np.argmax(tpr >= level)]
            # torchmetrics' ROC is float32: rates agree to its rounding (~6e-8 relative).
            assert float(metrics.fpr_at_tpr(in_scores, out_scores, level)) == pytest.approx(expected, abs=1e-6)


def test_fpr_at_95_tpr_hand_computed():
    # 20 in-distribution scores 1..20: the threshold keeping 19 of them is 19; OOD scores 10, 19, 19.5, 30: 2 of 4 pass.
    in_scores = torch.arange(1.0, 21.0)
    out_scores = torch.tensor([10.0, 19.0, 19.5, 30.0])
    assert float(metrics.fpr_at_tpr(in_scores, out_scores)) == 0.5
    assert float(metrics.fpr_at_tpr(in_scores, torch.tensor([25.0, 30.0]))) == 0.0  # separable


def test_energy_and_max_logit_scores():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        metrics.energy_score(logits),
        torch.tensor([-math.log(4), -10 - math.log1p(3 * math.exp(-10))], dtype=torch.float64),
    )
    torch.testing.assert_close(metrics.energy_score(logits, temperature=2.0), -2 * torch.logsumexp(logits / 2, -1))
    torch.testing.assert_close(metrics.max_logit_score(logits), torch.tensor([0.0, -10.0], dtype=torch.float64))
    mc = torch.stack([logits, logits + 1.0])  # (S=2, N, C): the mean over samples
    torch.testing.assert_close(
        metrics.energy_score(mc), (metrics.energy_score(logits) + metrics.energy_score(logits + 1)) / 2
    )
    torch.testing.assert_close(metrics.max_logit_score(mc), metrics.max_logit_score(logits) - 0.5)
    # confident inputs score lower (more in-distribution) than flat ones
    assert float(metrics.ood_auroc(metrics.energy_score(logits[1:]), metrics.energy_score(logits[:1]))) == 1.0


# ----------------------------------------------------------------------------- selective risk
def test_selective_risk_hand_computed():
    uncertainty = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    correct = torch.tensor([True, False, True, True, False])
    assert float(metrics.selective_risk(uncertainty, correct, 0.4)) == 0.5  # two most certain: one wrong
    assert float(metrics.selective_risk(uncertainty, correct, 0.8)) == 0.25  # four
    assert float(metrics.selective_risk(uncertainty, correct, 1.0)) == 0.4
    assert float(metrics.selective_risk(uncertainty, correct, 0.01)) == 0.0  # at least one answered
    ties = torch.tensor([0.1, 0.1, 0.5, 0.5, 0.5])  # coverage 0.6: 2 sure (1 wrong) + 1 of 3 tied (1 wrong of 3)
    assert float(metrics.selective_risk(ties, correct, 0.6)) == pytest.approx((1 + 1 / 3) / 3)


def test_bad_inputs_are_refused():
    probs, labels = _dirichlet(10, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="bandwidth"):
        metrics.smooth_calibration_error(probs, labels, 0.0)
    with pytest.raises(ValueError, match="labels must be in"):
        metrics.classwise_calibration_error(probs, torch.full((10,), 3))
    with pytest.raises(ValueError, match="n_bins"):
        metrics.classwise_calibration_error(probs, labels, 0)
    with pytest.raises(ValueError, match="tpr"):
        metrics.fpr_at_tpr(torch.rand(5), torch.rand(5), 0.0)
    with pytest.raises(ValueError, match="out_scores"):
        metrics.fpr_at_tpr(torch.rand(5), torch.tensor([]))
    with pytest.raises(ValueError, match="temperature"):
        metrics.energy_score(torch.randn(3, 4), temperature=0.0)
    with pytest.raises(TypeError, match="floating-point"):
        metrics.max_logit_score(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="coverage"):
        metrics.selective_risk(torch.rand(5), torch.ones(5, dtype=torch.bool), 1.5)
