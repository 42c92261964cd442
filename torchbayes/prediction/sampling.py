"""Monte Carlo sampling: the model's outputs for ``S`` posterior draws in few forward passes.

The batch is tiled ``G`` times and every Bayesian layer gives each of the ``G`` copies
its own posterior draw (see :mod:`torchbayes.nn.vectorized`), so a 32-sample prediction
costs about what 32 deterministic forwards cost, or much less for small batches.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from torchbayes.nn import noise
from torchbayes.nn.base import BayesianWeightLayer
from torchbayes.nn.vectorized import sample_groups

__all__ = ["default_chunk_size", "draw_samples"]

# Rows (examples x samples) per forward pass when chunk_size is not given, measured on
# the benchmark models (benchmarks/bench_predict.py): fully connected nets gain from tiled
# batches until each activation reaches a few megabytes, where fresh allocations start to
# cost page faults; convolutions run fastest when each pass's activations stay in cache.
_ROWS_PER_PASS = 2048
_ROWS_PER_PASS_CONV = 256


def default_chunk_size(modules: list[nn.Module], num_samples: int, batch_size: int) -> int:
    if not all(getattr(m, "supports_sample_groups", False) for m in modules):
        return 1
    # A module may state the rows per pass it runs fastest at (preferred_rows_per_pass);
    # the smallest preference wins, as the tightest layer bounds the pass.
    rows = min(getattr(m, "preferred_rows_per_pass", None) or _default_rows(m) for m in modules)
    return max(1, min(num_samples, rows // batch_size))


def _default_rows(module: nn.Module) -> int:
    is_conv = isinstance(module, BayesianWeightLayer) and module._num_spatial_dims > 0
    return _ROWS_PER_PASS_CONV if is_conv else _ROWS_PER_PASS


def draw_samples(model: nn.Module, x: Tensor, num_samples: int, chunk_size: int,
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


