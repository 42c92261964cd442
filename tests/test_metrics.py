"""Calibration, scoring, OOD and selective-prediction metrics against torchmetrics,
scikit-learn and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchbayes import metrics

torchmetrics_cls = pytest.importorskip("torchmetrics.functional.classification")
sk_metrics = pytest.importorskip("sklearn.metrics")


def _dirichlet_probs(n: int, c: int, concentration: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gamma = torch._standard_gamma(torch.full((n, c), concentration, dtype=torch.float64), generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    return gamma / gamma.sum(1, keepdim=True), labels


@pytest.fixture(scope="module")
def digits_probs(digits):
    """Predictive probabilities of a logistic regression on real data (digits test set)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=0.05, max_iter=300).fit(digits.train_x.flatten(1).numpy(), digits.train_y.numpy())
    return torch.from_numpy(clf.predict_proba(digits.test_x.flatten(1).numpy())).float(), digits.test_y


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_and_mce_equal_torchmetrics(digits_probs, n_bins):
    random_probs, random_labels = _dirichlet_probs(2000, 5, 0.3, seed=1)
    for probs, labels in ((random_probs.float(), random_labels), digits_probs):
        # torchmetrics puts a confidence of exactly 1.0 in an extra bin (module docstring);
        # these inputs have none, so both must agree.
        assert probs.max() < 1.0
        c = probs.shape[1]
        ece = torchmetrics_cls.multiclass_calibration_error(probs, labels, c, n_bins=n_bins, norm="l1")
        mce = torchmetrics_cls.multiclass_calibration_error(probs, labels, c, n_bins=n_bins, norm="max")
        torch.testing.assert_close(metrics.expected_calibration_error(probs, labels, n_bins), ece)
        torch.testing.assert_close(metrics.maximum_calibration_error(probs, labels, n_bins), mce)


def test_confidence_one_is_in_the_last_bin():
    # Two predictions in the last of 10 bins, (0.9, 1]: confidences 0.95 (right) and 1.0
    # (wrong). Guo et al.'s ECE: |mean acc - mean conf| = |0.5 - 0.975| = 0.475.
    probs = torch.tensor([[0.95, 0.05], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert float(metrics.expected_calibration_error(probs, labels, 10)) == pytest.approx(0.475)
    bins = metrics.calibration_bins(probs, labels, 10)
    assert bins.counts.tolist() == [0.0] * 9 + [2.0]


def test_bin_edges_close_on_the_right():
    # A confidence of exactly 0.5 belongs to (0.25, 0.5] with 4 bins.
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    bins = metrics.calibration_bins(probs, torch.tensor([0, 0]), 4)
    assert bins.counts.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_adaptive_ece_closed_forms():
    probs, labels = _dirichlet_probs(300, 4, 0.5, seed=2)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    # One bin: |accuracy - mean confidence|.
    one = metrics.expected_calibration_error(probs, labels, 1, adaptive=True)
    torch.testing.assert_close(one, (correct.mean() - conf.mean()).abs())
    # One example per bin: mean |correct - confidence|.
    each = metrics.expected_calibration_error(probs, labels, 300, adaptive=True)
    torch.testing.assert_close(each, (correct - conf).abs().mean())
    # Equal mass: 300 examples in 7 bins hold 42 or 43 each, sorted by confidence.
    bins = metrics.calibration_bins(probs, labels, 7, adaptive=True)
    assert set(bins.counts.tolist()) <= {42.0, 43.0} and bins.counts.sum() == 300
    assert torch.all(bins.edges[1:] >= bins.edges[:-1])
    assert bins.edges[0] == 0 and bins.edges[-1] == 1
    # More bins than examples: empty bins contribute nothing.
    few = metrics.calibration_bins(probs[:3], labels[:3], 8, adaptive=True)
    assert few.counts.sum() == 3
    torch.testing.assert_close(few.expected_calibration_error, (correct[:3] - conf[:3]).abs().mean())


def test_accuracy_equals_torchmetrics(digits_probs):
    probs, labels = digits_probs
    expected = torchmetrics_cls.multiclass_accuracy(probs, labels, probs.shape[1], average="micro")
    torch.testing.assert_close(metrics.accuracy(probs, labels), expected)


def test_nll_and_brier_equal_scikit_learn(digits_probs):
    random_probs, random_labels = _dirichlet_probs(500, 6, 0.7, seed=3)
    for probs, labels in ((random_probs, random_labels), (digits_probs[0].double(), digits_probs[1])):
        probs = probs / probs.sum(1, keepdim=True)  # exact float64 rows for scikit-learn's check
        y, p, classes = labels.numpy(), probs.numpy(), list(range(probs.shape[1]))
        assert float(metrics.negative_log_likelihood(probs, labels)) == pytest.approx(
            sk_metrics.log_loss(y, p, labels=classes), rel=1e-12)
        assert float(metrics.brier_score(probs, labels)) == pytest.approx(
            sk_metrics.brier_score_loss(y, p, labels=classes), rel=1e-12)


def test_nll_of_a_zero_probability_is_finite():
    nll = metrics.negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert torch.isfinite(nll) and nll > 80  # -log(float32 tiny) = 87.3


def test_ood_auroc_and_aupr_equal_scikit_learn():
    g = torch.Generator().manual_seed(4)
    in_scores = torch.randn(400, generator=g)
    out_scores = torch.randn(250, generator=g) + 1.0
    # Ties, which ROC and PR curves must handle: round the scores.
    for a, b in ((in_scores, out_scores), (in_scores.round(), out_scores.round())):
        y = np.r_[np.zeros(len(a)), np.ones(len(b))]
        s = np.r_[a.numpy(), b.numpy()]
        assert float(metrics.ood_auroc(a, b)) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-6)
        assert float(metrics.ood_aupr(a, b)) == pytest.approx(sk_metrics.average_precision_score(y, s), abs=1e-6)
        assert float(metrics.ood_aupr(a, b, positive="in")) == pytest.approx(
            sk_metrics.average_precision_score(1 - y, -s), abs=1e-6)
    # Perfect separation and its reverse.
    assert float(metrics.ood_auroc(torch.zeros(5), torch.ones(5))) == 1.0
    assert float(metrics.ood_auroc(torch.ones(5), torch.zeros(5))) == 0.0


def test_risk_coverage_without_ties_is_the_sorted_cumulative_error_rate():
    g = torch.Generator().manual_seed(5)
    unc = torch.rand(200, generator=g, dtype=torch.float64)
    correct = torch.rand(200, generator=g) < 0.7
    errors = (~correct[unc.argsort()]).double()
    k = torch.arange(1, 201, dtype=torch.float64)
    coverage, risk = metrics.risk_coverage_curve(unc, correct)
    torch.testing.assert_close(coverage, k / 200)
    torch.testing.assert_close(risk, errors.cumsum(0) / k)
    torch.testing.assert_close(metrics.area_under_risk_coverage(unc, correct), (errors.cumsum(0) / k).mean())
    # Perfect ranking: all errors last, so risk is 0 until coverage passes the accuracy.
    perfect = metrics.risk_coverage_curve((~correct).double(), correct)[1]
    n_right = int(correct.sum())
    assert perfect[:n_right].abs().max() == 0 and perfect[-1] == pytest.approx(1 - n_right / 200)


def test_risk_coverage_with_ties_is_the_expectation_over_tie_orders():
    g = torch.Generator().manual_seed(6)
    unc = torch.randint(0, 4, (12,), generator=g).double()
    correct = torch.rand(12, generator=g) < 0.6
    _, risk = metrics.risk_coverage_curve(unc, correct)
    # All ties: the expected error rate of any k inputs is the overall error rate.
    flat = metrics.risk_coverage_curve(torch.zeros(12), correct)[1]
    torch.testing.assert_close(flat, torch.full((12,), float((~correct).double().mean()), dtype=torch.float64))
    # Monte Carlo over random orders of the ties: 20,000 orders, each risk_k an average
    # of terms in [0, 1] (sd <= 0.5), so 5 standard errors = 5 * 0.5 / sqrt(20000) = 0.018.
    total = torch.zeros(12, dtype=torch.float64)
    k = torch.arange(1, 13, dtype=torch.float64)
    for _ in range(20_000):
        perm = torch.randperm(12, generator=g)
        order = perm[unc[perm].argsort(stable=True)]
        total += (~correct[order]).double().cumsum(0) / k
    assert (total / 20_000 - risk).abs().max() < 0.018


def test_bad_inputs_name_the_argument():
    probs = torch.softmax(torch.randn(6, 3), 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="labels must have shape"):
        metrics.expected_calibration_error(probs, labels[:4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        metrics.brier_score(probs, labels + 1)
    with pytest.raises(ValueError, match="empty batch"):
        metrics.negative_log_likelihood(probs[:0], labels[:0])
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.accuracy(probs * 0.9, labels)
    with pytest.raises(ValueError, match="softmax"):
        metrics.accuracy(torch.randn(6, 3) * 5, labels)
    with pytest.raises(ValueError, match="n_bins"):
        metrics.expected_calibration_error(probs, labels, 0)
    with pytest.raises(ValueError, match="out_scores"):
        metrics.ood_auroc(torch.rand(4), torch.rand(0))
    with pytest.raises(ValueError, match="positive"):
        metrics.ood_aupr(torch.rand(4), torch.rand(4), positive="both")
    with pytest.raises(ValueError, match="correct must be a bool"):
        metrics.risk_coverage_curve(torch.rand(6), labels)
