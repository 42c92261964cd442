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
from torchbayes.prediction import gaussian_mixture

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

    The predictive distribution is the equal-weight mixture of the samples' Gaussians
    ``N(sample_means[s], sample_variances[s])`` (``predictive="mixture"``: Monte Carlo,
    MC dropout and ensembles; for heteroscedastic members, the Gaussian mixture of
    Lakshminarayanan et al. 2017), or, for ``method="moments"``, the single Gaussian
    ``N(mean, variance)`` (``predictive="gaussian"``). The log-likelihood, CDF, quantiles,
    intervals and CRPS below are exact for that distribution
    (`torchbayes.prediction.gaussian_mixture`). A mixture needs predicted variances: a
    model with a Gaussian head of `torchbayes.nn.likelihoods`, or ``output_variance``.

    Attributes:
        samples: the model's outputs, ``(S, B, ...)`` (means and variance halves included).
        sample_means: the predicted mean of each sample, ``(S, B, D)``.
        sample_variances: the predicted variance of each sample, or ``None`` (a model
            predicting means only).
        mean: predictive mean, ``(B, D)``.
        variance: total predictive variance ``aleatoric + epistemic``, ``(B, D)``.
        aleatoric_variance: mean of the predicted variances (0 without them), ``(B, D)``.
        epistemic_variance: variance of the predicted means over samples, ``(B, D)``.
        predictive: ``"mixture"`` or ``"gaussian"`` (see above).

    Example:
        >>> result = predict(model, x, 100, task="regression")
        >>> lower, upper = result.interval(0.9)          # central 90% intervals, (B, D)
        >>> result.log_likelihood(y).mean()              # the UCI tables' test log-likelihood
    """

    sample_means: Tensor
    sample_variances: Tensor | None
    variance: Tensor
    aleatoric_variance: Tensor
    epistemic_variance: Tensor
    predictive: str = "mixture"

    @property
    def std(self) -> Tensor:
        """The predictive standard deviation ``sqrt(variance)``, ``(B, D)``."""
        return self.variance.sqrt()

    def components(self) -> tuple[Tensor, Tensor]:
        """The predictive distribution's Gaussian components ``(means, variances)``, each ``(S, B, D)``."""
        if self.predictive == "gaussian":
            return self.mean.unsqueeze(0), self.variance.unsqueeze(0)
        if self.sample_variances is None:
            raise ValueError(
                "this prediction has no predicted variances, so its predictive density is not defined; "
                "end the model in a Gaussian head (torchbayes.nn.HomoscedasticGaussian or HeteroscedasticGaussian) "
                "or predict with output_variance='variance' or 'log_variance'"
            )
        return self.sample_means, self.sample_variances

    def _target(self, target: Tensor) -> Tensor:
        if not isinstance(target, Tensor) or not target.is_floating_point():
            raise TypeError(f"target must be a floating-point tensor, got {getattr(target, 'dtype', type(target))}")
        if target.shape != self.mean.shape:
            if target.shape == self.mean.shape[:-1] and self.mean.shape[-1] == 1:
                target = target.unsqueeze(-1)  # (B,) targets of a single-output model
            else:
                raise ValueError(
                    f"target must have the prediction's shape {tuple(self.mean.shape)}, got {tuple(target.shape)}"
                )
        return target.to(self.mean.dtype)

    def log_likelihood(self, target: Tensor) -> Tensor:
        """The predictive log density of each example's target, ``(B,)`` (joint over ``D``).

        For a mixture, ``log 1/S sum_s N(y; m_s, v_s)`` (log-sum-exp); the published UCI
        test log-likelihood is its mean in the target's original units (for a model
        trained on standardised targets, subtract ``log(target_std)``).
        """
        means, variances = self.components()
        return gaussian_mixture.mixture_log_prob(means, variances, self._target(target))

    def cdf(self, target: Tensor) -> Tensor:
        """``P(Y <= target)`` per output, ``(B, D)``: the probability integral transform (PIT)."""
        means, variances = self.components()
        return gaussian_mixture.mixture_cdf(means, variances, self._target(target))

    def quantile(self, q: float | Tensor) -> Tensor:
        """The ``q``-quantile of each output's predictive distribution, ``(B, D)`` (bisection on the mixture)."""
        means, variances = self.components()
        return gaussian_mixture.mixture_quantile(means, variances, q)

    def interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """The central prediction interval of probability ``level``: the ``(1 - level) / 2`` and
        ``(1 + level) / 2`` quantiles of the predictive distribution, each ``(B, D)``.

        Exact for the mixture (not a Gaussian approximation of it): a bimodal ensemble
        gets the interval its density implies.
        """
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"level must be a float in (0, 1), got {level!r}")
        return self.quantile((1 - level) / 2), self.quantile((1 + level) / 2)

    def crps(self, target: Tensor) -> Tensor:
        """The continuous ranked probability score per output, ``(B, D)`` (closed form for the mixture)."""
        means, variances = self.components()
        return gaussian_mixture.mixture_crps(means, variances, self._target(target))


def summarize(
    samples: Tensor,
    *,
    task: str,
    outputs: str = "logits",
    output_variance: str | None = None,
    predictive: str = "mixture",
) -> ClassificationPrediction | RegressionPrediction:
    """Summarise per-sample outputs ``(S, B, ...)`` into a prediction result.

    Args:
        samples: the model's output for each of ``S`` samples, ``(S, B, ...)``.
        task: ``"classification"`` or ``"regression"``.
        outputs: for classification, ``"logits"`` or ``"probabilities"``.
        output_variance: for regression, ``None``, ``"variance"`` or ``"log_variance"``.
        predictive: for regression, ``"mixture"`` (the samples' Gaussians, equally
            weighted) or ``"gaussian"`` (one Gaussian of the samples' mean and variance).

    Returns:
        :class:`ClassificationPrediction` or :class:`RegressionPrediction`.
    """
    if samples.is_floating_point() and torch.finfo(samples.dtype).bits < 32:
        # Under autocast the outputs are bfloat16/float16, whose ~3 significant digits swamp
        # the mutual information (a small difference of two entropies): summarise in float32.
        samples = samples.float()
    if task == "classification":
        return _classification_result(samples, outputs)
    if predictive not in ("mixture", "gaussian"):
        raise ValueError(f"predictive must be 'mixture' or 'gaussian', got {predictive!r}")
    return _regression_result(samples, output_variance, predictive)


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


def _regression_result(samples: Tensor, output_variance: str | None, predictive: str) -> RegressionPrediction:
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
        predictive=predictive,
    )
