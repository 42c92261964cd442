"""Classification metrics: calibration, proper scoring rules, OOD detection, selective prediction.

Classification metrics take predictive probabilities ``probs`` of shape ``(N, C)``
(for a Bayesian model, the Monte Carlo average of the softmax outputs; rows must sum to
one) and integer ``labels`` of shape ``(N,)``. Every metric returns a 0-D tensor on the
inputs' device.

Calibration bins follow Guo et al. (2017): ``n_bins`` equal-width bins
``[0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1]`` of the top-class confidence. The numbers
equal ``torchmetrics.functional.classification.multiclass_calibration_error`` except that
torchmetrics counts a confidence of exactly 1.0 (common in float32) in an extra bin of its
own (Lightning-AI/torchmetrics#3510) and puts confidences that fall on an inner edge in
the upper bin; the bins are computed here because the reliability diagram
(:mod:`torchbayes.plots`) and the adaptive variant need them.

OOD detection (:func:`ood_auroc`, :func:`ood_aupr`) uses torchmetrics (extra ``metrics``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from torchbayes.validation import check_flag

__all__ = [
    "CalibrationBins",
    "accuracy",
    "negative_log_likelihood",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "classwise_calibration_error",
    "smooth_calibration_error",
    "ood_auroc",
    "ood_aupr",
    "risk_coverage_curve",
    "area_under_risk_coverage",
    "selective_risk",
    "referral_curve",
]

#: Tolerance on ``|sum_c probs - 1|``; loose enough for float16/bfloat16 MC averages.
PROBS_SUM_TOLERANCE = 1e-3


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact counts and comparisons, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_labels(labels: Tensor, n: int, num_classes: int | None, device: torch.device, caller: str) -> None:
    """Labels must be ``(n,)`` integer class indices in ``[0, num_classes)`` on ``device``."""
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        raise TypeError(f"{caller}: labels must be an integer tensor of class indices")
    if labels.shape != (n,):
        raise ValueError(f"{caller}: labels must have shape ({n},) to match the predictions, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{caller}: labels are on {labels.device} but the predictions on {device}")
    if num_classes is not None and n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{caller}: labels must be in [0, {num_classes - 1}], got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def _check_logits(logits: Tensor, caller: str) -> None:
    """Logits must be a float ``(N, C)`` or Monte Carlo ``(S, N, C)`` tensor with N > 0."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"{caller}: logits must be a floating-point tensor")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{caller}: logits must have shape (N, C) or Monte Carlo (S, N, C), got {tuple(logits.shape)}")
    if logits.shape[-2] == 0:
        raise ValueError(f"{caller}: logits is an empty batch (N = 0)")


def _check_logits_labels(logits: Tensor, labels: Tensor, caller: str) -> None:
    _check_logits(logits, caller)
    _check_labels(labels, logits.shape[-2], logits.shape[-1], logits.device, caller)


def _check_probs(probs: Tensor, labels: Tensor, caller: str) -> None:
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise TypeError(f"{caller}: probs must be a floating-point tensor of probabilities")
    if probs.dim() != 2:
        raise ValueError(f"{caller}: probs must have shape (N, C), got {tuple(probs.shape)}")
    if probs.shape[0] == 0:
        raise ValueError(f"{caller}: probs is an empty batch (N = 0)")
    _check_labels(labels, probs.shape[0], probs.shape[1], probs.device, caller)
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError(f"{caller}: probs must be probabilities in [0, 1]; pass softmax(logits), not logits")
    deviation = (probs.sum(1, dtype=_wide_dtype(probs.device)) - 1).abs().max()
    if deviation > PROBS_SUM_TOLERANCE:
        raise ValueError(
            f"{caller}: every row of probs must sum to 1 (within {PROBS_SUM_TOLERANCE}); "
            f"a row is off by {float(deviation):.3g}"
        )


def _confidence_and_correct(probs: Tensor, labels: Tensor, caller: str) -> tuple[Tensor, Tensor]:
    _check_probs(probs, labels, caller)
    confidence, prediction = probs.max(dim=1)
    return confidence, prediction == labels


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    """Fraction of examples whose most probable class is the label.

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.

    Returns:
        0-D tensor in ``[0, 1]``.

    Example:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    _, correct = _confidence_and_correct(probs, labels, "accuracy")
    return correct.to(probs.dtype).mean()


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> Tensor:
    """Mean ``-log p(label)``, in nats.

    A probability of exactly 0 for the label is clamped to the smallest positive normal
    number of the dtype, so the result is large but finite.

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.

    Returns:
        0-D tensor >= 0.

    Example:
        >>> negative_log_likelihood(probs.mean(0), y)   # probs: (S, N, C) MC softmax outputs
    """
    _check_probs(probs, labels, "negative_log_likelihood")
    p_label = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    return -p_label.clamp_min(torch.finfo(probs.dtype).tiny).log().mean()


def brier_score(probs: Tensor, labels: Tensor) -> Tensor:
    """Multi-class Brier score: mean over examples of ``sum_c (p_c - 1[c = label])^2``.

    In ``[0, 2]`` (Brier, 1950); scikit-learn's ``brier_score_loss`` gives the same number
    for multi-class inputs.

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.

    Returns:
        0-D tensor.

    Example:
        >>> brier_score(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
        tensor(2.)
    """
    _check_probs(probs, labels, "brier_score")
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return (probs - one_hot).square().sum(1).mean()


@dataclass
class CalibrationBins:
    """Per-bin statistics of top-class confidence against accuracy.

    Attributes:
        edges: ``(n_bins + 1,)`` bin edges (for adaptive bins, the confidences where one
            bin ends and the next starts; first 0, last 1).
        counts: ``(n_bins,)`` number of examples per bin.
        accuracy: ``(n_bins,)`` accuracy in each bin (0 where empty).
        confidence: ``(n_bins,)`` mean confidence in each bin (0 where empty).
    """

    edges: Tensor
    counts: Tensor
    accuracy: Tensor
    confidence: Tensor

    @property
    def gaps(self) -> Tensor:
        """``|accuracy - confidence|`` per bin (0 where empty)."""
        return (self.accuracy - self.confidence).abs()

    @property
    def expected_calibration_error(self) -> Tensor:
        """``sum_b (n_b / N) |acc_b - conf_b|``."""
        return (self.counts / self.counts.sum() * self.gaps).sum()

    @property
    def maximum_calibration_error(self) -> Tensor:
        """``max_b |acc_b - conf_b|`` over non-empty bins."""
        return self.gaps[self.counts > 0].max()


def _check_n_bins(n_bins: int, caller: str) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"{caller}: n_bins must be a positive int, got {n_bins!r}")


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = 15, *, adaptive: bool = False) -> CalibrationBins:
    """Bin the examples by top-class confidence.

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.
        n_bins: number of bins (15 as in Guo et al. 2017 and torchmetrics).
        adaptive: ``False``: equal-width bins ``((b-1)/M, b/M]`` (the first closed at
            0); ``True``: equal-mass bins, each holding ``N / n_bins`` examples (+-1) in
            order of confidence (Nixon et al. 2019, "adaptive ECE"; examples with equal
            confidence may be split between neighbouring bins).

    Returns:
        A :class:`CalibrationBins`.

    Example:
        >>> bins = calibration_bins(probs, y, n_bins=10); bins.expected_calibration_error
    """
    _check_n_bins(n_bins, "calibration_bins")
    check_flag("adaptive", adaptive)
    confidence, correct = _confidence_and_correct(probs, labels, "calibration_bins")
    return _bins(confidence, correct, n_bins, adaptive)


def _bins(confidence: Tensor, correct: Tensor, n_bins: int, adaptive: bool) -> CalibrationBins:
    """Bin predicted probabilities ``confidence`` ``(N,)`` of events ``correct`` ``(N,)`` bools."""
    n = confidence.shape[0]
    if adaptive:
        confidence, order = confidence.sort()
        correct = correct[order]
        bin_index = torch.arange(n, device=confidence.device) * n_bins // n
        # Inner edge b is the first confidence of bin b (index ceil(b N / M)); 1 if empty.
        starts = (torch.arange(1, n_bins, device=confidence.device) * n + n_bins - 1) // n_bins
        inner = torch.cat([confidence, confidence.new_ones(1)])[starts]
        edges = torch.cat([confidence.new_zeros(1), inner, confidence.new_ones(1)])
    else:
        edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
        # right=False: a confidence equal to edge b goes to the bin that edge closes.
        bin_index = torch.bucketize(confidence, edges[1:-1], right=False)
    counts = torch.zeros(n_bins, dtype=confidence.dtype, device=confidence.device)
    counts.index_add_(0, bin_index, torch.ones_like(confidence))
    sum_correct = torch.zeros_like(counts).index_add_(0, bin_index, correct.to(confidence.dtype))
    sum_confidence = torch.zeros_like(counts).index_add_(0, bin_index, confidence)
    safe_counts = counts.clamp_min(1)
    return CalibrationBins(edges, counts, sum_correct / safe_counts, sum_confidence / safe_counts)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15, *, adaptive: bool = False) -> Tensor:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.
        n_bins: number of bins.
        adaptive: equal-mass instead of equal-width bins (see :func:`calibration_bins`).

    Returns:
        0-D tensor in ``[0, 1]``.

    Example:
        >>> expected_calibration_error(torch.softmax(logits, -1), y)
    """
    return calibration_bins(probs, labels, n_bins, adaptive=adaptive).expected_calibration_error


def maximum_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15, *, adaptive: bool = False) -> Tensor:
    """Maximum calibration error ``max_b |acc_b - conf_b|`` over non-empty bins.

    Args and Returns as :func:`expected_calibration_error`.

    Example:
        >>> maximum_calibration_error(torch.softmax(logits, -1), y, n_bins=10)
    """
    return calibration_bins(probs, labels, n_bins, adaptive=adaptive).maximum_calibration_error


def classwise_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15, *, adaptive: bool = False) -> Tensor:
    """Classwise ECE (Kull et al. 2019): the binned calibration error of every class's
    probability, not only the top one's, averaged over classes.

    ``(1/C) sum_c sum_b (n_cb / N) |freq_cb - mean p_c in bin b|``, where ``freq_cb`` is
    the fraction of the bin's examples labelled ``c``. Per class it is torchmetrics'
    ``binary_calibration_error`` of ``probs[:, c]`` against ``labels == c`` (bins as in
    `calibration_bins`).

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.
        n_bins: bins per class.
        adaptive: equal-mass instead of equal-width bins.

    Returns:
        0-D tensor in ``[0, 1]``.

    Example:
        >>> classwise_calibration_error(result.mean, y_test)
    """
    _check_n_bins(n_bins, "classwise_calibration_error")
    check_flag("adaptive", adaptive)
    _check_probs(probs, labels, "classwise_calibration_error")
    errors = [
        _bins(probs[:, c].contiguous(), labels == c, n_bins, adaptive).expected_calibration_error
        for c in range(probs.shape[1])
    ]
    return torch.stack(errors).mean()


def _reflected_gaussian(t: Tensor, f: Tensor, sigma: float) -> Tensor:
    """``(M, N)`` Gaussian kernel of width ``sigma`` on ``[0, 1]`` reflected at 0 and 1 (its
    mass stays in the interval): ``phi(t - f) + phi(t + f) + phi(t - 2 + f)``."""
    t, f = t.unsqueeze(1), f.unsqueeze(0)
    scale = 1 / (math.sqrt(2 * math.pi) * sigma)
    return scale * sum(torch.exp(-0.5 * ((t - c) / sigma) ** 2) for c in (f, -f, 2 - f))  # type: ignore[return-value]


def _smooth_ece_at(confidence: Tensor, residual: Tensor, sigma: float, block: int = 4096) -> Tensor:
    """``int |sum_i K(t, f_i) r_i| dt / int sum_i K(t, f_i) dt`` on a mesh of ``[0, 1]``."""
    t = torch.linspace(0, 1, max(200, round(10 / sigma)), dtype=confidence.dtype, device=confidence.device)
    smoothed = torch.zeros_like(t)
    density = torch.zeros_like(t)
    for first in range(0, confidence.shape[0], block):  # bounded (M, block) kernels
        kernel = _reflected_gaussian(t, confidence[first : first + block], sigma)
        smoothed += kernel @ residual[first : first + block]
        density += kernel.sum(1)
    return smoothed.abs().sum() / density.sum()


def smooth_calibration_error(probs: Tensor, labels: Tensor, bandwidth: float | None = None) -> Tensor:
    """SmoothECE (Blasiok and Nakkiran 2023): the calibration error of top-class
    confidence with kernel smoothing instead of bins.

    ``smECE_s = int_0^1 |(1/N) sum_i K_s(t, f_i)(y_i - f_i)| dt`` with ``f_i`` the
    confidence, ``y_i`` whether the prediction is right and ``K_s`` a Gaussian kernel of
    width ``s`` reflected at 0 and 1. Without a ``bandwidth`` the paper's choice is used:
    the fixed point ``s* = smECE_{s*}`` (found by bisection to ``2**-16``), which makes
    the measure consistent and free of a bin count. The integral is a mean over a mesh of
    ``max(200, 10 / s)`` points normalised by the kernels' own mass, as in the authors'
    ``relplot`` package (which also rounds the confidences to a grid: the two agree to
    about ``1e-3``).

    Args:
        probs: ``(N, C)`` predictive probabilities.
        labels: ``(N,)`` class indices.
        bandwidth: the kernel width ``s`` in ``(0, 1]``, or ``None`` for ``s*``.

    Returns:
        0-D float64 tensor in ``[0, 1]``.

    Example:
        >>> smooth_calibration_error(result.mean, y_test)
    """
    confidence, correct = _confidence_and_correct(probs, labels, "smooth_calibration_error")
    wide = _wide_dtype(probs.device)
    confidence = confidence.to(wide)
    residual = correct.to(wide) - confidence
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth <= 1:
            raise ValueError(f"smooth_calibration_error: bandwidth must be in (0, 1] or None, got {bandwidth!r}")
        return _smooth_ece_at(confidence, residual, float(bandwidth))
    if float(_smooth_ece_at(confidence, residual, 1.0)) >= 1.0:
        return _smooth_ece_at(confidence, residual, 1.0)
    low, high = 0.0, 1.0  # smECE_s - s falls as s grows: s* is where it crosses 0
    for _ in range(16):
        mid = (low + high) / 2
        if mid < 1e-3 or mid < float(_smooth_ece_at(confidence, residual, mid)):
            low = mid
        else:
            high = mid
    return _smooth_ece_at(confidence, residual, high)


def _ood_scores(in_scores: Tensor, out_scores: Tensor, caller: str) -> tuple[Tensor, Tensor]:
    for name, s in (("in_scores", in_scores), ("out_scores", out_scores)):
        if not isinstance(s, Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"{caller}: {name} must be a non-empty 1-D tensor of uncertainty scores")
        if not torch.isfinite(s).all():
            raise ValueError(f"{caller}: {name} contains NaN or infinite scores")
    if in_scores.device != out_scores.device:
        raise ValueError(f"{caller}: in_scores and out_scores are on different devices")
    scores = torch.cat([in_scores, out_scores]).to(torch.promote_types(in_scores.dtype, out_scores.dtype))
    is_out = torch.cat([torch.zeros_like(in_scores, dtype=torch.long), torch.ones_like(out_scores, dtype=torch.long)])
    return scores, is_out


def _torchmetrics_classification():
    try:
        from torchmetrics.functional import classification
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("OOD metrics need torchmetrics: pip install 'torchbayes[metrics]'") from e
    return classification


def ood_auroc(in_scores: Tensor, out_scores: Tensor) -> Tensor:
    """Area under the ROC curve of telling out-of-distribution inputs from in-distribution
    ones by an uncertainty score (higher = more likely OOD).

    0.5 is chance, 1 perfect separation. Computed by torchmetrics' ``binary_auroc``
    (ties counted half, like scikit-learn's ``roc_auc_score``).

    Args:
        in_scores: ``(N,)`` scores of in-distribution inputs (e.g. predictive entropy).
        out_scores: ``(M,)`` scores of OOD inputs.

    Returns:
        0-D tensor.

    Example:
        >>> ood_auroc(predictive_entropy(p_test), predictive_entropy(p_ood))
    """
    scores, is_out = _ood_scores(in_scores, out_scores, "ood_auroc")
    return _torchmetrics_classification().binary_auroc(scores, is_out)


def ood_aupr(in_scores: Tensor, out_scores: Tensor, *, positive: Literal["out", "in"] = "out") -> Tensor:
    """Area under the precision-recall curve (average precision) of OOD detection.

    Args:
        in_scores: ``(N,)`` uncertainty scores of in-distribution inputs.
        out_scores: ``(M,)`` uncertainty scores of OOD inputs.
        positive: ``"out"`` (AUPR-Out: OOD inputs are the positives, ranked by high
            uncertainty) or ``"in"`` (AUPR-In: in-distribution inputs are the positives,
            ranked by low uncertainty).

    Returns:
        0-D tensor; equals scikit-learn's ``average_precision_score``.

    Example:
        >>> ood_aupr(mutual_information(mc_test), mutual_information(mc_ood))
    """
    if positive not in ("out", "in"):
        raise ValueError(f"ood_aupr: positive must be 'out' or 'in', got {positive!r}")
    scores, is_out = _ood_scores(in_scores, out_scores, "ood_aupr")
    if positive == "in":
        scores, is_out = -scores, 1 - is_out
    return _torchmetrics_classification().binary_average_precision(scores, is_out)


def _check_selective(uncertainty: Tensor, correct: Tensor, caller: str) -> None:
    if not isinstance(uncertainty, Tensor) or uncertainty.dim() != 1 or uncertainty.numel() == 0:
        raise ValueError(f"{caller}: uncertainty must be a non-empty 1-D tensor")
    if not isinstance(correct, Tensor) or correct.dtype != torch.bool or correct.shape != uncertainty.shape:
        raise ValueError(
            f"{caller}: correct must be a bool tensor of shape {tuple(uncertainty.shape)} (prediction == label)"
        )
    if correct.device != uncertainty.device:
        raise ValueError(f"{caller}: uncertainty and correct are on different devices")
    if torch.isnan(uncertainty).any():
        raise ValueError(f"{caller}: uncertainty contains NaN")


def risk_coverage_curve(uncertainty: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Risk-coverage curve of selective prediction: answer only the ``k`` most certain.

    For ``k = 1 .. N`` the model answers the ``k`` inputs of lowest uncertainty; coverage
    is ``k / N`` and risk the error rate on them. Inputs with equal uncertainty cannot be
    told apart, so within a tie the risk is its expectation over their order (linear
    between the tie's ends); the curve does not depend on how ties are sorted.

    Args:
        uncertainty: ``(N,)`` uncertainty scores (e.g. predictive entropy, ``1 - max p``).
        correct: ``(N,)`` bools, whether each prediction is right.

    Returns:
        ``(coverage, risk)``, float64 tensors of shape ``(N,)``.

    Example:
        >>> cov, risk = risk_coverage_curve(entropy, probs.argmax(1) == y)
    """
    _check_selective(uncertainty, correct, "risk_coverage_curve")
    n = uncertainty.numel()
    wide = _wide_dtype(uncertainty.device)
    _, group, group_size = torch.unique(uncertainty, sorted=True, return_inverse=True, return_counts=True)
    group_errors = torch.zeros(group_size.shape, dtype=wide, device=uncertainty.device)
    group_errors.index_add_(0, group, (~correct).to(wide))
    group_end = group_size.cumsum(0)
    errors_before = group_errors.cumsum(0) - group_errors  # errors of all lower-uncertainty groups
    k = torch.arange(1, n + 1, device=uncertainty.device)
    g = torch.searchsorted(group_end, k)  # the group the k-th answered input belongs to
    taken = (k - (group_end[g] - group_size[g])).to(wide)
    errors = errors_before[g] + taken * group_errors[g] / group_size[g]
    k = k.to(wide)
    return k / n, errors / k


def area_under_risk_coverage(uncertainty: Tensor, correct: Tensor) -> Tensor:
    """AURC: mean risk over coverages ``1/N .. 1`` (Geifman et al. 2019); lower is better.

    Args and tie handling as :func:`risk_coverage_curve`.

    Returns:
        0-D float64 tensor in ``[0, 1]``.

    Example:
        >>> area_under_risk_coverage(entropy, probs.argmax(1) == y)
    """
    _, risk = risk_coverage_curve(uncertainty, correct)
    return risk.mean()


def selective_risk(uncertainty: Tensor, correct: Tensor, coverage: float) -> Tensor:
    """Error rate on the ``ceil(coverage N)`` most certain inputs: the risk of answering only
    a fixed fraction (e.g. 80% as in torch-uncertainty's "risk at 80% coverage").

    Ties in ``uncertainty`` as in `risk_coverage_curve` (the expectation over their order).

    Args:
        uncertainty: ``(N,)`` uncertainty scores.
        correct: ``(N,)`` bools, whether each prediction is right.
        coverage: the fraction answered, in ``(0, 1]``.

    Returns:
        0-D float64 tensor in ``[0, 1]``.

    Example:
        >>> selective_risk(entropy, probs.argmax(1) == y, 0.8)
    """
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
        raise ValueError(f"selective_risk: coverage must be in (0, 1], got {coverage!r}")
    _, risk = risk_coverage_curve(uncertainty, correct)
    n = risk.numel()
    return risk[max(1, math.ceil(coverage * n - 1e-9)) - 1]


def referral_curve(uncertainty: Tensor, correct: Tensor, fractions: Sequence[float] | Tensor) -> Tensor:
    """Accuracy on the cases kept when the most uncertain ones are referred (e.g. to a doctor).

    The referral view of :func:`risk_coverage_curve` (Leibig et al. 2017): referring a
    fraction ``f`` of the ``N`` cases keeps the ``k = N - round(f N)`` least uncertain
    ones (at least one), and the accuracy on them is ``1 - risk`` at coverage ``k / N``.
    Ties are handled as there: the expectation over their order. Random referral keeps
    the overall accuracy on average; it is the curve of a constant ``uncertainty``.

    Args:
        uncertainty: ``(N,)`` uncertainty scores (e.g. predictive entropy, mutual
            information, or ``1 - confidence`` of a deterministic model).
        correct: ``(N,)`` bools, whether each prediction is right.
        fractions: fractions of cases referred, each in ``[0, 1)``.

    Returns:
        float64 tensor of shape ``(len(fractions),)``: accuracy on the kept cases.

    Example:
        >>> referral_curve(entropy, probs.argmax(1) == y, [0.0, 0.1, 0.2, 0.3])
    """
    fractions = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    if fractions.numel() == 0 or not ((fractions >= 0) & (fractions < 1)).all():
        raise ValueError(
            f"referral_curve: fractions must be a non-empty sequence of numbers in [0, 1), got {fractions.tolist()}"
        )
    _, risk = risk_coverage_curve(uncertainty, correct)
    n = risk.numel()
    kept = (n - torch.round(fractions * n).long()).clamp_min(1)
    return 1 - risk[(kept - 1).to(risk.device)]
