"""Post-training INT8 quantization of a trained Bayesian model: ``quantize`` / ``prepare`` / ``convert``.

The flow copies the model and swaps each supported Bayesian layer for its INT8 twin
(:mod:`torchbayes.quantization.layers`); every other module is kept as it is, in float.
The user's model is never modified.

* ``quantize(model)``: dynamic activation quantization, each input quantized over its
  own range (accurate on any data, nothing to calibrate).
* ``quantize(model, calibration_data)`` or ``prepare`` / run data / ``convert``:
  static activation ranges recorded on representative data, so that an example's
  output does not depend on the other examples of its batch.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from torchbayes.nn.base import iter_bayesian_modules
from torchbayes.nn.conv import BayesConv1d, BayesConv2d, BayesConv3d
from torchbayes.nn.linear import BayesLinear
from torchbayes.quantization.fusion import FusionPlan, plan_fusions
from torchbayes.quantization.layers import (
    QuantizedBayesConv1d,
    QuantizedBayesConv2d,
    QuantizedBayesConv3d,
    QuantizedBayesianModule,
    QuantizedBayesLinear,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedConv3d,
    QuantizedLinear,
    QuantizedModule,
    _ConvGeometry,
)

__all__ = ["DETERMINISTIC_TWINS", "DTYPES", "QUANTIZED_TWINS", "convert", "prepare", "quantize"]

ModelT = TypeVar("ModelT", bound=nn.Module)

#: Values accepted for ``dtype``.
DTYPES: tuple[Any, ...] = ("int8", torch.int8)

#: Float Bayesian layer -> its INT8 twin. Layers not listed (transposed convolutions,
#: recurrent layers, Bayesian-Torch-compatible layers returning ``(out, kl)``) stay in float.
QUANTIZED_TWINS: dict[type[nn.Module], type[QuantizedBayesianModule]] = {
    BayesLinear: QuantizedBayesLinear,
    BayesConv1d: QuantizedBayesConv1d,
    BayesConv2d: QuantizedBayesConv2d,
    BayesConv3d: QuantizedBayesConv3d,
}

#: Deterministic ``torch.nn`` layer -> its INT8 twin (exact classes only: a subclass may
#: read its weight elsewhere, as ``nn.MultiheadAttention``'s output projection is read).
DETERMINISTIC_TWINS: dict[type[nn.Module], type[QuantizedModule]] = {
    nn.Linear: QuantizedLinear,
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
}

# Calibration tensors are run through the model in batches of this many rows.
_CALIBRATION_BATCH = 256

# Modules that compute the same values whatever the memory layout of their input (and pass
# a channels-last layout on), and those that end it: Flatten(1, -1) reshapes, which copies a
# channels-last tensor into the logical order, so nothing after it can tell the difference.
_LAYOUT_AGNOSTIC: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    _ConvGeometry,
)


def _twin(module: nn.Module) -> type[QuantizedBayesianModule] | None:
    """The INT8 twin of a Bayesian ``module``, if its class computes what the float layer computes."""
    for float_cls, twin in QUANTIZED_TWINS.items():
        # A subclass with its own forward (e.g. one returning (out, kl)) is left alone.
        if isinstance(module, float_cls) and type(module).forward is float_cls.forward:
            return twin
    return None


def _any_twin(module: nn.Module, bayesian_only: bool) -> type[QuantizedModule] | None:
    """The INT8 twin of ``module`` (Bayesian, or deterministic unless ``bayesian_only``)."""
    twin = _twin(module)
    if twin is None and not bayesian_only and not module._forward_hooks and not module._forward_pre_hooks:
        return DETERMINISTIC_TWINS.get(type(module))
    return twin


def _check_inference_model(model: nn.Module, dtype: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(dtype == d and type(dtype) is type(d) for d in DTYPES):
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"model is in training mode ({training[0]!r} has training=True): "
            "quantize a trained model for inference; call model.eval() first"
        )


def _check_model(model: nn.Module, dtype: Any) -> None:
    _check_inference_model(model, dtype)
    bayesian = [m for _, m in iter_bayesian_modules(model)]
    if not bayesian:
        raise ValueError(
            "model has no torchbayes Bayesian layers to quantize; convert it first "
            "(torchbayes.dnn_to_bnn) or quantize it with torchao"
        )
    if not any(_twin(m) is not None for m in bayesian):
        kinds = sorted({type(m).__name__ for m in bayesian})
        supported = ", ".join(cls.__name__ for cls in QUANTIZED_TWINS)
        raise ValueError(f"model has no Bayesian layer that can be quantized (found {kinds}; supported: {supported})")


def _swap_layers(model: nn.Module, plan: FusionPlan | None, bayesian_only: bool) -> None:
    """Replace every quantizable layer by its INT8 twin, applying ``plan``'s folds and fusions."""
    plan = plan or FusionPlan()
    swapped: dict[int, nn.Module] = {}  # a layer registered twice gets one twin
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in plan.removable:
                setattr(parent, name, nn.Identity().train(child.training))
                continue
            twin = _any_twin(child, bayesian_only)
            if twin is None:
                continue
            if id(child) not in swapped:
                device = next((t.device for t in child.buffers()), None)
                device = next((t.device for t in child.parameters()), device or torch.device("cpu"))
                new = twin.from_float(child, plan.batchnorm.get(id(child))).to(device).eval()
                new.fused_relu = id(child) in plan.fused_relu
                if isinstance(new, _ConvGeometry):
                    new.channels_last_output = id(child) in plan.channels_last
                swapped[id(child)] = new
            setattr(parent, name, swapped[id(child)])


def _fuse_relus(model: nn.Module) -> None:
    """Fold each ``nn.ReLU`` that directly follows an INT8 layer in an ``nn.Sequential`` into it.

    The layer applies the ReLU inside its INT8 kernel (``fused_relu``) and the ReLU
    module is replaced by ``nn.Identity``: the same values without a separate pass over
    the activations (the fusion PyTorch's own quantization flows perform).
    """
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in itertools.pairwise(names):
            layer, follower = parent._modules[first], parent._modules[second]
            if (
                isinstance(layer, QuantizedModule)
                and not layer.fused_relu
                and type(follower) is nn.ReLU
                and not follower._forward_hooks
                and not follower._forward_pre_hooks
            ):
                layer.fused_relu = True
                parent._modules[second] = nn.Identity().train(follower.training)


def _flattened_before_leaving(followers: list[nn.Module]) -> bool:
    """Whether a tensor fed to ``followers`` (run in order) meets a full Flatten before any
    module that might depend on its memory layout, or the end of the sequence."""
    for module in followers:
        if isinstance(module, nn.Flatten):
            return module.start_dim in (0, 1) and module.end_dim == -1
        if not isinstance(module, _LAYOUT_AGNOSTIC):
            return False
    return False


def _allow_channels_last_outputs(model: nn.Module) -> None:
    """Let INT8 convolutions return oneDNN's channels-last output where no code can notice.

    A convolution in an ``nn.Sequential`` followed only by layout-agnostic modules up to a
    ``Flatten`` of the same sequence hands its layout to nothing but those modules (the
    model's own pooling then runs on channels-last data, several times faster). Anywhere
    else (a custom ``forward`` that might ``.view`` the output) it returns the float
    layer's layout.
    """
    verdicts: dict[int, bool] = {}
    for parent in model.modules():
        children = list(parent.children())
        for i, child in enumerate(children):
            if isinstance(child, _ConvGeometry):
                # A layer used in several places must be safe in all of them.
                safe = isinstance(parent, nn.Sequential) and _flattened_before_leaving(children[i + 1 :])
                verdicts[id(child)] = verdicts.get(id(child), True) and safe
                child.channels_last_output = verdicts[id(child)]


def _quantized_layers(model: nn.Module) -> list[QuantizedModule]:
    return [m for m in model.modules() if isinstance(m, QuantizedModule)]


def prepare(model: nn.Module, *, dtype: Any = "int8", bayesian_only: bool = False) -> nn.Module:
    """A quantized copy of ``model`` that records its layers' input ranges (calibration).

    Run representative data through the result (in eval mode, under
    ``torch.no_grad()``), then call :func:`convert` to fix the recorded ranges.
    The prepared model already predicts, with dynamic activation quantization.

    Args:
        model: a trained model with torchbayes Bayesian layers, in eval mode.
        dtype: ``"int8"`` (the only type supported).
        bayesian_only: quantize only the Bayesian layers; by default the deterministic
            ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers become INT8 too (see `quantize`).

    Returns:
        A new model; ``model`` is unchanged.

    Raises:
        ValueError: ``model`` is in training mode, has no Bayesian layer that can be
            quantized, or ``dtype`` is not supported.

    Example:
        >>> prepared = prepare(model.eval())
        >>> with torch.no_grad():
        ...     for x, _ in calibration_loader:
        ...         prepared(x)
        >>> qmodel = convert(prepared)
    """
    _check_model(model, dtype)
    if not isinstance(bayesian_only, bool):
        raise TypeError(f"bayesian_only must be a bool, got {type(bayesian_only).__name__}")
    prepared = copy.deepcopy(model)
    plan = plan_fusions(prepared, lambda m: _any_twin(m, bayesian_only) is not None)
    _swap_layers(prepared, plan, bayesian_only)
    if plan is None:  # untraceable forward: only nn.Sequential containers show what follows what
        _fuse_relus(prepared)
        _allow_channels_last_outputs(prepared)
    for layer in _quantized_layers(prepared):
        layer.start_observing()
    return prepared


def convert(model: nn.Module, *, dtype: Any = "int8", bayesian_only: bool = False) -> nn.Module:
    """The final INT8 model: from a :func:`prepare` d model (ranges it recorded become
    static) or directly from a float Bayesian model (dynamic activation quantization).

    Args:
        model: a prepared model, or a trained float model in eval mode.
        dtype: ``"int8"``.

    Returns:
        A new model; ``model`` is unchanged.

    Example:
        >>> qmodel = convert(model.eval())   # same as quantize(model)
    """
    if _quantized_layers(model):  # prepared (or already converted)
        _check_inference_model(model, dtype)
        model = copy.deepcopy(model)
    else:
        model = prepare(model, dtype=dtype, bayesian_only=bayesian_only)
    for layer in _quantized_layers(model):
        layer.stop_observing()
    _warn_zero_width_ranges(model)
    return model


def _warn_zero_width_ranges(model: nn.Module) -> None:
    """Warn when calibration gave a layer a single input value: every other input is then
    clipped to it (e.g. all-zero calibration data)."""
    flat = [
        name
        for name, m in model.named_modules()
        if isinstance(m, QuantizedModule)
        and bool(torch.isfinite(m.input_range).all())
        and float(m.input_range[0]) == float(m.input_range[1])
    ]
    if flat:
        warnings.warn(
            f"calibration gave {len(flat)} layer(s) (first: {flat[0]!r}) a zero-width input range "
            "(every calibration input had one value, e.g. all zeros): other inputs will be clipped "
            "to it; calibrate with representative data",
            UserWarning,
            stacklevel=3,
        )


def _calibration_batches(data: Any) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        if data.dim() < 1 or data.shape[0] == 0:
            raise ValueError(f"calibration_data must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
        return data.split(_CALIBRATION_BATCH)
    if isinstance(data, Iterable):
        # A DataLoader or list of batches; (inputs, targets) pairs contribute their inputs.
        return (batch[0] if isinstance(batch, (tuple, list)) else batch for batch in data)
    raise TypeError(
        "calibration_data must be a Tensor (N, ...), an iterable of batches "
        f"(e.g. a DataLoader) or None, got {type(data).__name__}"
    )


def quantize(
    model: ModelT,
    calibration_data: Tensor | Iterable[Any] | None = None,
    *,
    dtype: Any = "int8",
    bayesian_only: bool = False,
) -> nn.Module:
    """Quantize a trained Bayesian model to INT8 for inference; its layers still sample.

    Bayesian linear layers and 1/2/3-d convolutions become INT8 layers
    (`QuantizedBayesLinear`, `QuantizedBayesConv2d`...) whose posterior means and standard
    deviations are quantized per output channel and whose Monte Carlo draws run integer
    kernels; deterministic ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers become static
    INT8 layers (`QuantizedLinear`, `QuantizedConv2d`...), unless ``bayesian_only``.
    Other modules (activations, pooling, transposed convolutions, recurrent layers) stay
    in float. The result works with `torchbayes.predict` (whose prefix split then runs
    the deterministic INT8 part once per example), `torchbayes.posterior_mean` and the
    uncertainty functions.

    The copy is also fused where the model's traced graph shows it is safe
    (`torchbayes.quantization.fusion`): an eval-mode BatchNorm right after a
    convolution is folded into its weights (into its posterior for a Bayesian one,
    exactly), a ReLU right after a layer runs inside its INT8 kernel, and a convolution
    whose output nothing downstream can tell apart by layout returns oneDNN's
    channels-last output. Everywhere else convolutions return contiguous outputs, as the
    float layers do, so code such as ``x.view(x.size(0), -1)`` in a custom ``forward``
    keeps working. A ``forward`` that cannot be traced gets the same fusions inside
    ``nn.Sequential`` containers only.

    Args:
        model: a trained model with torchbayes Bayesian layers, in eval mode
            (``model.eval()``).
        calibration_data: ``None`` for dynamic activation quantization (each input over
            its own range), or representative inputs, a Tensor ``(N, ...)`` or an
            iterable of batches / ``(inputs, targets)`` pairs, to fix static ranges.
        dtype: ``"int8"``.
        bayesian_only: quantize only the Bayesian layers (deterministic ones stay float).

    Returns:
        A new, quantized model in eval mode; ``model`` is unchanged. Save it with
        ``torch.save(qmodel.state_dict(), path)``; load it into
        ``quantize(build_model().eval())`` with ``load_state_dict(torch.load(path,
        weights_only=True))``.

    Raises:
        ValueError: ``model`` is in training mode, has no quantizable Bayesian layer,
            ``dtype`` is unsupported, or ``calibration_data`` does not fit the model.
        TypeError: ``model`` or ``calibration_data`` has the wrong type.

    Example:
        >>> qmodel = quantize(model.eval())
        >>> result = torchbayes.predict(qmodel, images, num_samples=32)
    """
    prepared = prepare(model, dtype=dtype, bayesian_only=bayesian_only)
    if calibration_data is not None:
        seen = 0
        with torch.no_grad():
            for batch in _calibration_batches(calibration_data):
                if not isinstance(batch, Tensor):
                    raise TypeError(f"calibration_data batches must be Tensors, got {type(batch).__name__}")
                if batch.dim() and batch.shape[0] == 0:
                    continue  # nothing to observe (a refused empty input if no batch has rows)
                try:
                    prepared(batch)
                except (RuntimeError, ValueError, TypeError) as error:
                    raise ValueError(
                        f"calibration_data does not fit the model: a batch of shape "
                        f"{tuple(batch.shape)} failed with: {error}"
                    ) from error
                seen += batch.shape[0] if batch.dim() else 1
        if not seen:  # silently falling back to dynamic ranges would hide the mistake
            raise ValueError(
                "calibration_data holds no inputs (an empty iterable or empty batches); "
                "give representative inputs, or None for dynamic activation quantization"
            )
    return convert(prepared, dtype=dtype)
