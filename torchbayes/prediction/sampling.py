"""Monte Carlo sampling: the model's outputs for ``S`` posterior draws in few forward passes.

The batch is tiled ``G`` times and every Bayesian layer gives each of the ``G`` copies
its own posterior draw (see :mod:`torchbayes.nn.vectorized`), so a 32-sample prediction
costs about what 32 deterministic forwards cost, or much less for small batches.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.nn import noise
from torchbayes.nn.base import BayesianWeightLayer
from torchbayes.nn.mode import eval_mode
from torchbayes.nn.vectorized import sample_groups
from torchbayes.prediction.graph import SampleSplit, WholeModel, cached_split

__all__ = ["default_chunk_size", "draw_samples", "whole_model_reason"]

# Rows (examples x samples) per forward pass when chunk_size is not given, measured on
# the benchmark models (benchmarks/bench_predict.py): fully connected nets gain from tiled
# batches until each activation reaches a few megabytes, where fresh allocations start to
# cost page faults; convolutions run fastest when each pass's activations stay in cache.
_ROWS_PER_PASS = 2048
_ROWS_PER_PASS_CONV = 256


def default_chunk_size(modules: list[nn.Module], num_samples: int, batch_size: int) -> int:
    """How many Monte Carlo samples one forward pass of :func:`predict` should carry (1 without sample groups)."""
    if not all(getattr(m, "supports_sample_groups", False) for m in modules):
        return 1
    # A module may state the rows per pass it runs fastest at (preferred_rows_per_pass);
    # the smallest preference wins, as the tightest layer bounds the pass.
    # No Bayesian modules (MC dropout on a plain network): fully connected default.
    rows = min(
        (getattr(m, "preferred_rows_per_pass", None) or _default_rows(m) for m in modules), default=_ROWS_PER_PASS
    )
    return max(1, min(num_samples, rows // batch_size))


def _default_rows(module: nn.Module) -> int:
    is_conv = isinstance(module, BayesianWeightLayer) and module._num_spatial_dims > 0
    return _ROWS_PER_PASS_CONV if is_conv else _ROWS_PER_PASS


def draw_samples(
    model: nn.Module,
    x: Tensor,
    num_samples: int,
    chunk_size: int,
    seed: int | torch.Generator | None,
    shared_weights: bool,
    active: Sequence[nn.Module] = (),
) -> Tensor:
    """The model's outputs for ``num_samples`` posterior draws, ``(S, B, ...)``.

    ``active`` modules (MC dropout's dropout layers) stay in training mode while the rest
    of the model is in eval mode; each row of the tiled batch gets its own dropout mask.

    When ``forward`` can be split (:mod:`torchbayes.prediction.graph`), what does not
    depend on a draw runs once on ``x`` and only the rest runs on the tiled batch;
    otherwise the whole model runs on it, one sample per pass where a tiled batch would
    share a draw between samples (:func:`whole_model_reason` says which and why).
    """
    batch = x.shape[0]
    cache: dict = {}
    chunks: list[Tensor] = []
    with eval_mode(model):
        for m in active:
            m.training = True
        try:
            with torch.no_grad(), noise.noise_generator(seed) if seed is not None else contextlib.nullcontext():
                passes = _plan_passes(model, x, chunk_size)
                for size in passes.sizes(num_samples):
                    inputs = passes.inputs(size, cache)
                    with sample_groups(
                        size, shared_weights=shared_weights, shared_input=passes.shared(inputs), cache=cache
                    ):
                        out = passes.run(inputs)
                    if isinstance(out, tuple):  # Bayesian-Torch style (out, kl)
                        out = out[0]
                    if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != size * batch:
                        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                        raise RuntimeError(
                            f"model output must be a tensor with the batch in dim 0 "
                            f"({size * batch} rows in this pass), got {shape}"
                        )
                    chunks.append(out.reshape(size, batch, *out.shape[1:]))
        finally:
            for m in active:
                m.training = False
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


# model -> why its last Monte Carlo prediction ran the whole model in every pass (None: split)
_REASONS: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def whole_model_reason(model: nn.Module) -> str | None:
    """Why Monte Carlo prediction runs all of ``model`` in every pass, or ``None`` when its
    deterministic part runs once per example (see ``docs/predicting.md``).

    The answer is the one recorded by the model's last `torchbayes.predict` call (whether a
    value computed once keeps one row per example depends on the input); before any, the
    one its traced graph gives. A reason ending in "one sample per pass" means each pass
    carries a single sample (the plain per-sample loop), because a tiled batch would share
    a random draw between samples.

    Args:
        model: the model given to `torchbayes.predict`.

    Returns:
        One sentence, or ``None``.

    Example:
        >>> result = torchbayes.predict(model, x)
        >>> whole_model_reason(model)   # e.g. "module 'fc' has forward hooks, ...; one sample per pass"
    """
    if model in _REASONS:
        return _REASONS[model]
    split = cached_split(model)
    return _describe(split) if isinstance(split, WholeModel) else None


def _describe(plan: WholeModel) -> str:
    return plan.reason + ("; one sample per pass" if plan.one_sample_per_pass else "")


def _tile(value: Tensor, num_groups: int) -> Tensor:
    """``num_groups`` copies of ``value`` stacked along dim 0 (a stride-0 view for one row)."""
    return value.unsqueeze(0).expand(num_groups, *value.shape).reshape(num_groups * value.shape[0], *value.shape[1:])


def _stand_in(value: Tensor, rows: int) -> Tensor:
    """A tensor of ``value``'s dtype and device with ``rows`` rows, holding one element of memory."""
    return value.new_empty(()).expand(rows, *value.shape[1:])


def _balanced(num_samples: int, chunk_size: int) -> list[int]:
    """Samples per pass: as few passes as ``chunk_size`` allows, the largest at most one
    sample bigger than the smallest."""
    num_passes = math.ceil(num_samples / chunk_size)
    return [num_samples // num_passes + (i < num_samples % num_passes) for i in range(num_passes)]


class _WholeModel:
    """Every pass runs the whole model on the tiled batch (when it cannot be split)."""

    def __init__(self, model: nn.Module, x: Tensor, chunk_size: int) -> None:
        self.model, self.batch, self.chunk_size = model, x.shape[0], chunk_size
        self.tiled = _tile(x, chunk_size)

    def sizes(self, num_samples: int) -> list[int]:
        return _balanced(num_samples, self.chunk_size)

    def inputs(self, size: int, cache: dict) -> list[Tensor]:
        return [self.tiled[: size * self.batch]]

    def shared(self, inputs: list[Tensor]) -> list[Tensor]:
        return inputs

    def run(self, inputs: list[Tensor]) -> Any:
        return self.model(inputs[0])


class _PrefixOnce:
    """The sample-independent prefix runs once on ``x``; each pass runs the suffix on its
    tiled outputs (see :func:`torchbayes.prediction.graph.split_at_random_sources`)."""

    def __init__(self, split: SampleSplit, x: Tensor, values: tuple, chunk_size: int) -> None:
        self.split, self.x, self.chunk_size, self.batch = split, x, chunk_size, x.shape[0]
        self._set(values)

    def sizes(self, num_samples: int) -> list[int]:
        return _balanced(num_samples, self.chunk_size)

    def _set(self, values: tuple) -> None:
        self.values = values
        self.tiled = [
            _tile(v, self.chunk_size) if kind == "tile" else v for v, kind in zip(values, self.split.boundary_kinds)
        ]
        self.versions = self._versions()

    def _versions(self) -> list[int]:
        return [t._version for t in (*self.values, *self.tiled) if isinstance(t, Tensor)]

    def inputs(self, size: int, cache: dict) -> list[Any]:
        if self._versions() != self.versions:
            # Defence in depth: the split refuses models whose per-sample part writes into a
            # value computed once (graph._refusal); should a leaf module do so unseen,
            # recompute it rather than feed the next pass a modified value.
            cache.clear()
            self._set(self.split.prefix(self.x))
        rows = size * self.batch
        return [
            v[:rows] if kind == "tile" else _stand_in(v, size * v.shape[0]) if kind == "shape" else v
            for v, kind in zip(self.tiled, self.split.boundary_kinds)
        ]

    def shared(self, inputs: list[Any]) -> list[Tensor]:
        return [v for v, kind in zip(inputs, self.split.boundary_kinds) if kind == "tile"]

    def run(self, inputs: list[Any]) -> Any:
        return self.split.suffix(*inputs)


def _plan_passes(model: nn.Module, x: Tensor, chunk_size: int) -> _WholeModel | _PrefixOnce:
    """Run the sample-independent part of ``model`` once when that is possible and exact,
    and record why not (:func:`whole_model_reason`)."""
    split = cached_split(model)
    if isinstance(split, WholeModel):
        _REASONS[model] = _describe(split)
        return _WholeModel(model, x, 1 if split.one_sample_per_pass else chunk_size)
    values = split.prefix(x)
    signature = (tuple(x.shape[1:]), x.dtype, x.device, x.shape[0] == 1)
    if signature not in split.row_checks:
        split.row_checks[signature] = _rows_follow_the_batch(split, x, values)
    reason = _REASONS[model] = split.row_checks[signature]
    if reason is not None:
        return _WholeModel(model, x, chunk_size)
    return _PrefixOnce(split, x, values, chunk_size)


def _rows_follow_the_batch(split: SampleSplit, x: Tensor, values: tuple) -> str | None:
    """``None`` when every value to tile has one row per example in dim 0, else why not: the
    prefix is run on a batch of another size (once per input signature) and those values
    must follow it.

    A value whose dim 0 does not follow the batch (a reduction over examples, a reshape
    across them) cannot be tiled exactly; the model then runs whole on the tiled batch.
    """
    batch = x.shape[0]
    probe_rows = 1 if batch > 1 else 2
    try:
        probe = split.prefix(x[:1] if batch > 1 else x.repeat(2, *([1] * (x.dim() - 1))))
    except Exception as error:  # e.g. a forward written for one batch size: not row-wise, run it whole
        return f"its deterministic part fails on a batch of another size ({type(error).__name__}: {error})"
    for name, full, small, kind in zip(split.boundary_names, values, probe, split.boundary_kinds):
        if kind == "constant":
            continue
        if not (
            isinstance(full, Tensor)
            and isinstance(small, Tensor)
            and full.dim() >= 1
            and full.shape[0] == batch
            and small.shape[0] == probe_rows
            and full.shape[1:] == small.shape[1:]
        ):
            return (
                f"the value {name!r}, computed once, does not keep one row per example in dim 0 "
                "(a reduction or a reshape across examples)"
            )
    return None
