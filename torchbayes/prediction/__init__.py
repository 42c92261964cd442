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
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from torchbayes.ensemble import Ensemble
from torchbayes.nn.base import iter_bayesian_modules
from torchbayes.nn.likelihoods import find_likelihood
from torchbayes.nn.mode import eval_mode, posterior_mean
from torchbayes.prediction.moments import moment_samples
from torchbayes.prediction.results import (
    ClassificationPrediction,
    Prediction,
    RegressionPrediction,
    summarize,
)
from torchbayes.prediction.sampling import default_chunk_size, draw_samples, whole_model_reason
from torchbayes.validation import check_flag, seeded_generator

__all__ = [
    "ClassificationPrediction",
    "Prediction",
    "RegressionPrediction",
    "dropout_modules",
    "predict",
    "summarize",
    "whole_model_reason",
]

METHODS = ("mc", "moments")
TASKS = ("classification", "regression")
CLASSIFIER_OUTPUTS = ("logits", "probabilities")
VARIANCE_OUTPUTS = (None, "variance", "log_variance")


def predict(
    model: nn.Module,
    x: Tensor,
    num_samples: int = 32,
    *,
    method: str = "mc",
    task: str = "classification",
    outputs: str = "logits",
    output_variance: str | None = "auto",
    chunk_size: int | None = None,
    seed: int | torch.Generator | None = None,
    shared_weights: bool = False,
    dropout: bool = False,
) -> ClassificationPrediction | RegressionPrediction:
    """Predict with ``num_samples`` posterior samples and decompose the uncertainty.

    The model runs in eval mode (its previous modes are restored afterwards), without
    gradients. Layers in posterior-mean mode (:func:`torchbayes.posterior_mean`) stay
    deterministic. A model whose ``forward`` returns a tuple (e.g. ``(out, kl)``, as
    Bayesian-Torch-style models do) is read from the tuple's first element.

    Exactness: each example's ``S`` outputs are independent draws from the posterior
    predictive, whatever the layers' training estimator (convolutions sample whole
    kernels; linear layers, and convolutions whose output has one position, use local
    reparameterization, which is exact for them). Within one sample, different examples
    are not one network draw (linear layers share their local-reparameterization noise
    across examples, so their outputs are correlated, but not as one network's are)
    unless ``shared_weights=True``.

    Deterministic work runs once: ``forward`` is traced with :mod:`torch.fx` and what
    does not depend on a draw (everything before the first Bayesian layer or active
    dropout, and branches still identical across samples) runs once on ``x``; only the
    rest runs per sample (see :mod:`torchbayes.prediction.graph`); shape queries such as
    ``x.shape[0]`` are answered with B rows there and with S x B rows after the cut. The
    whole model runs in every pass instead, still exactly, where the split would not be
    (``forward`` cannot be traced, in-place writes across the cut, a value computed once
    without one row per example in dim 0), and one sample per pass where a tiled batch
    would share a draw (Python or NumPy randomness, ``torch.randn(8)``, hooks);
    `torchbayes.prediction.whole_model_reason` says which and why.

    Args:
        model: a module containing torchbayes Bayesian layers; examples must be
            processed independently in eval mode (true of BatchNorm, dropout...) and, for
            ``chunk_size > 1``, the batch must stay in dim 0 up to every Bayesian layer.
        x: a batch, ``(B, ...)``, on the model's device and (if floating) of its dtype.
            Under ``torch.autocast`` the model runs in low precision but ``samples`` and
            every summary are returned in float32.
        num_samples: ``S >= 1`` Monte Carlo samples (``method="moments"``: logit samples
            drawn from the propagated Gaussian, which cost no network pass).
        method: ``"mc"`` (Monte Carlo samples of the network, the default) or
            ``"moments"``: one pass that propagates each activation's mean and variance
            (:mod:`torchbayes.prediction.moments`; classification then samples only the
            logits from their Gaussian, regression gives the propagated mean and variance
            as the two samples ``mean +/- std``). See ``docs/moments.md`` for what is exact.
        task: ``"classification"`` or ``"regression"``.
        outputs: for classification, whether the model returns ``"logits"`` (softmax
            is applied; log-probabilities work too) or ``"probabilities"``.
        output_variance: for regression, ``"auto"`` (the default: ``"log_variance"``
            when the model holds a Gaussian head of `torchbayes.nn.likelihoods`, else
            ``None``), ``None`` (the model predicts means only), or ``"variance"`` /
            ``"log_variance"``: the last output dimension holds ``D`` means followed by
            ``D`` variances (log-variances) of a Gaussian likelihood. A model with a head
            takes only ``"auto"`` or ``"log_variance"``.
        chunk_size: most Monte Carlo samples per forward pass (memory grows with
            ``chunk_size * B``); ``1`` runs one pass per sample. Default: chosen from
            ``B`` (a single sample per pass for models with Bayesian modules that do not
            implement the sample-groups hook, e.g. recurrent layers).
        seed: an int or ``torch.Generator`` making the draws reproducible (for a given
            ``chunk_size``); ``None`` uses the global (or an enclosing
            :func:`torchbayes.noise_generator`) random state.
        shared_weights: draw one network per sample for the whole batch (joint samples,
            e.g. for Thompson sampling) instead of exact per-example draws.
        dropout: MC dropout (Gal & Ghahramani, 2016): keep the model's dropout modules
            (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``...) sampling while the
            rest is in eval mode. Each row of the tiled batch draws its own masks, so the
            samples are exact independent MC dropout draws. Works on plain networks and
            together with Bayesian layers; a model without dropout modules is an error.

    For a :class:`torchbayes.Ensemble`, the samples are the members' outputs (``S = M``
    members, ``num_samples`` unused) computed in one vectorized pass; members with
    Bayesian layers, or ``dropout=True``, draw ``num_samples`` samples each (``S = M *
    num_samples``, the mixture of the members' posteriors).

    Returns:
        :class:`ClassificationPrediction` or :class:`RegressionPrediction`.

    Shape:
        - x: :math:`(B, *)`; samples: :math:`(S, B, *)`; per-input uncertainties :math:`(B,)`.

    Example:
        >>> result = predict(model, images, num_samples=32, seed=0)
        >>> result.predicted_class, result.mutual_information   # epistemic, per image
    """
    output_variance = _resolve_output_variance(model, task, output_variance)
    _check_arguments(model, x, num_samples, task, outputs, output_variance, chunk_size)
    check_flag("shared_weights", shared_weights)
    check_flag("dropout", dropout)
    seeded_generator(seed)  # checks the seed up front, whichever path draws from it
    _check_result_fits(model, x, _sample_count(model, num_samples, dropout))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "moments":
        return _moment_prediction(
            model, x, num_samples, task, outputs, output_variance, chunk_size, seed, shared_weights, dropout
        )
    if isinstance(model, Ensemble):
        samples = _ensemble_samples(model, x, num_samples, chunk_size, seed, shared_weights, dropout)
        return summarize(samples, task=task, outputs=outputs, output_variance=output_variance)
    samples = _monte_carlo_samples(model, x, num_samples, chunk_size, seed, shared_weights, dropout)
    return summarize(samples, task=task, outputs=outputs, output_variance=output_variance)


def _resolve_output_variance(model: nn.Module, task: str, output_variance: str | None) -> str | None:
    """``"auto"``: the layout of the model's Gaussian head, if it has one (else ``None``)."""
    if output_variance != "auto" or not isinstance(model, nn.Module):
        return output_variance
    head = find_likelihood(model) if task == "regression" else None
    return head.output_variance if head is not None else None


def _moment_prediction(
    model: nn.Module,
    x: Tensor,
    num_samples: int,
    task: str,
    outputs: str,
    output_variance: str | None,
    chunk_size: int | None,
    seed: int | torch.Generator | None,
    shared_weights: bool,
    dropout: bool,
) -> ClassificationPrediction | RegressionPrediction:
    for name, value, default in (
        ("chunk_size", chunk_size, None),
        ("shared_weights", shared_weights, False),
        ("dropout", dropout, False),
    ):
        if value != default:
            raise ValueError(f"{name}={value!r} applies to method='mc' only; method='moments' takes none")
    if task == "classification" and outputs != "logits":
        raise ValueError("method='moments' propagates moments to the logits; outputs='probabilities' needs method='mc'")
    if isinstance(model, Ensemble):
        raise ValueError("method='moments' does not take an Ensemble; predict with method='mc'")
    _check_input_matches_model([m for _, m in iter_bayesian_modules(model)], x)
    samples = moment_samples(model, x, num_samples, task=task, output_variance=output_variance, seed=seed)
    _check_scales_overflow(model, x, samples)
    return summarize(samples, task=task, outputs="logits", output_variance=output_variance, predictive="gaussian")


def _monte_carlo_samples(
    model: nn.Module,
    x: Tensor,
    num_samples: int,
    chunk_size: int | None,
    seed: int | torch.Generator | None,
    shared_weights: bool,
    dropout: bool,
) -> Tensor:
    modules: list[nn.Module] = [m for _, m in iter_bayesian_modules(model)]
    active = dropout_modules(model) if dropout else []
    if dropout and not active:
        raise ValueError(
            f"dropout=True needs dropout modules (nn.Dropout, ...), but "
            f"{type(model).__name__} has none; add some or predict without dropout"
        )
    _check_input_matches_model(modules, x, model if active else None)
    if chunk_size is None:
        chunk_size = default_chunk_size(modules, num_samples, x.shape[0])
    with _seeded_dropout(seed if active else None, x.device):
        samples = draw_samples(model, x, num_samples, min(chunk_size, num_samples), seed, shared_weights, active)
    _check_scales_overflow(model, x, samples)
    return samples


def _check_scales_overflow(model: nn.Module, x: Tensor, samples: Tensor) -> None:
    """Refuse NaN or +inf samples of finite inputs when the posterior means give finite
    outputs: the posterior scales overflow (e.g. a huge ``rho`` from a setting or a file)."""
    if bool(torch.isfinite(samples).all()) or not bool(torch.isfinite(x).all()):
        return
    if not bool((samples.isnan() | samples.isposinf()).any()):
        return  # -inf logits (masked classes) are legitimate
    scales = [
        (float(F.softplus(rho.detach().max())), f"{name}.{pname}_rho" if name else f"{pname}_rho")
        for name, module in iter_bayesian_modules(model)
        for pname, _, rho, _ in module.variational_parameters()
        if rho.numel()
    ]
    if not scales:
        return
    with eval_mode(model), torch.no_grad(), posterior_mean(model):
        out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    if isinstance(out, Tensor) and bool((out.isnan() | out.isposinf()).any()):
        return  # the network itself is not finite here: not the scales' doing
    sigma, where = max(scales)
    raise ValueError(
        f"the predicted samples are not finite (NaN or inf) although the inputs and the posterior-mean "
        f"network's outputs are: the posterior scales overflow (largest sigma {sigma:.3g}, in {where}); "
        "lower posterior_rho_init, or check the model's (or checkpoint's) rho values"
    )


@contextlib.contextmanager
def _seeded_dropout(seed: int | torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Make dropout masks reproducible: they come from PyTorch's global generator, which is
    forked (left as it was afterwards) and seeded from ``seed``."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Generator)):
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        yield


def _ensemble_samples(
    ensemble: Ensemble,
    x: Tensor,
    num_samples: int,
    chunk_size: int | None,
    seed: int | torch.Generator | None,
    shared_weights: bool,
    dropout: bool,
) -> Tensor:
    stochastic = ensemble._checked_for_prediction() or dropout
    if not stochastic:  # the members are the samples: one vectorized pass
        _check_input_matches_model([ensemble], x)
        with torch.no_grad():
            return ensemble.member_outputs(x, checked=True)
    # Each member is a posterior of its own: S samples from each, stacked (a mixture).
    generator = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
    return torch.cat(
        [
            _monte_carlo_samples(member, x, num_samples, chunk_size, generator, shared_weights, dropout)
            for member in ensemble.members
        ]
    )


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The dropout modules of ``model`` (what ``predict(..., dropout=True)`` keeps sampling)."""
    return [m for m in model.modules() if isinstance(m, _DropoutNd)]


def _check_arguments(
    model: nn.Module,
    x: Tensor,
    num_samples: int,
    task: str,
    outputs: str,
    output_variance: str | None,
    chunk_size: int | None,
) -> None:
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
    if task == "regression" and output_variance != "log_variance" and find_likelihood(model) is not None:
        raise ValueError(
            f"the model ends in a Gaussian head, whose outputs are means and log-variances; "
            f"pass output_variance='auto' (the default) or 'log_variance', not {output_variance!r}"
        )
    if output_variance not in VARIANCE_OUTPUTS:
        raise ValueError(f"output_variance must be one of {VARIANCE_OUTPUTS}, got {output_variance!r}")


def _sample_count(model: nn.Module, num_samples: int, dropout: bool) -> int:
    """How many samples ``predict`` returns: an Ensemble's members (times ``num_samples`` when
    they sample themselves), ``num_samples`` otherwise."""
    if not isinstance(model, Ensemble):
        return num_samples
    stochastic = dropout or next(iter_bayesian_modules(model), None) is not None
    return model.num_members * (num_samples if stochastic else 1)


def _check_input_matches_model(modules: list[nn.Module], x: Tensor, plain_model: nn.Module | None = None) -> None:
    if plain_model is not None:  # MC dropout: a network without Bayesian layers is fine
        modules = [*modules, plain_model]
    if not modules:
        raise ValueError(
            "model has no torchbayes Bayesian layers, so its Monte Carlo samples "
            "would all be equal; convert it first (e.g. torchbayes.dnn_to_bnn) or "
            "call it directly"
        )
    reference = next((p for m in modules for p in m.parameters()), None)
    if reference is None:
        return
    if x.device != reference.device:
        raise ValueError(
            f"x is on {x.device} but the model's parameters are on {reference.device}; "
            f"move x with x.to({str(reference.device)!r})"
        )
    if x.is_floating_point() and x.dtype != reference.dtype:
        raise ValueError(
            f"x has dtype {x.dtype} but the model's parameters have dtype "
            f"{reference.dtype}; convert x with x.to({reference.dtype})"
        )


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
    try:
        with eval_mode(model), torch.no_grad(), posterior_mean(model):
            out = model(x[:1])
        out = out[0] if isinstance(out, tuple) else out
        per_row = out.numel() * max(out.element_size(), 4)  # summaries are float32 at least
    except Exception:
        return
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
        raise ValueError(
            f"num_samples={num_samples} for {x.shape[0]} input(s) needs about {needed / 1e9:.3g} GB "
            f"for the samples and their summary, more than the {available / 1e9:.3g} GB available "
            f"on {x.device}; use fewer samples or predict fewer inputs per call"
        )
