"""Bayesian-Torch's ``(x, kl)``-passing wrappers of batch norm, ReLU and dropout.

Reference model files chain layers as ``x, kl = layer(x)``; these wrappers accept such
a pair, apply the ``torch.nn`` layer to ``x`` and return ``(out, 0)`` as the reference
does (the incoming KL is dropped there too). A plain tensor gives a plain tensor.
The reference's ``BatchNorm2dLayer`` decides by ``len(input) == 2``, which mistakes a
batch of two images for a pair; here a pair is a ``tuple``/``list`` whose first item is a
tensor. Parameters, buffers and state-dict keys are those of the ``torch.nn`` layers
(and the reference's), but batch-norm weights start at 1 as in ``torch.nn`` (the
reference draws them from U(0, 1)).
"""

from __future__ import annotations

from typing import Any, overload

from torch import Tensor, nn

__all__ = ["BatchNorm1dLayer", "BatchNorm2dLayer", "BatchNorm3dLayer", "ReLU", "Dropout"]


def _unpack(input: Any, owner: str) -> tuple[Tensor, bool]:
    """``(tensor, was_a_pair)`` for an ``(x, kl)`` pair or a tensor; else a clear error."""
    if isinstance(input, Tensor):
        return input, False
    if isinstance(input, (tuple, list)) and len(input) == 2 and isinstance(input[0], Tensor):
        return input[0], True
    raise TypeError(f"{owner}: input must be a Tensor or an (x, kl) pair with a Tensor x, got {type(input).__name__}")


class _TuplePassing(nn.Module):
    @overload
    def forward(self, input: Tensor) -> Tensor: ...

    @overload
    def forward(self, input: tuple[Tensor, Any] | list[Any]) -> tuple[Tensor, int]: ...

    def forward(self, input: Tensor | tuple[Tensor, Any] | list[Any]) -> Tensor | tuple[Tensor, int]:
        """Apply the ``torch.nn`` layer to ``x``; return ``(out, 0)`` for a pair, ``out`` for a tensor."""
        x, pair = _unpack(input, type(self).__name__)
        out = super().forward(x)
        return (out, 0) if pair else out


class BatchNorm1dLayer(_TuplePassing, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` taking and returning ``(x, kl)`` pairs (reference name).

    Example:
        >>> x, kl = BatchNorm1dLayer(8)((torch.randn(4, 8, 5), 0.0))
    """


class BatchNorm2dLayer(_TuplePassing, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` taking and returning ``(x, kl)`` pairs (reference name).

    Example:
        >>> x, kl = BatchNorm2dLayer(8)((torch.randn(4, 8, 5, 5), 0.0))
    """


class BatchNorm3dLayer(_TuplePassing, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` taking and returning ``(x, kl)`` pairs (reference name).

    Example:
        >>> x, kl = BatchNorm3dLayer(8)((torch.randn(4, 8, 3, 5, 5), 0.0))
    """


class ReLU(_TuplePassing, nn.ReLU):
    """``torch.nn.ReLU`` taking and returning ``(x, kl)`` pairs (the reference's ``layers.ReLU``).

    Example:
        >>> x, kl = ReLU()((torch.randn(4, 8), 0.0))
    """


class Dropout(_TuplePassing, nn.Dropout):
    """``torch.nn.Dropout`` taking and returning ``(x, kl)`` pairs (the reference's ``layers.Dropout``).

    Example:
        >>> x, kl = Dropout(0.5)((torch.randn(4, 8), 0.0))
    """
