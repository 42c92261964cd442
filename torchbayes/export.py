"""Exporting Bayesian models with ``torch.export`` and to ONNX.

Two deployments:

* **posterior mean** (default): :func:`~torchbayes.conversion.bnn_to_dnn` turns the model
  into a plain ``torch.nn`` network whose weights are the posterior means; it exports like
  any network and runs at deterministic speed.
* **stochastic** (``stochastic=True``): the Bayesian layers themselves are exported, so
  the graph holds ``mu``, ``rho`` and the sampling ops, and every call of the exported
  program draws ONE new Monte Carlo sample (reparameterization, flipout or local, as
  each layer is configured). Run it ``S`` times for predictive uncertainty. In ONNX the
  draws are ``RandomNormalLike`` / ``RandomUniformLike`` nodes, which ONNX Runtime reseeds
  on every run.

Both export in ``eval()`` mode (BatchNorm statistics, no dropout), without autograd, and
with a dynamic batch dimension unless ``dynamic_batch=False``. The model passed in is
never modified.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.conversion import bnn_to_dnn
from torchbayes.nn.base import iter_bayesian_modules
from torchbayes.nn.mode import sampling
from torchbayes.validation import check_flag

__all__ = ["deployable_model", "export_program", "export_onnx"]


def deployable_model(model: nn.Module, *, stochastic: bool = False) -> nn.Module:
    """The module that :func:`export_program` and :func:`export_onnx` trace, in eval mode.

    Args:
        model: a model containing torchbayes Bayesian layers.
        stochastic: ``False``: a plain ``torch.nn`` copy with the posterior means
            (:func:`~torchbayes.conversion.bnn_to_dnn`). ``True``: a copy of the Bayesian
            model with every layer sampling (one draw per call).

    Returns:
        A new module; ``model`` is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not check_flag("stochastic", stochastic):
        return bnn_to_dnn(model).eval()
    if next(iter_bayesian_modules(model), None) is None:
        raise ValueError(f"stochastic export needs Bayesian layers; {type(model).__name__} has none")
    deployed = copy.deepcopy(model).eval()
    sampling(deployed)
    return deployed


def _as_args(example_inputs: Tensor | tuple[Any, ...]) -> tuple[Any, ...]:
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args:
        raise ValueError("example_inputs must be a Tensor or a non-empty tuple of inputs")
    return args


def _batch_shapes(args: tuple[Any, ...], dynamic_batch: bool) -> tuple[Any, ...] | None:
    if not check_flag("dynamic_batch", dynamic_batch):
        return None
    batch = torch.export.Dim("batch")
    for a in args:
        if isinstance(a, Tensor) and (a.dim() == 0 or a.shape[0] < 2):
            # torch.export specialises a size-1 dimension to the constant 1.
            raise ValueError(
                "with dynamic_batch=True every tensor in example_inputs needs a batch "
                f"dimension of size >= 2, got shape {tuple(a.shape)}"
            )
    return tuple({0: batch} if isinstance(a, Tensor) else None for a in args)


def export_program(
    model: nn.Module, example_inputs: Tensor | tuple[Any, ...], *, stochastic: bool = False, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` a Bayesian model for deployment.

    Args:
        model: a model containing torchbayes Bayesian layers (not modified).
        example_inputs: an input tensor, or a tuple of the forward's positional inputs.
        stochastic: export the sampling model (one draw per call) instead of the
            posterior-mean network; see the module docstring.
        dynamic_batch: let dimension 0 of every tensor input vary (all inputs share it).

    Returns:
        The ``ExportedProgram``; ``program.module()(x)`` runs it, ``torch.export.save``
        stores it.

    Example:
        >>> program = export_program(bnn, torch.randn(8, 1, 28, 28), stochastic=True)
        >>> draws = torch.stack([program.module()(x) for _ in range(30)])
    """
    args = _as_args(example_inputs)
    deployed = deployable_model(model, stochastic=stochastic)
    with torch.no_grad():
        return torch.export.export(deployed, args, dynamic_shapes=_batch_shapes(args, dynamic_batch))


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...],
    path: str | os.PathLike[str],
    *,
    stochastic: bool = False,
    dynamic_batch: bool = True,
) -> torch.onnx.ONNXProgram:
    """Export a Bayesian model to an ONNX file (``torch.onnx.export(..., dynamo=True)``).

    Args:
        model: a model containing torchbayes Bayesian layers (not modified).
        example_inputs: an input tensor, or a tuple of the forward's positional inputs.
        path: the ``.onnx`` file to write.
        stochastic: export the sampling model (one draw per run of the ONNX graph).
        dynamic_batch: let dimension 0 of every tensor input vary.

    Returns:
        The ``torch.onnx.ONNXProgram`` (already saved to ``path``).

    Example:
        >>> export_onnx(bnn, x, "bnn.onnx")
        >>> session = onnxruntime.InferenceSession("bnn.onnx")
        >>> mean_prediction = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    """
    args = _as_args(example_inputs)
    deployed = deployable_model(model, stochastic=stochastic)
    with torch.no_grad():
        program = torch.onnx.export(
            deployed, args, dynamo=True, verbose=False, dynamic_shapes=_batch_shapes(args, dynamic_batch)
        )
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise RuntimeError("export_onnx: torch.onnx.export returned no ONNXProgram")
    program.save(os.fspath(path))
    return program
