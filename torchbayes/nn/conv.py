"""Bayesian convolutions and transposed convolutions in 1, 2 and 3 dimensions.

One base, :class:`_BayesConvNd`, serves all six layers. Its hyperparameters are
validated and normalised by building the ``torch.nn`` twin on the ``meta`` device, so
every argument means exactly what it means in PyTorch (tuples, ``padding="same"``,
``padding_mode``, ``output_padding``...), and the convolution itself is PyTorch's.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes.nn.base import BayesianWeightLayer
from torchbayes.priors import Prior

# torch's own rule for turning output_size into output_padding. Its annotations say lists
# and a _ConvTransposeNd; it only reads these tuples and attributes, which our layers have.
_torch_output_padding: Any = nn.modules.conv._ConvTransposeNd._output_padding

__all__ = [
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
]

_LOCAL_NOTE = """
    With ``estimator="local"`` this layer is an approximation, not exact: outputs at
    different positions share one kernel, but local reparameterization samples each
    output position independently and so drops their correlation. Marginal means and
    variances per position are exact; joint statistics across positions are not.
"""

# Hyperparameters copied from the torch twin; they keep torch's names and meanings.
_HYPERPARAMETERS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


class _BayesConvNd(BayesianWeightLayer):
    """Shared implementation of the Bayesian (transposed) convolutions."""

    _torch_cls: (
        type[nn.Conv1d]
        | type[nn.Conv2d]
        | type[nn.Conv3d]
        | type[nn.ConvTranspose1d]
        | type[nn.ConvTranspose2d]
        | type[nn.ConvTranspose3d]
    )
    _twin_args: tuple[str, ...] = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )
    # Copied from the torch twin (_HYPERPARAMETERS), with torch's types.
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    padding_mode: PaddingMode
    _reversed_padding_repeated_twice: list[int]

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        output_padding: Any = None,
        prior_mu: float | Tensor = 0.0,
        prior_sigma: float | Tensor = 1.0,
        posterior_mu_init: float = 0.0,
        posterior_rho_init: float = -3.0,
        estimator: str = "reparameterization",
        prior: Prior | None = None,
    ) -> None:
        super().__init__(
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            posterior_mu_init=posterior_mu_init,
            posterior_rho_init=posterior_rho_init,
            estimator=estimator,
            prior=prior,
        )
        extra = {} if output_padding is None else {"output_padding": output_padding}
        twin = self._torch_cls(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device="meta",
            **extra,
        )
        for name in _HYPERPARAMETERS:
            setattr(self, name, getattr(twin, name))
        self._num_spatial_dims = len(twin.kernel_size)
        self._register_weight_and_bias(tuple(twin.weight.shape), (out_channels,) if bias else None, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Means as the ``torch.nn`` twin initialises its weights, then the posterior offsets."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if self.bias_mu is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight_mu)
            bound = 1 / math.sqrt(fan_in) if fan_in != 0 else 0
            nn.init.uniform_(self.bias_mu, -bound, bound)
        self.reset_variational_parameters()

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a Tensor, got {type(input).__name__}")
        d = self._num_spatial_dims
        if input.dim() not in (d + 1, d + 2):
            raise ValueError(
                f"{type(self).__name__}: input must be {d + 2}-D (N, C, ...) or "
                f"{d + 1}-D (C, ...), got shape {tuple(input.shape)}"
            )
        channels = input.shape[-(d + 1)]
        if channels != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input must have in_channels="
                f"{self.in_channels} channels, got {channels} (shape {tuple(input.shape)})"
            )

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # torch's own convolution forward (padding modes included), on our weights.
        return self._torch_cls._conv_forward(self, input, weight, bias)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        defaults = {
            "padding": (0,) * self._num_spatial_dims,
            "dilation": (1,) * self._num_spatial_dims,
            "output_padding": (0,) * self._num_spatial_dims,
            "groups": 1,
        }
        for name, default in defaults.items():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.bias_mu is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return f"{s}, {super().extra_repr()}"


class _BayesConvTransposeNd(_BayesConvNd):
    """Transposed convolutions: ``forward`` also takes torch's ``output_size``."""

    _conv_transpose: Any
    _twin_args = (*_BayesConvNd._twin_args, "output_padding")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: Any = 1,
        padding_mode: PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **bayes: Any,
    ) -> None:
        # torch orders a transposed convolution's arguments differently from a convolution's.
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
            output_padding=output_padding,
            **bayes,
        )

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        self._check_input(input)
        output_padding = _torch_output_padding(
            self,
            input,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            self._num_spatial_dims,
            self.dilation,
        )
        conv_transpose = type(self)._conv_transpose

        def op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return conv_transpose(
                x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
            )

        return self._estimate(input, op)

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return type(self)._conv_transpose(
            input, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )


_OUTPUT_SIZE_NOTE = " (``forward`` accepts its ``output_size``)"


def _conv_doc(name: str, twin: str, d: int, transposed: bool) -> str:
    shape = ", ".join(f"L_{i}" for i in range(d)) if d > 1 else "L"
    return f"""Bayesian counterpart of ``torch.nn.{twin}`` with a Gaussian posterior over kernel and bias.

    Takes every argument of ``torch.nn.{twin}`` with the same meaning, plus the
    keyword-only ``prior_mu``, ``prior_sigma``, ``posterior_mu_init``,
    ``posterior_rho_init``, ``estimator`` and ``prior`` of
    :class:`~torchbayes.nn.BayesianModule`. The posterior parameters are
    ``weight_mu``/``weight_rho`` (shape of the twin's ``weight``) and
    ``bias_mu``/``bias_rho``.
    {_LOCAL_NOTE}
    Shape:
        - Input: :math:`(N, C_{{in}}, {shape})` or :math:`(C_{{in}}, {shape})`.
        - Output: :math:`(N, C_{{out}}, ...)`, exactly as ``torch.nn.{twin}``{_OUTPUT_SIZE_NOTE if transposed else ""}.

    Example:
        >>> layer = {name}(3, 8, 3, estimator="flipout")
        >>> y = layer(torch.randn(4, 3, {", ".join(["16"] * d)}))
    """


# The six layers differ only in the torch twin they mirror.
class BayesConv1d(_BayesConvNd):
    __doc__ = _conv_doc("BayesConv1d", "Conv1d", 1, False)
    _torch_cls = nn.Conv1d


class BayesConv2d(_BayesConvNd):
    __doc__ = _conv_doc("BayesConv2d", "Conv2d", 2, False)
    _torch_cls = nn.Conv2d


class BayesConv3d(_BayesConvNd):
    __doc__ = _conv_doc("BayesConv3d", "Conv3d", 3, False)
    _torch_cls = nn.Conv3d


class BayesConvTranspose1d(_BayesConvTransposeNd):
    __doc__ = _conv_doc("BayesConvTranspose1d", "ConvTranspose1d", 1, True)
    _torch_cls = nn.ConvTranspose1d
    _conv_transpose = staticmethod(F.conv_transpose1d)


class BayesConvTranspose2d(_BayesConvTransposeNd):
    __doc__ = _conv_doc("BayesConvTranspose2d", "ConvTranspose2d", 2, True)
    _torch_cls = nn.ConvTranspose2d
    _conv_transpose = staticmethod(F.conv_transpose2d)


class BayesConvTranspose3d(_BayesConvTransposeNd):
    __doc__ = _conv_doc("BayesConvTranspose3d", "ConvTranspose3d", 3, True)
    _torch_cls = nn.ConvTranspose3d
    _conv_transpose = staticmethod(F.conv_transpose3d)
