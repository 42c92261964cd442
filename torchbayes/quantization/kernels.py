"""INT8 arithmetic: quantizing tensors and running prepacked integer products.

Weights are quantized symmetrically per output channel to ``int8``; activations
asymmetrically per tensor to ``uint8`` (scale and zero point from the tensor's own range,
or from a calibrated range). The products run on oneDNN's x86 INT8 kernels
(``torch.ops.onednn.qlinear_pointwise`` / ``qconv_pointwise`` on a weight prepacked once
by ``qlinear_prepack`` / ``qconv_prepack``): the kernels PyTorch's own x86 INT8 inference
lowers to, which take plain ``int8``/``uint8`` tensors and scales, so no deprecated
quantized-tensor API (``torch.quantize_per_tensor``, ``torch.ao.quantization``) is used.
Where those kernels are missing (a PyTorch built without oneDNN, a non-CPU tensor) the
same quantized values are multiplied in floating point: identical numerics up to
rounding, without the speed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "QuantizedActivation",
    "PackedConv",
    "PackedLinear",
    "dequantize_per_channel",
    "onednn_available",
    "quantize_activation",
    "quantize_per_channel",
    "quantize_square",
    "round_to_int8",
]

# uint8 activations use 254 steps so that the rounded zero point always fits in [0, 255]:
# q = trunc(x / scale + zero_point + 0.5) then lies in [0, 255] without a clamp.
_ACTIVATION_STEPS = 254.0
_WEIGHT_LEVELS = 127.0
# Products with at least this many outputs write into a tensor from PyTorch's allocator.
_ACCUMULATE_MIN_NUMEL = 1 << 16
_TINY = torch.finfo(torch.float32).tiny


def onednn_available() -> bool:
    """Whether PyTorch's oneDNN INT8 kernels (x86 CPUs) can be used."""
    ops = torch.ops.onednn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack", "qconv_pointwise")
    )


_ONEDNN = onednn_available()


@dataclass(frozen=True)
class QuantizedActivation:
    """A ``uint8`` tensor with its per-tensor scale and zero point.

    ``value = (data - zero_point) * scale``.
    """

    data: Tensor
    scale: float
    zero_point: int

    def dequantize(self) -> Tensor:
        """The float values the integers stand for."""
        return (self.data.float() - self.zero_point) * self.scale


def _dense_view(x: Tensor) -> Tensor:
    """``x`` with its dims permuted into memory order where that makes it contiguous.

    Whole-tensor reductions copy a non-contiguous input first; a channels-last
    activation read in memory order needs no copy.
    """
    if x.is_contiguous():
        return x
    strides = x.stride()
    view = x.permute(sorted(range(x.dim()), key=lambda d: -strides[d]))
    return view if view.is_contiguous() else x


def quantize_activation(
    x: Tensor, value_range: tuple[float, float] | None = None, buffers: tuple[Tensor, ...] | None = None
) -> QuantizedActivation:
    """Quantize ``x`` to ``uint8`` with one scale and zero point for the whole tensor.

    Args:
        x: float tensor.
        value_range: ``(low, high)`` to quantize over (values outside are clamped), e.g.
            from calibration; ``None`` uses ``x``'s own minimum and maximum. The range is
            widened to contain 0, so that 0 (padding, ReLU outputs) is exact.
        buffers: optional ``(float, int16, uint8)`` tensors of ``x``'s shape to compute
            in; the result's ``data`` is then the ``uint8`` one (see :func:`quantize_square`).

    Returns:
        A :class:`QuantizedActivation` of ``x``'s shape; the rounding error of each
        element is at most ``scale / 2``.
    """
    x = x.detach()  # integer kernels: no gradients flow through quantization
    if value_range is None:
        low_t, high_t = torch.aminmax(_dense_view(x))
        low, high = low_t.item(), high_t.item()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"cannot quantize an input containing NaN or infinity (range {low}..{high})")
    else:
        low, high = value_range
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / _ACTIVATION_STEPS, _TINY)
    zero_point = round(-low / scale)
    # One fused multiply-add, then truncation (round half up, as all values are >= 0).
    shifted = torch.add(
        torch.full((), zero_point + 0.5, dtype=x.dtype, device=x.device),
        x,
        alpha=1.0 / scale,
        out=None if buffers is None else buffers[0],
    )
    if value_range is not None:  # values outside the calibrated range go to its ends
        shifted.clamp_(zero_point + round(low / scale), zero_point + round(high / scale) + 0.5)
    return QuantizedActivation(_to_uint8(shifted, buffers), scale, zero_point)


def quantize_square(x: Tensor, abs_max: float, buffers: tuple[Tensor, ...] | None = None) -> QuantizedActivation:
    """Quantize ``x * x`` to ``uint8`` (zero point 0) given ``max |x| <= abs_max``, in one pass.

    ``buffers``: optional ``(float, int16, uint8)`` tensors of ``x``'s shape to compute in, e.g.
    kept across calls: a fresh large tensor page-faults on first touch, which costs
    more than the arithmetic.
    """
    x = x.detach()
    scale = max(abs_max * abs_max / _ACTIVATION_STEPS, _TINY)
    half = torch.full((), 0.5, dtype=x.dtype, device=x.device)
    shifted = torch.addcmul(half, x, x, value=1.0 / scale, out=None if buffers is None else buffers[0])
    return QuantizedActivation(_to_uint8(shifted, buffers), scale, 0)


def _to_uint8(shifted: Tensor, buffers: tuple[Tensor, ...] | None) -> Tensor:
    """Truncate ``shifted`` (values in ``[0, 256)``) to ``uint8``.

    Through int16: PyTorch's float-to-int16 and int16-to-uint8 conversions are
    vectorized and together faster than its direct float-to-uint8 one. ``buffers``:
    optional ``(float, int16, uint8)`` tensors of ``shifted``'s shape to convert into.
    """
    if buffers is None:
        return shifted.to(torch.int16).to(torch.uint8)
    return buffers[2].copy_(buffers[1].copy_(shifted))


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric ``int8`` quantization of ``weight`` with one scale per slice of dim 0.

    Args:
        weight: float tensor ``(C_out, ...)``.

    Returns:
        ``(q, scale)``: ``q`` int8 of ``weight``'s shape in ``[-127, 127]`` and ``scale``
        float32 ``(C_out,)``, with ``weight ~= q * scale`` (error at most ``scale / 2``).
    """
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    scale = flat.abs().amax(dim=1).div_(_WEIGHT_LEVELS).clamp_min_(_TINY)
    q = torch.round(flat / scale[:, None]).clamp_(-_WEIGHT_LEVELS, _WEIGHT_LEVELS).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_per_channel(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` with ``scale`` broadcast along dim 0 (float32)."""
    return q.float() * scale.reshape(-1, *([1] * (q.dim() - 1)))


def round_to_int8(t: Tensor) -> Tensor:
    """``t`` (already divided by its scale) rounded to the nearest integer in ``[-127, 127]``, as int8.

    Modifies ``t`` in place (pass a temporary).
    """
    return t.round_().clamp_(-_WEIGHT_LEVELS, _WEIGHT_LEVELS).to(torch.int8)


def _use_onednn(t: Tensor) -> bool:
    return _ONEDNN and t.device.type == "cpu"


@functools.lru_cache(maxsize=64)
def _zero_points(channels: int) -> Tensor:
    """The (all zero) weight zero points oneDNN takes for ``channels`` output channels."""
    return torch.zeros(channels, dtype=torch.long)


class PackedLinear:
    """``y = x W^T + b`` with ``W`` an ``int8`` matrix quantized per output row, packed once.

    Args:
        q: int8 weight ``(N, K)``; ``scale``: float32 ``(N,)``.

    Not a module and never serialized: the owner keeps ``q`` and ``scale`` as buffers
    and rebuilds this after loading.
    """

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        self.scale = scale.float().contiguous()
        self.out_features = q.shape[0]
        if _use_onednn(q):
            self.packed: Tensor = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)
            self.zero_points = _zero_points(q.shape[0])
            self.onednn = True
        else:
            self.packed = dequantize_per_channel(q, self.scale)
            self.onednn = False

    def __call__(
        self, x: QuantizedActivation, bias: Tensor | None, *, accumulate: Tensor | None = None, relu: bool = False
    ) -> Tensor:
        """Float32 ``x W^T + b`` ``(*, N)`` for a quantized input ``(*, K)``.

        Args:
            x: the quantized input.
            bias: float32 ``(N,)`` or ``None``.
            accumulate: a contiguous float32 ``(*, N)`` tensor to add the product to, in
                place (oneDNN's ``sum`` post-op: no separate pass over the output).
            relu: apply ``max(., 0)`` to the result, fused into the kernel.

        Returns:
            The result (``accumulate`` itself when given).
        """
        data = x.data
        lead = data.shape[:-1]
        if not self.onednn:
            out = F.linear(x.dequantize(), self.packed, bias)
            if accumulate is not None:
                out = accumulate.add_(out)
            return out.clamp_min_(0.0) if relu else out
        rows = data if data.dim() == 2 else data.reshape(-1, data.shape[-1])
        post_op = "relu" if relu else "none"
        if accumulate is None and rows.shape[0] * self.out_features >= _ACCUMULATE_MIN_NUMEL:
            # A large output that oneDNN allocates itself page-faults on every call (it is
            # not recycled by PyTorch's allocator); summing into zeros from PyTorch avoids that.
            accumulate = rows.new_zeros((rows.shape[0], self.out_features), dtype=torch.float32)
        if accumulate is None:
            out = torch.ops.onednn.qlinear_pointwise(
                rows,
                x.scale,
                x.zero_point,
                self.packed,
                self.scale,
                self.zero_points,
                bias,
                1.0,
                0,
                torch.float32,
                post_op,
                [],
                "",
            )
        else:
            out = torch.ops.onednn.qlinear_pointwise.binary(
                rows,
                x.scale,
                x.zero_point,
                self.packed,
                self.scale,
                self.zero_points,
                accumulate.view(rows.shape[0], self.out_features),
                bias,
                1.0,
                0,
                torch.float32,
                1.0,
                0,
                "sum",
                1.0,
                post_op,
                [],
                "",
            )
        return out if data.dim() == 2 else out.view(*lead, self.out_features)


class PackedConv:
    """An N-d convolution with an ``int8`` kernel quantized per output channel, packed once.

    Args:
        q: int8 kernel ``(C_out, C_in / groups, *kernel_size)``; ``scale``: ``(C_out,)``.
        stride, padding, dilation: one int per spatial dimension; groups: int.
    """

    def __init__(
        self,
        q: Tensor,
        scale: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> None:
        self.scale = scale.float().contiguous()
        self.args = (list(stride), list(padding), list(dilation), int(groups))
        if _use_onednn(q):
            self.packed: Tensor = torch.ops.onednn.qconv_prepack(q.contiguous(), self.scale, 1.0, 0, *self.args, None)
            self.zero_points = _zero_points(q.shape[0])
            self.onednn = True
        else:
            self.packed = dequantize_per_channel(q, self.scale)
            self.onednn = False
        self._float_conv = (F.conv1d, F.conv2d, F.conv3d)[q.dim() - 3]

    def __call__(self, x: QuantizedActivation, bias: Tensor | None, *, relu: bool = False) -> Tensor:
        """Float32 output ``(N, C_out, ...)`` for a quantized batched input ``(N, C_in, ...)``.

        oneDNN writes it channels-last (``(N, *spatial, C_out)`` in memory) whatever the
        input's layout; the float fallback follows the input's layout. ``relu`` applies
        ``max(., 0)`` to the result, fused into the kernel.
        """
        stride, padding, dilation, groups = self.args
        if not self.onednn:
            out = self._float_conv(x.dequantize(), self.packed, bias, stride, padding, dilation, groups)
            return out.clamp_min_(0.0) if relu else out
        return torch.ops.onednn.qconv_pointwise(
            x.data,
            x.scale,
            x.zero_point,
            self.packed,
            self.scale,
            self.zero_points,
            bias,
            stride,
            padding,
            dilation,
            groups,
            1.0,
            0,
            torch.float32,
            "relu" if relu else "none",
            [],
            None,
        )
