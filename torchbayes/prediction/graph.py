"""A model's ``forward`` as a graph, for prediction methods that need its structure.

Monte Carlo prediction uses it to run deterministic work once per example instead of
once per sample; moment propagation walks it carrying means and variances. Both see
the same graph: :func:`trace` records ``forward`` with :mod:`torch.fx`, keeping every
``torch.nn`` module and every torchbayes Bayesian module as one opaque call (a leaf).

Limits of tracing (symbolic, by torch.fx): control flow that depends on tensor values
or shapes, and calls into non-torch code with tensors, cannot be recorded; :func:`trace`
then raises :class:`TracingError` and callers fall back to their untraced path.

:func:`split_at_random_sources` cuts a traced graph where randomness enters
(:func:`is_random_source`): a *prefix* of everything that does not depend on a draw,
and a *suffix* of everything that does.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchbayes.nn.base import BayesianModule

__all__ = ["SampleSplit", "TracingError", "cached_split", "is_random_source", "split_at_random_sources", "trace"]


class TracingError(RuntimeError):
    """The model's ``forward`` cannot be recorded as a graph."""


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with Bayesian modules (and ``leaves``) kept whole, like ``torch.nn`` modules."""

    def __init__(self, leaves: tuple[type[nn.Module], ...] = ()) -> None:
        super().__init__()
        self.leaves: tuple[type[nn.Module], ...] = (BayesianModule, *leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaves: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """Record ``model.forward`` as a :class:`torch.fx.GraphModule` sharing ``model``'s modules.

    Args:
        model: the module to trace; it is not modified.
        leaves: further module types to keep whole (one ``call_module`` node each), e.g.
            the user modules that have a moment rule.

    Returns:
        A graph module whose ``call_module`` nodes refer to ``model``'s own submodules
        (same objects, so parameters and modes are shared).

    Raises:
        TracingError: when ``forward`` cannot be traced symbolically.

    Example:
        >>> graph = trace(model)
        >>> [n.target for n in graph.graph.nodes if n.op == "call_module"]
    """
    try:
        graph = _LeafTracer(leaves).trace(model)
    except Exception as error:  # torch.fx raises many types (TraceError, TypeError, ...)
        raise TracingError(
            f"{type(model).__name__}.forward cannot be traced with torch.fx: {type(error).__name__}: {error}"
        ) from error
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


# ----------------------------------------------------------------- random sources
_DROPOUT_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
# FractionalMaxPool draws its pooling regions in every forward, in any mode.
_ALWAYS_RANDOM_MODULES = (nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)


def is_random_source(module: nn.Module) -> bool:
    """Whether ``module``'s output is random in its current mode: where sampling enters a model.

    True for a torchbayes Bayesian module not in posterior-mean mode
    (:func:`torchbayes.nn.posterior_mean`), for dropout modules (``nn.Dropout``,
    ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``) and ``nn.RReLU`` in
    training mode (as MC dropout uses them) with a non-zero rate, and for
    ``nn.FractionalMaxPool2d/3d``. Everything a model computes from its input before
    (or beside) its random sources is the same for every Monte Carlo sample.

    Args:
        module: any module (its children are not looked at).

    Returns:
        ``True`` when two calls on the same input may differ.

    Example:
        >>> is_random_source(BayesLinear(4, 2)), is_random_source(nn.Dropout(0.1).eval())
        (True, False)
    """
    if isinstance(module, BayesianModule):
        return not module.deterministic
    if isinstance(module, _DROPOUT_MODULES):
        return module.training and getattr(module, "p", 1.0) != 0
    return isinstance(module, _ALWAYS_RANDOM_MODULES)


# Functions and tensor methods that draw random numbers when a traced forward calls them.
_RANDOM_FUNCTIONS: set[Callable[..., Any]] = {
    torch.rand,
    torch.rand_like,
    torch.randn,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    F.gumbel_softmax,
    F.fractional_max_pool2d,
    F.fractional_max_pool3d,
}
# Dropout-like functions: (position of their ``training`` argument, its default).
_TRAINING_FUNCTIONS: dict[Callable[..., Any], tuple[int, bool]] = {
    F.dropout: (2, True),
    F.dropout1d: (2, True),
    F.dropout2d: (2, True),
    F.dropout3d: (2, True),
    F.alpha_dropout: (2, False),
    F.feature_alpha_dropout: (2, False),
    F.rrelu: (3, False),
    torch.dropout: (2, True),
    torch.alpha_dropout: (2, True),
    torch.feature_dropout: (2, True),
    torch.feature_alpha_dropout: (2, True),
}
_RANDOM_METHODS = {
    "bernoulli",
    "bernoulli_",
    "normal_",
    "uniform_",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "multinomial",
}
# Queries whose answer depends on the number of rows: on a tensor computed once per example
# they must answer what the tiled (samples x examples) tensor would.
_SHAPE_METHODS = {"size", "numel", "nelement"}
# Tensor methods that take only the dtype and device from their tensor, not its values.
_FACTORY_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}


def _is_random_node(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return is_random_source(root.get_submodule(str(node.target)))
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    if node.target in _RANDOM_FUNCTIONS:
        return True
    if node.target in _TRAINING_FUNCTIONS:
        position, default = _TRAINING_FUNCTIONS[node.target]
        training = (
            node.args[position]
            if len(node.args) > position
            else node.kwargs.get("training", node.kwargs.get("train", default))
        )
        return training is not False  # a traced flag is a constant; anything else may be True
    return False


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and bool(
        node.target is torch.numel or (node.target is getattr and len(node.args) > 1 and node.args[1] == "shape")
    )


# ----------------------------------------------------------------- splitting
#: Kinds of values: fixed (parameters, constants), per example (computed from the input
#: only: the same for every sample), per sample (depend on a draw).
CONSTANT, PER_EXAMPLE, PER_SAMPLE = 0, 1, 2


@dataclass
class SampleSplit:
    """A traced model cut where randomness enters (see :func:`split_at_random_sources`).

    Attributes:
        prefix: ``prefix(x) -> tuple`` of the boundary values: everything the suffix
            needs that does not depend on a draw, computed on the untiled batch.
        suffix: ``suffix(*inputs) -> model output``, taking the boundary values with
            every per-example tensor tiled to the samples x examples layout.
        boundary_kinds: per boundary value, ``"constant"`` (passed as is), ``"tile"``
            (a per-example tensor: tiled), or ``"shape"`` (a per-example tensor the suffix
            only asks the shape of: a ``meta`` tensor of the tiled shape stands in).
        trivial: the prefix only passes the input on (the first operation is random):
            nothing is saved, and callers may run the model as it is.
        row_checks: per input signature, whether each ``"tile"``/``"shape"`` value keeps
            the batch in dim 0 (filled by the caller's probe, see ``sampling``).
    """

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    boundary_kinds: tuple[str, ...]
    trivial: bool
    row_checks: dict[Any, bool] = field(default_factory=dict)


def split_at_random_sources(traced: fx.GraphModule) -> SampleSplit:
    """Cut ``traced`` into the part computed once per example and the part computed per sample.

    A node is *per sample* when it is a random source (:func:`is_random_source`, or a
    random function such as ``torch.randn_like`` or active ``F.dropout``), consumes a per-sample
    value, or asks the row count (``x.shape``, ``x.size()``, ``x.numel()``) of a
    per-example tensor: in the tiled batch that count is ``samples x examples``, so the
    question is answered in the suffix, on the tiled shape, and whatever uses the
    answer runs per sample too. Every other node depends on the input and parameters only
    and runs once, in the prefix.

    Args:
        traced: a graph module from :func:`trace`; its first placeholder is the batch.

    Returns:
        A :class:`SampleSplit` sharing ``traced``'s modules.

    Example:
        >>> split = split_at_random_sources(trace(model))
        >>> boundary = split.prefix(x)   # then tile and call split.suffix per pass
    """
    nodes = list(traced.graph.nodes)
    kind: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            kind[node] = PER_EXAMPLE if not kind else CONSTANT  # later arguments keep their defaults
            continue
        if node.op == "get_attr":
            kind[node] = CONSTANT
            continue
        inputs = node.all_input_nodes
        if node.op == "call_method" and node.target in _FACTORY_METHODS:
            inputs = _input_nodes((node.args[1:], node.kwargs))  # the tensor gives dtype and device only
        value = max((kind[n] for n in inputs), default=CONSTANT)
        if _is_random_node(node, traced) or (value == PER_EXAMPLE and _is_shape_query(node)):
            value = PER_SAMPLE
        kind[node] = value
    output = nodes[-1]

    def needed_by_suffix(node: fx.Node) -> bool:
        return any(user is output or kind[user] == PER_SAMPLE for user in node.users)

    boundary = [n for n in nodes if n is not output and kind[n] < PER_SAMPLE and needed_by_suffix(n)]
    kinds = tuple(
        "constant"
        if kind[n] == CONSTANT
        else "shape"
        if all(u is not output and _is_shape_query(u) for u in n.users if u is output or kind[u] == PER_SAMPLE)
        else "tile"
        for n in boundary
    )

    prefix_graph, prefix_env = fx.Graph(), dict[fx.Node, fx.Node]()
    for node in nodes:
        if node is not output and kind[node] < PER_SAMPLE:
            prefix_env[node] = prefix_graph.node_copy(node, lambda n: prefix_env[n])
    prefix_graph.output(tuple(prefix_env[n] for n in boundary))

    suffix_graph, suffix_env = fx.Graph(), dict[fx.Node, fx.Node]()
    for i, node in enumerate(boundary):
        suffix_env[node] = suffix_graph.placeholder(f"boundary_{i}")
    for node in nodes:
        if node is output or kind[node] == PER_SAMPLE:
            suffix_env[node] = suffix_graph.node_copy(node, lambda n: suffix_env[n])

    placeholders = [n for n in nodes if n.op == "placeholder"]
    trivial = (
        len(boundary) == 1
        and boundary[0] is placeholders[0]
        and not any(kind[n] == PER_EXAMPLE for n in nodes if n.op not in ("placeholder", "output"))
    )
    return SampleSplit(
        fx.GraphModule(traced, prefix_graph, class_name="SampleIndependentPrefix"),
        fx.GraphModule(traced, suffix_graph, class_name="PerSampleSuffix"),
        kinds,
        trivial,
    )


def _input_nodes(arguments: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arguments, found.append)
    return found


# ----------------------------------------------------------------- cache
_SCALARS = (int, float, bool, str, type(None))
# model -> (fingerprint, split or the TracingError raised)
_SPLITS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, SampleSplit | TracingError]] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """What a cached trace depends on: the module tree, the modes, the scalar attributes
    (torch.fx bakes the ones ``forward`` reads into the graph) and the hooks."""
    parts: list[Any] = [
        len(torch.nn.modules.module._global_forward_hooks),
        len(torch.nn.modules.module._global_forward_pre_hooks),
    ]
    for name, module in model.named_modules():
        state = module.__dict__
        scalars = tuple(
            (key, value)
            for key, value in state.items()
            if isinstance(value, _SCALARS) or (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value))
        )
        parts.append(
            (
                name,
                id(module),
                type(module),
                state.get("forward"),
                scalars,
                tuple(module._forward_hooks),
                tuple(module._forward_pre_hooks),
            )
        )
    return tuple(parts)


def cached_split(model: nn.Module) -> SampleSplit:
    """:func:`split_at_random_sources` of :func:`trace`, kept (weakly) per model.

    The split is reused while the model's module tree, modes (``training``,
    ``deterministic``), scalar attributes and hooks are unchanged, so repeated
    predictions do not pay for tracing again.

    Raises:
        TracingError: when ``forward`` cannot be traced, or when a module that tracing
            looks inside has forward hooks (the graph would skip them).
    """
    fingerprint = _fingerprint(model)
    entry = _SPLITS.get(model)
    if entry is None or entry[0] != fingerprint:
        try:
            traced = trace(model)
            _check_hooks(model, traced)
            result: SampleSplit | TracingError = split_at_random_sources(traced)
        except TracingError as error:
            result = error
        entry = _SPLITS[model] = (fingerprint, result)
    if isinstance(entry[1], TracingError):
        raise entry[1]
    return entry[1]


def _check_hooks(model: nn.Module, traced: fx.GraphModule) -> None:
    leaves = [str(n.target) for n in traced.graph.nodes if n.op == "call_module"]
    global_hooks = torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
    for name, module in model.named_modules():
        inside_leaf = any(name == leaf or name.startswith(leaf + ".") for leaf in leaves)
        if not inside_leaf and (module._forward_hooks or module._forward_pre_hooks or global_hooks):
            raise TracingError(
                f"{type(model).__name__}: module {name or '(the model)'!r} has forward "
                "hooks, which a traced graph would not call"
            )
