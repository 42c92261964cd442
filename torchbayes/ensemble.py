"""Deep ensembles (Lakshminarayanan et al., 2017): ``M`` networks trained from different
initialisations, whose disagreement is the epistemic uncertainty.

`Ensemble` holds the members and computes their outputs ``(M, B, ...)``.
`torchbayes.predict` on an ensemble returns the same result object as Monte Carlo
prediction: the members are the samples, their disagreement the mutual information.
`fit_ensemble` trains all members.

Which pass computes the members (the same results, see the tests), by rule:

* **prediction on the CPU** (eval mode, no gradients): the **stacked pass**
  (`torchbayes.nn.stacked.StackedForward`): one traced copy of the architecture
  runs once for all members on their stacked weights (one wide matmul for the first
  linear layer, batched matmuls after it, the members' kernels as one convolution on the
  shared input...). Measured faster than a loop over the members at batch 1, 64 and 1000
  for LeNet and an MLP (``benchmarks/bench_ensemble.py``, ``docs/benchmarks.md``);
  ``torch.vmap`` was slower than the loop there, so it is not used for CPU prediction;
* **other devices, or with gradients** (training through ``forward``): one ``torch.vmap``
  over the stacked parameters (`torch.func.functional_call` of member 0), except
  for training steps of convolutional members on the CPU (the vmapped backward of the
  grouped convolutions measured slower than the loop);
* **a loop over the members** otherwise: members that differ in architecture (module
  types, parameter shapes or dtypes, settings such as a stride or a dropout rate), share
  parameters, hold Bayesian layers, have forward hooks (the loop calls them; the
  batched passes would not), contain BatchNorm in training mode, or whose ``forward``
  the stacked pass or vmap cannot run (data-dependent control flow, ``.item()``,
  unsupported operations). ``Ensemble.loop_reason()`` says why.

The members are re-checked cheaply at every call: a module replaced, a parameter
re-bound or a hook added after the first call is seen (module and tensor identities,
modes and hooks are compared); the settings of layers (stride, dropout rate) are
compared when that structure changes, or after `Ensemble.refresh`. A call with a
wrongly shaped input raises the loop's own error and changes no mode. Members returning
a tuple (e.g. ``(out, aux)``) are read from its first element, as ``predict`` reads
models. The same module object twice, or members sharing all their parameters (outputs
always equal, so the mutual information is 0), are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from torchbayes.elbo import elbo_loss
from torchbayes.nn.base import BayesianModule, iter_bayesian_modules
from torchbayes.nn.stacked import NotStackableError, StackedForward
from torchbayes.validation import check_flag, check_seed

__all__ = ["Ensemble", "fit_ensemble"]

LossFn = Callable[[Tensor, Tensor], Tensor]

# What makes vmap (or the stacked pass) fail on a forward: data-dependent control flow,
# .item(), operators without a batching rule.
_BATCHING_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError, AttributeError)


class Ensemble(nn.Module):
    r"""``M`` networks of one architecture, evaluated together.

    Args:
        members: the ``M >= 1`` member networks (e.g. ``[make_net() for _ in range(5)]``),
            each mapping a batch ``(B, *)`` to outputs ``(B, *out)`` (or a tuple whose
            first element is that); all on one device, each its own object with its own
            parameters (``[net] * 4`` is refused: its members always agree). How they are
            run (one stacked pass, vmap or a loop) is chosen per call (module docstring).

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
        _check_distinct(members)
        devices = {t.device for m in members for t in (*m.parameters(), *m.buffers())}
        if len(devices) > 1:
            raise ValueError(
                f"members must all be on one device, got {sorted(map(str, devices))}; move them with .to(device) first"
            )
        self.members = nn.ModuleList(members)
        self.refresh()

    @property
    def num_members(self) -> int:
        """``M``, the number of members."""
        return len(self.members)

    def refresh(self) -> None:
        """Forget what was learnt about the members (architecture checks, stacked weights,
        traced graph, failed batched passes); the next call checks them again. Needed only
        after changing a layer's settings in place (e.g. ``conv.stride``) in some members;
        replaced modules, re-bound parameters and hooks are noticed without it."""
        self._stacked: tuple[tuple[Any, ...], dict[str, Tensor], dict[str, Tensor]] | None = None
        # (cheap key of the members' structure, why they cannot be batched or None)
        self._structure: tuple[tuple[Any, ...], str | None] | None = None
        # (a module in training mode, a tracking BatchNorm in it, a Bayesian module)
        self._modes: tuple[bool, bool, bool] = (True, True, False)
        self._plan: StackedForward | str | None = None  # the stacked pass, or why there is none
        self._vmap_failed: str | None = None
        self._vmapped_forwards: dict[bool, Callable[..., Tensor]] = {}  # built once per mode
        self._last_reason: str | None = None

    def loop_reason(self) -> str | None:
        """Why ``predict`` runs the members one after the other on their device, or ``None``
        when it runs them in one batched pass (the stacked pass on the CPU, vmap elsewhere)."""
        reason = self._structure_reason()
        if reason is not None:
            return reason
        if self._device().type == "cpu":
            self._stacked_plan()
            return self._plan if isinstance(self._plan, str) else None
        return self._vmap_failed

    def _structure_reason(self) -> str | None:
        """Why no batched pass can run the members as they are now (``None``: one can)."""
        key, hooked, modes = _structure_key(self.members)
        structure = self._structure
        if structure is None or structure[0] != key:
            self.refresh()
            reason = self._architecture_reason(hooked)
            self._structure = structure = (key, reason)
        self._modes = modes
        reason = structure[1]
        if reason is None and modes[1]:
            reason = "BatchNorm in training mode updates running statistics in place"
        self._last_reason = reason
        return reason

    def _checked_for_prediction(self) -> bool:
        """The members' check, for ``predict``: whether they hold Bayesian layers (then
        ``member_outputs(x, checked=True)`` reuses this check instead of walking again)."""
        self._structure_reason()
        return self._modes[2]

    def _architecture_reason(self, hooked: str | None) -> str | None:
        _check_distinct(list(self.members))
        if hooked is not None:
            return f"forward hooks on {hooked} (the batched passes would not call them)"
        if len(self.members) < 2:
            return "a single member"
        first = self.members[0]
        signature = _signature(first)
        for i, member in enumerate(self.members):
            if _signature(member) != signature:
                return f"members[{i}] differs in architecture from members[0] (module types, settings or tensors)"
        owners: dict[int, int] = {}
        for i, member in enumerate(self.members):
            for t in (*member.parameters(), *member.buffers()):
                if owners.setdefault(id(t), i) != i:
                    return f"members[{i}] shares parameters with members[{owners[id(t)]}]"
        if _structure_key(self.members)[2][2]:
            return "members have Bayesian layers (each draws its own samples)"
        return None

    def has_bayesian_layers(self) -> bool:
        """Whether a member holds Bayesian layers (``predict`` then samples each member)."""
        self._structure_reason()
        return self._modes[2]

    def _device(self) -> torch.device:
        tensor = next(self.members[0].parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def forward(self, x: Tensor) -> Tensor:
        """Every member's output for ``x``, stacked: ``(M, B, *out)``."""
        if self.__dict__.pop("_skip_walk", False):
            reason = self._last_reason  # predict checked the members a moment ago
        else:
            reason = self._structure_reason()
        if reason is None:
            if x.device.type == "cpu" and not self._modes[0] and not torch.is_grad_enabled():
                plan = self._stacked_plan()
                if plan is not None:
                    try:
                        return plan(self.members, x)
                    except (NotStackableError, *_BATCHING_ERRORS) as error:
                        return self._fall_back(x, error, "_plan", "the stacked pass")
                return self.loop_forward(x)  # on the CPU the loop beats vmap for prediction
            if self._vmap_failed is None and not self._loop_for_gradients(x):
                try:
                    params, buffers = self._stacked_state()
                    return self._vmapped()(params, buffers, x)
                except _BATCHING_ERRORS as error:
                    return self._fall_back(x, error, "_vmap_failed", "torch.vmap")
        return self.loop_forward(x)

    def _fall_back(self, x: Tensor, error: Exception, flag: str, what: str) -> Tensor:
        # The loop tells a caller's error (it fails too, with its own message; nothing is
        # recorded) from one the batched pass cannot run (the loop works: recorded).
        out = self.loop_forward(x)
        if isinstance(error, NotStackableError):
            setattr(self, flag, f"{what} cannot run the members' forward: {_first_line(error)}")
        else:
            setattr(self, flag, f"{what} failed on the members' forward ({type(error).__name__}: {_first_line(error)})")
        return out

    def _stacked_plan(self) -> StackedForward | None:
        if self._plan is None:
            try:
                self._plan = StackedForward(self.members[0])
            except NotStackableError as error:
                self._plan = f"the stacked pass cannot run the members' forward: {error}"
        return self._plan if isinstance(self._plan, StackedForward) else None

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
        outputs = [_first(member(x)) for member in self.members]
        bad = next((type(o).__name__ for o in outputs if not isinstance(o, Tensor)), None)
        if bad is not None:
            raise TypeError(f"ensemble members must return a tensor (or a tuple starting with one), got {bad}")
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) > 1:
            raise ValueError(f"ensemble members return outputs of different shapes: {sorted(shapes)}")
        return torch.stack(outputs)

    def member_outputs(self, x: Tensor, *, checked: bool = False) -> Tensor:
        """``forward`` in eval mode without gradients (what `torchbayes.predict` uses).

        ``checked``: the members were checked by the caller just now, in eval mode
        (internal: saves a second walk over the members at small batches)."""
        was_training = self.training
        try:
            if was_training:
                self.eval()
            with torch.no_grad():
                if checked and not was_training and not self._modes[0]:
                    self._skip_walk = True  # consumed by the forward below
                return self(x)
        finally:
            if was_training:
                self.train()

    def extra_repr(self) -> str:
        reason = self.loop_reason()
        return f"num_members={self.num_members}, vectorized={reason is None}"

    # ------------------------------------------------------------------ stacked state
    def _template(self) -> nn.Module:
        # functional_call runs member 0's modules on the stacked tensors, so its settings
        # (and any change to them) are the ones used; the structure check keeps the members equal.
        return self.members[0]

    def _vmapped(self) -> Callable[..., Tensor]:
        # Built once per mode: creating the vmapped function costs as much as a small forward.
        if self.training not in self._vmapped_forwards:
            self._vmapped_forwards[self.training] = _vmapped_forward(self._template(), self.training)
        return self._vmapped_forwards[self.training]

    def _stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Training through forward: a differentiable stack, so gradients reach the members.
            named = [dict((*m.named_parameters(), *m.named_buffers())) for m in self.members]
            params = {k: torch.stack([n[k] for n in named]) for k, _ in self.members[0].named_parameters()}
            buffers = {k: torch.stack([n[k] for n in named]) for k, _ in self.members[0].named_buffers()}
            return params, buffers
        # Stacking copies every parameter: the stack is cached and rebuilt only when a
        # member's tensor changed (in-place updates bump _version; replacements change id).
        tensors = [t for m in self.members for t in (*m.parameters(), *m.buffers())]
        key = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        if self._stacked is None or self._stacked[0] != key:
            with torch.no_grad():
                params, buffers = stack_module_state(list(self.members))
            self._stacked = (key, {k: v.detach() for k, v in params.items()}, buffers)
        return self._stacked[1], self._stacked[2]

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles rebuild the caches
        state = self.__dict__.copy()
        state.update(_stacked=None, _structure=None, _plan=None, _vmap_failed=None, _vmapped_forwards={})
        state.pop("_skip_walk", None)
        return state


_BATCH_NORMS = nn.modules.batchnorm._BatchNorm


def _check_distinct(members: list[nn.Module]) -> None:
    """Refuse members that are one object, or share all their parameters: their outputs are
    always equal, so the ensemble's mutual information would be 0."""
    seen: dict[int, int] = {}
    for i, member in enumerate(members):
        j = seen.setdefault(id(member), i)
        if j != i:
            raise ValueError(
                f"members[{i}] is the same module object as members[{j}] (e.g. [net] * M): their outputs "
                "are always equal; build each member separately ([make_net() for _ in range(M)] or copy.deepcopy)"
            )
    owners: dict[int, int] = {}
    for i, member in enumerate(members):
        params = list(member.parameters())
        shared = {owners.get(id(p)) for p in params}
        if params and len(shared) == 1 and None not in shared:
            raise ValueError(
                f"members[{i}] shares all its parameters with members[{shared.pop()}]: their outputs are "
                "always equal; give each member its own parameters (e.g. copy.deepcopy)"
            )
        for p in params:
            owners.setdefault(id(p), i)


def _structure_key(members: nn.ModuleList) -> tuple[tuple[Any, ...], str | None, tuple[bool, bool, bool]]:
    """A cheap walk over the members (one call's worth of checks, no deep compare):

    * a key of what the batched passes depend on beyond the tensors' values: every
      module's identity and type, every parameter's and buffer's identity, and hooks;
    * the first hooked module's name, or ``None``;
    * whether a module is in training mode, whether a tracking BatchNorm is, and whether
      a module is Bayesian.
    """
    key: list[Any] = [
        len(nn.modules.module._global_forward_hooks),
        len(nn.modules.module._global_forward_pre_hooks),
    ]
    hooked = "every module (a global hook)" if key[0] or key[1] else None
    training = batchnorm_training = bayesian = False
    stack: list[nn.Module | None] = [members]
    while stack:
        module = stack.pop()
        if module is None:
            continue
        hooks = bool(module._forward_hooks or module._forward_pre_hooks)
        if hooks and hooked is None:
            hooked = _hooked_name(members, module)
        if module.training:
            training = True
            if isinstance(module, _BATCH_NORMS) and module.track_running_stats:
                batchnorm_training = True
        if isinstance(module, BayesianModule):
            bayesian = True
        key.append((id(module), type(module), hooks))
        key.extend(map(id, module._parameters.values()))
        key.extend(map(id, module._buffers.values()))
        stack.extend(module._modules.values())
    return tuple(key), hooked, (training, batchnorm_training, bayesian)


def _hooked_name(members: nn.ModuleList, hooked: nn.Module) -> str:
    name = next(n for n, m in members.named_modules() if m is hooked)
    index, _, inner = name.partition(".")
    return f"members[{index}]" + (f" ({inner!r})" if inner else "") if name else "the member list"


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """A member's architecture: module types and settings, tensor names, shapes and dtypes."""
    settings = tuple(
        (
            name,
            type(m),
            tuple(
                (k, v)
                for k, v in vars(m).items()
                if not k.startswith("_")
                and k != "training"
                and isinstance(v, (int, float, str, bool, tuple, type(None)))
            ),
        )
        for name, m in module.named_modules()
    )
    tensors = tuple(
        (name, tuple(t.shape), t.dtype) for name, t in (*module.named_parameters(), *module.named_buffers())
    )
    return settings, tensors


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _vmapped_forward(template: nn.Module, training: bool) -> Callable[..., Tensor]:
    def member_forward(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return _first(functional_call(template, (params, buffers), (x,)))

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
    When vmap cannot run the members' ``forward`` (``nn.LSTM``, ``.item()``, control flow
    on values) the training falls back to the loop (with ``vectorize=None``; an error with
    ``vectorize=True``). Members with Bayesian layers are trained on their ELBO,
    ``loss + KL / N`` (`torchbayes.elbo_loss` with ``num_data = N``), one after the other.
    Members returning a tuple are scored on its first element.

    Args:
        ensemble: the members to train (their current weights are the initialisation).
        inputs: ``(N, *)`` training inputs, on the members' device.
        targets: ``(N, *)`` training targets.
        loss: ``loss(outputs, targets) -> scalar`` of one member on one minibatch: the
            minibatch's mean (default cross-entropy on logits). A loss returning one
            value per example (``reduction="none"``) is refused.
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
    if not callable(loss):
        raise TypeError(f"loss must be callable (outputs, targets) -> scalar, got {type(loss).__name__}")
    was_training = ensemble.training
    ensemble.train()
    reason = ensemble._structure_reason()
    if vectorize and reason is not None:
        ensemble.train(was_training)
        raise ValueError(f"vectorize=True but the members cannot be trained in one vmapped step: {reason}")
    generator = torch.Generator().manual_seed(seed)
    num = len(inputs)
    # Every member's data order, drawn up front so both paths see the same minibatches.
    orders = torch.stack([torch.randperm(num, generator=generator) for _ in range(epochs * ensemble.num_members)])
    orders = orders.view(epochs, ensemble.num_members, num).to(inputs.device)
    # Default: vectorized, except where a loop is measured faster (convolutions on the CPU).
    history = None
    try:
        if reason is None and (vectorize or (vectorize is None and not ensemble._loop_for_gradients(inputs))):
            try:
                history = _fit_vectorized(ensemble, inputs, targets, orders, loss, batch_size, lr, weight_decay)
            except _VmapFailed as failure:
                # Nothing was trained yet (the members are copied back only at the end).
                if vectorize:
                    raise ValueError(f"vectorize=True but vmap cannot train the members: {failure}") from None
        if history is None:
            history = _fit_loop(ensemble, inputs, targets, orders, loss, batch_size, lr, weight_decay)
    except BaseException:
        ensemble.train(was_training)  # a refused or failed training leaves the modes as they were
        raise
    ensemble.eval()
    return history


class _VmapFailed(Exception):
    """vmap could not run the members' first training step (the loop is tried instead)."""


def _scalar_loss(value: Any, shape_hint: str = "") -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss must return one scalar per minibatch (its mean, e.g. reduction='mean'), got {shape}{shape_hint}"
        )
    return value


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
        return _scalar_loss(loss(_first(functional_call(template, (p, b), (x,))), y))

    batched_loss = vmap(member_loss, randomness="different")
    optimizer = torch.optim.Adam(params.values(), lr=lr, weight_decay=weight_decay)
    history = []
    for epoch, epoch_orders in enumerate(orders):
        total = 0.0
        for first in range(0, orders.shape[-1], batch_size):
            idx = epoch_orders[:, first : first + batch_size]  # (M, b): each member its own batch
            if epoch == 0 and first == 0:
                try:  # the first step tells whether vmap can run the members at all
                    losses = batched_loss(params, buffers, inputs[idx], targets[idx])
                except _BATCHING_ERRORS as error:
                    if isinstance(error, ValueError) and str(error).startswith("loss must return"):
                        raise
                    raise _VmapFailed(f"{type(error).__name__}: {_first_line(error)}") from error
            else:
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
    num = orders.shape[-1]
    for i, member in enumerate(ensemble.members):
        bayesian = next(iter_bayesian_modules(member), None) is not None
        optimizer = torch.optim.Adam(member.parameters(), lr=lr, weight_decay=weight_decay)
        for epoch, epoch_orders in enumerate(orders):
            for first in range(0, orders.shape[-1], batch_size):
                idx = epoch_orders[i, first : first + batch_size]
                value = _scalar_loss(loss(_first(member(inputs[idx])), targets[idx]))
                if bayesian:  # the negative ELBO per example: the KL term, once per data set
                    value = elbo_loss(value, member, num_data=num)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                totals[epoch] += float(value.detach()) * len(idx)
    return [t / (orders.shape[-1] * ensemble.num_members) for t in totals]
