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

import torch
from torch import Tensor, nn

from torchbayes.nn.base import iter_bayesian_modules
from torchbayes.prediction.results import (
    ClassificationPrediction,
    Prediction,
    RegressionPrediction,
    summarize,
)
from torchbayes.prediction.sampling import default_chunk_size, draw_samples

__all__ = ["ClassificationPrediction", "Prediction", "RegressionPrediction", "predict", "summarize"]

TASKS = ("classification", "regression")
CLASSIFIER_OUTPUTS = ("logits", "probabilities")
VARIANCE_OUTPUTS = (None, "variance", "log_variance")


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
        chunk_size = default_chunk_size(modules, num_samples, x.shape[0])
    samples = draw_samples(model, x, num_samples, min(chunk_size, num_samples), seed, shared_weights)
    return summarize(samples, task=task, outputs=outputs, output_variance=output_variance)


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
    _check_result_fits(model, x, num_samples)


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


#: From this many rows (samples x inputs) on, predict estimates the result's memory first.
_ROWS_CHECKED = 2**20
#: The samples, their probabilities and one more copy of that size while summarizing.
_RESULT_COPIES = 3


def _check_result_fits(model: nn.Module, x: Tensor, num_samples: int) -> None:
    """Refuse a prediction whose ``(S, B, ...)`` result cannot fit in memory, before computing it.

    From ``S * B >= 2**20`` rows on, one forward of one input (posterior means, eval mode,
    no gradients) gives the output size per example, and ``S * B`` times that, times
    :data:`_RESULT_COPIES`, must fit in the memory available on ``x``'s device (CPU:
    ``MemAvailable``; CUDA: free memory); otherwise ``ValueError``. A failing probe is
    left to the later, clearer checks.
    """
    if torch.compiler.is_compiling():  # traced (torch.export, compile): no guard on the batch size
        return
    rows = num_samples * x.shape[0]
    if rows < _ROWS_CHECKED:
        return
    import os

    from torchbayes.nn.mode import posterior_mean

    training = [m for m in model.modules() if m.training]
    try:
        model.eval()
        with torch.no_grad(), posterior_mean(model):
            out = model(x[:1])
        out = out[0] if isinstance(out, tuple) else out
        per_row = out.numel() * max(out.element_size(), 4)  # summaries are float32 at least
    except Exception:
        return
    finally:
        for m in training:
            m.training = True
    needed = rows * per_row * _RESULT_COPIES
    if x.device.type == "cuda":
        available = torch.cuda.mem_get_info(x.device)[0]
    elif x.device.type == "cpu" and hasattr(os, "sysconf"):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        try:  # free memory plus what the kernel can reclaim (page cache)
            with open("/proc/meminfo") as info:
                line = next(ln for ln in info if ln.startswith("MemAvailable:"))
            available = int(line.split()[1]) * 1024
        except (OSError, StopIteration, ValueError):
            pass
    else:
        return
    if needed > available:
        raise ValueError(f"num_samples={num_samples} for {x.shape[0]} input(s) needs about {needed / 1e9:.3g} GB "
                         f"for the samples and their summary, more than the {available / 1e9:.3g} GB available "
                         f"on {x.device}; use fewer samples or predict fewer inputs per call")
