"""Monte Carlo prediction with uncertainty: :func:`predict`.

``predict(model, x, num_samples)`` draws ``num_samples`` networks from the posterior and
returns every sample's output together with the predictive mean and the uncertainty
decomposition of :mod:`torchbayes.uncertainty`. The samples are computed in as few
forward passes as possible: the batch is tiled ``G`` times and every Bayesian layer
gives each of the ``G`` copies its own posterior draw (see
:mod:`torchbayes.nn.vectorized`), so a 32-sample prediction costs about what 32
deterministic forwards cost, or much less for small batches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes import uncertainty
from torchbayes.nn import noise
from torchbayes.nn.base import BayesianWeightLayer, iter_bayesian_modules
from torchbayes.nn.vectorized import sample_groups

__all__ = ["ClassificationPrediction", "Prediction", "RegressionPrediction", "predict"]

TASKS = ("classification", "regression")
CLASSIFIER_OUTPUTS = ("logits", "probabilities")
VARIANCE_OUTPUTS = (None, "variance", "log_variance")

# Rows (examples x samples) per forward pass when chunk_size is not given, measured on
# the benchmark models (benchmarks/bench_predict.py): fully connected nets gain from tiled
# batches until each activation reaches a few megabytes, where fresh allocations start to
# cost page faults; convolutions run fastest when each pass's activations stay in cache.
_ROWS_PER_PASS = 2048
_ROWS_PER_PASS_CONV = 256


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


def predict(
    model: nn.Module,
    x: Tensor,
    num_samples: int = 32,
    *,
    task: str = "classification",
    outputs: str = "logits",
    output_variance: str | None = None,
    chunk_size: int | None = None,
    seed: int | torch.Generator | None = None,
    shared_weights: bool = False,
) -> ClassificationPrediction | RegressionPrediction:
    """Predict with ``num_samples`` posterior samples and decompose the uncertainty.

    The model runs in eval mode (its previous modes are restored afterwards), without
    gradients. Layers in posterior-mean mode (:func:`torchbayes.posterior_mean`) stay
    deterministic. A model whose ``forward`` returns a tuple (e.g. ``(out, kl)``, as
    Bayesian-Torch-style models do) is read from the tuple's first element.

    Exactness: each example's ``S`` outputs are independent draws from the posterior
    predictive, whatever the layers' training estimator (convolutions always sample
    whole kernels, linear layers use local reparameterization, which is exact for them).
    Within one sample, different examples are not one network draw (linear layers share
    their local-reparameterization noise across examples, so their outputs are
    correlated, but not as one network's are) unless ``shared_weights=True``.

    Args:
        model: a module containing torchbayes Bayesian layers; examples must be
            processed independently in eval mode (true of BatchNorm, dropout...) and, for
            ``chunk_size > 1``, the batch must stay in dim 0 up to every Bayesian layer.
        x: a batch, ``(B, ...)``, on the model's device and (if floating) of its dtype.
            Under ``torch.autocast`` the model runs in low precision but ``samples`` and
            every summary are returned in float32.
        num_samples: ``S >= 1`` Monte Carlo samples.
        task: ``"classification"`` or ``"regression"``.
        outputs: for classification, whether the model returns ``"logits"`` (softmax
            is applied; log-probabilities work too) or ``"probabilities"``.
        output_variance: for regression, ``None`` (the model predicts means only), or
            ``"variance"`` / ``"log_variance"``: the last output dimension holds
            ``D`` means followed by ``D`` variances (log-variances) of a heteroscedastic
            Gaussian likelihood.
        chunk_size: most Monte Carlo samples per forward pass (memory grows with
            ``chunk_size * B``); ``1`` runs one pass per sample. Default: chosen from
            ``B`` (a single sample per pass for models with Bayesian modules that do not
            implement the sample-groups hook, e.g. recurrent layers).
        seed: an int or ``torch.Generator`` making the draws reproducible (for a given
            ``chunk_size``); ``None`` uses the global (or an enclosing
            :func:`torchbayes.noise_generator`) random state.
        shared_weights: draw one network per sample for the whole batch (joint samples,
            e.g. for Thompson sampling) instead of exact per-example draws.

    Returns:
        :class:`ClassificationPrediction` or :class:`RegressionPrediction`.

    Shape:
        - x: :math:`(B, *)`; samples: :math:`(S, B, *)`; per-input uncertainties :math:`(B,)`.

    Example:
        >>> result = predict(model, images, num_samples=32, seed=0)
        >>> result.predicted_class, result.mutual_information   # epistemic, per image
    """
    _check_arguments(model, x, num_samples, task, outputs, output_variance, chunk_size)
    modules = [m for _, m in iter_bayesian_modules(model)]
    _check_input_matches_model(modules, x)
    if chunk_size is None:
        chunk_size = _default_chunk_size(modules, num_samples, x.shape[0])
    samples = _draw_samples(model, x, num_samples, min(chunk_size, num_samples), seed, shared_weights)
    if samples.is_floating_point() and torch.finfo(samples.dtype).bits < 32:
        # Under autocast the outputs are bfloat16/float16, whose ~3 significant digits swamp
        # the mutual information (a small difference of two entropies): summarise in float32.
        samples = samples.float()
    if task == "classification":
        return _classification_result(samples, outputs)
    return _regression_result(samples, output_variance)


def _check_arguments(model: nn.Module, x: Tensor, num_samples: int, task: str, outputs: str,
                     output_variance: str | None, chunk_size: int | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a batch of shape (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if value is None and name == "chunk_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if outputs not in CLASSIFIER_OUTPUTS:
        raise ValueError(f"outputs must be one of {CLASSIFIER_OUTPUTS}, got {outputs!r}")
    if output_variance not in VARIANCE_OUTPUTS:
        raise ValueError(f"output_variance must be one of {VARIANCE_OUTPUTS}, got {output_variance!r}")


def _check_input_matches_model(modules: list[nn.Module], x: Tensor) -> None:
    if not modules:
        raise ValueError("model has no torchbayes Bayesian layers, so its Monte Carlo samples "
                         "would all be equal; convert it first (e.g. torchbayes.dnn_to_bnn) or "
                         "call it directly")
    reference = next((p for m in modules for p in m.parameters()), None)
    if reference is None:
        return
    if x.device != reference.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {reference.device}; "
                         f"move x with x.to({str(reference.device)!r})")
    if x.is_floating_point() and x.dtype != reference.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the model's parameters have dtype "
                         f"{reference.dtype}; convert x with x.to({reference.dtype})")


def _default_chunk_size(modules: list[nn.Module], num_samples: int, batch_size: int) -> int:
    if not all(getattr(m, "supports_sample_groups", False) for m in modules):
        return 1
    # A module may state the rows per pass it runs fastest at (preferred_rows_per_pass);
    # the smallest preference wins, as the tightest layer bounds the pass.
    rows = min(getattr(m, "preferred_rows_per_pass", None) or _default_rows(m) for m in modules)
    return max(1, min(num_samples, rows // batch_size))


def _default_rows(module: nn.Module) -> int:
    is_conv = isinstance(module, BayesianWeightLayer) and module._num_spatial_dims > 0
    return _ROWS_PER_PASS_CONV if is_conv else _ROWS_PER_PASS


def _draw_samples(model: nn.Module, x: Tensor, num_samples: int, chunk_size: int,
                  seed: int | torch.Generator | None, shared_weights: bool) -> Tensor:
    """The model's outputs for ``num_samples`` posterior draws, ``(S, B, ...)``."""
    batch = x.shape[0]
    num_passes = math.ceil(num_samples / chunk_size)
    # Balanced passes: the largest is at most one sample bigger than the smallest.
    sizes = [num_samples // num_passes + (i < num_samples % num_passes) for i in range(num_passes)]
    largest = sizes[0]
    tiled = x.unsqueeze(0).expand(largest, *x.shape).reshape(largest * batch, *x.shape[1:])
    cache: dict = {}
    # Only modules in training mode are switched (and switched back): most models arrive in
    # eval mode, and nn.Module attribute writes are slow enough to show at batch 1.
    training = [m for m in model.modules() if m.training]
    chunks: list[Tensor] = []
    try:
        if training:
            model.eval()
        with torch.no_grad(), (noise.noise_generator(seed) if seed is not None else contextlib.nullcontext()):
            for size in sizes:
                rows = tiled[: size * batch]
                with sample_groups(size, shared_weights=shared_weights, shared_input=rows, cache=cache):
                    out = model(rows)
                if isinstance(out, tuple):  # Bayesian-Torch style (out, kl)
                    out = out[0]
                if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != size * batch:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise RuntimeError(f"model output must be a tensor with the batch in dim 0 "
                                       f"({size * batch} rows in this pass), got {shape}")
                chunks.append(out.reshape(size, batch, *out.shape[1:]))
    finally:
        for m in training:
            m.training = True
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def _classification_result(samples: Tensor, outputs: str) -> ClassificationPrediction:
    if samples.dim() < 3:
        raise ValueError(f"classification needs outputs of shape (B, ..., C); got samples {tuple(samples.shape)}")
    probs = F.softmax(samples, dim=-1) if outputs == "logits" else samples
    mean = probs.mean(0)
    confidence, predicted = mean.max(-1)
    predictive, expected, mutual = uncertainty.entropy_decomposition(probs, mean)
    return ClassificationPrediction(
        samples=samples, mean=mean, probabilities=probs, predictive_entropy=predictive,
        expected_entropy=expected, mutual_information=mutual,
        predicted_class=predicted, confidence=confidence)


def _regression_result(samples: Tensor, output_variance: str | None) -> RegressionPrediction:
    if output_variance is None:
        means, variances = samples, None
    else:
        width = samples.shape[-1] if samples.dim() > 2 else 0
        if width % 2 or width == 0:
            raise ValueError(f"output_variance={output_variance!r} needs an even last output dimension "
                             f"(D means then D {output_variance}s); got samples {tuple(samples.shape)}")
        means, second = samples.split(width // 2, dim=-1)
        variances = second.exp() if output_variance == "log_variance" else second
    total, aleatoric, epistemic = uncertainty.variance_decomposition(means, variances)
    return RegressionPrediction(samples=samples, mean=means.mean(0), sample_means=means,
                                sample_variances=variances, variance=total,
                                aleatoric_variance=aleatoric, epistemic_variance=epistemic)
