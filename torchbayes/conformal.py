"""Split conformal prediction over the results of `torchbayes.predict`.

A conformal predictor turns any prediction into sets of classes, or intervals of values,
that contain the truth with probability at least ``1 - alpha`` over the draw of the
calibration and test data (exchangeable examples), whatever the model. It works on the
result objects every prediction method returns (`ClassificationPrediction`,
`RegressionPrediction`: Monte Carlo over Bayesian layers, moment propagation, MC
dropout, ensembles, or a plain network's output through `torchbayes.summarize`), so the
same code calibrates every method.

The recipe (Vovk et al. 2005; Angelopoulos and Bates 2023): a *conformity score*
``s(x, y)`` measures how badly ``y`` fits the prediction at ``x``; on ``n`` calibration
examples the threshold ``q`` is the ``k``-th smallest score with
``k = ceil((n + 1)(1 - alpha))`` (the finite-sample correction); a new input's set is
every ``y`` with ``s(x, y) <= q``. One base class, `SplitConformal`, owns ``fit`` and the
quantile; the subclasses differ only in the score:

- classification (`ConformalClassifier`): `LAC` (``1 - p_y``, Sadinle et al. 2019:
  smallest sets), `APS` (probability mass of the classes ranked up to ``y``, Romano et
  al. 2020: sets adapt to how hard the input is) and `RAPS` (APS plus a penalty on
  low-ranked classes, Angelopoulos et al. 2021: smaller APS sets);
- regression (`ConformalRegressor`): `AbsoluteResidual` (``|y - mean|``: intervals of
  one width) and `NormalizedResidual` (``|y - mean| / std`` with the model's
  predictive std: intervals as wide as the model is unsure).

Conventions (the same as MAPIE 1.6's non-randomised variants, which the tests check
set by set and interval by interval):

- the threshold is the ``ceil((n + 1)(1 - alpha))``-th smallest calibration score (MAPIE:
  ``np.quantile(scores, ceil((n + 1)(1 - alpha)) / n, method="lower")``). When that rank
  exceeds ``n`` (fewer than ``ceil(1 / alpha) - 1`` calibration examples) no finite
  threshold has the guarantee and `fit` refuses, where MAPIE would return infinite
  intervals with ``allow_infinite_bounds=True``;
- no randomisation: APS and RAPS calibration scores include the true class's whole
  probability (MAPIE subtracts ``u * p_y`` with ``u ~ U(0, 1)``). Their sets are the
  classes with ``s(x, y) <= q``, always with the most probable class (MAPIE's
  ``include_last_label=False``), and every class tied in probability with the last one
  in; ``include_last_label=True`` adds the class whose cumulative mass first passes the
  threshold (MAPIE's default; much more conservative on confident models: 100% coverage
  at ``alpha = 0.1`` on MNIST). Classes of probability 0 are never added by a tie;
- comparisons allow ``1e-8`` (MAPIE's ``EPSILON``) for rounding in cumulative sums.

For small data, `CrossConformal` gives CV+ intervals (Barber et al. 2021) and
cross-conformal sets (Romano et al. 2020) from ``K`` models each fitted without one fold;
every example then calibrates.

Example:
    >>> cal, test = calibration_split(len(x), 0.5, seed=0)
    >>> aps = APS(alpha=0.1).fit(predict(model, x[cal], 32), y[cal])
    >>> sets = aps.predict_sets(predict(model, x_new, 32))     # (N, C) bools
    >>> aps.evaluate(predict(model, x[test], 32), y[test]).coverage
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from torchbayes.metrics.conformal import UncertaintyStrata, size_by_uncertainty
from torchbayes.prediction.results import ClassificationPrediction, RegressionPrediction

__all__ = [
    "APS",
    "LAC",
    "RAPS",
    "AbsoluteResidual",
    "ConformalClassifier",
    "ConformalEvaluation",
    "ConformalRegressor",
    "CrossConformal",
    "NormalizedResidual",
    "SplitConformal",
    "calibration_split",
    "conformal_quantile",
    "cross_conformal_folds",
    "minimum_calibration_size",
]

#: Tolerance of score comparisons (MAPIE's ``EPSILON``): rounding in cumulative sums.
EPSILON = 1e-8

ClassificationInput = ClassificationPrediction | Tensor
SelfT = TypeVar("SelfT", bound="SplitConformal")


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be a number in (0, 1) (the allowed miscoverage), got {alpha!r}")
    return float(alpha)


def _quantile_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``: the rank of the calibration score used as threshold."""
    return math.ceil((n + 1) * (1 - alpha))


def minimum_calibration_size(alpha: float) -> int:
    """The fewest calibration examples with a finite threshold at ``alpha``: the smallest ``n``
    with ``ceil((n + 1)(1 - alpha)) <= n``."""
    alpha = _check_alpha(alpha)
    n = max(1, math.ceil(1 / alpha) - 2)
    while _quantile_rank(n, alpha) > n:
        n += 1
    return n


def conformal_quantile(scores: Tensor, alpha: float) -> Tensor:
    """The split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest score.

    Args:
        scores: ``(n, ...)`` calibration scores (one threshold per trailing position).
        alpha: allowed miscoverage, in ``(0, 1)``.

    Returns:
        Tensor of shape ``scores.shape[1:]``.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1)``, no scores, NaN scores, or fewer than
            `minimum_calibration_size` scores.

    Example:
        >>> conformal_quantile(torch.arange(1.0, 11.0), 0.1)   # rank ceil(11 * 0.9) = 10
        tensor(10.)
    """
    alpha = _check_alpha(alpha)
    n = scores.shape[0] if scores.dim() else 0
    if n == 0:
        raise ValueError("the calibration set is empty: conformal prediction needs calibration examples")
    if torch.isnan(scores).any():
        raise ValueError("calibration scores contain NaN (non-finite predictions or labels)")
    rank = _quantile_rank(n, alpha)
    if rank > n:
        raise ValueError(
            f"alpha={alpha} needs at least {minimum_calibration_size(alpha)} calibration examples "
            f"(the ceil((n + 1)(1 - alpha))-th smallest score must exist); got {n}"
        )
    return scores.kthvalue(rank, dim=0).values


def calibration_split(
    n: int, calibration: float | int, *, seed: int = 0, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Random indices of a calibration set and of the rest, disjoint and covering ``range(n)``.

    The calibration set must be data the model was not trained on (a held-out part of
    the training data, or of the test data when the model is fixed).

    Args:
        n: number of examples.
        calibration: its size, as a fraction in ``(0, 1)`` or a count in ``[1, n)``.
        seed: seed of the permutation.
        labels: ``(n,)`` class indices to stratify by (each class split in the same
            proportion, sizes rounded per class), or ``None``.

    Returns:
        ``(calibration_indices, rest_indices)``, sorted int64 tensors.

    Example:
        >>> cal, rest = calibration_split(1000, 0.5, seed=0, labels=y)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"calibration_split: n must be an int >= 2, got {n!r}")
    if isinstance(calibration, bool) or not isinstance(calibration, (int, float)):
        raise ValueError(f"calibration must be a fraction in (0, 1) or a count in [1, n), got {calibration!r}")
    if isinstance(calibration, float) and 0.0 < calibration < 1.0:
        fraction = calibration
    elif isinstance(calibration, int) and 1 <= calibration < n:
        fraction = calibration / n
    else:
        raise ValueError(f"calibration must be a fraction in (0, 1) or a count in [1, {n}), got {calibration!r}")
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        order = torch.randperm(n, generator=generator)
        size = round(fraction * n) if isinstance(calibration, float) else calibration
        size = min(max(size, 1), n - 1)
        return order[:size].sort().values, order[size:].sort().values
    if labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"calibration_split: labels must be ({n},) class indices")
    cal, rest = [], []
    for c in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels.cpu() == c).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        size = round(fraction * len(members))
        cal.append(members[:size])
        rest.append(members[size:])
    cal_idx, rest_idx = torch.cat(cal).sort().values, torch.cat(rest).sort().values
    if len(cal_idx) == 0 or len(rest_idx) == 0:
        raise ValueError(f"calibration_split: {calibration!r} of {n} examples leaves one side empty")
    return cal_idx, rest_idx


def cross_conformal_folds(n: int, num_folds: int, *, seed: int = 0) -> list[Tensor]:
    """A random partition of ``range(n)`` into ``num_folds`` folds of near-equal size.

    Fit one model without each fold, predict the fold with it, and give the folds'
    predictions to `CrossConformal.fit`.

    Args:
        n: number of examples.
        num_folds: ``K``, in ``[2, n]``.
        seed: seed of the permutation.

    Returns:
        ``K`` sorted int64 index tensors.

    Example:
        >>> folds = cross_conformal_folds(len(x), 10, seed=0)
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or not 2 <= num_folds <= n:
        raise ValueError(f"num_folds must be an int in [2, n={n}], got {num_folds!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [fold.sort().values for fold in order.tensor_split(num_folds)]


@dataclass
class ConformalEvaluation:
    """How a conformal predictor did on labelled test data.

    Attributes:
        alpha: the miscoverage it was fitted for.
        coverage: fraction of test examples whose label is in their set (interval).
        mean_size: mean set size (classes) or interval width (target units; averaged
            over the outputs).
        sizes: ``(N,)`` set sizes or interval widths.
        covered: ``(N,)`` bools.
        strata: coverage and size in equal-mass bins of the predicted uncertainty.
    """

    alpha: float
    coverage: float
    mean_size: float
    sizes: Tensor
    covered: Tensor
    strata: UncertaintyStrata

    def as_dict(self) -> dict[str, object]:
        """Plain values for JSON: alpha, coverage, mean size and the strata."""
        return {
            "alpha": self.alpha,
            "coverage": self.coverage,
            "mean_size": self.mean_size,
            "strata": self.strata.as_dict(),
        }


class SplitConformal(ABC):
    """Base of the split conformal predictors: a conformity score, ``fit`` and the threshold.

    Subclasses define `conformity_scores` (and how a threshold becomes a set or an
    interval); fitting is shared.

    Args:
        alpha: allowed miscoverage in ``(0, 1)``: the sets or intervals contain the truth
            with probability at least ``1 - alpha``.

    Attributes:
        quantile: the fitted threshold (``None`` before `fit`).
        num_calibration: the number of calibration examples.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = _check_alpha(alpha)
        self.quantile: Tensor | None = None
        self.num_calibration = 0

    @abstractmethod
    def conformity_scores(self, prediction: Any, labels: Tensor) -> Tensor:
        """``(N,)`` (or ``(N, D)``) scores of the true labels: larger = fits worse."""

    def fit(self: SelfT, prediction: Any, labels: Tensor) -> SelfT:
        """Calibrate on held-out data: the threshold is the conformal quantile of the scores.

        Args:
            prediction: the model's prediction of the calibration inputs.
            labels: their labels (class indices, or targets).

        Returns:
            ``self``.

        Raises:
            ValueError: empty calibration set, fewer examples than ``alpha`` needs
                (`minimum_calibration_size`), or labels that do not fit the prediction.
        """
        scores = self.conformity_scores(prediction, labels)
        self.quantile = conformal_quantile(scores, self.alpha)
        self.num_calibration = scores.shape[0]
        return self

    def _fitted_quantile(self) -> Tensor:
        if self.quantile is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(calibration_prediction, labels) first")
        return self.quantile

    def extra_repr(self) -> str:
        """The settings shown by ``repr``."""
        return f"alpha={self.alpha}"

    def __repr__(self) -> str:
        fitted = "" if self.quantile is None else f", fitted on {self.num_calibration}"
        return f"{type(self).__name__}({self.extra_repr()}{fitted})"


# ----------------------------------------------------------------------------- classification
def _probabilities(prediction: ClassificationInput) -> Tensor:
    probs = prediction.mean if isinstance(prediction, ClassificationPrediction) else prediction
    if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.dim() != 2:
        raise TypeError(
            "a conformal classifier takes a ClassificationPrediction (torchbayes.predict) or (N, C) "
            f"probabilities, got {type(prediction).__name__}"
            + (f" of shape {tuple(probs.shape)}" if isinstance(probs, Tensor) else "")
        )
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probabilities must be finite and >= 0 (pass softmax outputs, not logits)")
    return probs.double()  # cumulative sums of 1000 classes stay exact to ~1e-16


def _check_class_labels(labels: Tensor, n: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of class indices")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the prediction, got {tuple(labels.shape)}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes - 1}], got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def _default_uncertainty(prediction: object, fallback: Tensor) -> Tensor:
    if isinstance(prediction, ClassificationPrediction):
        return prediction.predictive_entropy
    if isinstance(prediction, RegressionPrediction):
        return prediction.variance.sqrt().mean(-1) if prediction.variance.dim() > 1 else prediction.variance.sqrt()
    return fallback


class ConformalClassifier(SplitConformal):
    """Prediction sets for classification: the classes whose score is within the threshold.

    Subclasses define `label_scores`, the score each class would have as the label.

    Shape:
        - prediction: a `ClassificationPrediction` (its ``mean``, ``(N, C)``) or ``(N, C)``
          probabilities.
        - labels: ``(N,)`` class indices.
        - sets: ``(N, C)`` bools.
    """

    @abstractmethod
    def label_scores(self, probs: Tensor) -> Tensor:
        """``(N, C)`` float64: the score of every class as the candidate label."""

    def conformity_scores(self, prediction: ClassificationInput, labels: Tensor) -> Tensor:
        """``(N,)`` scores of the true classes."""
        probs = _probabilities(prediction)
        labels = _check_class_labels(labels, probs.shape[0], probs.shape[1])
        return self.label_scores(probs).gather(1, labels.to(probs.device).unsqueeze(1)).squeeze(1)

    def predict_sets(self, prediction: ClassificationInput) -> Tensor:
        """Prediction sets: ``(N, C)`` bools, ``True`` for the classes in each input's set.

        Args:
            prediction: the model's prediction of new inputs.

        Returns:
            ``(N, C)`` bool tensor.
        """
        return self._sets(_probabilities(prediction), self._fitted_quantile())

    def _sets(self, probs: Tensor, threshold: Tensor) -> Tensor:
        return self.label_scores(probs) - threshold <= EPSILON

    def evaluate(
        self, prediction: ClassificationInput, labels: Tensor, *, uncertainty: Tensor | None = None, num_strata: int = 5
    ) -> ConformalEvaluation:
        """Coverage and set size on labelled test data, also by uncertainty.

        Args:
            prediction: the model's prediction of the test inputs.
            labels: ``(N,)`` their classes.
            uncertainty: ``(N,)`` uncertainty to stratify by (default: the predictive
                entropy of a `ClassificationPrediction`, else ``1 - max p``).
            num_strata: number of equal-mass uncertainty bins.

        Returns:
            A `ConformalEvaluation`.
        """
        probs = _probabilities(prediction)
        labels = _check_class_labels(labels, probs.shape[0], probs.shape[1])
        sets = self._sets(probs, self._fitted_quantile())
        covered = sets.gather(1, labels.to(sets.device).unsqueeze(1)).squeeze(1)
        sizes = sets.sum(1).double()
        if uncertainty is None:
            uncertainty = _default_uncertainty(prediction, 1 - probs.max(1).values)
        strata = size_by_uncertainty(sizes, covered, uncertainty, num_strata)
        return ConformalEvaluation(
            self.alpha, float(covered.double().mean()), float(sizes.mean()), sizes, covered, strata
        )


class LAC(ConformalClassifier):
    """Least ambiguous set-valued classifier (Sadinle et al. 2019; MAPIE ``"lac"``, the
    "score" or THR method): score ``1 - p_y``.

    Sets are the classes with ``p_c >= 1 - q``: the smallest sets on average among
    methods with the guarantee, but blind to how hard an input is (an input can get an
    empty set when no class is probable enough).

    Args:
        alpha: allowed miscoverage in ``(0, 1)``.

    Example:
        >>> LAC(0.1).fit(cal_prediction, y_cal).predict_sets(test_prediction).sum(1)
    """

    def label_scores(self, probs: Tensor) -> Tensor:
        return 1 - probs


class APS(ConformalClassifier):
    """Adaptive prediction sets (Romano et al. 2020; MAPIE ``"aps"``, non-randomised).

    Score: the total probability of the classes ranked at least as high as ``y``
    (sorted by decreasing probability, ``y`` included). A set takes classes in that
    order while their mass stays within the threshold, so a confident input gets one
    class and an ambiguous one several. Never empty: the most probable class is always in.

    Args:
        alpha: allowed miscoverage in ``(0, 1)``.
        include_last_label: also take the class whose cumulative mass first passes the
            threshold (MAPIE's ``include_last_label=True``): larger sets, coverage well
            above ``1 - alpha``.
        randomized: the randomised score of Romano et al. (2020): the true class counts
            only a uniform fraction ``u`` of its probability (``u ~ U(0, 1)``, one draw per
            input, for calibration and prediction alike), so coverage is ``1 - alpha`` up
            to ``1/(n + 1)`` instead of above it; sets can then be empty. A confident
            network needs it: the non-randomised scores of its correct predictions all sit
            near 1, and the sets grow to reach them.
        seed: seed of the uniform draws (``randomized=True``); each call draws anew.

    Example:
        >>> APS(0.1).fit(cal_prediction, y_cal).predict_sets(test_prediction)
    """

    def __init__(
        self, alpha: float = 0.1, *, include_last_label: bool = False, randomized: bool = False, seed: int = 0
    ) -> None:
        super().__init__(alpha)
        if not isinstance(include_last_label, bool):
            raise ValueError(f"include_last_label must be a bool, got {include_last_label!r}")
        if not isinstance(randomized, bool):
            raise ValueError(f"randomized must be a bool, got {randomized!r}")
        if randomized and include_last_label:
            raise ValueError("randomized sets decide the last class by a uniform draw: give include_last_label=False")
        self.include_last_label = include_last_label
        self.randomized = randomized
        self._generator = torch.Generator().manual_seed(seed) if randomized else None

    def _penalty(self, num_classes: int, device: torch.device) -> Tensor:
        """Added to the cumulative mass at each rank ``1..C``; zero for APS."""
        return torch.zeros(num_classes, dtype=torch.float64, device=device)

    def _sorted_scores(self, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Probabilities by decreasing value, their order, and the score at each rank."""
        sorted_probs, order = probs.sort(dim=1, descending=True)
        return sorted_probs, order, sorted_probs.cumsum(1) + self._penalty(probs.shape[1], probs.device)

    def label_scores(self, probs: Tensor) -> Tensor:
        sorted_probs, order, ranked = self._sorted_scores(probs)
        if self._generator is not None:  # the class itself counts a uniform fraction of its mass
            u = torch.rand(probs.shape[0], 1, generator=self._generator, dtype=torch.float64).to(probs.device)
            ranked = ranked - (1 - u) * sorted_probs
        return torch.empty_like(ranked).scatter_(1, order, ranked)

    def _sets(self, probs: Tensor, threshold: Tensor) -> Tensor:
        if self.randomized:  # scores rise with rank for every u: the set is a prefix, no tie rule
            return super()._sets(probs, threshold)
        sorted_probs, _, ranked = self._sorted_scores(probs)
        if self.include_last_label:  # the last class in the set: the first to reach the threshold
            last = (ranked < threshold - EPSILON).sum(1, keepdim=True).clamp_max(probs.shape[1] - 1)
        else:  # the last class within the threshold (scores rise with rank); the top class at least
            limit = torch.maximum(threshold.expand(ranked.shape[0], 1), ranked[:, :1])
            last = (ranked - limit <= EPSILON).sum(1, keepdim=True) - 1
        last_prob = sorted_probs.gather(1, last)
        # A class of probability 0 joins no set: stop at the least probable positive class.
        smallest_positive = probs.masked_fill(probs < EPSILON, math.inf).min(1, keepdim=True).values
        last_prob = torch.where(last_prob <= EPSILON, smallest_positive, last_prob)
        return probs - last_prob >= -EPSILON  # ties with the last class are in (order-free)


class RAPS(APS):
    """Regularised adaptive prediction sets (Angelopoulos et al. 2021; MAPIE ``"raps"``,
    non-randomised, with ``lambda`` and ``k_reg`` given instead of tuned).

    Score: APS's cumulative mass plus ``lambda * max(0, rank(y) - k_reg)`` (rank from
    1): classes beyond the ``k_reg`` most probable pay a penalty, which keeps sets small
    when the tail of the softmax is flat.

    Args:
        alpha: allowed miscoverage in ``(0, 1)``.
        penalty: ``lambda >= 0`` (the paper's grid: 0.001, 0.01, 0.1, 0.2, 0.5).
        k_reg: number of classes free of penalty, ``>= 0`` (the paper picks the
            ``1 - alpha`` quantile of the true class's rank on held-out data).
        include_last_label, randomized, seed: as for `APS`.

    Example:
        >>> RAPS(0.1, penalty=0.01, k_reg=2).fit(cal_prediction, y_cal)
    """

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        penalty: float = 0.01,
        k_reg: int = 1,
        include_last_label: bool = False,
        randomized: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(alpha, include_last_label=include_last_label, randomized=randomized, seed=seed)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 <= penalty < math.inf:
            raise ValueError(f"penalty (lambda) must be a finite number >= 0, got {penalty!r}")
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise ValueError(f"k_reg must be an int >= 0, got {k_reg!r}")
        self.penalty = float(penalty)
        self.k_reg = k_reg

    def _penalty(self, num_classes: int, device: torch.device) -> Tensor:
        rank = torch.arange(1, num_classes + 1, dtype=torch.float64, device=device)
        return self.penalty * (rank - self.k_reg).clamp_min(0)

    def extra_repr(self) -> str:
        last = ", include_last_label=True" if self.include_last_label else ""
        last += ", randomized=True" if self.randomized else ""
        return f"alpha={self.alpha}, penalty={self.penalty}, k_reg={self.k_reg}{last}"


# ----------------------------------------------------------------------------- regression
def _regression_parts(prediction: RegressionPrediction) -> tuple[Tensor, Tensor]:
    if not isinstance(prediction, RegressionPrediction):
        raise TypeError(
            "a conformal regressor takes a RegressionPrediction (torchbayes.predict(..., task='regression') "
            f"or torchbayes.summarize), got {type(prediction).__name__}"
        )
    mean, variance = prediction.mean, prediction.variance
    if mean.dim() == 1:
        mean, variance = mean.unsqueeze(1), variance.unsqueeze(1)
    if mean.dim() != 2:
        raise ValueError(f"regression predictions must have a mean of shape (N, D), got {tuple(mean.shape)}")
    return mean.double(), variance.double()


def _check_targets(targets: Tensor, mean: Tensor) -> Tensor:
    if not isinstance(targets, Tensor) or not targets.is_floating_point():
        raise TypeError("regression targets must be a floating-point tensor")
    if targets.dim() == 1 and mean.shape[1] == 1:
        targets = targets.unsqueeze(1)
    if targets.shape != mean.shape:
        raise ValueError(
            f"targets must have shape {tuple(mean.shape)} (or (N,) for one output), got {tuple(targets.shape)}"
        )
    if not torch.isfinite(targets).all():
        raise ValueError("targets contain NaN or infinite values")
    return targets.to(mean.device, torch.float64)


class ConformalRegressor(SplitConformal):
    """Prediction intervals ``mean +- q * scale`` from the score ``|y - mean| / scale``.

    Subclasses define `scale`. Each output of a multi-output model is calibrated on its
    own (a threshold per output; coverage holds per output).

    Shape:
        - prediction: a `RegressionPrediction` with ``mean`` and ``variance`` ``(N, D)``.
        - targets: ``(N, D)``, or ``(N,)`` when ``D = 1``.
        - intervals: ``lower`` and ``upper``, ``(N, D)`` float64.
    """

    @abstractmethod
    def scale(self, mean: Tensor, variance: Tensor) -> Tensor:
        """``(N, D)`` positive scales of the residuals."""

    def conformity_scores(self, prediction: RegressionPrediction, labels: Tensor) -> Tensor:
        """``(N, D)`` scaled absolute residuals."""
        mean, variance = _regression_parts(prediction)
        targets = _check_targets(labels, mean)
        return (targets - mean).abs() / self.scale(mean, variance)

    def predict_intervals(self, prediction: RegressionPrediction) -> tuple[Tensor, Tensor]:
        """Intervals for new inputs.

        Args:
            prediction: the model's prediction of new inputs.

        Returns:
            ``(lower, upper)``, each ``(N, D)`` float64.
        """
        mean, variance = _regression_parts(prediction)
        half = self._fitted_quantile() * self.scale(mean, variance)
        return mean - half, mean + half

    def evaluate(
        self,
        prediction: RegressionPrediction,
        targets: Tensor,
        *,
        uncertainty: Tensor | None = None,
        num_strata: int = 5,
    ) -> ConformalEvaluation:
        """Coverage and interval width on labelled test data, also by uncertainty.

        Widths and coverage are averaged over the outputs (``D``) per example.

        Args:
            prediction: the model's prediction of the test inputs.
            targets: ``(N, D)`` (or ``(N,)``) their targets.
            uncertainty: ``(N,)`` uncertainty to stratify by (default: the predictive std,
                averaged over outputs).
            num_strata: number of equal-mass uncertainty bins.

        Returns:
            A `ConformalEvaluation` (``covered`` is per example: all its outputs covered).
        """
        mean, _ = _regression_parts(prediction)
        targets = _check_targets(targets, mean)
        lower, upper = self.predict_intervals(prediction)
        inside = (targets >= lower) & (targets <= upper)
        widths = (upper - lower).mean(1)
        covered = inside.all(1)
        if uncertainty is None:
            uncertainty = _default_uncertainty(prediction, widths)
        strata = size_by_uncertainty(widths, covered, uncertainty, num_strata)
        return ConformalEvaluation(
            self.alpha, float(inside.double().mean()), float(widths.mean()), widths, covered, strata
        )


class AbsoluteResidual(ConformalRegressor):
    """Intervals ``mean +- q`` from the score ``|y - mean|`` (MAPIE ``"absolute"``).

    Every input gets the same width: valid, but blind to which inputs are hard.

    Args:
        alpha: allowed miscoverage in ``(0, 1)``.

    Example:
        >>> lower, upper = AbsoluteResidual(0.1).fit(cal_prediction, y_cal).predict_intervals(test_prediction)
    """

    def scale(self, mean: Tensor, variance: Tensor) -> Tensor:
        return torch.ones_like(mean)


class NormalizedResidual(ConformalRegressor):
    """Intervals ``mean +- q * std`` from the score ``|y - mean| / std`` (MAPIE ``"std"``,
    ``StdConformityScore``), with the model's total predictive std (aleatoric + epistemic).

    Adaptive widths: the conformal step corrects the scale of a model's uncertainty,
    the uncertainty decides which inputs get wide intervals. A std below ``1e-8`` is
    raised to it (as MAPIE does).

    Args:
        alpha: allowed miscoverage in ``(0, 1)``.

    Raises:
        ValueError: at `fit`, if every predicted variance is zero (a plain network with
            no variance output: use `AbsoluteResidual`).

    Example:
        >>> NormalizedResidual(0.1).fit(predict(model, x_cal, task="regression", output_variance="log_variance"), y_cal)
    """

    def scale(self, mean: Tensor, variance: Tensor) -> Tensor:
        if not torch.isfinite(variance).all() or (variance < 0).any():
            raise ValueError("NormalizedResidual: predictive variances must be finite and >= 0")
        if variance.numel() and not (variance > 0).any():
            raise ValueError(
                "NormalizedResidual: every predictive variance is 0 (a model without uncertainty); use AbsoluteResidual"
            )
        return variance.sqrt().clamp_min(EPSILON)


# ----------------------------------------------------------------------------- cross-conformal
class CrossConformal:
    """CV+ intervals (Barber et al. 2021) and cross-conformal sets (Romano et al. 2020).

    For small data: instead of giving up a calibration split, fit ``K`` models, each
    without one fold (`cross_conformal_folds`), and score every example with the model
    that did not see it. A new input is predicted by all ``K`` models.

    - Regression (a `ConformalRegressor` score): with ``R_i`` the scaled residual of
      calibration example ``i`` and ``m_k(x), s_k(x)`` the mean and scale of the model
      without ``i``'s fold, the interval is ``[floor(alpha (n + 1))``-th smallest of
      ``m_k(x) - R_i s_k(x)``, ``ceil((1 - alpha)(n + 1))``-th smallest of
      ``m_k(x) + R_i s_k(x)]`` (MAPIE's ``CrossConformalRegressor(method="plus")``).
      Coverage is at least ``1 - 2 alpha`` in theory, about ``1 - alpha`` in practice.
    - Classification (a `ConformalClassifier` score): class ``y`` is in the set when
      fewer than ``(1 - alpha)(n + 1)`` calibration scores are below the score of ``y``
      under the model without their fold.

    Args:
        score: a conformal predictor giving the score and ``alpha`` (it is not fitted).

    Example:
        >>> cv = CrossConformal(NormalizedResidual(0.1)).fit(fold_predictions, fold_targets)
        >>> lower, upper = cv.predict_intervals(test_predictions)   # one per fold model
    """

    def __init__(self, score: SplitConformal) -> None:
        if not isinstance(score, (ConformalClassifier, ConformalRegressor)):
            raise TypeError(f"score must be a ConformalClassifier or ConformalRegressor, got {type(score).__name__}")
        self.score = score
        self.alpha = score.alpha
        self.fold_scores: list[Tensor] | None = None

    def fit(self, predictions: Sequence[Any], labels: Sequence[Tensor]) -> CrossConformal:
        """Score each fold with the model fitted without it.

        Args:
            predictions: per fold ``k``, the prediction of fold ``k``'s examples by the
                model fitted without fold ``k``.
            labels: per fold, its labels (targets).

        Returns:
            ``self``.
        """
        if len(predictions) != len(labels) or len(predictions) < 2:
            raise ValueError("fit needs one prediction and one label tensor per fold, and at least two folds")
        self.fold_scores = [self.score.conformity_scores(p, y) for p, y in zip(predictions, labels)]
        n = sum(s.shape[0] for s in self.fold_scores)
        if n == 0:
            raise ValueError("the calibration set is empty: conformal prediction needs calibration examples")
        if _quantile_rank(n, self.alpha) > n or math.floor(self.alpha * (n + 1)) < 1:
            raise ValueError(
                f"alpha={self.alpha} needs at least {minimum_calibration_size(self.alpha)} "
                f"calibration examples; got {n}"
            )
        return self

    def _fitted(self, predictions: Sequence[Any]) -> list[Tensor]:
        if self.fold_scores is None:
            raise RuntimeError("CrossConformal is not fitted: call fit(fold_predictions, fold_labels) first")
        if len(predictions) != len(self.fold_scores):
            raise ValueError(f"give one prediction per fold model ({len(self.fold_scores)}), got {len(predictions)}")
        return self.fold_scores

    def predict_intervals(self, predictions: Sequence[RegressionPrediction]) -> tuple[Tensor, Tensor]:
        """CV+ intervals of new inputs.

        Args:
            predictions: per fold model ``k``, its prediction of the new inputs.

        Returns:
            ``(lower, upper)``, each ``(N, D)`` float64.
        """
        fold_scores = self._fitted(predictions)
        score = self.score
        if not isinstance(score, ConformalRegressor):
            raise TypeError("predict_intervals needs a ConformalRegressor score; use predict_sets")
        lows, highs = [], []
        for prediction, scores in zip(predictions, fold_scores):
            mean, variance = _regression_parts(prediction)
            half = scores.unsqueeze(1) * score.scale(mean, variance).unsqueeze(0)  # (n_k, N, D)
            lows.append(mean - half)
            highs.append(mean + half)
        low, high = torch.cat(lows), torch.cat(highs)
        n = low.shape[0]
        lower = low.kthvalue(math.floor(self.alpha * (n + 1)), dim=0).values
        upper = high.kthvalue(_quantile_rank(n, self.alpha), dim=0).values
        return lower, upper

    def predict_sets(self, predictions: Sequence[ClassificationInput]) -> Tensor:
        """Cross-conformal sets of new inputs.

        Args:
            predictions: per fold model ``k``, its prediction of the new inputs.

        Returns:
            ``(N, C)`` bools.
        """
        fold_scores = self._fitted(predictions)
        score = self.score
        if not isinstance(score, ConformalClassifier):
            raise TypeError("predict_sets needs a ConformalClassifier score; use predict_intervals")
        below: Tensor | None = None
        n = 0
        for prediction, scores in zip(predictions, fold_scores):
            candidate = score.label_scores(_probabilities(prediction))  # (N, C)
            sorted_scores = scores.sort().values.contiguous()
            # number of this fold's calibration scores strictly below each candidate's score
            count = torch.searchsorted(sorted_scores, (candidate - EPSILON).contiguous(), right=False)
            below = count if below is None else below + count
            n += scores.shape[0]
        assert below is not None
        return below < (1 - self.alpha) * (n + 1)

    def __repr__(self) -> str:
        return f"CrossConformal({self.score!r})"
