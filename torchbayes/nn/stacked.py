"""``M`` networks of one architecture in one pass, for prediction: the deep ensemble's fast path.

`StackedForward` traces one member with `torch.fx` and runs the graph once for
all members, on one batch of ``M * B`` rows where block ``i`` (rows ``i*B .. (i+1)*B``)
belongs to member ``i`` -- the layout of Monte Carlo sample groups
(`torchbayes.nn.vectorized`). Every operation then costs one call instead of ``M``:

* linear layers: the input shared by all members (the batch itself) meets the ``M``
  weight matrices stacked as one wide matrix; later ones run as one batched matmul
  (``torch.baddbmm``) over the members' blocks;
* convolutions: `torchbayes.nn.vectorized.stacked_conv` (the members' kernels as
  output channels of one convolution on the shared input, a grouped convolution for
  small blocks, a loop over the blocks for large ones);
* BatchNorm in eval mode: one affine map with the members' statistics stacked;
* activations, pooling, flattening and sums act row by row, so they run once on all
  blocks; values that do not depend on a member (the input and what is computed from it
  alone) are computed once, not ``M`` times.

Only an allowlist of operations is supported (the exact ``torch.nn`` types above,
row-wise functions and tensor methods); anything else -- other modules or functions,
parameters read in ``forward``, random functions, in-place updates of a value used
again, a ``view`` that would move rows between members -- raises
`NotStackableError` and the caller runs the members one after the other. The
members' modules are read at every call (their parameters and settings), so the plan
depends only on the traced graph. Prediction only: eval mode, no gradients.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torchbayes.nn.mode import eval_mode
from torchbayes.nn.vectorized import stacked_conv

__all__ = ["NotStackableError", "StackedForward"]


class NotStackableError(RuntimeError):
    """The members' forward uses an operation the stacked pass does not support."""


class _Blocks:
    """A value with one block of rows per member: ``(M * B, ...)``."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class _PerMember:
    """A value held member by member (a list of ``M``), for batches above `BLOCK_ROWS`."""

    __slots__ = ("values",)

    def __init__(self, values: list[Any]) -> None:
        self.values = values


#: Up to this many rows per member the members run as blocks of one batch (per-call
#: overhead dominates small batches, so one call per operation wins); above it each member
#: runs its own operations after the shared first layer (the loop's memory traffic, without
#: the copies that gathering blocks costs at large batches). Measured: benchmarks/bench_ensemble.py.
BLOCK_ROWS = 8


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_ROW_WISE_MODULES: tuple[type[nn.Module], ...] = (
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
    nn.Flatten,
)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Row-wise, deterministic functions and methods (no randomness, no in-place update).
_ROW_WISE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        F.relu,
        torch.relu,
        F.leaky_relu,
        F.gelu,
        F.silu,
        F.elu,
        F.softplus,
        torch.sigmoid,
        torch.tanh,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        torch.flatten,
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        torch.add,
        torch.mul,
        torch.cat,
        operator.getitem,
    }
)
_ROW_WISE_METHODS = frozenset(
    {"relu", "sigmoid", "tanh", "flatten", "view", "reshape", "size", "add", "mul", "contiguous"}
)
_RESHAPES = frozenset({"view", "reshape"})


class StackedForward:
    """Run ``M`` members of one architecture together (see the module docstring).

    Args:
        template: one member, traced once; the others must have the same module tree.

    Raises:
        NotStackableError: ``forward`` cannot be traced or uses an unsupported operation.
    """

    def __init__(self, template: nn.Module) -> None:
        try:
            with eval_mode(template):  # the pass runs in eval mode: forwards reading self.training
                self.graph = fx.symbolic_trace(template).graph
        except Exception as error:  # fx raises many types
            raise NotStackableError(f"forward cannot be traced with torch.fx ({type(error).__name__})") from error
        self._weights: dict[str, tuple[tuple, tuple[Tensor, ...]]] = {}
        # The members' submodules per target, for one list of members (ids): looked up once.
        self._modules: tuple[tuple[int, ...], dict[str, list[nn.Module]]] = ((), {})
        placeholders = 0
        for node in self.graph.nodes:
            if node.op == "placeholder":
                placeholders += 1
            elif node.op == "call_module":
                module = template.get_submodule(str(node.target))
                if not _supported_module(module):
                    raise NotStackableError(f"module {node.target!r} ({type(module).__name__}) is not supported")
                if getattr(module, "inplace", False) and _reused(node.args[0]):
                    raise NotStackableError(f"module {node.target!r} updates in place a value used again")
            elif node.op == "call_function":
                if node.target not in _ROW_WISE_FUNCTIONS or node.kwargs.get("inplace", False):
                    raise NotStackableError(
                        f"function {getattr(node.target, '__name__', node.target)} is not supported"
                    )
            elif node.op == "call_method":
                if node.target not in _ROW_WISE_METHODS:
                    raise NotStackableError(f"tensor method .{node.target}() is not supported")
            elif node.op != "output":  # get_attr: parameters read in forward
                raise NotStackableError(f"{node.op} {node.target!r} is not supported")
        if placeholders != 1:
            raise NotStackableError(f"forward takes {placeholders} inputs (one is supported)")

    def __call__(self, members: Sequence[nn.Module] | nn.ModuleList, x: Tensor) -> Tensor:
        """The members' outputs ``(M, B, *out)`` for the batch ``x`` (eval mode, no gradients)."""
        m, b = len(members), x.shape[0]
        ids = tuple(map(id, members))
        if self._modules[0] != ids:
            self._modules = (ids, {})
        blocks = b <= BLOCK_ROWS
        env: dict[fx.Node, Any] = {}
        out: Any = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "output":
                out = args[0]
                break
            if node.op == "call_module":
                modules = self._member_modules(members, str(node.target))
                if blocks:
                    env[node] = self._module(modules, str(node.target), args, kwargs, m)
                else:
                    env[node] = self._module_per_member(modules, str(node.target), args, kwargs, m)
            elif blocks:
                env[node] = _call(node, args, kwargs, m)
            else:
                env[node] = _call_per_member(node, args, kwargs, m)
        if isinstance(out, (tuple, list)) and out:  # (out, aux): the first element, as predict reads it
            out = out[0]
        if isinstance(out, _Blocks) and out.tensor.shape[0] == m * b:
            return out.tensor.reshape(m, b, *out.tensor.shape[1:])
        if isinstance(out, _PerMember) and all(isinstance(v, Tensor) for v in out.values):
            return torch.stack(out.values)
        if isinstance(out, Tensor):  # nothing depends on the members
            return out.expand(m, *out.shape).clone()
        raise NotStackableError("the output is not one block of rows per member")

    def _member_modules(self, members: Sequence[nn.Module] | nn.ModuleList, target: str) -> list[nn.Module]:
        found = self._modules[1].get(target)
        if found is None:
            found = self._modules[1][target] = [member.get_submodule(target) for member in members]
        return found

    def _module_per_member(self, modules: list[nn.Module], target: str, args: tuple, kwargs: dict, m: int) -> Any:
        """Large batches: what depends on no member runs once, the first weight layer on the
        shared input is one wide call whose output is split into the members' views, and the
        rest runs member by member (as the loop does, on the same tensors)."""
        if len(args) != 1 or kwargs:
            raise NotStackableError(f"module {target!r} is called with more than its input")
        x, first = args[0], modules[0]
        if isinstance(x, _PerMember):
            return _PerMember([module(value) for module, value in zip(modules, x.values)])
        if isinstance(first, (*_ELEMENTWISE_MODULES, *_ROW_WISE_MODULES)):
            return first(x)  # shared: once
        if isinstance(first, nn.Linear):
            weight, bias = self._stacked(target, modules, ("weight", "bias"))
            wide = F.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())
            return _PerMember(list(wide.split(weight.shape[1], dim=-1)))
        if isinstance(first, _CONVOLUTIONS) and first.groups == 1:
            weight, bias = self._stacked(target, modules, ("weight", "bias"))
            wide = first._conv_forward(x, weight.flatten(0, 1), None if bias is None else bias.flatten())
            return _PerMember(list(wide.split(weight.shape[1], dim=1)))
        return _PerMember([module(x) for module in modules])

    # ------------------------------------------------------------------ modules
    def _module(self, modules: list[nn.Module], target: str, args: tuple, kwargs: dict, m: int) -> Any:
        first = modules[0]
        if len(args) != 1 or kwargs:
            raise NotStackableError(f"module {target!r} is called with more than its input")
        x = args[0]
        if isinstance(first, (*_ELEMENTWISE_MODULES, *_ROW_WISE_MODULES)):
            if isinstance(first, nn.Flatten) and first.start_dim % max(_tensor(x).dim(), 1) == 0:
                raise NotStackableError("nn.Flatten over the batch dimension")
            return _Blocks(first(x.tensor)) if isinstance(x, _Blocks) else first(x)
        if isinstance(first, nn.Linear):
            weight, bias = self._stacked(target, modules, ("weight", "bias"))
            return _Blocks(_linear(x, weight, bias, m))
        if isinstance(first, _CONVOLUTIONS):
            weight, bias = self._stacked(target, modules, ("weight", "bias"))
            shared = not isinstance(x, _Blocks)
            return _Blocks(stacked_conv(first, _tensor(x), weight, bias, first._conv_forward, shared))
        if isinstance(first, _BATCH_NORMS):
            scale, shift = self._batch_norm(target, modules)
            return _Blocks(_affine(x, scale, shift, m))
        raise NotStackableError(f"module {target!r} ({type(first).__name__}) is not supported")

    def _stacked(self, name: str, modules: list[nn.Module], attrs: tuple[str, ...]) -> Any:
        tensors = [[getattr(mod, a) for mod in modules] for a in attrs]
        # In-place updates bump _version; .to() and re-binding change the storage or the object.
        key = tuple((id(t), t._version, t.data_ptr()) if isinstance(t, Tensor) else None for ts in tensors for t in ts)
        entry = self._weights.get(name)
        if entry is None or entry[0] != key:
            stacked = tuple(torch.stack(ts) if ts[0] is not None else None for ts in tensors)
            entry = self._weights[name] = (key, stacked)  # type: ignore[assignment]
        return entry[1]  # type: ignore[index]

    def _batch_norm(self, name: str, modules: list[nn.Module]) -> tuple[Tensor, Tensor]:
        mean, var, weight, bias = self._stacked(name, modules, ("running_mean", "running_var", "weight", "bias"))
        eps = modules[0].eps
        if any(mod.eps != eps for mod in modules):
            raise NotStackableError("BatchNorm eps differs between members")
        scale = (var + eps).rsqrt()
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        return scale, shift


def _supported_module(module: nn.Module) -> bool:
    kind = type(module)
    if kind in _ELEMENTWISE_MODULES or kind in _ROW_WISE_MODULES or kind is nn.Linear:
        return not getattr(module, "return_indices", False)
    if kind in _CONVOLUTIONS:
        return module.padding_mode == "zeros"
    if kind in _BATCH_NORMS:
        return module.track_running_stats  # type: ignore[return-value]
    return False


def _reused(value: Any) -> bool:
    return isinstance(value, fx.Node) and len(value.users) > 1


def _tensor(value: Any) -> Tensor:
    return value.tensor if isinstance(value, _Blocks) else value


def _linear(x: Any, weight: Tensor, bias: Tensor | None, m: int) -> Tensor:
    """``(M, out, in)`` weights: a shared input meets them as one wide matrix, blocks by a batched matmul."""
    if not isinstance(x, _Blocks):
        wide = F.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())  # (B, ..., M * out)
        out = wide.unflatten(-1, (m, -1)).movedim(-2, 0)  # (M, B, ..., out)
        return out.reshape(-1, *out.shape[2:])
    t = x.tensor
    rows = t.reshape(m, -1, t.shape[-1])  # (M, B * ..., in)
    transposed = weight.transpose(1, 2)
    out = torch.bmm(rows, transposed) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, transposed)
    return out.reshape(*t.shape[:-1], weight.shape[1])


def _affine(x: Any, scale: Tensor, shift: Tensor, m: int) -> Tensor:
    """Eval-mode BatchNorm of every block with its member's ``(M, C)`` scale and shift."""
    t = _tensor(x)
    blocks = t.expand(m, *t.shape) if not isinstance(x, _Blocks) else t.reshape(m, -1, *t.shape[1:])
    view = (m, 1, -1) + (1,) * (blocks.dim() - 3)
    out = torch.addcmul(shift.view(view), blocks, scale.view(view))
    return out.reshape(-1, *out.shape[2:])


def _call(node: fx.Node, args: tuple, kwargs: dict, m: int) -> Any:
    values = [*args, *kwargs.values()]
    blocks = _has_blocks(values)
    if node.op == "call_method":
        if not blocks:
            return getattr(args[0], node.target)(*args[1:], **kwargs)  # type: ignore[arg-type]
        if not isinstance(args[0], _Blocks):
            raise NotStackableError(f".{node.target}() with member blocks among its arguments")
        t = args[0].tensor
        if node.target in _RESHAPES:
            shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            if not shape or shape[0] != t.shape[0]:  # e.g. view(batch, -1) with the members' batch
                raise NotStackableError(f".{node.target}{tuple(shape)} moves rows between members")
        elif node.target == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            if start % t.dim() == 0:
                raise NotStackableError(".flatten() over the batch dimension")
        result = getattr(t, node.target)(*_unwrap(args[1:], m), **_unwrap(kwargs, m))  # type: ignore[arg-type]
        return _Blocks(result) if isinstance(result, Tensor) else result
    fn: Callable[..., Any] = node.target  # type: ignore[assignment]
    if not blocks:
        return fn(*args, **kwargs)
    if fn is operator.getitem and not (
        isinstance(args[0], _Blocks) and isinstance(args[1], tuple) and args[1] and args[1][0] in (slice(None), ...)
    ):
        raise NotStackableError("indexing member blocks along the batch dimension")
    if fn is torch.flatten:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        if start % _tensor(args[0]).dim() == 0:
            raise NotStackableError("torch.flatten over the batch dimension")
    if fn is torch.cat and (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % _tensor(args[0][0]).dim() == 0:
        raise NotStackableError("torch.cat along the batch dimension")
    return _Blocks(fn(*_unwrap(args, m), **_unwrap(kwargs, m)))


def _call_per_member(node: fx.Node, args: tuple, kwargs: dict, m: int) -> Any:
    """A function or method: once on shared values, else member by member (the loop's calls)."""
    if node.op == "call_method":

        def fn(obj: Any, *a: Any, **k: Any) -> Any:
            return getattr(obj, node.target)(*a, **k)  # type: ignore[arg-type]

    else:
        fn = node.target  # type: ignore[assignment]
    if not _has_per_member((args, kwargs)):
        return fn(*args, **kwargs)
    results = [fn(*_member_values(args, i), **_member_values(kwargs, i)) for i in range(m)]
    if all(isinstance(r, _PLAIN) for r in results) and all(r == results[0] for r in results[1:]):
        return results[0]  # e.g. a size: the same for every member
    return _PerMember(results)


_PLAIN = (int, float, bool, str, torch.Size, torch.dtype, torch.device, type(None))


def _has_per_member(values: Any) -> bool:
    if isinstance(values, _PerMember):
        return True
    if isinstance(values, (tuple, list)):
        return any(_has_per_member(v) for v in values)
    if isinstance(values, dict):
        return any(_has_per_member(v) for v in values.values())
    return False


def _member_values(values: Any, i: int) -> Any:
    if isinstance(values, _PerMember):
        return values.values[i]
    if isinstance(values, (tuple, list)):
        return type(values)(_member_values(v, i) for v in values)
    if isinstance(values, dict):
        return {k: _member_values(v, i) for k, v in values.items()}
    return values


def _has_blocks(values: Any) -> bool:
    if isinstance(values, _Blocks):
        return True
    if isinstance(values, (tuple, list)):
        return any(_has_blocks(v) for v in values)
    if isinstance(values, dict):
        return any(_has_blocks(v) for v in values.values())
    return False


def _unwrap(values: Any, m: int) -> Any:
    """Member blocks as tensors; a shared batch tensor beside them is repeated per member."""
    if isinstance(values, _Blocks):
        return values.tensor
    if isinstance(values, Tensor) and values.dim() > 0:
        return values.repeat(m, *(1,) * (values.dim() - 1))
    if isinstance(values, (tuple, list)):
        return type(values)(_unwrap(v, m) for v in values)
    if isinstance(values, dict):
        return {k: _unwrap(v, m) for k, v in values.items()}
    return values
