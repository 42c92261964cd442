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

import functools
import operator
import pickle
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from torchbayes.nn.base import BayesianModule

__all__ = [
    "SampleSplit",
    "TracingError",
    "WholeModel",
    "cached_split",
    "is_random_source",
    "split_at_random_sources",
    "trace",
]


class TracingError(RuntimeError):
    """The model's ``forward`` cannot be recorded as a graph."""


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with Bayesian modules (and ``leaves``) kept whole, like ``torch.nn`` modules.

    So are modules whose class sets ``fx_leaf = True``: layers like ``torch.nn``'s, whose
    ``forward`` checks its input in Python (the INT8 layers of `torchbayes.quantization`).
    """

    def __init__(self, leaves: tuple[type[nn.Module], ...] = ()) -> None:
        super().__init__()
        self.leaves: tuple[type[nn.Module], ...] = (BayesianModule, *leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaves)
            or getattr(type(m), "fx_leaf", False) is True
            or super().is_leaf_module(m, module_qualified_name)
        )


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


# ----------------------------------------------------------------- random functions
# Functions that draw random numbers shaped like their tensor arguments (one value per
# element or row): in the tiled batch, every sample x example row gets its own draw.
_DRAWS_LIKE_ARGUMENT: set[Callable[..., Any]] = {
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.bernoulli,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    torch.binomial,
    F.gumbel_softmax,
    F.fractional_max_pool2d,
    F.fractional_max_pool3d,
}
# Functions that draw a size given in numbers: the same draw for every row of a tiled pass.
_DRAWS_OF_GIVEN_SIZE: set[Callable[..., Any]] = {torch.rand, torch.randn, torch.randint, torch.randperm}
# Dropout-like functions: (position of their ``training`` argument, its default).
_TRAINING_FUNCTIONS: dict[Callable[..., Any], tuple[int, bool]] = {
    F.dropout: (2, True),
    F.dropout1d: (2, True),
    F.dropout2d: (2, True),
    F.dropout3d: (2, True),
    F.alpha_dropout: (2, False),
    F.feature_alpha_dropout: (2, False),
    F.rrelu: (3, False),
    F.rrelu_: (3, False),
    torch.dropout: (2, True),
    torch.alpha_dropout: (2, True),
    torch.feature_dropout: (2, True),
    torch.feature_alpha_dropout: (2, True),
}
# Functions random only with a non-zero dropout rate: (position of the rate, its keyword).
_DROPOUT_RATE_FUNCTIONS: dict[Callable[..., Any], tuple[int, str]] = {F.scaled_dot_product_attention: (4, "dropout_p")}
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


@functools.cache
def _seeded_aten_op(name: str) -> bool:
    """Whether an ATen operator of this name draws random numbers (PyTorch tags those
    ``nondeterministic_seeded``): the rule for functions and methods not listed above.
    Attention and recurrent kernels, random only through a dropout rate, are left to
    their explicit entries."""
    if not name or any(word in name for word in ("attention", "lstm", "gru", "rnn")):
        return False
    try:
        packet = getattr(torch.ops.aten, name)
        return any(torch.Tag.nondeterministic_seeded in getattr(packet, o).tags for o in packet.overloads())
    except Exception:  # not an ATen operator
        return False


def _is_random_node(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":  # a leaf is random if anything it runs is (MC dropout inside nn.Transformer...)
        return any(is_random_source(m) for m in root.get_submodule(str(node.target)).modules())
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS or _seeded_aten_op(str(node.target))
    if node.op != "call_function":
        return False
    if node.target in _TRAINING_FUNCTIONS:
        position, default = _TRAINING_FUNCTIONS[node.target]
        training = _argument(node, position, ("training", "train"), default)
        return training is not False  # a traced flag is a constant; anything else may be True
    if node.target in _DROPOUT_RATE_FUNCTIONS:
        position, keyword = _DROPOUT_RATE_FUNCTIONS[node.target]
        return _argument(node, position, (keyword,), 0.0) not in (0, 0.0)
    if node.target in _DRAWS_LIKE_ARGUMENT or node.target in _DRAWS_OF_GIVEN_SIZE:
        return True
    return getattr(node.target, "__module__", None) in _TORCH_NAMESPACES and _seeded_aten_op(
        getattr(node.target, "__name__", "")
    )


_TORCH_NAMESPACES = {"torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions"}


def _argument(node: fx.Node, position: int, keywords: tuple[str, ...], default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return next((node.kwargs[k] for k in keywords if k in node.kwargs), default)


def _draws_per_row(node: fx.Node, kind: dict[fx.Node, int], root: nn.Module) -> bool:
    """Whether a random node draws separately for every row of the batch it is given, as
    the tiled batch needs (each sample x example row its own draw). True when its draw is
    shaped by a value that depends on the input: a Bayesian layer or dropout applied to
    activations, ``torch.randn_like(h)``, ``F.dropout(h)``, ``h.bernoulli()``. False for a
    draw shaped by a parameter or constant (DropConnect ``F.dropout(self.weight)``,
    ``torch.bernoulli(self.p)``) or by numbers (``torch.randn(8)``): one draw would be
    shared by all samples of a pass."""
    if node.target in _DRAWS_OF_GIVEN_SIZE:
        return False
    if node.op in ("call_module", "call_method"):
        shaping = [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    else:
        shaping = node.all_input_nodes
    return any(kind[n] >= PER_EXAMPLE for n in shaping)


# ----------------------------------------------------------------- queries and in-place ops
# Queries whose answer depends on the number of rows: the prefix answers them for its
# untiled batch; the suffix asks them again on the tiled values.
_SHAPE_METHODS = {"size", "numel", "nelement"}
# Queries whose answer is the same for the untiled and the tiled batch.
_ROW_FREE_ATTRIBUTES = {"dtype", "device", "ndim", "layout", "is_cuda"}
_ROW_FREE_METHODS = {"dim", "ndimension", "is_floating_point", "is_complex", "get_device"}
# Tensor methods that take only the dtype and device from their tensor, not its values.
_FACTORY_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}
_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.imatmul,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.setitem,
}
# Operations whose result never shares memory with their arguments (the rest may be views).
_FRESH_FUNCTIONS: set[Callable[..., Any]] = {
    *(getattr(operator, name) for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul")),
    *(getattr(operator, name) for name in ("neg", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor")),
    torch.cat,
    torch.stack,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.matmul,
    torch.bmm,
    torch.einsum,
    torch.where,
    torch.tanh,
    torch.sigmoid,
    torch.exp,
    torch.softmax,
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.softmax,
    F.log_softmax,
    F.gelu,
    F.layer_norm,
    F.scaled_dot_product_attention,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "pow", "softmax", "log_softmax", "exp", "tanh", "sigmoid"}
_FRESH_METHODS |= {"sum", "mean", "clone", *_FACTORY_METHODS}
# Modules whose output may be their input or a view of it.
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and bool(
        node.target is torch.numel or (node.target is getattr and len(node.args) > 1 and node.args[1] == "shape")
    )


def _is_row_free_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _ROW_FREE_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in _ROW_FREE_ATTRIBUTES
    )


def _mutated(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The values ``node`` writes into in place (``h.add_(1)``, ``F.relu(h, inplace=True)``,
    ``nn.ReLU(inplace=True)``, ``out=``, ``h[i] = v``)."""
    first = [a for a in (*node.args[:1], *node.kwargs.values())[:1] if isinstance(a, fx.Node)]
    if node.op == "call_module":
        return first if getattr(root.get_submodule(str(node.target)), "inplace", False) is True else []
    if node.op not in ("call_method", "call_function"):
        return []
    if "out" in node.kwargs:
        return _input_nodes(node.kwargs["out"])
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return first
    return first if name.endswith("_") and not name.startswith("__") else []


def _aliased_inputs(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The inputs whose memory ``node``'s result may share (conservatively: all of them for
    a function not known to return a fresh tensor)."""
    mutated = _mutated(node, root)
    if mutated or _is_shape_query(node) or _is_row_free_query(node):
        return mutated
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        view = isinstance(module, _VIEW_MODULES) and not is_random_source(module)
        return [node.args[0]] if view and node.args and isinstance(node.args[0], fx.Node) else []
    if node.op == "call_method":
        if node.target in _FRESH_METHODS:
            return []
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    if node.op == "call_function" and node.target not in _FRESH_FUNCTIONS:
        if node.target is operator.getitem:
            return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
        return node.all_input_nodes
    return []


# ----------------------------------------------------------------- splitting
#: Kinds of values: fixed (parameters, constants, row-free queries such as ``x.dtype``),
#: shape-derived (computed from row counts and constants only, e.g. ``x.shape[0]``,
#: ``token.expand(n, -1, -1)``: recomputed wherever used), per example (computed from the
#: input: the same for every sample), per sample (depend on a draw).
CONSTANT, SHAPED, PER_EXAMPLE, PER_SAMPLE = 0, 1, 2, 3


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
            only asks the shape, dtype or device of: a stand-in of the tiled shape without
            memory is passed).
        boundary_names: per boundary value, the name of its node in the traced graph.
        row_checks: per input signature, ``None`` when every ``"tile"``/``"shape"`` value
            keeps the batch in dim 0, else why not (filled by the caller's probe, see
            ``sampling``).
    """

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    boundary_kinds: tuple[str, ...]
    boundary_names: tuple[str, ...]
    row_checks: dict[Any, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class WholeModel:
    """Why a model is not split: every Monte Carlo pass runs the whole model.

    Attributes:
        reason: one sentence for the user (``torchbayes.prediction.whole_model_reason``).
        one_sample_per_pass: the model draws randomness that a tiled batch would share
            between samples (Python's ``random``, ``torch.randn(8)``, a hook), so each pass
            must carry a single sample: the plain per-sample loop.
    """

    reason: str
    one_sample_per_pass: bool = False


def split_at_random_sources(traced: fx.GraphModule) -> SampleSplit | WholeModel:
    """Cut ``traced`` into the part computed once per example and the part computed per sample.

    A node is *per sample* when it is a random source (:func:`is_random_source`, or a
    random function such as ``torch.randn_like`` or active ``F.dropout``) or consumes a
    per-sample value. Every other node depends on the input and parameters only and runs
    once, in the prefix, on the B examples. Shape queries (``x.shape[0]``, ``x.size(0)``,
    ``x.numel()``) and what is computed from their answers alone (``n * 2``,
    ``token.expand(n, -1, -1)``) are answered where they are used: the prefix uses its
    untiled row count, and a value the suffix needs is recomputed there, on the tiled
    shape of the boundary tensor it came from.

    The cut is refused (a :class:`WholeModel` says why) when it would not be exact: a random
    draw not made per row (shaped by a parameter or given sizes: one sample per pass then),
    an in-place write into the input, a parameter or a shape-derived value, an in-place
    write by the per-sample part into a value computed once, or an in-place write by the
    prefix into a value the per-sample part read before it (the prefix runs first).

    Args:
        traced: a graph module from :func:`trace`; its first placeholder is the batch.

    Returns:
        A :class:`SampleSplit` sharing ``traced``'s modules, or a :class:`WholeModel`.

    Example:
        >>> split = split_at_random_sources(trace(model))
        >>> boundary = split.prefix(x)   # then tile and call split.suffix per pass
    """
    nodes = list(traced.graph.nodes)
    output = nodes[-1]
    kind = _classify(traced, nodes)
    # The suffix: per-sample nodes, the output, and the shape-derived values they need.
    suffix_side = {n for n in nodes if n is output or kind[n] == PER_SAMPLE}
    pending = list(suffix_side)
    while pending:
        for n in pending.pop().all_input_nodes:
            if kind[n] == SHAPED and n not in suffix_side:
                suffix_side.add(n)
                pending.append(n)
    refusal = _refusal(traced, nodes, kind, suffix_side)
    if refusal is not None:
        return refusal
    placeholders = [n for n in nodes if n.op == "placeholder"]
    boundary = [n for n in nodes if n not in suffix_side and any(u in suffix_side for u in n.users)]
    if boundary == placeholders[:1] and not any(kind.get(n) == PER_EXAMPLE for n in nodes[1:]):
        return WholeModel("its first operation is random (nothing before a draw to run once)")

    def stand_in_suffices(node: fx.Node) -> bool:  # the suffix reads only its shape, dtype, device
        return all(
            _is_shape_query(u) or _is_row_free_query(u) or (u.op == "call_method" and u.target in _FACTORY_METHODS)
            for u in node.users
            if u in suffix_side
        ) and not any(u is output or (u.target in _FACTORY_METHODS and node in u.args[1:]) for u in node.users)

    kinds = tuple("constant" if kind[n] == CONSTANT else "shape" if stand_in_suffices(n) else "tile" for n in boundary)

    prefix_graph, prefix_env = fx.Graph(), dict[fx.Node, fx.Node]()
    for node in nodes:
        if node is not output and kind[node] < PER_SAMPLE:
            prefix_env[node] = prefix_graph.node_copy(node, lambda n: prefix_env[n])
    prefix_graph.output(tuple(prefix_env[n] for n in boundary))

    suffix_graph, suffix_env = fx.Graph(), dict[fx.Node, fx.Node]()
    for i, node in enumerate(boundary):
        suffix_env[node] = suffix_graph.placeholder(f"boundary_{i}")
    for node in nodes:
        if node in suffix_side:
            suffix_env[node] = suffix_graph.node_copy(node, lambda n: suffix_env[n])
    return SampleSplit(
        fx.GraphModule(traced, prefix_graph, class_name="SampleIndependentPrefix"),
        fx.GraphModule(traced, suffix_graph, class_name="PerSampleSuffix"),
        kinds,
        tuple(n.name for n in boundary),
    )


def _classify(traced: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, int]:
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
        factory = node.op == "call_method" and node.target in _FACTORY_METHODS
        if factory:  # the tensor gives dtype and device only
            inputs = _input_nodes((node.args[1:], node.kwargs))
        value = max((kind[n] for n in inputs), default=CONSTANT)
        if _is_random_node(node, traced) or (factory and kind[node.args[0]] == PER_SAMPLE):  # type: ignore[index]
            value = PER_SAMPLE
        elif value == PER_EXAMPLE and _is_shape_query(node):
            value = SHAPED
        elif value == PER_EXAMPLE and _is_row_free_query(node):
            value = CONSTANT
        kind[node] = value
    return kind


def _refusal(
    traced: fx.GraphModule, nodes: list[fx.Node], kind: dict[fx.Node, int], suffix_side: set[fx.Node]
) -> WholeModel | None:
    """Why cutting ``traced`` at ``suffix_side`` would change the samples, or ``None``."""
    for node in nodes:
        random_node = node.op != "output" and kind[node] == PER_SAMPLE and _is_random_node(node, traced)
        if random_node and not _draws_per_row(node, kind, traced):
            return WholeModel(
                f"{_describe(node)} draws random numbers shaped by a parameter, a constant or given sizes, "
                "which one pass would share between samples",
                one_sample_per_pass=True,
            )
    # May-alias classes (union-find): a write into one member changes them all.
    parent = {n: n for n in nodes}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in nodes:
        for other in _aliased_inputs(node, traced):
            parent[root(node)] = root(other)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        members.setdefault(root(node), []).append(node)
    position = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        for target in _mutated(node, traced):
            alias = members[root(target)]
            what = f"{_describe(node)} writes in place into"
            if any(n.op == "placeholder" or kind[n] in (CONSTANT, SHAPED) for n in alias):
                return WholeModel(f"{what} the input, a parameter, a constant or a shape-derived value")
            if node in suffix_side:
                if any(kind[n] < PER_SAMPLE for n in alias):
                    return WholeModel(f"{what} a value that does not depend on a draw (computed once)")
            elif any(position[u] < position[node] and set(u.all_input_nodes) & set(alias) for u in suffix_side):
                return WholeModel(f"{what} a value that a per-sample operation reads before it")
    return None


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return {"call_module": f"module {target!r}", "call_method": f"method .{target}()"}.get(node.op, f"{target}()")


def _input_nodes(arguments: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arguments, found.append)
    return found


# ----------------------------------------------------------------- what a traced graph cannot see
def _random_state_handles(model: nn.Module) -> list[tuple[Callable[[], Any], Callable[[Any], Any]]]:
    """(get, set) of every random state ``forward`` may draw from: torch's, Python's and
    NumPy's global generators, and the generators the model's modules hold."""
    handles: list[tuple[Callable[[], Any], Callable[[Any], Any]]] = [
        (torch.get_rng_state, torch.set_rng_state),
        (random.getstate, random.setstate),
        (np.random.get_state, np.random.set_state),
    ]
    if torch.cuda.is_initialized():
        handles.append((torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all))
    for module in model.modules():
        for value in list(vars(module).values()):
            if isinstance(value, torch.Generator):
                handles.append((value.get_state, value.set_state))
            elif isinstance(value, random.Random):
                handles.append((value.getstate, value.setstate))
            elif isinstance(value, np.random.RandomState):
                handles.append((value.get_state, value.set_state))
            elif isinstance(value, np.random.Generator):
                handles.append(_bit_generator_state(value.bit_generator))
    return handles


def _bit_generator_state(bits: Any) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    def set_state(state: Any) -> None:
        bits.state = state

    return (lambda: bits.state), set_state


def _trace_exactly(model: nn.Module) -> fx.GraphModule | WholeModel:
    """:func:`trace` ``model``, refusing a graph that froze a random draw made while tracing.

    torch.fx runs the Python of ``forward``: ``random.random()``, ``numpy.random``, or
    ``torch.randn(8)`` (no traced argument) execute once and their values become constants
    of the graph, reused by every later call. Such a draw changes a random state (restored
    afterwards: tracing leaves no trace) or, drawn from fresh entropy, makes two traces
    differ.
    """
    handles = _random_state_handles(model)
    states = [get() for get, _ in handles]
    try:
        first, second = trace(model), trace(model)
        drew = any(_state_bytes(get()) != _state_bytes(s) for (get, _), s in zip(handles, states))
    finally:
        for (_, set_state), state in zip(handles, states):
            set_state(state)
    if drew or not _same_graph(first, second):
        return WholeModel(
            f"{type(model).__name__}.forward draws random numbers that torch.fx would freeze into the graph "
            "(Python's random, numpy.random, or a torch random function without traced arguments)",
            one_sample_per_pass=True,
        )
    return first


def _state_bytes(state: Any) -> bytes:
    if isinstance(state, torch.Tensor):  # torch's generators: a byte tensor
        return state.numpy().tobytes()
    if isinstance(state, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in state):
        return b"".join(s.numpy().tobytes() for s in state)
    return pickle.dumps(state)


def _same_graph(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    if a.code != b.code:
        return False
    for node in a.graph.nodes:
        if node.op == "get_attr":
            x, y = _attribute(a, str(node.target)), _attribute(b, str(node.target))
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                if x is not y and not (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)):
                    return False
            elif x is not y and x != y:
                return False
    return True


def _attribute(module: nn.Module, target: str) -> Any:
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _hidden_code(model: nn.Module, traced: fx.GraphModule) -> str | None:
    """Code the graph cannot see or place: forward hooks (on any module: those on traced-through
    modules would be skipped, those on leaves run wherever the leaf runs, once for all
    samples in the prefix) and a leaf module whose ``forward`` was replaced on the instance."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook)"
    leaves = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or '(the model)'!r} has forward hooks, which could draw or record per sample"
        if name in leaves and "forward" in vars(module):
            return f"module {name!r} has its forward replaced on the instance"
    return None


# ----------------------------------------------------------------- cache
_SCALARS = (int, float, bool, str, type(None))
# model -> (fingerprint, split or why not)
_SPLITS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, SampleSplit | WholeModel]] = weakref.WeakKeyDictionary()


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


def cached_split(model: nn.Module) -> SampleSplit | WholeModel:
    """:func:`split_at_random_sources` of :func:`trace`, kept (weakly) per model.

    The split is reused while the model's module tree, modes (``training``,
    ``deterministic``), scalar attributes and hooks are unchanged, so repeated
    predictions do not pay for tracing again.

    Returns:
        The split, or a :class:`WholeModel` saying why the model must run whole: ``forward``
        cannot be traced, drew random numbers while traced, has hooks, or
        :func:`split_at_random_sources` refused the cut.
    """
    fingerprint = _fingerprint(model)
    entry = _SPLITS.get(model)
    if entry is None or entry[0] != fingerprint:
        entry = _SPLITS[model] = (fingerprint, _split(model))
    return entry[1]


def _split(model: nn.Module) -> SampleSplit | WholeModel:
    try:
        traced = _trace_exactly(model)
    except TracingError as error:
        return WholeModel(str(error))
    if isinstance(traced, WholeModel):
        return traced
    hidden = _hidden_code(model, traced)
    if hidden is not None:
        return WholeModel(hidden, one_sample_per_pass=True)
    return split_at_random_sources(traced)
