"""A model's ``forward`` as a graph, for prediction methods that need its structure.

Monte Carlo prediction uses it to run deterministic work once per example instead of
once per sample; moment propagation walks it carrying means and variances. Both see
the same graph: :func:`trace` records ``forward`` with :mod:`torch.fx`, keeping every
``torch.nn`` module and every torchbayes Bayesian module as one opaque call (a leaf).

Limits of tracing (symbolic, by torch.fx): control flow that depends on tensor values
or shapes, and calls into non-torch code with tensors, cannot be recorded; :func:`trace`
then raises :class:`TracingError` and callers fall back to their untraced path.
"""

from __future__ import annotations

from torch import fx, nn

from torchbayes.nn.base import BayesianModule

__all__ = ["TracingError", "trace"]


class TracingError(RuntimeError):
    """The model's ``forward`` cannot be recorded as a graph."""


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with Bayesian modules kept whole, like ``torch.nn`` modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, BayesianModule) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Record ``model.forward`` as a :class:`torch.fx.GraphModule` sharing ``model``'s modules.

    Args:
        model: the module to trace; it is not modified.

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
        graph = _LeafTracer().trace(model)
    except Exception as error:  # torch.fx raises many types (TraceError, TypeError, ...)
        raise TracingError(f"{type(model).__name__}.forward cannot be traced with torch.fx: "
                           f"{type(error).__name__}: {error}") from error
    return fx.GraphModule(model, graph, class_name=type(model).__name__)

