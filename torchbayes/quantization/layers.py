"""INT8 layers: Bayesian linear and 1/2/3-d convolutions that still sample, and their
deterministic counterparts.

The posterior means and standard deviations are stored quantized per output channel
(``int8`` plus one float scale per channel), and every Monte Carlo draw runs integer
kernels (:mod:`torchbayes.quantization.kernels`):

* :class:`QuantizedBayesLinear` uses local reparameterization, exact for a linear
  layer: the output is ``N(x mu^T + b, x^2 (sigma^2)^T + sigma_b^2)``, so the mean path
  ``x mu^T`` and the variance path ``x^2 sigma^2`` are two INT8 products with weights
  packed once, and a draw costs only output-sized Gaussian noise; no weight is
  re-quantized per draw. Inside :func:`torchbayes.predict` (sample groups) the noise is
  drawn once per group and output unit and shared by the group's examples, as in the
  float layers (:mod:`torchbayes.nn.vectorized`): each example still meets fresh noise
  in every layer, so its own outputs are exact draws. When the input is the same in
  every group (the first layer) both products run once per prediction.
* The convolutions (:class:`QuantizedBayesConv1d` / ``2d`` / ``3d``) draw whole kernels
  ``mu + sigma * eps`` (local reparameterization would make positions that share a
  kernel independent, which changes the joint distribution). A drawn kernel is rounded
  on a fixed per-channel grid chosen from the posterior (it covers ``|mu| + 6 sigma``),
  so a draw is one fused multiply-add, a rounding and a pack; the input is quantized
  once for all draws of a pass (once per prediction for the first layer). oneDNN
  writes convolution outputs channels-last; they are returned in the input's layout
  (contiguous for a contiguous input) unless :func:`~torchbayes.quantization.quantize`
  found that nothing downstream can tell the layout apart (``channels_last_output``),
  where channels-last saves a copy and makes the model's own pooling faster. A
  convolution whose output has one position (ResNet-18's layer4 on 32x32 inputs)
  shares no kernel between positions: inside `torchbayes.predict` it samples as the
  INT8 linear layer of its taps (exact local reparameterization, nothing packed per draw).
* :class:`QuantizedLinear` and :class:`QuantizedConv1d` / ``2d`` / ``3d`` are static INT8
  copies of deterministic ``torch.nn`` layers (a following eval-mode BatchNorm folded in
  by `quantize`); they are :class:`QuantizedModule` subclasses, not Bayesian modules, so
  `torchbayes.predict` runs them once per example when they precede the first draw.

The Bayesian modules are :class:`~torchbayes.nn.BayesianModule` subclasses, so
:func:`torchbayes.posterior_mean` / :func:`torchbayes.sampling` switch them and
:func:`torchbayes.predict` vectorizes over them. They hold buffers only (inference
modules): their ``state_dict`` is plain tensors and loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes.nn import noise
from torchbayes.nn.base import BayesianModule
from torchbayes.nn.conv import BayesConv1d, BayesConv2d, BayesConv3d, PaddingMode
from torchbayes.nn.linear import BayesLinear
from torchbayes.nn.vectorized import SampleGroups, _single_position_taps, active_sample_groups
from torchbayes.quantization.kernels import (
    PackedConv,
    PackedLinear,
    QuantizedActivation,
    _dense_view,
    dequantize_per_channel,
    quantize_activation,
    quantize_per_channel,
    quantize_square,
    round_to_int8,
)

__all__ = [
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedLinear",
    "QuantizedModule",
    "QuantizedBayesianModule",
    "QuantizedBayesLinear",
    "QuantizedBayesConv1d",
    "QuantizedBayesConv2d",
    "QuantizedBayesConv3d",
]


# Inputs (elements) up to which a layer keeps its quantization buffers between calls
# (8 bytes per element, per thread: 32 MB at most).
_SCRATCH_MAX_NUMEL = 1 << 22


def batchnorm_affine(batchnorm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(a, c)`` with ``batchnorm(z) = a * z + c`` per channel, for an eval-mode BatchNorm
    with running statistics (the map it applies at inference)."""
    bn: Any = batchnorm
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training:
        raise ValueError("only eval-mode BatchNorm layers with running statistics can be folded")
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("only eval-mode BatchNorm layers with running statistics can be folded")
    a = torch.rsqrt(var.detach().float() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach().float()
    c = -mean.detach().float() * a
    if bn.bias is not None:
        c = c + bn.bias.detach().float()
    return a, c


class _FoldedPosterior:
    """A Bayesian layer's posterior with an eval-mode BatchNorm after it folded in.

    ``a * (W x + b) + c`` with ``W ~ N(mu, sigma^2)``, ``b ~ N(mu_b, sigma_b^2)`` is the
    layer with ``W' ~ N(a mu, (|a| sigma)^2)`` and ``b' ~ N(a mu_b + c, (|a| sigma_b)^2)``:
    the same distribution of outputs, exactly.
    """

    def __init__(self, layer: Any, batchnorm: nn.Module | None) -> None:
        mu, sigma = layer.weight_mu.detach().float(), layer.posterior_sigma("weight").detach().float()
        has_bias = layer.bias_mu is not None
        bias_mu = layer.bias_mu.detach().float() if has_bias else mu.new_zeros(mu.shape[0])
        bias_sigma = layer.posterior_sigma("bias").detach().float() if has_bias else mu.new_zeros(mu.shape[0])
        if batchnorm is not None:
            a, c = batchnorm_affine(batchnorm)
            shape = (-1, *([1] * (mu.dim() - 1)))
            mu, sigma = mu * a.reshape(shape), sigma * a.abs().reshape(shape)
            bias_mu, bias_sigma = bias_mu * a + c, bias_sigma * a.abs()
            has_bias = True
        self.weight_mu, self.weight_sigma, self.bias_mu, self.bias_sigma = mu, sigma, bias_mu, bias_sigma
        self.has_bias = has_bias


class QuantizedModule(nn.Module):
    """Base of every INT8 layer: the input's activation range, calibration and packed caches.

    Attributes:
        input_range: buffer ``(low, high)`` of the calibrated input range, or NaNs when
            each input is quantized over its own range (dynamic quantization).
        fused_relu: the layer applies ``max(., 0)`` to its output inside the INT8 kernel
            (set by :func:`~torchbayes.quantization.quantize` where a ReLU follows it).
    """

    input_range: Tensor
    fused_relu: bool
    #: one opaque call in a traced graph (`torchbayes.prediction.graph`), as a torch.nn layer
    fx_leaf = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fused_relu = False
        self.register_buffer("input_range", torch.full((2,), math.nan))
        # Packed kernels and dequantized copies, rebuilt from the buffers when needed.
        self._cache: dict[Any, Any] = {}
        self._observed: list[float] | None = None

    # ------------------------------------------------------------- calibration
    def start_observing(self) -> None:
        """Record the range of the inputs of the following forward passes (see :meth:`stop_observing`)."""
        self._observed = [math.inf, -math.inf]

    def stop_observing(self) -> None:
        """Fix ``input_range`` to the range observed since :meth:`start_observing` (if any input was seen)."""
        if self._observed is not None and math.isfinite(self._observed[0]):
            self.input_range.copy_(torch.tensor(self._observed))
            self._cache = {}  # derived layers copied the old range
        self._observed = None

    def _quantize_input(self, x: Tensor, buffers: tuple[Tensor, ...] | None = None) -> QuantizedActivation:
        if self._observed is not None:
            low, high = torch.aminmax(_dense_view(x.detach()))
            self._observed = [min(self._observed[0], float(low)), max(self._observed[1], float(high))]
        # The range as Python floats, re-read whenever the buffer changes (its version).
        version, (low, high) = self._cache.get("input_range", (None, (math.nan, math.nan)))
        if version != self.input_range._version:
            low, high = self.input_range.tolist()
            self._cache["input_range"] = (self.input_range._version, (low, high))
        return quantize_activation(x, None if math.isnan(low) else (low, high), buffers)

    # ---------------------------------------------------------------- plumbing
    def _cached(self, key: Any, build: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def _scratch_buffers(self, x: Tensor, groups: SampleGroups | None) -> tuple[Tensor, ...] | None:
        """Float, int16 and two uint8 tensors shaped like ``x`` for the quantized inputs.

        These temporaries never leave a call, and a fresh tensor of a few MB page-faults
        on first touch, which costs more than the pass that fills it: inputs of up to
        ``_SCRATCH_MAX_NUMEL`` elements reuse buffers kept per thread (dropped with the
        thread, or when the module moves or loads), larger ones inside a prediction
        reuse buffers for its passes (``groups.cache``), and others get none.
        """
        if x.numel() <= _SCRATCH_MAX_NUMEL:
            store = self._cached("scratch", threading.local).__dict__
        elif groups is not None:
            store = groups.cache
        else:
            return None
        key = (id(self), "int8_scratch")
        buffers = store.get(key)
        if (
            buffers is None
            or buffers[0].shape != x.shape
            or buffers[0].stride() != x.stride()
            or buffers[0].dtype != x.dtype
            or buffers[0].device != x.device
        ):
            # empty_like keeps x's layout (channels-last activations stay channels-last).
            dtypes = (x.dtype, torch.int16, torch.uint8, torch.uint8)
            buffers = store[key] = tuple(torch.empty_like(x, dtype=dtype) for dtype in dtypes)
        return buffers

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedModule:
        self._cache = {}  # device or dtype moves invalidate packed kernels
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Packed oneDNN tensors have no storage to copy or pickle; they are rebuilt lazily.
        state = dict(super().__getstate__())
        state["_cache"] = {}
        return state

    @classmethod
    def from_float(cls, layer: nn.Module, batchnorm: nn.Module | None = None) -> QuantizedModule:
        """The INT8 twin of the float ``layer`` (with an eval-mode ``batchnorm`` applied to
        its output folded in)."""
        raise NotImplementedError

    def _register_quantized(self, name: str, shape: tuple[int, ...]) -> None:
        self.register_buffer(f"{name}_int8", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer(f"{name}_scale", torch.ones(shape[0]))

    def _dequantized(self, name: str) -> Tensor:
        return self._cached(
            f"float_{name}",
            lambda: dequantize_per_channel(getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale")),
        )


class QuantizedBayesianModule(QuantizedModule, BayesianModule):
    """Base of the INT8 Bayesian layers: quantized posterior buffers that still sample.

    See :class:`QuantizedModule` for ``input_range`` and ``fused_relu``.
    """

    supports_sample_groups = True
    bias_mu: Tensor | None
    bias_sigma: Tensor | None

    def __init__(self, estimator: str) -> None:
        super().__init__(estimator=estimator)

    def kl_divergence(self, reduction: str = "sum") -> Tensor:
        """Not available: quantized layers are for inference; compute the KL on the float model."""
        raise TypeError(
            f"{type(self).__name__} is an INT8 inference layer and has no KL term; "
            "compute the KL (and train) on the float model before quantizing it"
        )

    def _store_posterior(self, name: str, mu: Tensor, second: Tensor, second_name: str) -> None:
        """Quantize a posterior mean and a second moment tensor per output channel into buffers."""
        for suffix, value in (("mu", mu), (second_name, second)):
            q, scale = quantize_per_channel(value.detach().float())
            getattr(self, f"{name}_{suffix}_int8").copy_(q)
            getattr(self, f"{name}_{suffix}_scale").copy_(scale)

    def _store_bias(self, mu: Tensor, sigma: Tensor) -> None:
        """Copy a float posterior of the bias into the bias buffers (registered when bias=True)."""
        assert self.bias_mu is not None and self.bias_sigma is not None
        self.bias_mu.copy_(mu)
        self.bias_sigma.copy_(sigma)

    def _draw_bias(self, g: int) -> Tensor | None:
        """``g`` bias draws ``(g, out)`` from the posterior (kept in float), or ``None``."""
        mu, sigma = self.bias_mu, self.bias_sigma
        if mu is None or sigma is None:
            return None
        eps = noise.randn((g, *mu.shape), mu)
        return torch.addcmul(mu, sigma, eps)


class QuantizedBayesLinear(QuantizedBayesianModule):
    r"""INT8 counterpart of :class:`~torchbayes.nn.BayesLinear` (local reparameterization).

    Build it with :func:`torchbayes.quantization.quantize` (or :meth:`from_float`); the
    constructor makes an empty layer to load a ``state_dict`` into.

    Args:
        in_features: as in :class:`~torchbayes.nn.BayesLinear`.
        out_features: as in :class:`~torchbayes.nn.BayesLinear`.
        bias: as in :class:`~torchbayes.nn.BayesLinear`.

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

    #: Rows per pass for torchbayes.predict: activations of a few MB keep the elementwise
    #: passes around the INT8 products (quantization, noise) in cache.
    preferred_rows_per_pass = 2048
    weight_mu_int8: Tensor
    weight_mu_scale: Tensor
    weight_var_int8: Tensor
    weight_var_scale: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(estimator="local")
        self.in_features, self.out_features = in_features, out_features
        self._register_quantized("weight_mu", (out_features, in_features))
        self._register_quantized("weight_var", (out_features, in_features))
        self.register_buffer("bias_mu", torch.zeros(out_features) if bias else None)
        self.register_buffer("bias_sigma", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, layer: nn.Module, batchnorm: nn.Module | None = None) -> QuantizedBayesLinear:
        """The INT8 layer holding ``layer``'s posterior, quantized per output feature.

        ``batchnorm``: an eval-mode ``nn.BatchNorm1d`` applied to the layer's output, folded
        in (exactly: an affine map of a Gaussian output is Gaussian).
        """
        if not isinstance(layer, BayesLinear):
            raise TypeError(f"{cls.__name__}.from_float: layer must be a BayesLinear, got {type(layer).__name__}")
        fold = _FoldedPosterior(layer, batchnorm)
        new = cls(layer.in_features, layer.out_features, fold.has_bias)
        with torch.no_grad():
            new._store_posterior("weight", fold.weight_mu, fold.weight_sigma.square(), "var")
            if fold.has_bias:
                new._store_bias(fold.bias_mu, fold.bias_sigma)
        new.deterministic = layer.deterministic
        return new

    def _packed(self, name: str) -> PackedLinear:
        return self._cached(
            f"packed_{name}", lambda: PackedLinear(getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale"))
        )

    def _quantize_with_std(self, x: Tensor, groups: SampleGroups | None = None) -> tuple[QuantizedActivation, Tensor]:
        """The quantized input and the output's standard deviation (the variance product).

        ``groups``: the prediction in progress, whose scratch buffers the quantized inputs
        are computed in (only for inputs that are not cached).
        """
        buffers = self._scratch_buffers(x, groups)
        q = self._quantize_input(x, None if buffers is None else buffers[:3])
        abs_max = (max(q.zero_point, 255 - q.zero_point) + 0.5) * q.scale
        bias_var = None if self.bias_sigma is None else self._cached("bias_var", lambda: self.bias_sigma.square())
        x2 = quantize_square(x, abs_max, None if buffers is None else (*buffers[:2], buffers[3]))
        var = self._packed("weight_var")(x2, bias_var)
        return q, var.sqrt_()  # >= 0: non-negative integers times non-negative weights

    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of the output: two INT8 products."""
        q, std = self._quantize_with_std(x)
        return self._packed("weight_mu")(q, self.bias_mu), std

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor) or input.dim() < 1 or input.shape[-1] != self.in_features:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(
                f"{type(self).__name__}: input must have shape (*, in_features={self.in_features}), got {shape}"
            )
        if self.deterministic:
            return self._packed("weight_mu")(self._quantize_input(input), self.bias_mu, relu=self.fused_relu)
        groups = active_sample_groups()
        if groups is None:  # a plain forward: fresh noise for every example
            return self._sample(input, None)
        g = groups.check_batch(self, input)
        if groups.shared_weights or input.dim() != 2:
            # Positions of a sequence (extra dims) share their weight, as in the float layer.
            return self._forward_weight_draws(input, g, groups.is_shared(input))
        if groups.is_shared(input):
            rows = input.shape[0] // g
            mean, std = groups.shared_result(self, input, lambda: self._moments(input[:rows]))
            out = torch.addcmul(mean, std, noise.randn((g, 1, self.out_features), mean))
            out = out.view(input.shape[0], self.out_features)
            return out.clamp_min_(0.0) if self.fused_relu else out
        return self._sample(input, groups)

    def _sample(self, x: Tensor, groups: SampleGroups | None) -> Tensor:
        """``mean + std * eps`` (and the fused ReLU) on an input that is not cached.

        ``eps`` is fresh for every output (outside sample groups), or drawn once per group
        and output unit and shared by the group's examples (see the module docstring):
        ``out_features`` normals per group instead of one per output.
        """
        q, std = self._quantize_with_std(x, groups)
        if groups is None:
            std.mul_(noise.randn(std.shape, std))
        else:
            g = groups.num_groups
            std.view(g, -1, self.out_features).mul_(noise.randn((g, 1, self.out_features), std))
        # The mean product adds itself to std * eps in its output pass.
        return self._packed("weight_mu")(q, self.bias_mu, accumulate=std, relu=self.fused_relu)

    def _forward_weight_draws(self, x: Tensor, g: int, shared: bool) -> Tensor:
        """One weight draw per group, shared by its examples (and positions)."""
        mu = self._dequantized("weight_mu")
        sigma = self._cached("float_weight_sigma", lambda: self._dequantized("weight_var").sqrt())
        # All g draws quantized in one pass; packing is per draw.
        weights = torch.addcmul(mu, sigma, noise.randn((g, *mu.shape), mu))
        q, scale = quantize_per_channel(weights.flatten(0, 1))
        bias = self._draw_bias(g)
        n = x.shape[0] // g
        xq = self._quantize_input(x[:n] if shared else x)
        blocks = [xq.data] * g if shared else xq.data.split(n)
        c = self.out_features
        return torch.cat(
            [
                PackedLinear(q[i * c : (i + 1) * c], scale[i * c : (i + 1) * c])(
                    QuantizedActivation(block, xq.scale, xq.zero_point),
                    None if bias is None else bias[i],
                    relu=self.fused_relu,
                )
                for i, block in enumerate(blocks)
            ]
        )

    def extra_repr(self) -> str:
        relu = ", fused_relu=True" if self.fused_relu else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias_mu is not None}{relu}, {super().extra_repr()}"
        )


# Hyperparameters copied from the float convolution (torch's names and meanings).
_CONV_HYPERPARAMETERS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)
# Drawn kernels are rounded on a fixed grid per output channel that covers |mu| + 6 sigma of
# every weight of the channel: a draw falls outside (and is clamped to the edge) with
# probability 2e-9 per weight, and the grid needs no per-draw range reduction.
_KERNEL_GRID_SIGMAS = 6.0
_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
# Rows per predict pass of the convolutions: output elements per pass aimed at, and bounds.
_CONV_PASS_NUMEL = 1 << 22
_MIN_CONV_ROWS_PER_PASS, _MAX_CONV_ROWS_PER_PASS = 256, 1024
_TORCH_CONVS: dict[int, type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]] = {
    1: nn.Conv1d,
    2: nn.Conv2d,
    3: nn.Conv3d,
}


def _is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also plain contiguous)."""
    layout = _MEMORY_FORMATS.get(x.dim())
    return layout is not None and not x.is_contiguous() and x.is_contiguous(memory_format=layout)


class _ConvGeometry:
    """What the INT8 convolutions (Bayesian or not) share: torch's hyperparameters, input
    checks, explicit padding, packing and the output layout."""

    # Copied from the torch twin (_CONV_HYPERPARAMETERS), with torch's types.
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: PaddingMode
    _reversed_padding_repeated_twice: list[int]
    _num_spatial_dims: int
    #: never a transposed convolution (read by the vectorized one-position rule)
    transposed = False
    #: return outputs channels-last even for a contiguous input (set by ``quantize`` where
    #: nothing downstream can tell the layout apart)
    channels_last_output: bool
    fused_relu: bool

    def _init_geometry(self, d: int, *args: Any, **kwargs: Any) -> tuple[int, ...]:
        """Validate and store torch's hyperparameters of a ``d``-dimensional convolution;
        returns the kernel's shape."""
        # torch's own validation and normalisation of the hyperparameters.
        torch_cls: Any = _TORCH_CONVS[d]
        twin = torch_cls(*args, **kwargs, device="meta")
        for name in _CONV_HYPERPARAMETERS:
            setattr(self, name, getattr(twin, name))
        self._num_spatial_dims = d
        self.channels_last_output = False
        return tuple(twin.weight.shape)

    def _check_conv_input(self, input: Tensor) -> None:
        d = self._num_spatial_dims
        if (
            not isinstance(input, Tensor)
            or input.dim() not in (d + 1, d + 2)
            or input.shape[-(d + 1)] != self.in_channels
        ):
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(
                f"{type(self).__name__}: input must be (N, C={self.in_channels}, ...) with "
                f"{d} spatial dims, or unbatched (C, ...); got {shape}"
            )

    def _prepare_input(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Pad ``x`` explicitly where the INT8 kernel cannot (padding modes, ``"same"``)."""
        d = self._num_spatial_dims
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            if any(self._reversed_padding_repeated_twice):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            return x, (0,) * d
        assert not isinstance(self.padding, str)  # string padding was handled above
        return x, self.padding

    def _packed_conv(self, q: Tensor, scale: Tensor, padding: tuple[int, ...]) -> PackedConv:
        return PackedConv(q, scale, self.stride, padding, self.dilation, self.groups)

    def _keeps_layout(self, input: Tensor) -> bool:
        return self.channels_last_output or _is_channels_last(input)

    def _in_layout(self, out: Tensor, input: Tensor) -> Tensor:
        """``out`` channels-last if allowed (see ``channels_last_output``), else contiguous."""
        return out if self._keeps_layout(input) else out.contiguous()

    def _geometry_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._num_spatial_dims:
            s += f", padding={self.padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.fused_relu:
            s += ", fused_relu=True"
        return s


def _conv_arguments(layer: Any) -> tuple[int, int, Any, Any, Any, Any, int]:
    """A float convolution's constructor arguments (without ``bias``)."""
    return (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
    )


class _QuantizedBayesConvNd(_ConvGeometry, QuantizedBayesianModule):
    """Shared implementation of the INT8 Bayesian convolutions (kernel draws)."""

    _float_cls: type[BayesConv1d] | type[BayesConv2d] | type[BayesConv3d]
    _dims: int
    weight_mu_int8: Tensor
    weight_mu_scale: Tensor
    weight_sigma_int8: Tensor
    weight_sigma_scale: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__(estimator="reparameterization")
        shape = self._init_geometry(
            self._dims,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        self._output_numel_per_row = 0  # of the last output, to size predict's passes
        self._register_quantized("weight_mu", shape)
        self._register_quantized("weight_sigma", shape)
        self.register_buffer("bias_mu", torch.zeros(out_channels) if bias else None)
        self.register_buffer("bias_sigma", torch.zeros(out_channels) if bias else None)

    @classmethod
    def from_float(cls, layer: nn.Module, batchnorm: nn.Module | None = None) -> _QuantizedBayesConvNd:
        """The INT8 layer holding ``layer``'s posterior, quantized per output channel.

        ``batchnorm``: an eval-mode BatchNorm applied to the layer's output, folded into
        the posterior (exactly: an affine map per channel, see ``_FoldedPosterior``).
        """
        if not isinstance(layer, cls._float_cls):
            raise TypeError(
                f"{cls.__name__}.from_float: layer must be a {cls._float_cls.__name__}, got {type(layer).__name__}"
            )
        fold = _FoldedPosterior(layer, batchnorm)
        new = cls(*_conv_arguments(layer), fold.has_bias, layer.padding_mode)
        with torch.no_grad():
            new._store_posterior("weight", fold.weight_mu, fold.weight_sigma, "sigma")
            if fold.has_bias:
                new._store_bias(fold.bias_mu, fold.bias_sigma)
        new.deterministic = layer.deterministic
        return new

    def _kernel_grid(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu / step, sigma / step, step)``: the posterior on the fixed per-channel draw grid."""

        def build() -> tuple[Tensor, Tensor, Tensor]:
            mu, sigma = self._dequantized("weight_mu"), self._dequantized("weight_sigma")
            reach = (mu.abs() + _KERNEL_GRID_SIGMAS * sigma).flatten(1).amax(1)
            step = quantize_per_channel(reach.reshape(-1, 1))[1]  # reach / 127, kept > 0
            shape = (-1, *([1] * (mu.dim() - 1)))
            return mu / step.reshape(shape), sigma / step.reshape(shape), step

        return self._cached("kernel_grid", build)

    def _draw_kernels(self, g: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``g`` kernel draws on the fixed grid: int8 ``(g, *kernel)``, the grid's step
        ``(C_out,)`` and bias draws ``(g, C_out)`` (or ``None``)."""
        mu, sigma, step = self._kernel_grid()
        q = round_to_int8(torch.addcmul(mu, sigma, noise.randn((g, *mu.shape), mu)))
        return q, step, self._draw_bias(g)

    def forward(self, input: Tensor) -> Tensor:
        self._check_conv_input(input)
        if input.dim() == self._num_spatial_dims + 1:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        x, padding = self._prepare_input(input)
        if self.deterministic:
            packed = self._cached(
                "packed_mean", lambda: self._packed_conv(self.weight_mu_int8, self.weight_mu_scale, padding)
            )
            return self._in_layout(packed(self._quantize_input(x), self.bias_mu, relu=self.fused_relu), input)
        groups = active_sample_groups()
        if groups is not None and not groups.shared_weights:
            taps = _single_position_taps(self, input)  # type: ignore[arg-type]
            if taps is not None:
                return self._single_position(input, taps)
        g = 1 if groups is None else groups.check_batch(self, input)
        n = x.shape[0] // g
        # The input is quantized once for all draws (on a shared input, once per prediction).
        if groups is not None and groups.is_shared(input):
            xq = groups.shared_result(self, input, lambda: self._quantize_input(x[:n]))
            blocks = [xq.data] * g
        else:
            buffers = self._scratch_buffers(x, groups)
            xq = self._quantize_input(x, None if buffers is None else buffers[:3])
            blocks = list(xq.data.split(n)) if g > 1 else [xq.data]
        q, step, bias = self._draw_kernels(g)
        outputs = [
            self._packed_conv(q[i], step, padding)(
                QuantizedActivation(block, xq.scale, xq.zero_point),
                None if bias is None else bias[i],
                relu=self.fused_relu,
            )
            for i, block in enumerate(blocks)
        ]
        self._output_numel_per_row = outputs[0][0].numel()
        return self._in_layout(torch.cat(outputs) if g > 1 else outputs[0], input)

    def _single_position(self, x: Tensor, taps: Any) -> Tensor:
        """A convolution whose output has one position, as the linear map it is.

        No kernel is shared between output positions, so local reparameterization is
        exact (as in the float predictor, :mod:`torchbayes.nn.vectorized`): the INT8 linear
        layer of the taps that fall on the input samples its output, with mean and
        variance weights packed once instead of a kernel drawn and packed per sample.
        """
        inputs, kernel_range = taps
        linear = self._cached(("single_position", kernel_range), lambda: self._taps_linear(kernel_range))
        window = (slice(None), slice(None), *inputs)
        patches = x[window].reshape(x.shape[0], -1)
        out = linear(patches)
        self._output_numel_per_row = self.out_channels
        return out.view(x.shape[0], self.out_channels, *([1] * self._num_spatial_dims))

    def _taps_linear(self, kernel_range: tuple[tuple[int, int], ...]) -> QuantizedBayesLinear:
        window = (slice(None), slice(None), *(slice(a, b) for a, b in kernel_range))
        mu_q = self.weight_mu_int8[window].reshape(self.out_channels, -1)
        linear = QuantizedBayesLinear(mu_q.shape[1], self.out_channels, self.bias_mu is not None)
        with torch.no_grad():
            linear.weight_mu_int8.copy_(mu_q)
            linear.weight_mu_scale.copy_(self.weight_mu_scale)
            variance = self._dequantized("weight_sigma")[window].reshape(self.out_channels, -1).square()
            q, scale = quantize_per_channel(variance)
            linear.weight_var_int8.copy_(q)
            linear.weight_var_scale.copy_(scale)
            if self.bias_mu is not None and self.bias_sigma is not None:
                linear._store_bias(self.bias_mu, self.bias_sigma)
            linear.input_range.copy_(self.input_range)  # the taps read a part of this input
        linear.fused_relu = self.fused_relu
        return linear.to(self.weight_mu_int8.device)

    @property
    def preferred_rows_per_pass(self) -> int:
        """Rows per pass for :func:`torchbayes.predict`, sized from the last output seen.

        Passes of up to ~16 MB of output keep the model's own pooling and activations
        in cache; small feature maps (LeNet's) then run 1024 rows at a time, which
        halves the per-pass costs, and large ones (or before any input) 256, as the
        float convolutions do.
        """
        per_row = self._output_numel_per_row
        if not per_row:
            return _MIN_CONV_ROWS_PER_PASS
        return max(_MIN_CONV_ROWS_PER_PASS, min(_MAX_CONV_ROWS_PER_PASS, _CONV_PASS_NUMEL // per_row))

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, {super().extra_repr()}"


def _conv_doc(d: int) -> str:
    return f"""INT8 counterpart of :class:`~torchbayes.nn.BayesConv{d}d`: each draw samples a kernel.

    Each forward pass (each Monte Carlo group inside :func:`torchbayes.predict`) draws a
    kernel ``mu + sigma * eps`` from the dequantized posterior, rounds it on a fixed
    per-output-channel grid and runs an INT8 convolution on the input quantized per
    tensor. Outputs are contiguous, or channels-last where ``channels_last_output`` is
    set or the input is channels-last. Build it
    with :func:`torchbayes.quantization.quantize` (or :meth:`from_float`); the
    constructor (torch's convolution arguments) makes an empty layer to load a
    ``state_dict`` into.

    Attributes:
        weight_mu_int8, weight_mu_scale: posterior means of the kernel, int8 and one
            scale per output channel.
        weight_sigma_int8, weight_sigma_scale: posterior standard deviations, likewise.
        bias_mu, bias_sigma: float32 ``(out_channels,)`` (or ``None``).
        channels_last_output: return channels-last outputs for contiguous inputs too
            (set by :func:`~torchbayes.quantization.quantize` where nothing can notice).

    Shape:
        As ``torch.nn.Conv{d}d``.

    Example:
        >>> qconv = QuantizedBayesConv{d}d.from_float(BayesConv{d}d(3, 8, 3).eval())
        >>> y = qconv(torch.randn(4, 3, {", ".join(["16"] * d)}))
    """


class QuantizedBayesConv1d(_QuantizedBayesConvNd):
    __doc__ = _conv_doc(1)
    _float_cls = BayesConv1d
    _dims = 1


class QuantizedBayesConv2d(_QuantizedBayesConvNd):
    __doc__ = _conv_doc(2)
    _float_cls = BayesConv2d
    _dims = 2


class QuantizedBayesConv3d(_QuantizedBayesConvNd):
    __doc__ = _conv_doc(3)
    _float_cls = BayesConv3d
    _dims = 3


# ------------------------------------------------------------------ deterministic layers
class QuantizedLinear(QuantizedModule):
    """INT8 counterpart of ``torch.nn.Linear`` (a deterministic layer of a Bayesian model).

    The weight is stored per output feature in ``int8``; the input is quantized per
    tensor (over the calibrated ``input_range``, or its own range) and the product runs
    oneDNN's INT8 kernel. Build it with :func:`torchbayes.quantization.quantize`, which
    also folds a following eval-mode ``BatchNorm1d`` and ReLU into it.

    Args:
        in_features, out_features, bias: as in ``torch.nn.Linear``.

    Shape:
        - Input: :math:`(*, H_{in})`; output: :math:`(*, H_{out})`.

    Attributes:
        weight_int8, weight_scale: the weight, int8 ``(out, in)`` and one scale per row.
        bias: float32 ``(out,)`` (or ``None``).

    Example:
        >>> qlayer = QuantizedLinear.from_float(nn.Linear(20, 30))
        >>> qlayer(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    bias: Tensor | None
    weight_int8: Tensor
    weight_scale: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._register_quantized("weight", (out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, layer: nn.Module, batchnorm: nn.Module | None = None) -> QuantizedLinear:
        """The INT8 copy of a ``torch.nn.Linear`` (with ``batchnorm`` after it folded in)."""
        if type(layer) is not nn.Linear:
            raise TypeError(f"{cls.__name__}.from_float: layer must be an nn.Linear, got {type(layer).__name__}")
        weight, bias = _folded_weights(layer, batchnorm)
        new = cls(layer.in_features, layer.out_features, bias is not None)
        new._store(weight, bias)
        return new

    def _store(self, weight: Tensor, bias: Tensor | None) -> None:
        q, scale = quantize_per_channel(weight)
        with torch.no_grad():
            self.weight_int8.copy_(q)
            self.weight_scale.copy_(scale)
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor) or input.dim() < 1 or input.shape[-1] != self.in_features:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(
                f"{type(self).__name__}: input must have shape (*, in_features={self.in_features}), got {shape}"
            )
        packed = self._cached("packed", lambda: PackedLinear(self.weight_int8, self.weight_scale))
        buffers = self._scratch_buffers(input, None)
        q = self._quantize_input(input, None if buffers is None else buffers[:3])
        return packed(q, self.bias, relu=self.fused_relu)

    def extra_repr(self) -> str:
        relu = ", fused_relu=True" if self.fused_relu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{relu}"


def _folded_weights(layer: Any, batchnorm: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    """``layer``'s weight and bias (float32) with an eval-mode BatchNorm after it folded in."""
    weight = layer.weight.detach().float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    if batchnorm is None:
        return weight, bias
    a, c = batchnorm_affine(batchnorm)
    weight = weight * a.reshape(-1, *([1] * (weight.dim() - 1)))
    return weight, c if bias is None else bias * a + c


class _QuantizedConvNd(_ConvGeometry, QuantizedModule):
    """Shared implementation of the deterministic INT8 convolutions."""

    _dims: int
    bias: Tensor | None
    weight_int8: Tensor
    weight_scale: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        shape = self._init_geometry(
            self._dims,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        self._register_quantized("weight", shape)
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    @classmethod
    def from_float(cls, layer: nn.Module, batchnorm: nn.Module | None = None) -> _QuantizedConvNd:
        """The INT8 copy of a ``torch.nn`` convolution (with ``batchnorm`` after it folded in)."""
        if type(layer) is not _TORCH_CONVS[cls._dims]:
            raise TypeError(
                f"{cls.__name__}.from_float: layer must be an nn.Conv{cls._dims}d, got {type(layer).__name__}"
            )
        conv: Any = layer
        weight, bias = _folded_weights(conv, batchnorm)
        new = cls(*_conv_arguments(conv), bias is not None, conv.padding_mode)
        q, scale = quantize_per_channel(weight)
        with torch.no_grad():
            new.weight_int8.copy_(q)
            new.weight_scale.copy_(scale)
            if new.bias is not None and bias is not None:
                new.bias.copy_(bias)
        return new

    def forward(self, input: Tensor) -> Tensor:
        self._check_conv_input(input)
        if input.dim() == self._num_spatial_dims + 1:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        x, padding = self._prepare_input(input)
        packed = self._cached("packed", lambda: self._packed_conv(self.weight_int8, self.weight_scale, padding))
        buffers = self._scratch_buffers(x, active_sample_groups())
        q = self._quantize_input(x, None if buffers is None else buffers[:3])
        return self._in_layout(packed(q, self.bias, relu=self.fused_relu), input)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, bias={self.bias is not None}"


def _plain_conv_doc(d: int) -> str:
    return f"""INT8 counterpart of ``torch.nn.Conv{d}d`` (a deterministic layer of a Bayesian model).

    The kernel is stored per output channel in ``int8``, the input quantized per tensor
    (over the calibrated ``input_range``, or its own range) and the convolution runs
    oneDNN's INT8 kernel. Build it with :func:`torchbayes.quantization.quantize`, which
    also folds a following eval-mode BatchNorm and ReLU into it.

    Attributes:
        weight_int8, weight_scale: the kernel, int8 and one scale per output channel.
        bias: float32 ``(out_channels,)`` (or ``None``).

    Shape:
        As ``torch.nn.Conv{d}d``.

    Example:
        >>> qconv = QuantizedConv{d}d.from_float(nn.Conv{d}d(3, 8, 3))
        >>> y = qconv(torch.randn(4, 3, {", ".join(["16"] * d)}))
    """


class QuantizedConv1d(_QuantizedConvNd):
    __doc__ = _plain_conv_doc(1)
    _dims = 1


class QuantizedConv2d(_QuantizedConvNd):
    __doc__ = _plain_conv_doc(2)
    _dims = 2


class QuantizedConv3d(_QuantizedConvNd):
    __doc__ = _plain_conv_doc(3)
    _dims = 3
