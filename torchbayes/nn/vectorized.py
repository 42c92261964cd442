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
  under one shared weight sample). When the input is the same in every group (a shared
  input: the tiled batch, or what :func:`torchbayes.predict` computed once per example
  and tiled), the mean and variance are computed once. When a
  weight draw per group is cheaper than local's second matmul (large groups), or the
  input has more dimensions (positions of a sequence must share their weight), each
  group draws one weight sample and runs a batched matmul instead.
* **Convolutions**: local reparameterization is not exact for them (positions sharing a
  kernel would become independent), so each group gets a sampled kernel. On a shared
  input the ``G`` kernels are stacked into one convolution with ``G`` times the output
  channels; otherwise small batches run as one grouped convolution (``G`` groups) and
  large ones group after group. The exception: a convolution whose output has a single
  position (ResNet-18's last stage on 32x32 images) shares no kernel between positions;
  it is the linear map from the input entries its kernel covers (taps on zero padding
  dropped) and takes the linear layers' exact local reparameterization.
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
from collections.abc import Callable, Iterator, Sequence
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
        shared_inputs: tensors whose ``G`` blocks are known to be identical (the tiled
            batch, or activations computed once per example and tiled); a layer whose
            input is one of them (or a contiguous reshape of it) computes what does not
            depend on the draw once.
        cache: per-layer results that do not depend on the draw (moments on a shared
            input, posterior variances) and scratch buffers, reused across the forward
            passes of one prediction.
    """

    num_groups: int
    shared_weights: bool = False
    shared_inputs: tuple[Tensor, ...] = ()
    cache: dict = field(default_factory=dict)

    def _shared_match(self, x: Tensor) -> Tensor | None:
        """The shared input whose rows ``x`` holds exactly (same memory, row for row), if any.

        Matches a shared input itself and views that only reshape each row (e.g.
        ``Flatten``), including the stride-0 tiling of a single example.
        """
        if x.dim() == 0:
            return None
        for ref in self.shared_inputs:
            if (
                x.data_ptr() == ref.data_ptr()
                and x.dtype == ref.dtype
                and x.device == ref.device
                and x.numel() == ref.numel()
                and x.shape[0] == ref.shape[0]
                and x.stride(0) == ref.stride(0)
                and x[0].is_contiguous()
                and ref[0].is_contiguous()
            ):
                return ref
        return None

    def is_shared(self, x: Tensor) -> bool:
        """Whether ``x`` holds exactly one shared input's rows, so its ``G`` blocks are identical."""
        return self._shared_match(x) is not None

    def check_batch(self, module: torch.nn.Module, x: Tensor) -> int:
        """``num_groups``, after checking that dim 0 of ``module``'s input ``x`` splits into the groups."""
        g = self.num_groups
        if x.dim() == 0 or x.shape[0] % g:
            raise RuntimeError(
                f"{type(module).__name__}: predicting {g} Monte Carlo samples per pass needs the "
                f"batch in dim 0 of every Bayesian layer's input, divisible by {g}; got input of "
                f"shape {tuple(x.shape)}. Use predict(..., chunk_size=1) for this model."
            )
        return g

    def shared_result(self, module: torch.nn.Module, x: Tensor, compute: Callable[[], Any]) -> Any:
        """``compute()``, a draw-independent result of ``module`` on the shared input ``x``.

        Kept in :attr:`cache` across the passes of one prediction, per module and shared
        input, while that input is unmodified (its version counter, which views share, is
        unchanged) and its groups hold the same number of rows.
        """
        ref = self._shared_match(x)
        if ref is None:
            return compute()
        key = (id(module), "shared", ref.data_ptr())
        rows = x.shape[0] // self.num_groups
        entry = self.cache.get(key)
        if entry is not None and entry[0] == ref._version and entry[1] == rows:
            return entry[2]
        value = compute()
        self.cache[key] = (ref._version, rows, value)
        return value


_ACTIVE: contextvars.ContextVar[SampleGroups | None] = contextvars.ContextVar("torchbayes_sample_groups", default=None)


def active_sample_groups() -> SampleGroups | None:
    """The :class:`SampleGroups` in force, or ``None`` outside :func:`sample_groups`."""
    return _ACTIVE.get()


@contextlib.contextmanager
def sample_groups(
    num_groups: int,
    *,
    shared_weights: bool = False,
    shared_input: Tensor | Sequence[Tensor] | None = None,
    cache: dict | None = None,
) -> Iterator[SampleGroups]:
    """Make every Bayesian layer draw ``num_groups`` independent samples per forward pass.

    Args:
        num_groups: number of blocks ``G`` of dim 0 (>= 1).
        shared_weights: one weight sample per block shared by its examples.
        shared_input: the tiled batch, whose blocks are identical, or several such
            tensors (optional; enables the shortcut of the layers that read them).
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
    shared = (
        () if shared_input is None else ((shared_input,) if isinstance(shared_input, Tensor) else tuple(shared_input))
    )
    groups = SampleGroups(num_groups, bool(shared_weights), shared, {} if cache is None else cache)
    token = _ACTIVE.set(groups)
    try:
        yield groups
    finally:
        _ACTIVE.reset(token)


def _weight_samples(layer: BayesianWeightLayer, num: int, groups: SampleGroups) -> tuple[Tensor, Tensor | None]:
    """``num`` independent posterior draws of weight and bias, stacked along a new dim 0."""
    sigma_w, sigma_b = _posterior_sigmas(layer, groups)

    def draw(mu: Tensor, sigma: Tensor) -> Tensor:
        # In place on the fresh noise: one weight-sized pass and no further allocation.
        return noise.randn((num, *mu.shape), mu).mul_(sigma).add_(mu)

    bias = None if layer.bias_mu is None or sigma_b is None else draw(layer.bias_mu, sigma_b)
    return draw(layer.weight_mu, sigma_w), bias


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
        raise RuntimeError(
            f"{type(layer).__name__}: an unbatched input of shape {tuple(x.shape)} "
            "cannot hold several Monte Carlo samples; give it a batch dimension"
        )
    if not groups.shared_weights:
        taps = _single_position_taps(layer, x)
        if taps is not None:
            out = _single_position_conv(layer, x, taps, g, shared, groups)
            if out is not None:
                return out
    return _conv_groups(layer, x, op, g, shared, groups)


def _linear_groups(layer: BayesianWeightLayer, x: Tensor, op: Op, g: int, shared: bool, groups: SampleGroups) -> Tensor:
    n_in, n_out = layer.weight_mu.shape[1], layer.weight_mu.shape[0]
    rows = x.shape[0] // g
    if groups.shared_weights or x.dim() != 2 or (not shared and _weight_draws_are_cheaper(rows, n_in, n_out)):
        return _linear_weight_draws(layer, x, g, shared, groups)
    var_w, var_b = _posterior_variances(layer, groups)
    return _local_groups(layer, x, x, op, (layer.weight_mu, layer.bias_mu, var_w, var_b), g, shared, groups)


def _local_groups(
    layer: BayesianWeightLayer,
    x: Tensor,
    rows_in: Tensor | None,
    op: Op,
    weights: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    g: int,
    shared: bool,
    groups: SampleGroups,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Local reparameterization of a linear map: ``N(x mu^T + b, x^2 sigma^2^T + sigma_b^2)``.

    ``x`` is the layer's input (it identifies a shared input), ``rows_in`` the
    ``(rows, features)`` matrix the map applies to (``prepare(x)`` for the first block of
    a shared input), ``weights`` ``(mu, bias mu, sigma^2, bias sigma^2)`` as matrices.
    The Gaussian noise is drawn once per group and output unit: each example still meets
    fresh N(0, I) noise in every layer, so its own outputs are exact draws.
    """
    mu_w, mu_b, var_w, var_b = weights
    n_out, total = mu_w.shape[0], x.shape[0]
    rows = total // g
    eps = noise.randn((g, 1, n_out), x)
    if shared:

        def moments() -> tuple[Tensor, Tensor]:
            x0 = x[:rows] if prepare is None else prepare(x[:rows])
            return op(x0, mu_w, mu_b), op(torch.square(x0), var_w, var_b).sqrt_()

        mean, std = groups.shared_result(layer, x, moments)
        return torch.addcmul(mean, std, eps).reshape(total, n_out)
    assert rows_in is not None
    mean = op(rows_in, mu_w, mu_b)
    if rows_in.dtype != var_w.dtype or torch.is_autocast_enabled(rows_in.device.type):
        var = op(torch.square(rows_in), var_w, var_b)  # let op (and autocast) pick the precision
    else:
        # x^2 and the variance are scratch: reusing their memory across the passes of one
        # prediction spares the page faults of fresh multi-megabyte allocations.
        square = torch.square(rows_in, out=_scratch(groups, layer, "square", rows_in))
        var = _scratch(groups, layer, "variance", mean)
        if var_b is None:
            torch.mm(square, var_w.t(), out=var)
        else:
            torch.addmm(var_b, square, var_w.t(), out=var)
    # A sum of products of non-negative numbers is never negative: no clamp before sqrt.
    std = var.sqrt_().view(g, rows, n_out)
    return mean.view(g, rows, n_out).addcmul_(std, eps).view(total, n_out)


def _weight_draws_are_cheaper(rows: int, n_in: int, n_out: int) -> bool:
    """Whether a weight draw per group beats local reparameterization's variance product.

    Per group, local pays one more matmul (``rows * n_in * n_out`` multiply-adds) plus
    squares and square roots of its activations; a weight draw pays ``n_in * n_out``
    Gaussians and its multiply-add.
    """
    local = rows * (n_in * n_out * _MAC_COST + (n_in + n_out) * _ELEMENT_COST)
    return n_in * n_out * _NOISE_COST < local


def _posterior_sigmas(layer: BayesianWeightLayer, groups: SampleGroups) -> tuple[Tensor, Tensor | None]:
    """``softplus(rho)`` of weight and bias, computed once per prediction (parameters are fixed)."""
    key = (id(layer), "posterior_sigmas")
    if key not in groups.cache:
        groups.cache[key] = (
            BF.softplus(layer.weight_rho),
            None if layer.bias_rho is None else BF.softplus(layer.bias_rho),
        )
    return groups.cache[key]


def _posterior_variances(layer: BayesianWeightLayer, groups: SampleGroups) -> tuple[Tensor, Tensor | None]:
    """``sigma^2`` of weight and bias, computed once per prediction (parameters are fixed)."""
    key = (id(layer), "posterior_variances")
    if key not in groups.cache:
        sigma_w, sigma_b = _posterior_sigmas(layer, groups)
        groups.cache[key] = (sigma_w.square(), None if sigma_b is None else sigma_b.square())
    return groups.cache[key]


def _scratch(groups: SampleGroups, layer: BayesianWeightLayer, name: str, like: Tensor) -> Tensor:
    """A buffer shaped like ``like`` that ``layer`` reuses across the passes of a prediction."""
    key = (id(layer), name)
    buffer = groups.cache.get(key)
    if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        groups.cache[key] = buffer
    return buffer


def _linear_weight_draws(layer: BayesianWeightLayer, x: Tensor, g: int, shared: bool, groups: SampleGroups) -> Tensor:
    """One weight draw per group for all its examples (exact for any input shape)."""
    n_in, n_out = layer.weight_mu.shape[1], layer.weight_mu.shape[0]
    weight, bias = _weight_samples(layer, g, groups)
    if shared:
        x0 = x[: x.shape[0] // g]
        out = torch.nn.functional.linear(
            x0, weight.reshape(g * n_out, n_in), None if bias is None else bias.reshape(-1)
        )
        out = out.unflatten(-1, (g, n_out)).movedim(-2, 0)
        return out.reshape(x.shape[0], *out.shape[2:])
    xg = x.reshape(g, -1, n_in)
    if bias is None:
        out = torch.bmm(xg, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), xg, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], n_out)


Taps = tuple[tuple[slice, ...], tuple[tuple[int, int], ...]]


def _single_position_taps(layer: BayesianWeightLayer, x: Tensor) -> Taps | None:
    """Where a convolution whose output has ONE position reads its input, or ``None``.

    Such a convolution (e.g. ResNet-18's last stage on 32x32 images) is a linear map of
    the input entries its kernel covers, so local reparameterization is exact for it: no
    kernel is shared between output positions. Returns, per spatial dim, the input slice
    and the (start, stop) range of kernel taps that fall on the input rather than on the
    zero padding. Only zero-padded, ungrouped, non-transposed convolutions qualify.
    """
    conv: Any = layer  # a convolution's hyperparameters, as torch.nn's twin holds them
    if getattr(conv, "transposed", True) or getattr(conv, "groups", 0) != 1 or conv.padding_mode != "zeros":
        return None
    kernel, stride, dilation, padding = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if isinstance(padding, str):  # "valid", or "same" (stride 1; torch pads total // 2 on the left)
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    inputs, taps = [], []
    for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation):
        out = size if conv.padding == "same" else (size + 2 * p - d * (k - 1) - 1) // s + 1
        covered = [t for t in range(k) if 0 <= t * d - p < size]
        if out != 1 or not covered:
            return None
        first, last = covered[0], covered[-1]
        inputs.append(slice(first * d - p, last * d - p + 1, d))
        taps.append((first, last + 1))
    return tuple(inputs), tuple(taps)


def _single_position_conv(
    layer: BayesianWeightLayer, x: Tensor, taps: Taps, g: int, shared: bool, groups: SampleGroups
) -> Tensor | None:
    """A one-position convolution as the linear map it is, by local reparameterization
    (exact, see :func:`_single_position_taps`); ``None`` when kernel draws are cheaper."""
    inputs, kernel_range = taps
    n_out = layer.weight_mu.shape[0]
    key = (id(layer), "single_position_weights", kernel_range)
    weights = groups.cache.get(key)
    if weights is None:
        var_w, var_b = _posterior_variances(layer, groups)
        window = (slice(None), slice(None), *(slice(a, b) for a, b in kernel_range))
        weights = groups.cache[key] = (
            layer.weight_mu[window].reshape(n_out, -1),
            layer.bias_mu,
            var_w[window].reshape(n_out, -1),
            var_b,
        )
    if not shared and _weight_draws_are_cheaper(x.shape[0] // g, weights[0].shape[1], n_out):
        return None
    window = (slice(None), slice(None), *inputs)

    def patches(t: Tensor) -> Tensor:
        return t[window].reshape(t.shape[0], -1)

    out = _local_groups(
        layer,
        x,
        None if shared else patches(x),
        torch.nn.functional.linear,
        weights,
        g,
        shared,
        groups,
        prepare=patches,
    )
    return out.view(x.shape[0], n_out, *([1] * (x.dim() - 2)))


def _conv_groups(layer: BayesianWeightLayer, x: Tensor, op: Op, g: int, shared: bool, groups: SampleGroups) -> Tensor:
    # Per-group kernels for every convolution: exact, whatever the estimator.
    weight, bias = _weight_samples(layer, g, groups)
    n = x.shape[0] // g
    return stacked_conv(layer, x[:n] if shared else x, weight, bias, op, shared)


def stacked_conv(layer: Any, x: Tensor, weight: Tensor, bias: Tensor | None, op: Op, shared: bool) -> Tensor:
    """``G`` convolutions with kernels ``weight[i]`` (and ``bias[i]``), the cheapest exact way.

    Also the deep ensembles' convolution (`torchbayes.Ensemble`: the members' kernels).

    Args:
        layer: the convolution whose hyperparameters apply (stride, padding, groups...).
        x: ``shared``: one block ``(n, C, ...)`` that every kernel sees; otherwise ``G``
            consecutive blocks ``(G * n, C, ...)``, block ``i`` for kernel ``i``.
        weight: ``(G, *kernel)``; bias: ``(G, out)`` or ``None``.
        op: ``op(input, kernel, bias)``, the layer's convolution.
        shared: see ``x``.

    Returns:
        ``(G * n, out, ...)``: block ``i`` convolved with kernel ``i``.
    """
    g = weight.shape[0]
    n = x.shape[0] if shared else x.shape[0] // g
    transposed = bool(getattr(layer, "transposed", False))
    if shared and getattr(layer, "groups", 1) == 1:
        # One convolution of the shared block with the g kernels stacked as output channels.
        channel_dim = 1 if transposed else 0
        stacked = weight.movedim(0, channel_dim).flatten(channel_dim, channel_dim + 1)
        out = op(x, stacked, None if bias is None else bias.reshape(-1))
        out = out.unflatten(1, (g, -1)).transpose(0, 1)
        return out.reshape(g * n, *out.shape[2:])
    if not shared and n <= _GROUPED_CONV_MAX_ROWS and not transposed and layer.padding_mode == "zeros":
        return _grouped_conv(layer, x, weight, bias, g)
    blocks = [x] * g if shared else x.split(n)
    outputs = [op(block, weight[i], None if bias is None else bias[i]) for i, block in enumerate(blocks)]
    return torch.cat(outputs) if g > 1 else outputs[0]


def _grouped_conv(conv_layer: BayesianWeightLayer, x: Tensor, weight: Tensor, bias: Tensor | None, g: int) -> Tensor:
    """All groups in one convolution: group ``i``'s examples meet only kernel ``i``."""
    layer: Any = conv_layer  # a convolution's hyperparameters, as torch.nn's twin holds them
    n = x.shape[0] // g
    conv = _CONVOLUTIONS[len(layer.kernel_size)]
    # (g*n, C, ...) -> (n, g*C, ...): free when n == 1, a copy otherwise.
    xg = x.unflatten(0, (g, n)).transpose(0, 1).flatten(1, 2)
    out = conv(
        xg,
        weight.flatten(0, 1),
        None if bias is None else bias.reshape(-1),
        layer.stride,
        layer.padding,
        layer.dilation,
        g * layer.groups,
    )
    return out.unflatten(1, (g, -1)).transpose(0, 1).reshape(x.shape[0], -1, *out.shape[2:])
