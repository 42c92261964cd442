"""Deep ensembles (Lakshminarayanan et al., 2017): ``M`` networks trained from different
initialisations, whose disagreement is the epistemic uncertainty.

:class:`Ensemble` holds the members and computes their outputs ``(M, B, ...)`` in one
vectorized pass when they share one architecture: the members' parameters are stacked
(:func:`torch.func.stack_module_state`) and one copy of the architecture is run under
:func:`torch.vmap` with :func:`torch.func.functional_call`, so the ``M`` forwards run as
one batched pass (what it saves depends on the layers and the machine: on a 2-core CPU
it did not beat the loop for prediction, see ``docs/quality.md``; vmapped training of
fully connected members was faster).
:func:`torchbayes.predict` on an ensemble returns the same result object as Monte Carlo
prediction: the members are the samples, their disagreement the mutual information.
:func:`fit_ensemble` trains all members in the same vectorized way.

Loop fallback: members are run one after the other when they differ in architecture
(parameter names, shapes or dtypes), hold Bayesian layers, contain BatchNorm in training
mode (vmap cannot update running statistics in place), or when vmap fails on their
``forward`` (data-dependent control flow, ``.item()``...); training steps of
convolutional members on the CPU also loop (measured faster there than the vmapped
backward). Loop and vectorized results are equal (see the tests). Members on different
devices are an error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from torchbayes.nn.base import iter_bayesian_modules
from torchbayes.validation import check_flag, check_seed

__all__ = ["Ensemble", "fit_ensemble"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class Ensemble(nn.Module):
    r"""``M`` networks of one architecture, evaluated together.

    Args:
        members: the ``M >= 1`` member networks (e.g. ``[make_net() for _ in range(5)]``),
            each mapping a batch ``(B, *)`` to outputs ``(B, *out)``; all on one device.
            Members of one architecture are run in one vectorized pass; others (or those
            vmap cannot run) one after the other (see the module docstring).

    Shape:
        - Input: :math:`(B, *)`.
        - Output: :math:`(M, B, *out)`: every member's output (logits for classifiers).

    Example:
        >>> ensemble = Ensemble([LeNet5((1, 28, 28), 10) for _ in range(5)])
        >>> fit_ensemble(ensemble, train_x, train_y, epochs=10)
        >>> result = torchbayes.predict(ensemble, test_x)   # samples = members
        >>> result.mutual_information                         # member disagreement
    """

    members: nn.ModuleList

    def __init__(self, members: Iterable[nn.Module]) -> None:
        super().__init__()
        if isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList):
            raise TypeError(
                f"members must be an iterable of nn.Module (e.g. a list), got a single {type(members).__name__}"
            )
        members = list(members)
        if not members:
            raise ValueError("members must hold at least one nn.Module, got none")
        for i, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise TypeError(f"members[{i}] must be an nn.Module, got {type(member).__name__}")
        devices = {t.device for m in members for t in (*m.parameters(), *m.buffers())}
        if len(devices) > 1:
            raise ValueError(
                f"members must all be on one device, got {sorted(map(str, devices))}; move them with .to(device) first"
            )
        self.members = nn.ModuleList(members)
        self._stacked: tuple[tuple[Any, ...], dict[str, Tensor], dict[str, Tensor]] | None = None
        self._vmap_failed = False
        # (member ids, why the architecture cannot be vectorized or None, BatchNorm modules):
        # checked once per set of members, not at every call (it shows at batch 1).
        self._structure: tuple[tuple[int, ...], str | None, list[nn.Module]] | None = None

    @property
    def num_members(self) -> int:
        """``M``, the number of members."""
        return len(self.members)

    def loop_reason(self) -> str | None:
        """Why the members cannot be run in one vectorized pass, or ``None`` when they can."""
        key = tuple(map(id, self.members))
        structure = self._structure
        if structure is None or structure[0] != key:
            batchnorms: list[nn.Module] = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            structure = self._structure = (key, self._architecture_reason(), batchnorms)
            self.__dict__.pop("_template_module", None)  # new members: a new template
            self.__dict__.pop("_vmapped_forwards", None)
        _, reason, batchnorms = structure
        if reason is not None:
            return reason
        if any(m.training and m.track_running_stats for m in batchnorms):
            return "BatchNorm in training mode updates running statistics in place"
        if self._vmap_failed:
            return "torch.vmap failed on the members' forward (e.g. data-dependent control flow)"
        return None

    def _architecture_reason(self) -> str | None:
        if len(self.members) < 2:
            return "a single member"
        first = self.members[0]
        signature = _signature(first)
        for i, member in enumerate(self.members):
            if type(member) is not type(first) or _signature(member) != signature:
                return f"members[{i}] differs in architecture from members[0]"
        if next(iter_bayesian_modules(self), None) is not None:
            return "members have Bayesian layers (each draws its own samples)"
        return None

    def forward(self, x: Tensor) -> Tensor:
        """Every member's output for ``x``, stacked: ``(M, B, *out)``."""
        if self.loop_reason() is None and not self._loop_for_gradients(x):
            try:
                params, buffers = self._stacked_state()
                return self._vmapped()(params, buffers, x)
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                # vmap cannot run this forward (e.g. data-dependent control flow); the loop
                # below re-raises any error that is not vmap's.
                self._vmap_failed = True
        return self.loop_forward(x)

    def _loop_for_gradients(self, x: Tensor) -> bool:
        # Measured (benchmarks/bench_ensemble.py, docs/quality.md): on the CPU the vmapped
        # backward of convolutions (grouped convolutions) is slower than a loop over the
        # members, so training steps of convolutional members loop; fully connected ones
        # gain from vmap and keep it.
        if x.device.type != "cpu" or not torch.is_grad_enabled():
            return False
        return any(isinstance(m, nn.modules.conv._ConvNd) for m in self.members[0].modules())

    def loop_forward(self, x: Tensor) -> Tensor:
        """The members run one after the other (the fallback, and the reference of tests)."""
        outputs = [member(x) for member in self.members]
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members return outputs of different shapes: {sorted(shapes)}")
        return torch.stack(outputs)

    def member_outputs(self, x: Tensor) -> Tensor:
        """``forward`` in eval mode without gradients (what :func:`torchbayes.predict` uses)."""
        was_training = self.training
        try:
            if was_training:
                self.eval()
            with torch.no_grad():
                return self(x)
        finally:
            if was_training:
                self.train()

    def extra_repr(self) -> str:
        reason = self.loop_reason()
        return f"num_members={self.num_members}, vectorized={reason is None}"

    # ------------------------------------------------------------------ stacked state
    def _template(self) -> nn.Module:
        # One copy of the architecture without storage: functional_call supplies the tensors.
        template = self.__dict__.get("_template_module")
        if template is None:
            template = copy.deepcopy(self.members[0]).to("meta")
            self.__dict__["_template_module"] = template  # not a submodule: no state_dict entry
        if template.training != self.training:
            template.train(self.training)
        return template

    def _vmapped(self) -> Callable[..., Tensor]:
        # Built once per mode: creating the vmapped function costs as much as a small forward.
        cache = self.__dict__.setdefault("_vmapped_forwards", {})
        template = self._template()  # follows the ensemble's mode
        if self.training not in cache:
            cache[self.training] = _vmapped_forward(template, self.training)
        return cache[self.training]

    def _stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Training through forward: a differentiable stack, so gradients reach the members.
            named = [dict((*m.named_parameters(), *m.named_buffers())) for m in self.members]
            params = {k: torch.stack([n[k] for n in named]) for k, _ in self.members[0].named_parameters()}
            buffers = {k: torch.stack([n[k] for n in named]) for k, _ in self.members[0].named_buffers()}
            return params, buffers
        # Stacking copies every parameter, which would dominate a batch-1 prediction:
        # the stack is cached and rebuilt only when a member's tensor changed (in-place
        # updates bump a tensor's _version; replacements change its identity).
        tensors = [t for m in self.members for t in (*m.parameters(), *m.buffers())]
        key = tuple((id(t), t._version) for t in tensors)
        if self._stacked is None or self._stacked[0] != key:
            with torch.no_grad():
                params, buffers = stack_module_state(list(self.members))
            self._stacked = (key, {k: v.detach() for k, v in params.items()}, buffers)
        return self._stacked[1], self._stacked[2]

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles rebuild the caches
        state = self.__dict__.copy()
        state.pop("_template_module", None)
        state.pop("_vmapped_forwards", None)
        state["_stacked"] = None
        state["_structure"] = None
        return state


def _signature(module: nn.Module) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in (*module.named_parameters(), *module.named_buffers()))


def _vmapped_forward(template: nn.Module, training: bool) -> Callable[..., Tensor]:
    def member_forward(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(template, (params, buffers), (x,))

    # "different": each member draws its own dropout masks in training mode.
    return vmap(member_forward, in_dims=(0, 0, None), randomness="different" if training else "error")


def fit_ensemble(
    ensemble: Ensemble,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: LossFn = F.cross_entropy,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    vectorize: bool | None = None,
) -> list[float]:
    """Train every member of ``ensemble`` with Adam on ``(inputs, targets)``, in place.

    Each member sees the data in its own random order (members differ by their
    initialisation and their minibatches, as in Lakshminarayanan et al., 2017). Members of
    one architecture are trained together: their parameters are stacked and one vmapped
    step updates all of them (Adam is elementwise, so this is exactly ``M`` independent
    trainings); otherwise the members are trained one after the other by the same step.

    Args:
        ensemble: the members to train (their current weights are the initialisation).
        inputs: ``(N, *)`` training inputs, on the members' device.
        targets: ``(N, *)`` training targets.
        loss: ``loss(outputs, targets) -> scalar`` of one member on one minibatch
            (default cross-entropy on logits).
        epochs: passes over the data.
        batch_size: minibatch size.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        seed: seeds the members' data orders.
        vectorize: ``None`` (vectorize when possible, except convolutional members on the
            CPU, which train faster in a loop), ``True`` (required: error otherwise) or
            ``False`` (train one member after the other).

    Returns:
        The members' mean training loss of each epoch.

    Example:
        >>> ensemble = Ensemble([make_net() for _ in range(5)])
        >>> fit_ensemble(ensemble, x, y, epochs=10, lr=2e-3)
    """
    if not isinstance(ensemble, Ensemble):
        raise TypeError(f"ensemble must be an Ensemble, got {type(ensemble).__name__}")
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("inputs and targets must be Tensors")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"inputs and targets must hold the same number (>= 1) of examples, got {len(inputs)} and {len(targets)}"
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    check_flag("vectorize", vectorize, allow_none=True)
    check_seed(seed)
    ensemble.train()
    reason = ensemble.loop_reason()
    if vectorize and reason is not None:
        raise ValueError(f"vectorize=True but the members cannot be trained in one vmapped step: {reason}")
    generator = torch.Generator().manual_seed(seed)
    num = len(inputs)
    # Every member's data order, drawn up front so both paths see the same minibatches.
    orders = torch.stack([torch.randperm(num, generator=generator) for _ in range(epochs * ensemble.num_members)])
    orders = orders.view(epochs, ensemble.num_members, num).to(inputs.device)
    # Default: vectorized, except where a loop is measured faster (convolutions on the CPU).
    if reason is None and (vectorize or (vectorize is None and not ensemble._loop_for_gradients(inputs))):
        history = _fit_vectorized(ensemble, inputs, targets, orders, loss, batch_size, lr, weight_decay)
    else:
        history = _fit_loop(ensemble, inputs, targets, orders, loss, batch_size, lr, weight_decay)
    ensemble.eval()
    return history


def _fit_vectorized(
    ensemble: Ensemble,
    inputs: Tensor,
    targets: Tensor,
    orders: Tensor,
    loss: LossFn,
    batch_size: int,
    lr: float,
    weight_decay: float,
) -> list[float]:
    params, buffers = stack_module_state(list(ensemble.members))
    template = ensemble._template()

    def member_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss(functional_call(template, (p, b), (x,)), y)

    batched_loss = vmap(member_loss, randomness="different")
    optimizer = torch.optim.Adam(params.values(), lr=lr, weight_decay=weight_decay)
    history = []
    for epoch_orders in orders:
        total = 0.0
        for first in range(0, orders.shape[-1], batch_size):
            idx = epoch_orders[:, first : first + batch_size]  # (M, b): each member its own batch
            losses = batched_loss(params, buffers, inputs[idx], targets[idx])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # members' parameters are disjoint: independent gradients
            optimizer.step()
            total += float(losses.detach().sum()) * idx.shape[1]
        history.append(total / (orders.shape[-1] * ensemble.num_members))
    with torch.no_grad():
        for i, member in enumerate(ensemble.members):
            for name, tensor in (*member.named_parameters(), *member.named_buffers()):
                source = params[name] if name in params else buffers[name]
                tensor.copy_(source[i])
    return history


def _fit_loop(
    ensemble: Ensemble,
    inputs: Tensor,
    targets: Tensor,
    orders: Tensor,
    loss: LossFn,
    batch_size: int,
    lr: float,
    weight_decay: float,
) -> list[float]:
    totals = [0.0] * orders.shape[0]
    for i, member in enumerate(ensemble.members):
        optimizer = torch.optim.Adam(member.parameters(), lr=lr, weight_decay=weight_decay)
        for epoch, epoch_orders in enumerate(orders):
            for first in range(0, orders.shape[-1], batch_size):
                idx = epoch_orders[i, first : first + batch_size]
                value = loss(member(inputs[idx]), targets[idx])
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                totals[epoch] += float(value.detach()) * len(idx)
    return [t / (orders.shape[-1] * ensemble.num_members) for t in totals]
