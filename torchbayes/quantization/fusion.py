"""What :func:`~torchbayes.quantization.quantize` may fold and fuse, read from the model's graph.

INT8 inference pays for every pass over the activations, so the flow removes the passes
that carry no information of their own, as PyTorch's quantization flows do:

* an eval-mode BatchNorm right after a linear or convolution layer (Bayesian or not) is
  an affine map per channel and is folded into the layer's weights (for a Bayesian
  layer, into its posterior: exact in distribution);
* a ReLU right after a layer (or after its folded BatchNorm) runs inside the INT8
  kernel; the ReLU module is removed when the graph calls it only there;
* a convolution returns oneDNN's channels-last output where nothing downstream can tell
  the layout apart (every torch operation computes the same values on either layout;
  only ``view``-like calls may refuse one), so no copy to contiguous memory is made.

The decisions come from :func:`torchbayes.prediction.graph.trace` (torch.fx), which sees
custom ``forward`` methods such as torchvision's residual blocks. They depend only on
the model's structure, never on data, so quantizing a freshly built model of the same
architecture (to load an INT8 ``state_dict`` into) makes the same ones. When ``forward``
cannot be traced, :func:`plan_fusions` returns ``None`` and the flow falls back to what
the ``nn.Sequential`` containers alone show.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchbayes.prediction.graph import TracingError, trace

__all__ = ["FusionPlan", "plan_fusions"]

# ReLU as a module, a function and a method: what a layer's fused_relu computes.
_RELU_FUNCTIONS: set[Callable[..., object]] = {F.relu, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}
# Calls that read a tensor's memory layout (or may refuse a channels-last one).
_LAYOUT_SENSITIVE_METHODS = {
    "view",
    "view_as",
    "stride",
    "is_contiguous",
    "data_ptr",
    "storage",
    "untyped_storage",
    "numpy",
    "unfold",
    "as_strided",
}
# Calls after which the layout no longer shows: they return logically ordered memory.
_FLATTENING_METHODS = {"flatten", "reshape", "contiguous", "tolist", "item"}
_FLATTENING_FUNCTIONS: set[Callable[..., object]] = {torch.flatten, torch.reshape}
# Leaf modules through which a channels-last tensor may flow (values computed per element,
# per channel or per window, whatever the layout).
_LAYOUT_NEUTRAL_MODULES: tuple[type[nn.Module], ...] = (
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
    nn.modules.dropout._DropoutNd,
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
    nn.modules.batchnorm._BatchNorm,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Upsample,
)


@dataclass
class FusionPlan:
    """Folds and fusions for one model, keyed by the ``id`` of its modules.

    Attributes:
        batchnorm: layer -> the BatchNorm module folded into it.
        fused_relu: layers whose output goes through a ReLU first (fused into the kernel).
        removable: BatchNorm and ReLU modules that the graph calls only where they were
            folded or fused: replaced by ``nn.Identity``.
        channels_last: convolutions whose output may stay channels-last.
    """

    batchnorm: dict[int, nn.Module] = field(default_factory=dict)
    fused_relu: set[int] = field(default_factory=set)
    removable: set[int] = field(default_factory=set)
    channels_last: set[int] = field(default_factory=set)


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        return type(module) is nn.ReLU and _no_hooks(module)
    if node.op == "call_method":
        return node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs
    return False


# The BatchNorm that normalizes a convolution's output channels, by its number of spatial dims.
_BATCHNORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _spatial_dims(layer: nn.Module) -> int | None:
    """The number of spatial dims of a (Bayesian or torch) convolution, else ``None``."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return len(layer.kernel_size)
    dims = getattr(layer, "_num_spatial_dims", 0)
    return dims if dims and not getattr(layer, "transposed", False) else None


def _foldable_batchnorm(layer: nn.Module, node: fx.Node, root: nn.Module, calls: Counter) -> nn.Module | None:
    """The BatchNorm module that is ``node``'s only user, if it can be folded into ``layer``.

    Only after convolutions: their output's dim 1 is always the channels the BatchNorm
    normalizes. (After a linear layer it is only for 2-d outputs, which a graph does not show.)
    """
    users = list(node.users)
    dims = _spatial_dims(layer)
    if dims is None or len(users) != 1 or users[0].op != "call_module" or calls[users[0].target] != 1:
        return None
    bn = root.get_submodule(str(users[0].target))
    if (
        type(bn) is not _BATCHNORMS[dims]
        or bn.training
        or getattr(bn, "running_mean", None) is None
        or getattr(bn, "running_var", None) is None
        or getattr(bn, "num_features", None) != getattr(layer, "out_channels", None)
        or not _no_hooks(bn)
    ):
        return None
    return bn


def _flattens(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _FLATTENING_METHODS) or (
        node.op == "call_function" and node.target in _FLATTENING_FUNCTIONS
    )


def _keeps_layout_hidden(
    node: fx.Node, root: nn.Module, is_swapped: Callable[[nn.Module], bool], seen: dict[fx.Node, bool]
) -> bool:
    """Whether every use of ``node``'s value (transitively) computes the same on a
    channels-last tensor: no layout-sensitive call and no return to the caller before a
    flatten or reshape."""
    if node in seen:
        return seen[node]
    seen[node] = True  # a graph is acyclic; this only stops revisits
    ok = True
    for user in node.users:
        if user.op == "output":
            ok = False
        elif _flattens(user):
            continue
        elif user.op == "call_method" and user.target in _LAYOUT_SENSITIVE_METHODS:
            ok = False
        elif user.op == "call_module":
            module = root.get_submodule(str(user.target))
            if isinstance(module, nn.Flatten):
                ok = module.start_dim in (0, 1) and module.end_dim == -1
            elif isinstance(module, _LAYOUT_NEUTRAL_MODULES) or (is_swapped(module) and _spatial_dims(module)):
                # An INT8 convolution keeps a channels-last input's layout.
                ok = _keeps_layout_hidden(user, root, is_swapped, seen)
            elif is_swapped(module):
                continue  # an INT8 linear layer returns contiguous rows
            else:
                ok = False
        elif user.op in ("call_function", "call_method"):
            # Elementwise arithmetic, pooling and activations as functions; getattr
            # (e.g. .shape) reads no memory.
            if user.op == "call_function" and user.target is operator.getitem:
                ok = False  # indexing may feed a view of the memory to user code
            else:
                ok = _keeps_layout_hidden(user, root, is_swapped, seen)
        else:
            ok = False
        if not ok:
            break
    seen[node] = ok
    return ok


def plan_fusions(model: nn.Module, is_swapped: Callable[[nn.Module], bool]) -> FusionPlan | None:
    """The folds and fusions the graph of ``model.forward`` allows, or ``None`` when it
    cannot be traced.

    Args:
        model: the float model about to be quantized (eval mode).
        is_swapped: whether a module will become an INT8 layer.

    Returns:
        A :class:`FusionPlan` keyed by module ids of ``model``.
    """
    try:
        traced = trace(model)
    except TracingError:
        return None
    calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
    plan = FusionPlan()
    for node in traced.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        layer = traced.get_submodule(str(node.target))
        if not is_swapped(layer):
            continue
        tail = node
        bn = _foldable_batchnorm(layer, node, traced, calls)
        if bn is not None:
            plan.batchnorm[id(layer)] = bn
            plan.removable.add(id(bn))
            tail = next(iter(node.users))
        users = list(tail.users)
        if len(users) == 1 and _is_relu(users[0], traced):
            plan.fused_relu.add(id(layer))
            relu = users[0]
            if relu.op == "call_module" and calls[relu.target] == 1:
                plan.removable.add(id(traced.get_submodule(str(relu.target))))
        if _spatial_dims(layer) and _keeps_layout_hidden(tail, traced, is_swapped, {}):
            plan.channels_last.add(id(layer))
    return plan
