"""Split conformal prediction (torchbayes.conformal) against MAPIE 1.6, closed forms and
its finite-sample guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from torchbayes import conformal, metrics
from torchbayes.conformal import (
    APS,
    LAC,
    RAPS,
    AbsoluteResidual,
    CrossConformal,
    NormalizedResidual,
    calibration_split,
    conformal_quantile,
    cross_conformal_folds,
)
from torchbayes.prediction import ClassificationPrediction, RegressionPrediction, summarize

mapie = pytest.importorskip("mapie")
from mapie.utils import _compute_classification_quantile, _compute_regression_quantile  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin  # noqa: E402


def _dirichlet(n: int, c: int, concentration: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and labels drawn from them (a calibrated model, so sets are meaningful)."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch._standard_gamma(torch.full((n, c), concentration, dtype=torch.float64), generator=g)
    probs = gamma / gamma.sum(1, keepdim=True)
    return probs, torch.multinomial(probs, 1, generator=g).squeeze(1)


def _regression(n: int, seed: int) -> tuple[RegressionPrediction, torch.Tensor]:
    """Heteroscedastic data whose predicted std is informative: y = mean + std * noise."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 1, generator=g, dtype=torch.float64)
    std = 0.1 + 2 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    y = mean + std * torch.randn(n, 1, generator=g, dtype=torch.float64)
    samples = torch.cat([mean, std.square()], dim=-1).unsqueeze(0)  # one sample: (mean, variance)
    prediction = summarize(samples, task="regression", output_variance="variance")
    assert isinstance(prediction, RegressionPrediction)
    return prediction, y[:, 0]


class _FixedClassifier(ClassifierMixin, BaseEstimator):
    """A prefit sklearn classifier whose X is a row index into a table of probabilities."""

    def __init__(self, table: np.ndarray | None = None) -> None:
        self.table = table

    def fit(self, x, y):
        self.classes_ = np.arange(self.table.shape[1])
        return self

    def predict_proba(self, x):
        return self.table[np.asarray(x)[:, 0].astype(int)]

    def predict(self, x):
        return self.predict_proba(x).argmax(1)


class _FixedRegressor(RegressorMixin, BaseEstimator):
    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        self.mean, self.std = mean, std

    def fit(self, x, y):
        self.n_features_in_ = 1
        return self

    def predict(self, x, return_std: bool = False):
        idx = np.asarray(x)[:, 0].astype(int)
        return (self.mean[idx], self.std[idx]) if return_std else self.mean[idx]


# ----------------------------------------------------------------------------- the threshold
@pytest.mark.parametrize("n", [9, 10, 57, 500])
@pytest.mark.parametrize("alpha", [0.1, 0.05, 0.2, 0.37])
def test_quantile_equals_mapie(n, alpha):
    if n < conformal.minimum_calibration_size(alpha):
        pytest.skip("no finite threshold")
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ours = conformal_quantile(scores, alpha)
    assert float(ours) == float(_compute_classification_quantile(scores.numpy(), np.array([alpha]))[0])
    assert float(ours) == float(_compute_regression_quantile(scores.numpy(), np.array([1 - alpha]))[0, 0])
    rank = math.ceil((n + 1) * (1 - alpha))
    assert float(ours) == float(scores.sort().values[rank - 1])


def test_minimum_calibration_size_is_where_mapie_stops_raising():
    for alpha in (0.5, 0.2, 0.1, 0.05, 0.01, 0.3):
        m = conformal.minimum_calibration_size(alpha)
        _compute_regression_quantile(np.ones(m), np.array([1 - alpha]))  # finite
        with pytest.raises(ValueError):
            _compute_regression_quantile(np.ones(m - 1), np.array([1 - alpha]))
        if m > 1:
            with pytest.raises(ValueError, match=f"at least {m} calibration examples"):
                conformal_quantile(torch.ones(m - 1), alpha)
    assert conformal.minimum_calibration_size(0.1) == 9  # ceil(10 * 0.9) = 9 <= 9


# ----------------------------------------------------------------------------- classification against MAPIE
@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_lac_sets_equal_mapie_split_conformal_classifier(alpha):
    probs, labels = _dirichlet(900, 6, 0.5, seed=1)
    cal, test = torch.arange(400), torch.arange(400, 900)
    ours = LAC(alpha).fit(probs[cal], labels[cal])
    sets = ours.predict_sets(probs[test])

    from mapie.classification import SplitConformalClassifier

    x = np.arange(900)[:, None]
    clf = _FixedClassifier(probs.numpy()).fit(x, labels.numpy())
    reference = SplitConformalClassifier(clf, confidence_level=1 - alpha, conformity_score="lac", prefit=True)
    reference.conformalize(x[:400], labels[:400].numpy())
    _, mapie_sets = reference.predict_set(x[400:])
    assert np.array_equal(sets.numpy(), mapie_sets[:, :, 0])
    assert 0 < sets.sum(1).float().mean() < 6


def _mapie_sets(score, probs: torch.Tensor, q: float, alpha: float, include_last_label: bool) -> np.ndarray:
    score.quantiles_ = np.array([q])
    sets = score.get_prediction_sets(
        probs.numpy()[:, :, None], np.zeros(1), np.array([alpha]), cv="prefit", include_last_label=include_last_label
    )
    return sets[:, :, 0]


@pytest.mark.parametrize("include_last_label", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 0.05, 0.3])
def test_aps_scores_threshold_and_sets_equal_mapie(alpha, include_last_label):
    from mapie.conformity_scores import APSConformityScore

    probs, labels = _dirichlet(1000, 8, 0.4, seed=2)
    cal, test = slice(0, 500), slice(500, None)
    aps = APS(alpha, include_last_label=include_last_label).fit(probs[cal], labels[cal])
    ours = aps.conformity_scores(probs[cal], labels[cal])
    # MAPIE's non-randomised part of the score (it then subtracts u * p_y, u ~ U(0, 1)).
    reference_scores, _ = APSConformityScore.get_true_label_cumsum_proba(
        labels[cal].numpy(), probs[cal].numpy(), np.arange(8)
    )
    np.testing.assert_allclose(ours.numpy(), reference_scores[:, 0], rtol=0, atol=1e-12)
    q = float(_compute_classification_quantile(ours.numpy(), np.array([alpha]))[0])
    assert float(aps.quantile) == q
    sets = aps.predict_sets(probs[test])
    assert np.array_equal(sets.numpy(), _mapie_sets(APSConformityScore(), probs[test], q, alpha, include_last_label))
    assert sets.sum(1).min() >= 1  # never empty


@pytest.mark.parametrize("include_last_label", [False, True])
@pytest.mark.parametrize(("penalty", "k_reg"), [(0.01, 1), (0.1, 2), (0.5, 0)])
def test_raps_scores_and_sets_equal_mapie(penalty, k_reg, include_last_label):
    from mapie.conformity_scores import APSConformityScore, RAPSConformityScore

    alpha = 0.1
    probs, labels = _dirichlet(1000, 10, 0.3, seed=3)
    cal, test = slice(0, 500), slice(500, None)
    raps = RAPS(alpha, penalty=penalty, k_reg=k_reg, include_last_label=include_last_label).fit(probs[cal], labels[cal])
    aps_part, rank = APSConformityScore.get_true_label_cumsum_proba(
        labels[cal].numpy(), probs[cal].numpy(), np.arange(10)
    )
    reference = RAPSConformityScore._regularize_conformity_score(np.array([k_reg]), penalty, aps_part, rank)[:, 0, 0]
    np.testing.assert_allclose(raps.conformity_scores(probs[cal], labels[cal]).numpy(), reference, atol=1e-12)
    q = float(_compute_classification_quantile(reference, np.array([alpha]))[0])
    np.testing.assert_allclose(float(raps.quantile), q, atol=1e-12)
    score = RAPSConformityScore()
    score.k_star, score.lambda_star = np.array([k_reg]), penalty
    sets = raps.predict_sets(probs[test])
    assert np.array_equal(
        sets.numpy(), _mapie_sets(score, probs[test], float(raps.quantile), alpha, include_last_label)
    )


def test_aps_ties_and_zero_probabilities():
    """Ties with the last class join the set whatever the sort order; probability-0 classes never do."""
    probs = torch.tensor([[0.4, 0.3, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    last = APS(0.1, include_last_label=True)
    last.quantile = torch.tensor(0.6, dtype=torch.float64)  # 0.4 < 0.6 <= 0.7: the first 0.3 reaches it
    assert last.predict_sets(probs).tolist() == [[True, True, True, False], [True, False, False, False]]
    within = APS(0.1)
    within.quantile = torch.tensor(0.6, dtype=torch.float64)  # only 0.4 is within
    assert within.predict_sets(probs).tolist() == [[True, False, False, False], [True, False, False, False]]
    within.quantile = torch.tensor(0.2, dtype=torch.float64)  # below the top class: the top class alone
    assert within.predict_sets(probs)[0].tolist() == [True, False, False, False]
    within.quantile = torch.tensor(0.7, dtype=torch.float64)  # one 0.3 within, its tie joins
    assert within.predict_sets(probs)[0].tolist() == [True, True, True, False]
    within.quantile = torch.tensor(1.0, dtype=torch.float64)  # everything but the zero
    assert within.predict_sets(probs)[0].tolist() == [True, True, True, False]


# ----------------------------------------------------------------------------- regression against MAPIE
@pytest.mark.parametrize("alpha", [0.1, 0.05])
@pytest.mark.parametrize("score", ["absolute", "std"])
def test_intervals_equal_mapie_split_conformal_regressor(alpha, score):
    from mapie.conformity_scores import StdConformityScore
    from mapie.regression import SplitConformalRegressor

    prediction, y = _regression(800, seed=4)
    mean, std = prediction.mean[:, 0].numpy(), prediction.variance[:, 0].sqrt().numpy()
    # n = 299: (n + 1) * alpha is an integer. MAPIE's StdConformityScore takes its lower bound
    # at rank n + 1 - ceil(alpha (n + 1)) where the guarantee (and its upper bound, and our
    # both bounds) use ceil((1 - alpha)(n + 1)); the two agree only when alpha (n + 1) is whole.
    cal, test = slice(0, 299), slice(299, None)
    ours = (AbsoluteResidual if score == "absolute" else NormalizedResidual)(alpha)

    def part(s: slice) -> RegressionPrediction:
        return summarize(prediction.samples[:, s], task="regression", output_variance="variance")  # type: ignore[return-value]

    ours.fit(part(cal), y[cal])
    lower, upper = ours.predict_intervals(part(test))
    x = np.arange(800)[:, None]
    reg = _FixedRegressor(mean, std).fit(x, y.numpy())
    reference = SplitConformalRegressor(
        reg,
        confidence_level=1 - alpha,
        conformity_score="absolute" if score == "absolute" else StdConformityScore(),
        prefit=True,
    )
    reference.conformalize(x[cal], y[cal].numpy())
    _, bounds = reference.predict_interval(x[test])
    np.testing.assert_allclose(upper[:, 0].numpy(), bounds[:, 1, 0], rtol=0, atol=1e-10)
    n = 299
    alpha_ref = (1 - 2 * (1 - alpha)) + (1 - alpha)  # MAPIE's reverse level, in its float arithmetic
    mapie_rank = n + 1 - math.ceil(alpha_ref * (n + 1))
    if score == "absolute" or mapie_rank == math.ceil((1 - alpha) * (n + 1)):
        np.testing.assert_allclose(lower[:, 0].numpy(), bounds[:, 0, 0], rtol=0, atol=1e-10)
    else:  # alpha = 0.05: 0.05000000000000004 * 300 rounds up to rank 16 from the top
        q_low = ours.conformity_scores(part(cal), y[cal]).sort(0).values[mapie_rank - 1, 0].item()
        np.testing.assert_allclose(mean[test] - q_low * std[test], bounds[:, 0, 0], rtol=0, atol=1e-10)


def test_cv_plus_intervals_equal_mapie_cross_conformal_regressor():
    from mapie.regression import CrossConformalRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=120)
    x_new = rng.normal(size=(40, 3))
    alpha, k = 0.1, 6
    reference = CrossConformalRegressor(LinearRegression(), confidence_level=1 - alpha, method="plus", cv=KFold(k))
    reference.fit_conformalize(x, y)
    _, bounds = reference.predict_interval(x_new)

    folds, fold_predictions, new_predictions = [], [], []
    for train, held in KFold(k).split(x):
        model = LinearRegression().fit(x[train], y[train])
        as_prediction = lambda v: summarize(torch.from_numpy(v)[None, :, None], task="regression")  # noqa: E731
        fold_predictions.append(as_prediction(model.predict(x[held])))
        new_predictions.append(as_prediction(model.predict(x_new)))
        folds.append(torch.from_numpy(y[held]))
    cv = CrossConformal(AbsoluteResidual(alpha)).fit(fold_predictions, folds)
    lower, upper = cv.predict_intervals(new_predictions)
    np.testing.assert_allclose(lower[:, 0].numpy(), bounds[:, 0, 0], atol=1e-10)
    np.testing.assert_allclose(upper[:, 0].numpy(), bounds[:, 1, 0], atol=1e-10)


def test_cross_conformal_sets_equal_the_definition():
    """Class y is in the set iff #{i: s_i < s_k(i)(x, y)} < (1 - alpha)(n + 1) (Romano et al. 2020)."""
    alpha = 0.1
    fold_probs, fold_labels, new_probs = [], [], []
    for k in range(4):
        p, y = _dirichlet(30, 5, 0.5, seed=10 + k)
        fold_probs.append(p)
        fold_labels.append(y)
        new_probs.append(_dirichlet(7, 5, 0.5, seed=20 + k)[0])
    for score in (LAC(alpha), APS(alpha)):
        sets = CrossConformal(score).fit(fold_probs, fold_labels).predict_sets(new_probs)
        n = 120
        expected = torch.zeros(7, 5, dtype=torch.bool)
        for j in range(7):
            for c in range(5):
                below = sum(
                    int(
                        (
                            score.conformity_scores(fold_probs[k], fold_labels[k])
                            < score.label_scores(new_probs[k][j : j + 1])[0, c] - 1e-8
                        ).sum()
                    )
                    for k in range(4)
                )
                expected[j, c] = below < (1 - alpha) * (n + 1)
        assert torch.equal(sets, expected)


# ----------------------------------------------------------------------------- the guarantee
def _randomized_aps(alpha: float) -> APS:
    return APS(alpha, randomized=True, seed=3)


def _randomized_raps(alpha: float) -> RAPS:
    return RAPS(alpha, randomized=True, seed=4)


@pytest.mark.parametrize("cls", [LAC, APS, RAPS, _randomized_aps, _randomized_raps])
def test_classification_coverage_guarantee(cls):
    """Mean coverage over 200 random calibration/test splits is in [1 - alpha, 1 - alpha + 1/(n + 1)]
    (exchangeable data, continuous scores). Monte Carlo error of the mean over 200 splits of
    300 test examples: sd ~ sqrt(0.09 / 60000) + calibration sd 0.017 / sqrt(200) ~ 0.0013;
    the band is widened by 3 sd on both sides."""
    alpha, n_cal = 0.1, 200
    probs, labels = _dirichlet(500, 6, 0.5, seed=6)
    coverages = []
    for r in range(200):
        cal, test = calibration_split(500, n_cal, seed=r)
        predictor = cls(alpha).fit(probs[cal], labels[cal])
        coverages.append(float(metrics.set_coverage(predictor.predict_sets(probs[test]), labels[test])))
    mean = float(np.mean(coverages))
    # Non-randomised APS/RAPS cover more than 1 - alpha: only the lower bound holds for them. LAC
    # and the randomised scores are continuous: coverage is at most 1 - alpha + 1/(n + 1) too.
    upper = 1 - alpha + 1 / (n_cal + 1) + 0.004 if cls not in (APS, RAPS) else 1.0
    assert 1 - alpha - 0.004 <= mean <= upper


@pytest.mark.parametrize("cls", [AbsoluteResidual, NormalizedResidual])
def test_regression_coverage_guarantee_and_adaptivity(cls):
    alpha, n_cal = 0.1, 200
    prediction, y = _regression(600, seed=7)
    coverages, widths = [], []
    for r in range(150):
        cal, test = calibration_split(600, n_cal, seed=r)
        part = lambda idx: summarize(prediction.samples[:, idx], task="regression", output_variance="variance")  # noqa: E731
        result = cls(alpha).fit(part(cal), y[cal]).evaluate(part(test), y[test])
        coverages.append(result.coverage)
        widths.append(result.mean_size)
    # sd of the mean over 150 splits of 400: sqrt(0.09 / 60000) + 0.02 / sqrt(150) ~ 0.0028; 3 sd.
    assert 1 - alpha - 0.009 <= float(np.mean(coverages)) <= 1 - alpha + 1 / (n_cal + 1) + 0.009
    if cls is NormalizedResidual:  # the std is the true noise scale here: narrower than one width for all
        absolute = AbsoluteResidual(alpha).fit(prediction, y).evaluate(prediction, y).mean_size
        assert float(np.mean(widths)) < 0.9 * absolute


# ----------------------------------------------------------------------------- every prediction method
def _small_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def test_every_prediction_method_is_calibrated_alike():
    from torchbayes import Ensemble, dnn_to_bnn, predict

    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(1))
    bayesian = dnn_to_bnn(_small_classifier())
    plain = _small_classifier()
    results = {
        "mc": predict(bayesian, x, 8, seed=0),
        "moments": predict(bayesian, x, 8, seed=0, method="moments"),
        "dropout": predict(plain, x, 8, seed=0, dropout=True),
        "ensemble": predict(Ensemble([_small_classifier() for _ in range(3)]), x, 3),
        "plain": summarize(plain.eval()(x).detach().unsqueeze(0), task="classification"),
    }
    for name, result in results.items():
        assert isinstance(result, ClassificationPrediction), name
        for cls in (LAC, APS, RAPS):
            predictor = cls(0.1).fit(result, y)
            sets = predictor.predict_sets(result)
            assert sets.shape == (60, 3)
            evaluation = predictor.evaluate(result, y)  # in-sample: coverage >= 1 - alpha by construction
            assert evaluation.coverage >= 0.9, (name, cls)
            torch.testing.assert_close(
                (evaluation.strata.coverage * evaluation.strata.counts).sum() / 60,
                torch.tensor(evaluation.coverage, dtype=torch.float64),
            )
            assert evaluation.strata.counts.tolist() == [12.0] * 5


# ----------------------------------------------------------------------------- hostile input
def test_bad_alpha_is_refused():
    for alpha in (0, 1, -0.1, 1.5, float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match="alpha must be a number in \\(0, 1\\)"):
            LAC(alpha)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        conformal_quantile(torch.ones(10), 1.0)


def test_empty_and_too_small_calibration_sets_are_refused():
    probs, labels = _dirichlet(20, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="calibration set is empty"):
        LAC(0.1).fit(probs[:0], labels[:0])
    with pytest.raises(ValueError, match=r"alpha=0\.05 needs at least 19 calibration examples .* got 18"):
        APS(0.05).fit(probs[:18], labels[:18])
    APS(0.05).fit(probs[:19], labels[:19])
    prediction, y = _regression(10, seed=0)
    with pytest.raises(ValueError, match=r"alpha=0\.01 needs at least 99"):
        AbsoluteResidual(0.01).fit(prediction, y)


def test_labels_and_predictions_are_checked():
    probs, labels = _dirichlet(30, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\], got values in \[0, 3\]"):
        LAC(0.1).fit(probs, torch.cat([labels[:-1], torch.tensor([3])]))
    with pytest.raises(ValueError, match="got values in \\[-1"):
        LAC(0.1).fit(probs, torch.cat([labels[:-1], torch.tensor([-1])]))
    with pytest.raises(TypeError, match="integer tensor"):
        LAC(0.1).fit(probs, labels.float())
    with pytest.raises(ValueError, match="shape \\(30,\\)"):
        LAC(0.1).fit(probs, labels[:5])
    with pytest.raises(ValueError, match="softmax outputs, not logits"):
        LAC(0.1).fit(torch.log(probs), labels)
    with pytest.raises(RuntimeError, match="not fitted"):
        APS(0.1).predict_sets(probs)
    with pytest.raises(TypeError, match="RegressionPrediction"):
        AbsoluteResidual(0.1).fit(probs, labels.double())  # type: ignore[arg-type]
    prediction, y = _regression(30, seed=0)
    with pytest.raises(ValueError, match="targets must have shape"):
        AbsoluteResidual(0.1).fit(prediction, y[:10])
    with pytest.raises(ValueError, match="NaN or infinite"):
        AbsoluteResidual(0.1).fit(prediction, torch.full_like(y, float("nan")))
    no_variance = summarize(prediction.mean.unsqueeze(0), task="regression")
    with pytest.raises(ValueError, match=r"every predictive variance is 0 .*AbsoluteResidual"):
        NormalizedResidual(0.1).fit(no_variance, y)
    with pytest.raises(ValueError, match="penalty"):
        RAPS(0.1, penalty=-1.0)
    with pytest.raises(ValueError, match="k_reg"):
        RAPS(0.1, k_reg=-1)
    with pytest.raises(ValueError, match="include_last_label=False"):
        APS(0.1, randomized=True, include_last_label=True)


def test_calibration_split_and_folds():
    labels = torch.arange(100) % 4
    cal, rest = calibration_split(100, 0.3, seed=1, labels=labels)
    assert len(cal) == 32 and len(rest) == 68  # round(0.3 * 25) = 8 per class
    assert torch.equal(torch.cat([cal, rest]).sort().values, torch.arange(100))
    assert torch.bincount(labels[cal]).tolist() == [8, 8, 8, 8]
    cal2, _ = calibration_split(100, 25, seed=1)
    assert len(cal2) == 25
    for bad in (0.0, 1.0, 0, 100, "half", True):
        with pytest.raises(ValueError, match="calibration must be"):
            calibration_split(100, bad)  # type: ignore[arg-type]
    folds = cross_conformal_folds(10, 3, seed=0)
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert torch.equal(torch.cat(folds).sort().values, torch.arange(10))
    with pytest.raises(ValueError, match="num_folds"):
        cross_conformal_folds(10, 1)


def test_repr():
    assert repr(RAPS(0.05, penalty=0.1, k_reg=2)) == "RAPS(alpha=0.05, penalty=0.1, k_reg=2)"
    probs, labels = _dirichlet(30, 3, 1.0, seed=0)
    assert repr(LAC(0.1).fit(probs, labels)) == "LAC(alpha=0.1, fitted on 30)"
