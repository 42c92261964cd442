"""Monte Carlo sampling: the model's outputs for ``S`` posterior draws in few forward passes.

The batch is tiled ``G`` times and every Bayesian layer gives each of the ``G`` copies
its own posterior draw (see :mod:`torchbayes.nn.vectorized`), so a 32-sample prediction
costs about what 32 deterministic forwards cost, or much less for small batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.nn import noise
from torchbayes.nn.base import BayesianWeightLayer
from torchbayes.nn.mode import eval_mode
from torchbayes.nn.vectorized import sample_groups
from torchbayes.prediction.graph import SampleSplit, TracingError, cached_split

__all__ = ["default_chunk_size", "draw_samples"]

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

    When ``forward`` can be traced (:mod:`torchbayes.prediction.graph`), what does not
    depend on a draw runs once on ``x`` and only the rest runs on the tiled batch;
    otherwise the whole model runs on it.
    """
    batch = x.shape[0]
    num_passes = math.ceil(num_samples / chunk_size)
    # Balanced passes: the largest is at most one sample bigger than the smallest.
    sizes = [num_samples // num_passes + (i < num_samples % num_passes) for i in range(num_passes)]
    cache: dict = {}
    chunks: list[Tensor] = []
    with eval_mode(model):
        for m in active:
            m.training = True
        try:
            with torch.no_grad(), noise.noise_generator(seed) if seed is not None else contextlib.nullcontext():
                passes = _plan_passes(model, x, sizes[0])
                for size in sizes:
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


def _tile(value: Tensor, num_groups: int) -> Tensor:
    """``num_groups`` copies of ``value`` stacked along dim 0 (a stride-0 view for one row)."""
    return value.unsqueeze(0).expand(num_groups, *value.shape).reshape(num_groups * value.shape[0], *value.shape[1:])


class _WholeModel:
    """Every pass runs the whole model on the tiled batch (when it cannot be split)."""

    def __init__(self, model: nn.Module, x: Tensor, largest: int) -> None:
        self.model, self.batch = model, x.shape[0]
        self.tiled = _tile(x, largest)

    def inputs(self, size: int, cache: dict) -> list[Tensor]:
        return [self.tiled[: size * self.batch]]

    def shared(self, inputs: list[Tensor]) -> list[Tensor]:
        return inputs

    def run(self, inputs: list[Tensor]) -> Any:
        return self.model(inputs[0])


class _PrefixOnce:
    """The sample-independent prefix runs once on ``x``; each pass runs the suffix on its
    tiled outputs (see :func:`torchbayes.prediction.graph.split_at_random_sources`)."""

    def __init__(self, split: SampleSplit, x: Tensor, values: tuple, largest: int) -> None:
        self.split, self.x, self.largest, self.batch = split, x, largest, x.shape[0]
        self._set(values)

    def _set(self, values: tuple) -> None:
        self.values = values
        self.tiled = [
            _tile(v, self.largest) if kind == "tile" else v for v, kind in zip(values, self.split.boundary_kinds)
        ]
        self.versions = self._versions()

    def _versions(self) -> list[int]:
        return [t._version for t in (*self.values, *self.tiled) if isinstance(t, Tensor)]

    def inputs(self, size: int, cache: dict) -> list[Any]:
        if self._versions() != self.versions:
            # A pass wrote in place into a value computed once (e.g. `identity += out`):
            # recompute it rather than feed the next pass a modified value.
            cache.clear()
            self._set(self.split.prefix(self.x))
        rows = size * self.batch
        return [
            v[:rows]
            if kind == "tile"
            else torch.empty((size * v.shape[0], *v.shape[1:]), dtype=v.dtype, device="meta")
            if kind == "shape"
            else v
            for v, kind in zip(self.tiled, self.split.boundary_kinds)
        ]

    def shared(self, inputs: list[Any]) -> list[Tensor]:
        return [v for v, kind in zip(inputs, self.split.boundary_kinds) if kind == "tile"]

    def run(self, inputs: list[Any]) -> Any:
        return self.split.suffix(*inputs)


def _plan_passes(model: nn.Module, x: Tensor, largest: int) -> _WholeModel | _PrefixOnce:
    """Run the sample-independent part of ``model`` once when that is possible and exact."""
    try:
        split = cached_split(model)
    except TracingError:
        return _WholeModel(model, x, largest)
    if split.trivial:  # the first operation is random: nothing to save
        return _WholeModel(model, x, largest)
    values = split.prefix(x)
    signature = (tuple(x.shape[1:]), x.dtype, x.device, x.shape[0] == 1)
    if signature not in split.row_checks:
        split.row_checks[signature] = _rows_follow_the_batch(split, x, values)
    if not split.row_checks[signature]:
        return _WholeModel(model, x, largest)
    return _PrefixOnce(split, x, values, largest)


def _rows_follow_the_batch(split: SampleSplit, x: Tensor, values: tuple) -> bool:
    """Whether every value to tile has one row per example in dim 0: the prefix is run on
    a batch of another size (once per input signature) and those values must follow it.

    A value whose dim 0 does not follow the batch (a reduction over examples, a reshape
    across them) cannot be tiled exactly; the model then runs whole on the tiled batch.
    """
    batch = x.shape[0]
    probe_rows = 1 if batch > 1 else 2
    try:
        probe = split.prefix(x[:1] if batch > 1 else x.repeat(2, *([1] * (x.dim() - 1))))
    except Exception:  # e.g. a forward written for one batch size: not row-wise, run it whole
        return False
    for full, small, kind in zip(values, probe, split.boundary_kinds):
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
            return False
    return True
