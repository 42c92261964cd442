"""Many Monte Carlo samples in one forward pass: sample groups.

Inside a :func:`sample_groups` block, every Bayesian layer reads the first dimension of
its input as ``G`` consecutive, equally sized blocks (``G`` = ``num_groups``) and gives
each block its own, independent posterior draw. A model's ordinary ``forward``
(ResNets with BatchNorm in eval mode, ``Flatten``, pooling...) therefore computes ``G``
Monte Carlo samples at once when fed its batch tiled ``G`` times, which is what
:func:`torchbayes.predict` does. The layers pick, per call, the cheapest exact way:

* **Linear layers** on ``(rows, features)`` inputs: local reparameterization,
  ``N(x mu^T + b, x^2 sigma^2^T + sigma_b^2)`` per output, exactly the distribution of
  the output under a fresh weight sample. The Gaussian noise is drawn once per group and
  output unit and shared by the group's examples: each example still meets fresh noise
  in every layer, independent of everything upstream, so its own outputs are exact
  posterior draws; only different examples of one group become correlated (as they are
  under one shared weight sample). When the input is the same in every group (the first
  Bayesian layer sees the tiled batch), the mean and variance are computed once. When a
  weight draw per group is cheaper than local's second matmul (large groups), or the
  input has more dimensions (positions of a sequence must share their weight), each
  group draws one weight sample and runs a batched matmul instead.
* **Convolutions**: local reparameterization is not exact for them (positions sharing a
  kernel would become independent), so each group gets a sampled kernel. On a shared
  input the ``G`` kernels are stacked into one convolution with ``G`` times the output
  channels; otherwise small batches run as one grouped convolution (``G`` groups) and
  large ones group after group.
* **shared_weights**: every layer uses one weight sample per group for all examples,
  so each group is a joint sample of the whole network (e.g. for Thompson sampling).

Hook for other Bayesian modules: a :class:`~torchbayes.nn.BayesianModule` subclass
opts in by setting the class attribute ``supports_sample_groups = True`` and, when
:func:`active_sample_groups` returns a :class:`SampleGroups` ``g``, treating dim 0 of
its input as ``g.num_groups`` blocks with one independent draw each (one draw per
block for all its examples when ``g.shared_weights``). Modules that do not opt in (the
default) make :func:`torchbayes.predict` fall back to one sample per forward pass,
which is always correct. A module may also set ``preferred_rows_per_pass`` (an int):
``predict``'s default ``chunk_size`` keeps ``G * batch`` at most the smallest such
preference in the model (by default 2048 rows for linear layers, 256 for convolutions).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchbayes.nn import functional as BF
from torchbayes.nn import noise

if TYPE_CHECKING:  # base imports this module; only the type is needed here
    from torchbayes.nn.base import BayesianWeightLayer

__all__ = ["SampleGroups", "active_sample_groups", "forward_sample_groups", "sample_groups"]

Op = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

# Relative CPU costs, in matmul multiply-adds, of one Gaussian weight draw (randn and the
# multiply-add using it) and of one elementwise activation operation; they decide between
# local reparameterization and a weight draw per group for linear layers. Measured with 2
# threads (benchmarks/bench_predict.py sizes): ~3 ns per draw, ~0.008 ns per multiply-add.
_NOISE_COST = 400.0
_MAC_COST = 1.0
_ELEMENT_COST = 40.0
# Up to this many examples per group, one grouped convolution over all groups beats a loop
# over them (per-call overhead dominates small batches); above it the loop's cache use wins.
_GROUPED_CONV_MAX_ROWS = 4
_CONVOLUTIONS = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


@dataclass
class SampleGroups:
    """The Monte Carlo layout of the current forward pass (see the module docstring).

    Attributes:
        num_groups: ``G``; dim 0 of every Bayesian layer's input is ``G`` blocks.
        shared_weights: one weight sample per group for all its examples.
        shared_input: a tensor whose ``G`` blocks are known to be identical (the tiled
            batch); a layer whose input is this tensor (or a contiguous reshape of it)
            computes what does not depend on the draw once.
        cache: per-layer results that do not depend on the draw (first-layer moments on
            ``shared_input``, posterior variances) and scratch buffers, reused across the
            forward passes of one prediction.
    """

    num_groups: int
    shared_weights: bool = False
    shared_input: Tensor | None = None
    cache: dict = field(default_factory=dict)

    def is_shared(self, x: Tensor) -> bool:
        """Whether ``x`` holds exactly ``shared_input``'s rows: the same memory, row for row.

        True for ``shared_input`` itself and for views that only reshape each row (e.g.
        ``Flatten``), including the stride-0 tiling of a single example.
        """
        ref = self.shared_input
        return (ref is not None and x.dim() > 0 and x.data_ptr() == ref.data_ptr()
                and x.dtype == ref.dtype and x.device == ref.device and x.numel() == ref.numel()
                and x.shape[0] == ref.shape[0] and x.stride(0) == ref.stride(0)
                and x[0].is_contiguous() and ref[0].is_contiguous())

    def check_batch(self, module: torch.nn.Module, x: Tensor) -> int:
        """``num_groups``, after checking that dim 0 of ``module``'s input ``x`` splits into the groups."""
        g = self.num_groups
        if x.dim() == 0 or x.shape[0] % g:
            raise RuntimeError(
                f"{type(module).__name__}: predicting {g} Monte Carlo samples per pass needs the "
                f"batch in dim 0 of every Bayesian layer's input, divisible by {g}; got input of "
                f"shape {tuple(x.shape)}. Use predict(..., chunk_size=1) for this model.")
        return g

    def shared_result(self, module: torch.nn.Module, rows: int, compute: Callable[[], Any]) -> Any:
        """``compute()``, a draw-independent result of ``module`` on ``shared_input``'s first ``rows`` rows.

        Kept in :attr:`cache` across the passes of one prediction, while ``shared_input`` is
        unmodified (its version counter, which views share, is unchanged) and holds the same rows.
        """
        ref = self.shared_input
        version = ref._version if ref is not None else -1
        entry = self.cache.get(id(module))
        if entry is not None and entry[0] == version and entry[1] == rows:
            return entry[2]
        value = compute()
        self.cache[id(module)] = (version, rows, value)
        return value


_ACTIVE: contextvars.ContextVar[SampleGroups | None] = contextvars.ContextVar(
    "torchbayes_sample_groups", default=None)


def active_sample_groups() -> SampleGroups | None:
    """The :class:`SampleGroups` in force, or ``None`` outside :func:`sample_groups`."""
    return _ACTIVE.get()


@contextlib.contextmanager
def sample_groups(num_groups: int, *, shared_weights: bool = False,
                  shared_input: Tensor | None = None,
                  cache: dict | None = None) -> Iterator[SampleGroups]:
    """Make every Bayesian layer draw ``num_groups`` independent samples per forward pass.

    Args:
        num_groups: number of blocks ``G`` of dim 0 (>= 1).
        shared_weights: one weight sample per block shared by its examples.
        shared_input: the tiled batch, whose blocks are identical (optional; enables the
            first layer's shortcut).
        cache: a dict to keep draw-independent results and scratch buffers in across
            passes over the same ``shared_input`` rows and parameters.

    Returns:
        A context manager yielding the :class:`SampleGroups`.

    Example:
        >>> x = batch.repeat(8, *([1] * (batch.dim() - 1)))   # 8 samples of each example
        >>> with sample_groups(8, shared_input=x):
        ...     out = model(x).view(8, len(batch), -1)
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
    groups = SampleGroups(num_groups, bool(shared_weights), shared_input,
                          {} if cache is None else cache)
    token = _ACTIVE.set(groups)
    try:
        yield groups
    finally:
        _ACTIVE.reset(token)


def _weight_samples(layer: BayesianWeightLayer, num: int) -> tuple[Tensor, Tensor | None]:
    """``num`` independent posterior draws of weight and bias, stacked along a new dim 0."""
    def draw(mu: Tensor, rho: Tensor) -> Tensor:
        return torch.addcmul(mu, BF.softplus(rho), noise.randn((num, *mu.shape), mu))
    bias = None if layer.bias_mu is None else draw(layer.bias_mu, layer.bias_rho)
    return draw(layer.weight_mu, layer.weight_rho), bias


def forward_sample_groups(layer: BayesianWeightLayer, x: Tensor, op: Op, groups: SampleGroups) -> Tensor:
    """``layer``'s output on ``x`` with an independent posterior draw per group.

    Args:
        layer: a Bayesian weight layer (linear, convolution or transposed convolution).
        x: input whose dim 0 is ``groups.num_groups`` blocks of equal size.
        op: ``(x, weight, bias) -> output``, the layer's operation.
        groups: the layout in force.

    Returns:
        The output, dim 0 in the same block order.
    """
    g = groups.check_batch(layer, x)
    from torchbayes.nn.linear import BayesLinear  # late: linear imports base, which imports us

    shared = groups.is_shared(x)
    if isinstance(layer, BayesLinear):
        return _linear_groups(layer, x, op, g, shared, groups)
    if x.dim() != layer._num_spatial_dims + 2:
        raise RuntimeError(f"{type(layer).__name__}: an unbatched input of shape {tuple(x.shape)} "
                           "cannot hold several Monte Carlo samples; give it a batch dimension")
    return _conv_groups(layer, x, op, g, shared)


def _linear_groups(layer: BayesianWeightLayer, x: Tensor, op: Op, g: int, shared: bool,
                   groups: SampleGroups) -> Tensor:
    n_in, n_out = layer.weight_mu.shape[1], layer.weight_mu.shape[0]
    rows = x.shape[0] // g
    if (groups.shared_weights or x.dim() != 2
            or not shared and _weight_draws_are_cheaper(rows, n_in, n_out)):
        return _linear_weight_draws(layer, x, g, shared)
    # Local reparameterization with the noise shared by the examples of a group: each
    # example still sees a fresh N(0, I) per layer, so its own outputs are exact draws.
    eps = noise.randn((g, 1, n_out), x)
    if shared:
        mean, std = _shared_local_moments(layer, x[:rows], op, groups)
        return torch.addcmul(mean, std, eps).reshape(x.shape[0], n_out)
    mean = op(x, layer.weight_mu, layer.bias_mu)
    var_w, var_b = _posterior_variances(layer, groups)
    if x.dtype != var_w.dtype or torch.is_autocast_enabled(x.device.type):
        var = op(torch.square(x), var_w, var_b)  # let op (and autocast) pick the precision
    else:
        # x^2 and the variance are scratch: reusing their memory across the passes of one
        # prediction spares the page faults of fresh multi-megabyte allocations.
        square = torch.square(x, out=_scratch(groups, layer, "square", x))
        var = _scratch(groups, layer, "variance", mean)
        if var_b is None:
            torch.mm(square, var_w.t(), out=var)
        else:
            torch.addmm(var_b, square, var_w.t(), out=var)
    # A sum of products of non-negative numbers is never negative: no clamp before sqrt.
    std = var.sqrt_().view(g, rows, n_out)
    return mean.view(g, rows, n_out).addcmul_(std, eps).view(x.shape[0], n_out)


def _weight_draws_are_cheaper(rows: int, n_in: int, n_out: int) -> bool:
    """Whether a weight draw per group beats local reparameterization's variance product.

    Per group, local pays one more matmul (``rows * n_in * n_out`` multiply-adds) plus
    squares and square roots of its activations; a weight draw pays ``n_in * n_out``
    Gaussians and its multiply-add.
    """
    local = rows * (n_in * n_out * _MAC_COST + (n_in + n_out) * _ELEMENT_COST)
    return n_in * n_out * _NOISE_COST < local


def _variance(rho: Tensor | None) -> Tensor | None:
    return None if rho is None else BF.softplus(rho).square_()


def _posterior_variances(layer: BayesianWeightLayer, groups: SampleGroups) -> tuple[Tensor, Tensor | None]:
    """``sigma^2`` of weight and bias, computed once per prediction (parameters are fixed)."""
    key = (id(layer), "posterior_variances")
    if key not in groups.cache:
        groups.cache[key] = (_variance(layer.weight_rho), _variance(layer.bias_rho))
    return groups.cache[key]


def _scratch(groups: SampleGroups, layer: BayesianWeightLayer, name: str, like: Tensor) -> Tensor:
    """A buffer shaped like ``like`` that ``layer`` reuses across the passes of a prediction."""
    key = (id(layer), name)
    buffer = groups.cache.get(key)
    if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        groups.cache[key] = buffer
    return buffer


def _linear_weight_draws(layer: BayesianWeightLayer, x: Tensor, g: int, shared: bool) -> Tensor:
    """One weight draw per group for all its examples (exact for any input shape)."""
    n_in, n_out = layer.weight_mu.shape[1], layer.weight_mu.shape[0]
    weight, bias = _weight_samples(layer, g)
    if shared:
        x0 = x[: x.shape[0] // g]
        out = torch.nn.functional.linear(
            x0, weight.reshape(g * n_out, n_in), None if bias is None else bias.reshape(-1))
        out = out.unflatten(-1, (g, n_out)).movedim(-2, 0)
        return out.reshape(x.shape[0], *out.shape[2:])
    xg = x.reshape(g, -1, n_in)
    if bias is None:
        out = torch.bmm(xg, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), xg, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], n_out)


def _shared_local_moments(layer: BayesianWeightLayer, x0: Tensor, op: Op,
                          groups: SampleGroups) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of a linear layer's output on one block, cached
    (see :meth:`SampleGroups.shared_result`)."""
    def moments() -> tuple[Tensor, Tensor]:
        mean = op(x0, layer.weight_mu, layer.bias_mu)
        return mean, op(torch.square(x0), *_posterior_variances(layer, groups)).sqrt_()
    return groups.shared_result(layer, x0.shape[0], moments)


def _conv_groups(layer: BayesianWeightLayer, x: Tensor, op: Op, g: int, shared: bool) -> Tensor:
    # Per-group kernels for every convolution: exact, whatever the estimator.
    weight, bias = _weight_samples(layer, g)
    n = x.shape[0] // g
    transposed = bool(getattr(layer, "transposed", False))
    if shared and getattr(layer, "groups", 1) == 1:
        # One convolution of the shared block with the g kernels stacked as output channels.
        channel_dim = 1 if transposed else 0
        stacked = weight.movedim(0, channel_dim).flatten(channel_dim, channel_dim + 1)
        out = op(x[:n], stacked, None if bias is None else bias.reshape(-1))
        out = out.unflatten(1, (g, -1)).transpose(0, 1)
        return out.reshape(x.shape[0], *out.shape[2:])
    if not shared and n <= _GROUPED_CONV_MAX_ROWS and not transposed and layer.padding_mode == "zeros":
        return _grouped_conv(layer, x, weight, bias, g)
    blocks = [x[:n]] * g if shared else x.split(n)
    outputs = [op(block, weight[i], None if bias is None else bias[i]) for i, block in enumerate(blocks)]
    return torch.cat(outputs) if g > 1 else outputs[0]


def _grouped_conv(layer: BayesianWeightLayer, x: Tensor, weight: Tensor, bias: Tensor | None, g: int) -> Tensor:
    """All groups in one convolution: group ``i``'s examples meet only kernel ``i``."""
    n = x.shape[0] // g
    conv = _CONVOLUTIONS[layer._num_spatial_dims]
    # (g*n, C, ...) -> (n, g*C, ...): free when n == 1, a copy otherwise.
    xg = x.unflatten(0, (g, n)).transpose(0, 1).flatten(1, 2)
    out = conv(xg, weight.flatten(0, 1), None if bias is None else bias.reshape(-1), layer.stride,
               layer.padding, layer.dilation, g * layer.groups)
    return out.unflatten(1, (g, -1)).transpose(0, 1).reshape(x.shape[0], -1, *out.shape[2:])
