"""The result objects of :func:`torchbayes.predict` and the one summary every method shares.

Every prediction method (Monte Carlo over Bayesian layers, MC dropout, deep ensembles,
moment propagation) ends in :func:`summarize`: it turns per-sample outputs ``(S, B, ...)``
into a :class:`ClassificationPrediction` or :class:`RegressionPrediction`, so results of
different methods are read, compared and reported alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from torchbayes import uncertainty

__all__ = ["ClassificationPrediction", "Prediction", "RegressionPrediction", "summarize"]


@dataclass(frozen=True)
class Prediction:
    """What every :func:`predict` result holds.

    Attributes:
        samples: the model's output for each posterior sample, ``(S, B, ...)``.
        mean: the predictive mean, ``(B, ...)``.
    """

    samples: Tensor
    mean: Tensor


@dataclass(frozen=True)
class ClassificationPrediction(Prediction):
    """Result of ``predict(..., task="classification")``; all uncertainties in nats.

    Attributes:
        samples: the model's outputs (logits, or probabilities), ``(S, B, C)``.
        probabilities: class probabilities of each sample, ``(S, B, C)``.
        mean: predictive class probabilities (the mean over samples), ``(B, C)``.
        predictive_entropy: total uncertainty, ``(B,)``.
        expected_entropy: aleatoric uncertainty, ``(B,)``.
        mutual_information: epistemic uncertainty, ``predictive - expected``, ``(B,)``.
        predicted_class: ``mean.argmax(-1)``, ``(B,)``.
        confidence: ``mean.max(-1)``, ``(B,)``.
    """

    probabilities: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    predicted_class: Tensor
    confidence: Tensor


@dataclass(frozen=True)
class RegressionPrediction(Prediction):
    """Result of ``predict(..., task="regression")``.

    Attributes:
        samples: the model's outputs, ``(S, B, ...)`` (means and variance halves included).
        sample_means: the predicted mean of each sample, ``(S, B, D)``.
        sample_variances: the predicted variance of each sample, or ``None`` (homoscedastic).
        mean: predictive mean, ``(B, D)``.
        variance: total predictive variance ``aleatoric + epistemic``, ``(B, D)``.
        aleatoric_variance: mean of the predicted variances (0 without them), ``(B, D)``.
        epistemic_variance: variance of the predicted means over samples, ``(B, D)``.
    """

    sample_means: Tensor
    sample_variances: Tensor | None
    variance: Tensor
    aleatoric_variance: Tensor
    epistemic_variance: Tensor


def summarize(
    samples: Tensor, *, task: str, outputs: str = "logits", output_variance: str | None = None
) -> ClassificationPrediction | RegressionPrediction:
    """Summarise per-sample outputs ``(S, B, ...)`` into a prediction result.

    Args:
        samples: the model's output for each of ``S`` samples, ``(S, B, ...)``.
        task: ``"classification"`` or ``"regression"``.
        outputs: for classification, ``"logits"`` or ``"probabilities"``.
        output_variance: for regression, ``None``, ``"variance"`` or ``"log_variance"``.

    Returns:
        :class:`ClassificationPrediction` or :class:`RegressionPrediction`.
    """
    if samples.is_floating_point() and torch.finfo(samples.dtype).bits < 32:
        # Under autocast the outputs are bfloat16/float16, whose ~3 significant digits swamp
        # the mutual information (a small difference of two entropies): summarise in float32.
        samples = samples.float()
    if task == "classification":
        return _classification_result(samples, outputs)
    return _regression_result(samples, output_variance)


def _classification_result(samples: Tensor, outputs: str) -> ClassificationPrediction:
    if samples.dim() < 3:
        raise ValueError(f"classification needs outputs of shape (B, ..., C); got samples {tuple(samples.shape)}")
    probs = F.softmax(samples, dim=-1) if outputs == "logits" else samples
    mean = probs.mean(0)
    confidence, predicted = mean.max(-1)
    predictive, expected, mutual = uncertainty.entropy_decomposition(probs, mean)
    return ClassificationPrediction(
        samples=samples,
        mean=mean,
        probabilities=probs,
        predictive_entropy=predictive,
        expected_entropy=expected,
        mutual_information=mutual,
        predicted_class=predicted,
        confidence=confidence,
    )


def _regression_result(samples: Tensor, output_variance: str | None) -> RegressionPrediction:
    if output_variance is None:
        means, variances = samples, None
    else:
        width = samples.shape[-1] if samples.dim() > 2 else 0
        if width % 2 or width == 0:
            raise ValueError(
                f"output_variance={output_variance!r} needs an even last output dimension "
                f"(D means then D {output_variance}s); got samples {tuple(samples.shape)}"
            )
        means, second = samples.split(width // 2, dim=-1)
        variances = second.exp() if output_variance == "log_variance" else second
    total, aleatoric, epistemic = uncertainty.variance_decomposition(means, variances)
    return RegressionPrediction(
        samples=samples,
        mean=means.mean(0),
        sample_means=means,
        sample_variances=variances,
        variance=total,
        aleatoric_variance=aleatoric,
        epistemic_variance=epistemic,
    )
