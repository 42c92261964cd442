"""INT8 Bayesian layers that still sample: linear and 1/2/3-d convolution.

The posterior means and standard deviations are stored quantized per output channel
(``int8`` plus one float scale per channel), and every Monte Carlo draw runs integer
kernels (:mod:`torchbayes.quantization.kernels`):

* :class:`QuantizedBayesLinear` uses local reparameterization, exact for a linear
  layer: the output is ``N(x mu^T + b, x^2 (sigma^2)^T + sigma_b^2)``, so the mean path
  ``x mu^T`` and the variance path ``x^2 sigma^2`` are two INT8 products with weights
  packed once, and a draw costs only output-sized Gaussian noise; no weight is
  re-quantized per draw. When the input is the same in every Monte Carlo group (the
  first layer inside :func:`torchbayes.predict`) both products run once.
* The convolutions (:class:`QuantizedBayesConv1d` / ``2d`` / ``3d``) draw whole kernels
  ``mu + sigma * eps`` (local reparameterization would make positions that share a
  kernel independent, which changes the joint distribution), quantize each drawn
  kernel per output channel and run an INT8 convolution. Kernels are small next to
  their activations, so the per-draw quantization costs little; on a shared input the
  draws of all groups run as one convolution with stacked kernels.

Both modules are :class:`~torchbayes.nn.BayesianModule` subclasses, so
:func:`torchbayes.posterior_mean` / :func:`torchbayes.sampling` switch them and
:func:`torchbayes.predict` vectorizes over them. They hold buffers only (inference
modules): their ``state_dict`` is plain tensors and loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes.nn import noise
from torchbayes.nn.base import BayesianModule
from torchbayes.nn.conv import BayesConv1d, BayesConv2d, BayesConv3d
from torchbayes.nn.linear import BayesLinear
from torchbayes.nn.vectorized import SampleGroups, active_sample_groups
from torchbayes.quantization.kernels import (
    PackedConv,
    PackedLinear,
    QuantizedActivation,
    dequantize_per_channel,
    quantize_activation,
    quantize_per_channel,
    quantize_square,
)

__all__ = [
    "QuantizedBayesianModule",
    "QuantizedBayesLinear",
    "QuantizedBayesConv1d",
    "QuantizedBayesConv2d",
    "QuantizedBayesConv3d",
]


class QuantizedBayesianModule(BayesianModule):
    """Base of the INT8 Bayesian layers: quantized buffers, activation ranges, packed caches.

    Attributes:
        input_range: buffer ``(low, high)`` of the calibrated input range, or NaNs when
            each input is quantized over its own range (dynamic quantization).
    """

    supports_sample_groups = True

    def __init__(self, estimator: str) -> None:
        super().__init__(estimator=estimator)
        self.register_buffer("input_range", torch.full((2,), math.nan))
        # Packed kernels and dequantized copies, rebuilt from the buffers when needed.
        self._cache: dict[str, Any] = {}
        self._observed: list[float] | None = None

    # ------------------------------------------------------------- calibration
    def start_observing(self) -> None:
        """Record the range of the inputs of the following forward passes (see :meth:`stop_observing`)."""
        self._observed = [math.inf, -math.inf]

    def stop_observing(self) -> None:
        """Fix ``input_range`` to the range observed since :meth:`start_observing` (if any input was seen)."""
        if self._observed is not None and math.isfinite(self._observed[0]):
            self.input_range.copy_(torch.tensor(self._observed))
        self._observed = None

    def _quantize_input(self, x: Tensor) -> QuantizedActivation:
        if self._observed is not None:
            low, high = torch.aminmax(x.detach())
            self._observed = [min(self._observed[0], float(low)), max(self._observed[1], float(high))]
        low, high = self.input_range.tolist()
        return quantize_activation(x, None if math.isnan(low) else (low, high))

    # ---------------------------------------------------------------- plumbing
    def _cached(self, key: str, build: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedBayesianModule:
        self._cache = {}  # device or dtype moves invalidate packed kernels
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Packed oneDNN tensors have no storage to copy or pickle; they are rebuilt lazily.
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def kl_divergence(self, reduction: str = "sum") -> Tensor:
        """Not available: quantized layers are for inference; compute the KL on the float model."""
        raise TypeError(f"{type(self).__name__} is an INT8 inference layer and has no KL term; "
                        "compute the KL (and train) on the float model before quantizing it")

    def _store_posterior(self, name: str, mu: Tensor, second: Tensor, second_name: str) -> None:
        """Quantize a posterior mean and a second moment tensor per output channel into buffers."""
        for suffix, value in (("mu", mu), (second_name, second)):
            q, scale = quantize_per_channel(value.detach().float())
            getattr(self, f"{name}_{suffix}_int8").copy_(q)
            getattr(self, f"{name}_{suffix}_scale").copy_(scale)

    def _register_quantized(self, name: str, shape: tuple[int, ...]) -> None:
        self.register_buffer(f"{name}_int8", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer(f"{name}_scale", torch.ones(shape[0]))

    def _dequantized(self, name: str) -> Tensor:
        return self._cached(f"float_{name}", lambda: dequantize_per_channel(
            getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale")))


def _check_groups(layer: nn.Module, x: Tensor, groups: SampleGroups) -> int:
    g = groups.num_groups
    if x.dim() == 0 or x.shape[0] % g:
        raise RuntimeError(f"{type(layer).__name__}: predicting {g} Monte Carlo samples per pass "
                           f"needs dim 0 of the input divisible by {g}; got shape {tuple(x.shape)}")
    return g


def _shared_cache(layer: nn.Module, groups: SampleGroups, rows: int, compute: Any) -> Any:
    """Results on ``groups.shared_input`` that do not depend on the draw, kept across passes."""
    ref = groups.shared_input
    version = ref._version if ref is not None else -1
    entry = groups.cache.get(id(layer))
    if entry is not None and entry[0] == version and entry[1].shape[0] == rows:
        return entry[1], entry[2]
    first, second = compute()
    groups.cache[id(layer)] = (version, first, second)
    return first, second


class QuantizedBayesLinear(QuantizedBayesianModule):
    r"""INT8 counterpart of :class:`~torchbayes.nn.BayesLinear` (local reparameterization).

    Build it with :func:`torchbayes.quantization.quantize` (or :meth:`from_float`); the
    constructor makes an empty layer to load a ``state_dict`` into.

    Args:
        in_features, out_features, bias: as in :class:`~torchbayes.nn.BayesLinear`.

    Shape:
        - Input: :math:`(*, H_{in})`; output: :math:`(*, H_{out})`.

    Attributes:
        weight_mu_int8, weight_mu_scale: posterior means, int8 ``(out, in)`` and one
            scale per output feature.
        weight_var_int8, weight_var_scale: posterior variances ``sigma^2``, likewise.
        bias_mu, bias_sigma: float32 ``(out,)`` (or ``None``).

    Example:
        >>> qlayer = QuantizedBayesLinear.from_float(BayesLinear(20, 30).eval())
        >>> qlayer(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(estimator="local")
        self.in_features, self.out_features = in_features, out_features
        self._register_quantized("weight_mu", (out_features, in_features))
        self._register_quantized("weight_var", (out_features, in_features))
        self.register_buffer("bias_mu", torch.zeros(out_features) if bias else None)
        self.register_buffer("bias_sigma", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, layer: BayesLinear) -> QuantizedBayesLinear:
        """The INT8 layer holding ``layer``'s posterior, quantized per output feature."""
        new = cls(layer.in_features, layer.out_features, layer.bias_mu is not None)
        with torch.no_grad():
            sigma = layer.posterior_sigma("weight")
            new._store_posterior("weight", layer.weight_mu, sigma.square(), "var")
            if layer.bias_mu is not None:
                new.bias_mu.copy_(layer.bias_mu)
                new.bias_sigma.copy_(layer.posterior_sigma("bias"))
        new.deterministic = layer.deterministic
        return new

    def _packed(self, name: str) -> PackedLinear:
        return self._cached(f"packed_{name}", lambda: PackedLinear(
            getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale")))

    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of the output: two INT8 products."""
        q = self._quantize_input(x)
        mean = self._packed("weight_mu")(q, self.bias_mu)
        abs_max = (max(q.zero_point, 255 - q.zero_point) + 0.5) * q.scale
        bias_var = None if self.bias_sigma is None else self.bias_sigma.square()
        var = self._packed("weight_var")(quantize_square(x, abs_max), bias_var)
        return mean, var.sqrt_()  # >= 0: non-negative integers times non-negative weights

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor) or input.dim() < 1 or input.shape[-1] != self.in_features:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{type(self).__name__}: input must have shape (*, in_features="
                             f"{self.in_features}), got {shape}")
        if self.deterministic:
            return self._packed("weight_mu")(self._quantize_input(input), self.bias_mu)
        groups = active_sample_groups()
        if groups is None or groups.num_groups == 1 and not groups.shared_weights:
            mean, std = self._moments(input)
            return mean.addcmul_(std, noise.randn(mean.shape, mean))
        g = _check_groups(self, input, groups)
        if groups.shared_weights:
            return self._forward_weight_draws(input, g)
        if groups.is_shared(input):
            rows = input.shape[0] // g
            mean, std = _shared_cache(self, groups, rows, lambda: self._moments(input[:rows]))
            out = torch.addcmul(mean, std, noise.randn((g, *mean.shape), mean))
            return out.reshape(input.shape[0], *mean.shape[1:])
        mean, std = self._moments(input)
        return mean.addcmul_(std, noise.randn(mean.shape, mean))

    def _forward_weight_draws(self, x: Tensor, g: int) -> Tensor:
        """One weight draw per group, shared by its examples (``shared_weights``)."""
        mu = self._dequantized("weight_mu")
        sigma = self._cached("float_weight_sigma", lambda: self._dequantized("weight_var").sqrt())
        q = self._quantize_input(x)
        outputs = []
        for block in q.data.split(x.shape[0] // g):
            weight = torch.addcmul(mu, sigma, noise.randn(mu.shape, mu))
            bias = None if self.bias_mu is None else torch.addcmul(
                self.bias_mu, self.bias_sigma, noise.randn(self.bias_mu.shape, self.bias_mu))
            packed = PackedLinear(*quantize_per_channel(weight))
            outputs.append(packed(QuantizedActivation(block, q.scale, q.zero_point), bias))
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_mu is not None}, {super().extra_repr()}")


# Hyperparameters copied from the float convolution (torch's names and meanings).
_CONV_HYPERPARAMETERS = ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                         "dilation", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class _QuantizedBayesConvNd(QuantizedBayesianModule):
    """Shared implementation of the INT8 Bayesian convolutions (kernel draws)."""

    _float_cls: type[nn.Module]
    _torch_cls: type[nn.modules.conv._ConvNd]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros") -> None:
        super().__init__(estimator="reparameterization")
        # torch's own validation and normalisation of the hyperparameters.
        twin = self._torch_cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                               dilation=dilation, groups=groups, bias=bias,
                               padding_mode=padding_mode, device="meta")
        for name in _CONV_HYPERPARAMETERS:
            setattr(self, name, getattr(twin, name))
        self._num_spatial_dims = len(twin.kernel_size)
        shape = tuple(twin.weight.shape)
        self._register_quantized("weight_mu", shape)
        self._register_quantized("weight_sigma", shape)
        self.register_buffer("bias_mu", torch.zeros(out_channels) if bias else None)
        self.register_buffer("bias_sigma", torch.zeros(out_channels) if bias else None)

    @classmethod
    def from_float(cls, layer: nn.Module) -> _QuantizedBayesConvNd:
        """The INT8 layer holding ``layer``'s posterior, quantized per output channel."""
        if not isinstance(layer, cls._float_cls):
            raise TypeError(f"{cls.__name__}.from_float: layer must be a "
                            f"{cls._float_cls.__name__}, got {type(layer).__name__}")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                  layer.padding, layer.dilation, layer.groups, layer.bias_mu is not None,
                  layer.padding_mode)
        with torch.no_grad():
            new._store_posterior("weight", layer.weight_mu, layer.posterior_sigma("weight"), "sigma")
            if layer.bias_mu is not None:
                new.bias_mu.copy_(layer.bias_mu)
                new.bias_sigma.copy_(layer.posterior_sigma("bias"))
        new.deterministic = layer.deterministic
        return new

    def _prepare_input(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Pad ``x`` explicitly where the INT8 kernel cannot (padding modes, ``"same"``)."""
        d = self._num_spatial_dims
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            if any(self._reversed_padding_repeated_twice):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            return x, (0,) * d
        return x, tuple(self.padding)

    def _packed_conv(self, q: Tensor, scale: Tensor, padding: tuple[int, ...]) -> PackedConv:
        return PackedConv(q, scale, self.stride, padding, self.dilation, self.groups)

    def _draw_kernels(self, g: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``g`` kernel draws, quantized per output channel: ``(q, scale, bias)`` stacked over draws."""
        mu, sigma = self._dequantized("weight_mu"), self._dequantized("weight_sigma")
        weight = torch.addcmul(mu, sigma, noise.randn((g, *mu.shape), mu))
        q, scale = quantize_per_channel(weight.flatten(0, 1))
        bias = None
        if self.bias_mu is not None:
            bias = torch.addcmul(self.bias_mu, self.bias_sigma,
                                 noise.randn((g, *self.bias_mu.shape), self.bias_mu)).reshape(-1)
        return q, scale, bias

    def forward(self, input: Tensor) -> Tensor:
        d = self._num_spatial_dims
        if not isinstance(input, Tensor) or input.dim() not in (d + 1, d + 2) \
                or input.shape[-(d + 1)] != self.in_channels:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{type(self).__name__}: input must be (N, C={self.in_channels}, ...) with "
                             f"{d} spatial dims, or unbatched (C, ...); got {shape}")
        if input.dim() == d + 1:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        groups = active_sample_groups()
        shared = groups is not None and groups.is_shared(input)
        x, padding = self._prepare_input(input)
        if self.deterministic:
            packed = self._cached("packed_mean", lambda: self._packed_conv(
                self.weight_mu_int8, self.weight_mu_scale, padding))
            return packed(self._quantize_input(x), self.bias_mu)
        g = 1 if groups is None else _check_groups(self, input, groups)
        q, scale, bias = self._draw_kernels(g)
        n = x.shape[0] // g
        # One INT8 convolution per draw. On a shared input the rows are quantized once and
        # reused; stacking the g kernels into one convolution would be fewer calls, but
        # its (n, g * C, ...) output needs a strided transpose copy that costs more.
        xq = self._quantize_input(x[:n] if shared else x)
        blocks = [xq.data] * g if shared else xq.data.split(n)
        c = self.out_channels
        outputs = [
            self._packed_conv(q[i * c:(i + 1) * c], scale[i * c:(i + 1) * c], padding)(
                QuantizedActivation(block, xq.scale, xq.zero_point),
                None if bias is None else bias[i * c:(i + 1) * c])
            for i, block in enumerate(blocks)
        ]
        return torch.cat(outputs) if g > 1 else outputs[0]

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._num_spatial_dims:
            s += f", padding={self.padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return f"{s}, {super().extra_repr()}"


def _conv_doc(d: int) -> str:
    return f"""INT8 counterpart of :class:`~torchbayes.nn.BayesConv{d}d`: each draw samples a kernel.

    Each forward pass (each Monte Carlo group inside :func:`torchbayes.predict`) draws a
    kernel ``mu + sigma * eps`` from the dequantized posterior, quantizes it per output
    channel and runs an INT8 convolution on the input quantized per tensor. Build it
    with :func:`torchbayes.quantization.quantize` (or :meth:`from_float`); the
    constructor (torch's convolution arguments) makes an empty layer to load a
    ``state_dict`` into.

    Attributes:
        weight_mu_int8, weight_mu_scale: posterior means of the kernel, int8 and one
            scale per output channel.
        weight_sigma_int8, weight_sigma_scale: posterior standard deviations, likewise.
        bias_mu, bias_sigma: float32 ``(out_channels,)`` (or ``None``).

    Shape:
        As ``torch.nn.Conv{d}d``.

    Example:
        >>> qconv = QuantizedBayesConv{d}d.from_float(BayesConv{d}d(3, 8, 3).eval())
        >>> y = qconv(torch.randn(4, 3, {", ".join(["16"] * d)}))
    """


class QuantizedBayesConv1d(_QuantizedBayesConvNd):
    __doc__ = _conv_doc(1)
    _float_cls = BayesConv1d
    _torch_cls = nn.Conv1d


class QuantizedBayesConv2d(_QuantizedBayesConvNd):
    __doc__ = _conv_doc(2)
    _float_cls = BayesConv2d
    _torch_cls = nn.Conv2d


class QuantizedBayesConv3d(_QuantizedBayesConvNd):
    __doc__ = _conv_doc(3)
    _float_cls = BayesConv3d
    _torch_cls = nn.Conv3d
