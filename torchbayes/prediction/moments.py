"""Sampling-free prediction: carry each activation's mean and variance through the network.

For a network with mean-field Gaussian weights, :func:`propagate_moments` runs ONE pass
over the model's graph (:func:`torchbayes.prediction.graph.trace`) in which every value
is a :class:`Moments`: a mean and a variance per element, treated as independent
Gaussians (the approach of Wu et al. 2019, "Deterministic Variational Inference for
Robust Bayesian Neural Networks", and of Gast & Roth 2018, "Lightweight Probabilistic
Deep Networks", with diagonal covariances). Each module, function or tensor method has
one rule in a registry (:func:`register_moment_rule`), so a user can add rules for their
own modules.

What each rule computes:

* exact (given independent inputs): Bayesian and deterministic linear layers,
  convolutions and transposed convolutions (``E[y] = op(m, mu_w) + mu_b``,
  ``Var[y] = op(m^2 + v, sigma_w^2) + sigma_b^2 + op(v, mu_w^2)``), BatchNorm in eval
  mode, average pooling (also adaptive, and ``mean``), dropout in eval mode (identity),
  reshapes and indexing, concatenation, sums and products of independent values, and
  ``exp`` (log-normal moments);
* exact moment matching (closed forms under a Gaussian input): ReLU, LeakyReLU;
* accurate approximations (Gauss-Hermite quadrature with :data:`QUADRATURE_NODES`
  nodes): GELU, SiLU, sigmoid, tanh, softplus; the error grows with the input's
  standard deviation (see ``docs/moments.md``);
* documented approximation: max pooling (Clark's 1961 moment matching of the maximum
  of two Gaussians, applied pairwise across each window, as Gast & Roth do).

Independence is the assumption throughout: outputs of a convolution at different
positions share one kernel, and the two branches of a residual block share their input,
so they are correlated; these correlations are dropped. An operation without a rule is
an error naming it (never a silent fallback), except on values that carry no variance
(e.g. deterministic layers before the first Bayesian one), which are computed exactly.
"""

from __future__ import annotations

import inspect
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.operator_schemas import get_signature_for_torch_op

from torchbayes.layers.base import ReferenceLayer
from torchbayes.nn import noise
from torchbayes.nn.base import BayesianModule, BayesianWeightLayer
from torchbayes.nn.conv import _torch_output_padding
from torchbayes.nn.likelihoods import (
    GaussianLikelihood,
    HeteroscedasticGaussian,
    HomoscedasticGaussian,
    _standard_normal_nodes,
    find_likelihood,
)
from torchbayes.nn.mode import eval_mode
from torchbayes.prediction.graph import TracingError, _fingerprint, trace

__all__ = [
    "QUADRATURE_NODES",
    "Moments",
    "UnsupportedOperationError",
    "expected_log_likelihood",
    "moment_samples",
    "propagate_moments",
    "register_moment_rule",
]

#: Gauss-Hermite nodes used for the smooth nonlinearities (GELU, SiLU, sigmoid, tanh, softplus).
QUADRATURE_NODES = 32


@dataclass(frozen=True)
class Moments:
    """Mean and variance of a tensor-valued random variable, elementwise independent.

    Attributes:
        mean: the elementwise means.
        variance: the elementwise variances (same shape), or ``None`` when the value is
            known exactly (variance 0), which lets rules skip the variance work.
    """

    mean: Tensor
    variance: Tensor | None = None

    def variance_or_zeros(self) -> Tensor:
        """The variance, with zeros for an exactly known value."""
        return torch.zeros_like(self.mean) if self.variance is None else self.variance


# A rule: ``rule(module, *args, **kwargs)`` for a module type, ``rule(*args, **kwargs)`` for
# a function or a tensor method (the tensor first); arguments that were tensors in the
# original forward arrive as Moments (or as plain values for constants).
MomentRule = Callable[..., Any]
RuleT = TypeVar("RuleT", bound=MomentRule)

_RULES: dict[object, MomentRule] = {}


class UnsupportedOperationError(TypeError):
    """The model uses a module, function or method that has no moment rule."""


def register_moment_rule(*targets: type[nn.Module] | Callable[..., Any] | str) -> Callable[[RuleT], RuleT]:
    """Register ``rule`` as the moment propagation of modules, functions or tensor methods.

    A module type's rule is called as ``rule(module, *args, **kwargs)``, a function's or a
    tensor method's as ``rule(*args, **kwargs)`` (the tensor first), with the arguments of
    the original call where every tensor computed from the input is a :class:`Moments`;
    it returns :class:`Moments` (or what the original returns, with tensors as moments).
    A module type's rule also serves its subclasses (the most specific registration wins),
    and registered module types are traced as one call, not looked into.

    Args:
        *targets: ``nn.Module`` subclasses, functions as the forward calls them
            (``torch.relu``, ``F.relu``, ``operator.add``...), or tensor method names
            (``"view"``).

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Example:
        >>> @register_moment_rule(Scale)                    # y = module.factor * x
        ... def scale_moments(module, x: Moments) -> Moments:
        ...     v = None if x.variance is None else x.variance * module.factor**2
        ...     return Moments(x.mean * module.factor, v)
    """
    if not targets:
        raise ValueError("register_moment_rule needs at least one module type, function or method name")
    for target in targets:
        if not (isinstance(target, (type, str)) or callable(target)):
            raise TypeError(
                f"register_moment_rule: targets must be nn.Module types, functions or method names, got {target!r}"
            )
        if isinstance(target, type) and not issubclass(target, nn.Module):
            raise TypeError(f"register_moment_rule: {target.__name__} is not an nn.Module subclass")

    def register(rule: RuleT) -> RuleT:
        if not callable(rule):
            raise TypeError(f"register_moment_rule: the rule must be callable, got {type(rule).__name__}")
        for target in targets:
            _RULES[target] = rule
        return rule

    return register


def _module_rule(module: nn.Module) -> MomentRule | None:
    """The rule of ``module``'s type or its nearest registered base class.

    A base class's rule describes the base's ``forward``; it does not serve a subclass
    whose own ``forward`` (defined outside torch and torchbayes, whose subclasses keep
    their family's math) replaces it: that raises, naming the class to register.
    """
    cls = type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base)
        if rule is None:
            continue
        owner = next(k for k in cls.__mro__ if "forward" in k.__dict__)
        if owner is not base and issubclass(owner, base) and not _library_class(owner):
            raise _OverriddenForward(
                f"{owner.__module__}.{owner.__qualname__} overrides forward() of "
                f"{base.__module__}.{base.__qualname__}, so that class's moment rule does not "
                f"describe it; register a rule for {owner.__qualname__} with "
                "torchbayes.prediction.moments.register_moment_rule, or predict with method='mc'"
            )
        return rule
    return None


def _library_class(cls: type) -> bool:
    return cls.__module__.split(".", 1)[0] in ("torch", "torchbayes")


class _OverriddenForward(Exception):
    """Internal: a registered base class's rule found for a subclass with its own forward."""


# ----------------------------------------------------------------------------- graph walk
def _has_moments(values: Any) -> bool:
    if isinstance(values, Moments):
        return True
    if isinstance(values, (tuple, list)):
        return any(_has_moments(v) for v in values)
    if isinstance(values, dict):
        return any(_has_moments(v) for v in values.values())
    return False


def _all_exact(values: Any) -> bool:
    if isinstance(values, Moments):
        return values.variance is None
    if isinstance(values, (tuple, list)):
        return all(_all_exact(v) for v in values)
    if isinstance(values, dict):
        return all(_all_exact(v) for v in values.values())
    return True


def _means(values: Any) -> Any:
    if isinstance(values, Moments):
        return values.mean
    if isinstance(values, (tuple, list)):
        return type(values)(_means(v) for v in values)
    if isinstance(values, dict):
        return {k: _means(v) for k, v in values.items()}
    return values


def _exact(values: Any) -> Any:
    """Wrap the tensors of a computed value as exactly known moments."""
    if isinstance(values, Tensor):
        return Moments(values)
    if isinstance(values, (tuple, list)):
        return type(values)(_exact(v) for v in values)
    return values


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return f"tensor method .{target}()"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None)
    return f"function {module}.{name}" if module else f"function {name}"


def _unsupported(what: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"method='moments' has no moment rule for {what}; predict with method='mc' instead, or "
        "register a rule with torchbayes.prediction.moments.register_moment_rule"
    )


class _MomentInterpreter(fx.Interpreter):
    """Runs a traced model on `Moments`, dispatching each node to its rule.

    Calls are normalised before a rule sees them (keyword arguments that the operation
    also takes positionally become positional: ``torch.mul(h, other=2)`` reaches the rule
    as ``(h, 2)``), and every rule's result is checked (`_check_rule_result`).
    """

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.extra_traceback = False  # errors stay one clear line (fx would append the node and a traceback)

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        return super().run_node(n)

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:  # type: ignore[override]
        module = self.fetch_attr(target)
        if not _has_moments((args, kwargs)):
            if not isinstance(module, BayesianModule):
                return super().call_module(target, args, kwargs)
            args = tuple(Moments(a) if isinstance(a, Tensor) else a for a in args)  # e.g. fed a constant
        what = f"module {target!r} ({type(module).__module__}.{type(module).__qualname__})"
        try:
            rule = _module_rule(module)
        except _OverriddenForward as error:
            if not isinstance(module, BayesianModule) and _all_exact((args, kwargs)):
                return _exact(module(*_means(args), **_means(kwargs)))  # no variance yet: exact
            raise UnsupportedOperationError(f"method='moments' cannot propagate {what}: {error}") from None
        if rule is not None:
            args, kwargs = _normalized(type(module).forward, args, kwargs, bound=True)
            return self._apply(rule, what, args, kwargs, module)
        if not isinstance(module, BayesianModule) and _all_exact((args, kwargs)):
            return _exact(module(*_means(args), **_means(kwargs)))  # no variance yet: exact
        raise _unsupported(what)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._call(target, target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._call(target, lambda obj, *a, **k: getattr(obj, target)(*a, **k), args, kwargs)

    def _call(self, target: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if not _has_moments((args, kwargs)):
            return fn(*args, **kwargs)
        rule = _RULES.get(target)
        if rule is not None:
            if kwargs:
                signature_of = getattr(torch, target, None) if isinstance(target, str) else target
                args, kwargs = _normalized(signature_of, args, kwargs)
            return self._apply(rule, _describe(target), args, kwargs)
        if _all_exact((args, kwargs)):
            return _exact(fn(*_means(args), **_means(kwargs)))
        raise _unsupported(_describe(target))

    def _apply(self, rule: MomentRule, what: str, args: tuple, kwargs: dict, module: nn.Module | None = None) -> Any:
        call_args = (module, *args) if module is not None else args
        try:
            result = rule(*call_args, **kwargs)
        except TypeError as error:
            try:  # the rule cannot take this call's arguments: say so, naming the rule
                inspect.signature(rule).bind(*call_args, **kwargs)
            except (TypeError, ValueError):
                raise UnsupportedOperationError(
                    f"method='moments': the moment rule {_rule_name(rule)} for {what} does not accept "
                    f"the call's arguments ({_argument_summary(args, kwargs)}): {error}"
                ) from error
            raise
        _check_rule_result(result, rule, what, self._node)
        return result


def _rule_name(rule: MomentRule) -> str:
    return f"{getattr(rule, '__module__', '?')}.{getattr(rule, '__qualname__', repr(rule))}"


def _argument_summary(args: tuple, kwargs: dict) -> str:
    def kind(v: Any) -> str:
        return "Moments" if isinstance(v, Moments) else type(v).__name__

    return ", ".join([*(kind(a) for a in args), *(f"{k}={kind(v)}" for k, v in kwargs.items())])


# What a node whose rule returned a tuple or list may be used by (reading its elements).
_SEQUENCE_USERS: tuple[Any, ...] = (operator.getitem, getattr, len, torch.cat, torch.concat, torch.stack)


def _check_rule_result(result: Any, rule: MomentRule, what: str, node: fx.Node) -> None:
    """A rule returns `Moments` (tensors as moments, never plain tensors, which would
    silently drop the variance), or a tuple/list of them used only element by element."""

    def fail(problem: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"method='moments': the moment rule {_rule_name(rule)} for {what} {problem}; a rule returns "
            "Moments(mean, variance) (Moments(t) for an exactly known tensor), or a tuple of them "
            "where the operation returns a tuple"
        )

    if result is None:
        if node.users:
            raise fail("returned None")
        return
    _check_no_tensors(result, fail)
    if isinstance(result, (tuple, list)) and not isinstance(result, torch.Size):
        if not _has_moments(result):
            raise fail(f"returned a {type(result).__name__} without Moments")
        for user in node.users:
            if user.op != "output" and not (user.op == "call_function" and user.target in _SEQUENCE_USERS):
                raise fail(f"returned a {type(result).__name__}, but {user.format_node()} uses it as one value")


def _check_no_tensors(value: Any, fail: Callable[[str], Exception]) -> None:
    if isinstance(value, Tensor):
        raise fail("returned a plain Tensor (its variance would be lost)")
    if isinstance(value, Moments):
        if not isinstance(value.mean, Tensor) or not (
            value.variance is None or (isinstance(value.variance, Tensor) and value.variance.shape == value.mean.shape)
        ):
            raise fail(
                f"returned Moments with mean {type(value.mean).__name__} and variance "
                f"{type(value.variance).__name__} (need a tensor, and None or a tensor of the same shape)"
            )
    elif isinstance(value, (tuple, list)):
        for v in value:
            _check_no_tensors(v, fail)
    elif isinstance(value, dict):
        for v in value.values():
            _check_no_tensors(v, fail)


# Signatures by target: torch operators have one per overload (the first that binds is used).
_SIGNATURES: dict[Any, list[inspect.Signature]] = {}


def _signatures(target: Any, bound: bool) -> list[inspect.Signature]:
    key = (target, bound)
    if key not in _SIGNATURES:
        signatures: list[inspect.Signature] = []
        try:
            signatures = [inspect.signature(target)]
        except (TypeError, ValueError):
            signatures = list(get_signature_for_torch_op(target) or [])
        if bound:  # an unbound forward(self, ...): drop self
            signatures = [s.replace(parameters=list(s.parameters.values())[1:]) for s in signatures]
        _SIGNATURES[key] = signatures
    return _SIGNATURES[key]


def _normalized(target: Any, args: tuple, kwargs: dict, bound: bool = False) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every keyword argument that the operation also takes by
    position moved to its position (defaults filled in before it), so rules, whose own
    parameter names need not be torch's, see one form of each call."""
    if not kwargs or target is None:
        return args, kwargs
    for signature in _signatures(target, bound):
        try:
            call = signature.bind(*args, **kwargs)
        except TypeError:
            continue
        positional: list[Any] = []
        pending: list[Any] = []  # defaults of skipped parameters, kept only if a later one is given
        rest = dict(kwargs)
        for name, parameter in signature.parameters.items():
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.VAR_KEYWORD):
                break
            if parameter.kind == parameter.VAR_POSITIONAL:
                if name in call.arguments:
                    positional.extend(pending)
                    positional.extend(call.arguments[name])
                break
            if name in call.arguments:
                positional.extend(pending)
                pending = []
                positional.append(call.arguments[name])
                rest.pop(name, None)
            elif parameter.default is parameter.empty:
                break
            else:
                pending.append(parameter.default)
        return tuple(positional), rest
    return args, kwargs


# model -> (fingerprint, registered module types, graph): tracing ResNet-18 costs more than
# propagating a small batch through it, so the graph is reused while the model is unchanged.
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple, fx.GraphModule]] = weakref.WeakKeyDictionary()


def _traced(model: nn.Module) -> fx.GraphModule:
    if (
        nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    ):
        raise UnsupportedOperationError(
            "method='moments' cannot run the model's forward hooks (it replaces each "
            "module's forward by its moment rule); remove them or predict with method='mc'"
        )
    leaves = tuple(t for t in _RULES if isinstance(t, type))
    fingerprint = _fingerprint(model)
    entry = _GRAPHS.get(model)
    if entry is None or entry[0] != fingerprint or entry[1] != leaves:
        try:
            entry = _GRAPHS[model] = (fingerprint, leaves, trace(model, leaves))
        except TracingError as error:
            raise UnsupportedOperationError(
                f"method='moments' needs a forward that torch.fx can trace; predict with method='mc' instead ({error})"
            ) from error
    return entry[2]


def propagate_moments(model: nn.Module, x: Tensor, *, differentiable: bool = False) -> Moments:
    """The mean and variance of ``model``'s output for input ``x``, in one pass.

    The model runs in eval mode (its modes are restored afterwards), without autocast
    (variances need float32's range), and without gradients unless ``differentiable``.
    Layers in posterior-mean mode
    (:func:`torchbayes.posterior_mean`) have no weight variance. A model returning a
    tuple is read from its first element.

    Args:
        model: a network whose ``forward`` torch.fx can trace (no control flow on tensor
            values), made of modules and functions that have moment rules.
        x: the input batch, known exactly.
        differentiable: record the autograd graph, so that a loss of the moments trains
            the posterior (sampling-free training, `expected_log_likelihood`). The
            rules of linear and convolutional layers, ReLU, sums, reshapes and the
            Gaussian heads then avoid in-place steps; other rules may not support it.

    Returns:
        :class:`Moments` of the output (variance ``None`` if nothing in the model is random).

    Raises:
        UnsupportedOperationError: an operation without a rule acts on a random value,
            ``forward`` cannot be traced (the message says why), or the model has forward hooks.

    Example:
        >>> out = propagate_moments(model, images)
        >>> out.mean.shape, out.variance.shape   # (B, C) logits' means and variances
    """
    with eval_mode(model):  # before tracing: forwards that read self.training are recorded in eval mode
        graph = _traced(model)
        device_type = x.device.type if x.device.type in ("cuda", "cpu", "mps", "xpu") else "cpu"
        with torch.set_grad_enabled(differentiable), torch.autocast(device_type, enabled=False):
            out = _MomentInterpreter(graph).run(Moments(x))
    if isinstance(out, tuple) and out:  # Bayesian-Torch style (out, kl)
        out = out[0]
    if isinstance(out, Tensor):
        out = Moments(out)
    if not isinstance(out, Moments):
        raise TypeError(f"model output must be a tensor (or a tuple starting with one), got {type(out).__name__}")
    return out


def expected_log_likelihood(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """``E_q[log p(target | x, w)]`` per example, in closed form: sampling-free training.

    The moments of the input of the model's Gaussian head
    (`torchbayes.nn.likelihoods.GaussianLikelihood`, the model's last operation)
    are propagated through the network (`propagate_moments`, differentiable), and
    the head's closed form gives the expected Gaussian log-likelihood (Wu et al. 2019,
    with diagonal covariances). No weights are sampled, so the objective has no Monte
    Carlo noise. With `torchbayes.elbo_loss` it is the sampling-free ELBO; the model is
    run in eval mode (dropout off).

    Args:
        model: a network ending in a Gaussian head, made of modules with differentiable
            moment rules (Bayesian and plain linear/convolutional layers, ReLU...).
        x: the input batch ``(B, ...)``.
        target: ``(B, D)`` targets (``(B,)`` when ``D = 1``).

    Returns:
        ``(B,)`` expected log-likelihoods, differentiable in the model's parameters.

    Example:
        >>> nll = -expected_log_likelihood(model, x, y).mean()
        >>> loss = torchbayes.elbo_loss(nll, model, num_data=len(train_x))
    """
    head = find_likelihood(model)
    if head is None:
        raise ValueError(
            f"expected_log_likelihood needs a model ending in a Gaussian head "
            f"(torchbayes.nn.HomoscedasticGaussian or HeteroscedasticGaussian); {type(model).__name__} has none"
        )
    captured: list[tuple[GaussianLikelihood, Moments, Moments]] = []
    _HEAD_INPUTS.append(captured)
    try:
        out = propagate_moments(model, x, differentiable=True)
    finally:
        _HEAD_INPUTS.pop()
    if len(captured) != 1 or captured[0][2] is not out:
        raise ValueError(
            "expected_log_likelihood needs the Gaussian head to be the model's last operation, called once"
        )
    head, inputs, _ = captured[0]
    return head.expected_log_likelihood(inputs.mean, inputs.variance_or_zeros(), target)


def moment_samples(
    model: nn.Module,
    x: Tensor,
    num_samples: int,
    *,
    task: str,
    output_variance: str | None = None,
    seed: int | torch.Generator | None = None,
) -> Tensor:
    """Outputs ``(S, B, ...)`` that :func:`~torchbayes.prediction.summarize` turns into the result.

    * classification: ``num_samples`` logit vectors drawn from the propagated Gaussian
      ``N(mean, diag(variance))``, so the softmax's nonlinearity and the entropy
      decomposition are computed as for Monte Carlo samples, at a cost of
      ``O(S * B * C)`` (no network pass);
    * regression: the two points ``mean +/- std`` (``S = 2``), whose mean and
      (population) variance are the propagated moments exactly. For a model whose
      output's second half is a variance (log-variance), that half holds the exact
      expected variance ``E[variance]`` (its log ``log E[exp(log_variance)]``) in both.

    Args:
        model: as for :func:`propagate_moments`.
        x: as for :func:`propagate_moments`.
        num_samples: logit samples per input (classification).
        task: ``"classification"`` or ``"regression"``.
        output_variance: for regression, ``None``, ``"variance"`` or ``"log_variance"``
            (as for :func:`~torchbayes.predict`).
        seed: makes the logit samples reproducible.

    Returns:
        A tensor ``(S, B, ...)``.
    """
    out = propagate_moments(model, x)
    if task == "regression":
        out = _expected_output_variance(out, output_variance)
    std = out.variance_or_zeros().sqrt()
    if task == "classification":
        with noise.noise_generator(seed):
            eps = noise.randn((num_samples, *out.mean.shape), out.mean)
        return eps.mul_(std).add_(out.mean)
    return torch.stack([out.mean + std, out.mean - std])


def _expected_output_variance(out: Moments, output_variance: str | None) -> Moments:
    """Replace the variance half of a regression output by its exact expectation (see :func:`moment_samples`)."""
    if output_variance is None:
        return out
    width = out.mean.shape[-1] if out.mean.dim() > 1 else 0
    if width % 2 or width == 0:
        raise ValueError(
            f"output_variance={output_variance!r} needs an even last output dimension "
            f"(D means then D {output_variance}s); got output {tuple(out.mean.shape)}"
        )
    means, second = out.mean.split(width // 2, dim=-1)
    mean_variance, second_variance = out.variance_or_zeros().split(width // 2, dim=-1)
    # E[exp(l)] = exp(m + v/2) for a Gaussian l; the expected variance has no variance of its own.
    expected = second + second_variance / 2 if output_variance == "log_variance" else second
    return Moments(torch.cat([means, expected], -1), torch.cat([mean_variance, torch.zeros_like(expected)], -1))


# ----------------------------------------------------------------------------- linear maps
Op = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _linear_map(
    op: Op,
    x: Moments,
    weight: Tensor,
    bias: Tensor | None,
    weight_variance: Tensor | None = None,
    bias_variance: Tensor | None = None,
    channels: tuple[int, int] | None = None,
    weight_square: Tensor | None = None,
) -> Moments:
    """Moments of ``op(x, W, b)`` for ``op`` linear in ``x`` and in ``W``, with independent
    ``x`` and Gaussian ``W``, ``b``: exact. ``Var = op(m^2 + v, var_W) + var_b + op(v, mean_W^2)``.

    ``channels``: the input's and the weight's input-channel dimensions, when the two
    variance terms may be one ``op`` on inputs and weights concatenated along them (not
    for grouped convolutions): faster for narrow layers, where one wide call beats two.
    ``weight_square``: ``weight ** 2`` if the caller has it.
    """
    mean = op(x.mean, weight, bias)
    if x.variance is None:
        return Moments(mean, None if weight_variance is None else op(x.mean.square(), weight_variance, bias_variance))
    if weight_square is None:
        weight_square = weight.square()
    if weight_variance is None:
        return Moments(mean, op(x.variance, weight_square, None))
    second = x.mean.square().add_(x.variance)
    if channels is not None:
        inputs, weights = (
            torch.cat([second, x.variance], channels[0]),
            torch.cat([weight_variance, weight_square], channels[1]),
        )
        return Moments(mean, op(inputs, weights, bias_variance))
    variance = op(second, weight_variance, bias_variance)
    return Moments(mean, variance.add_(op(x.variance, weight_square, None)))


def _channel_dims(module: nn.Module, x: Tensor) -> tuple[int, int] | None:
    """Where a layer's input channels are in its input and its weight (``None``: grouped)."""
    if not hasattr(module, "kernel_size"):
        return (-1, 1)  # linear: (..., in) and (out, in)
    if module.groups != 1:
        return None
    batched = x.dim() == len(module.kernel_size) + 2  # type: ignore[arg-type]
    return (1 if batched else 0, 0 if module.transposed else 1)


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _weight_op(module: nn.Module, x: Tensor, output_size: list[int] | None = None) -> Op:
    """The layer's ``op(input, weight, bias)``: linear, convolution or transposed convolution."""
    if isinstance(module, nn.Linear) or not hasattr(module, "kernel_size"):
        return F.linear
    if not getattr(module, "transposed", False):
        return module._op if isinstance(module, BayesianWeightLayer) else module._conv_forward  # type: ignore[return-value]
    d = len(module.kernel_size)  # type: ignore[arg-type]
    output_padding = _torch_output_padding(
        module, x, output_size, module.stride, module.padding, module.kernel_size, d, module.dilation
    )
    transpose = _CONV_TRANSPOSE[d]

    stride, padding, groups, dilation = (
        cast(Any, getattr(module, n)) for n in ("stride", "padding", "groups", "dilation")
    )

    def op(inp: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return transpose(inp, weight, bias, stride, padding, output_padding, groups, dilation)

    return op


# module -> (the parameters' identities and versions, their variance tensors): a layer's
# weight variances (and squared means) cost as much as its whole pass for small batches,
# so they are kept while the parameters are unchanged (in-place updates bump _version).
_WEIGHT_MOMENTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[Tensor, Tensor | None, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _weight_moments(module: BayesianWeightLayer) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(sigma_W^2, sigma_b^2 or None, mu_W^2)`` of a Bayesian layer, cached per parameter version
    (not while recording gradients: training needs them fresh and differentiable)."""
    params = [p for pair in module._mu_rho_pairs() for p in pair]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _fresh_weight_moments(module)
    key = tuple((id(p), p._version) for p in params)
    entry = _WEIGHT_MOMENTS.get(module)
    if entry is None or entry[0] != key:
        entry = _WEIGHT_MOMENTS[module] = (key, _fresh_weight_moments(module))
    return entry[1]


def _fresh_weight_moments(module: BayesianWeightLayer) -> tuple[Tensor, Tensor | None, Tensor]:
    bias_variance = module.posterior_sigma("bias").square() if module.bias_mu is not None else None
    return module.posterior_sigma("weight").square(), bias_variance, module.weight_mu.square()


@register_moment_rule(BayesianWeightLayer)
def _bayesian_weight_layer(module: BayesianWeightLayer, x: Moments, output_size: list[int] | None = None) -> Moments:
    module._check_input(x.mean)
    op = _weight_op(module, x.mean, output_size)
    if module.deterministic:  # posterior-mean mode
        return _linear_map(op, x, module.weight_mu, module.bias_mu)
    weight_variance, bias_variance, weight_square = _weight_moments(module)
    return _linear_map(
        op,
        x,
        module.weight_mu,
        module.bias_mu,
        weight_variance,
        bias_variance,
        _channel_dims(module, x.mean),
        weight_square,
    )


@register_moment_rule(ReferenceLayer)
def _reference_layer(module: ReferenceLayer, x: Moments, return_kl: bool = True) -> Moments | tuple[Moments, Moments]:
    out = _bayesian_weight_layer(module, x)
    return (out, Moments(module.kl_loss())) if return_kl and not module.dnn_to_bnn_flag else out


@register_moment_rule(nn.Linear, nn.modules.conv._ConvNd)
def _deterministic_weight_layer(module: nn.Module, x: Moments, output_size: list[int] | None = None) -> Moments:
    return _linear_map(_weight_op(module, x.mean, output_size), x, module.weight, module.bias)  # type: ignore[arg-type]


@register_moment_rule(nn.modules.batchnorm._BatchNorm)
def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Moments) -> Moments:
    if module.training or module.running_var is None:
        raise _unsupported(
            f"{type(module).__name__} without running statistics (it normalises with "
            "the batch's own statistics, so examples are not independent)"
        )
    mean = module(x.mean)
    if x.variance is None:
        return Moments(mean)
    scale = (module.running_var + module.eps).rsqrt()
    if module.weight is not None:
        scale = scale * module.weight
    shape = (-1,) + (1,) * (x.mean.dim() - 2)
    return Moments(mean, x.variance * scale.square().view(shape))


# ----------------------------------------------------------------------------- likelihood heads
# While expected_log_likelihood runs, the heads' rules record (head, input, output) here.
_HEAD_INPUTS: list[list[tuple[GaussianLikelihood, Moments, Moments]]] = []


@register_moment_rule(GaussianLikelihood)
def _gaussian_head(module: GaussianLikelihood, x: Moments) -> Moments:
    """The means pass through; the log-variance is moment-matched: log-normal with the
    exact mean and variance of the predicted variance (so ``E[exp(l)]``, what regression
    prediction reads, is exact), by quadrature over the raw input for the heteroscedastic head."""
    module._check_input(x.mean)
    width = module.out_features
    if isinstance(module, HomoscedasticGaussian):
        mean, variance = x.mean, x.variance
        log_variance = Moments(torch.log(module.variance).expand_as(x.mean))
    elif isinstance(module, HeteroscedasticGaussian):
        mean, raw = x.mean.split(width, dim=-1)
        variance, raw_variance = (None, None) if x.variance is None else x.variance.split(width, dim=-1)
        if raw_variance is None or _HEAD_INPUTS:  # (training reads the head's input, not this)
            log_variance = Moments(torch.log(module.variance_of(raw)))
        else:
            noise = _quadrature(module.variance_of, Moments(raw, raw_variance))
            spread = torch.log1p(noise.variance_or_zeros() / noise.mean.square())  # lognormal sigma^2
            log_variance = Moments(torch.log(noise.mean) - spread / 2, spread)
    else:
        raise _unsupported(f"Gaussian head {type(module).__qualname__} (register a moment rule for it)")
    out = _joining(torch.cat)([Moments(mean, variance), log_variance], -1)
    if _HEAD_INPUTS:
        _HEAD_INPUTS[-1].append((module, x, out))
    return out


# ----------------------------------------------------------------------------- shapes, sums
def _both(fn: Callable[[Tensor], Tensor], x: Moments) -> Moments:
    return Moments(fn(x.mean), None if x.variance is None else fn(x.variance))


@register_moment_rule(
    nn.Flatten, nn.Unflatten, nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle, nn.modules.dropout._DropoutNd
)
def _rearrangement_module(module: nn.Module, x: Moments) -> Moments:
    # Dropout modules are the identity in eval mode (propagate_moments switches it on).
    return _both(module, x)


def _rearrangement(fn: Callable[..., Tensor]) -> MomentRule:
    def rule(x: Moments, *args: Any, **kwargs: Any) -> Moments:
        if not isinstance(x, Moments) or _has_moments((args, kwargs)):
            raise _unsupported(f"{_describe(fn)} with random arguments other than its input")
        return _both(lambda t: fn(t, *args, **kwargs), x)

    return rule


for _name in (
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "t",
    "expand",
    "repeat",
    "movedim",
    "narrow",
    "clone",
):
    register_moment_rule(_name)(_rearrangement(lambda t, *a, _m=_name, **k: getattr(t, _m)(*a, **k)))
for _fn in (
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.movedim,
    torch.narrow,
    torch.clone,
):
    register_moment_rule(_fn)(_rearrangement(_fn))


@register_moment_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout_function(x: Moments, p: float = 0.5, training: bool = True, inplace: bool = False) -> Moments:
    if training:
        raise _unsupported("dropout in training mode (functional dropout called with training=True)")
    return x


@register_moment_rule(operator.getitem)
def _getitem(obj: Any, index: Any) -> Any:
    if not isinstance(obj, Moments):  # a tuple of outputs, e.g. (out, kl)
        return _exact(obj[index])
    if _has_moments(index):
        raise _unsupported("indexing with a random index")
    return _both(lambda t: t[index], obj)


@register_moment_rule(getattr)
def _getattr(obj: Any, name: str, *default: Any) -> Any:
    if not isinstance(obj, Moments):
        return _exact(getattr(obj, name, *default))
    if name in ("shape", "dtype", "device", "ndim", "is_cuda", "layout"):
        return getattr(obj.mean, name)
    raise _unsupported(f"tensor attribute .{name}")


for _name in ("size", "dim", "numel", "ndimension", "get_device"):
    register_moment_rule(_name)(lambda x, *a, _m=_name, **k: getattr(x.mean, _m)(*a, **k))


def _as_moments(value: Any) -> Moments:
    if isinstance(value, Moments):
        return value
    if isinstance(value, Tensor):
        return Moments(value)
    return Moments(torch.as_tensor(value))


def _add_variances(a: Tensor | None, b: Tensor | None, scale: float = 1.0) -> Tensor | None:
    if b is None:
        return a
    b = b if scale == 1.0 else b * scale**2
    return b if a is None else a + b


@register_moment_rule(operator.add, operator.iadd, torch.add, "add")
def _add(a: Any, b: Any, *, alpha: float = 1.0) -> Moments:
    """Sum of independent values (a residual connection's branches are treated as independent)."""
    a, b = _as_moments(a), _as_moments(b)
    mean = a.mean + b.mean if alpha == 1 else torch.add(a.mean, b.mean, alpha=alpha)
    return Moments(mean, _add_variances(a.variance, b.variance, alpha))


@register_moment_rule(operator.sub, operator.isub, torch.sub, "sub")
def _sub(a: Any, b: Any, *, alpha: float = 1.0) -> Moments:
    return _add(a, b, alpha=-alpha)


@register_moment_rule(operator.neg, torch.neg, "neg")
def _neg(x: Moments) -> Moments:
    return Moments(-x.mean, x.variance)


@register_moment_rule(operator.mul, operator.imul, torch.mul, "mul")
def _mul(a: Any, b: Any) -> Moments:
    """Product of independent values: ``Var = va vb + va mb^2 + vb ma^2``."""
    a, b = _as_moments(a), _as_moments(b)
    mean = a.mean * b.mean
    variance = None
    if a.variance is not None:
        variance = a.variance * b.mean.square()
        if b.variance is not None:
            variance = variance + a.variance * b.variance
    if b.variance is not None:
        variance = _add_variances(variance, b.variance * a.mean.square())
    return Moments(mean, variance)


@register_moment_rule(operator.truediv, operator.itruediv, torch.div, "div")
def _div(a: Any, b: Any) -> Moments:
    if isinstance(b, Moments) and b.variance is not None:
        raise _unsupported("division by a random value")
    b = b.mean if isinstance(b, Moments) else b
    a = _as_moments(a)
    return Moments(a.mean / b, None if a.variance is None else a.variance / (b * b))


def _joining(join: Callable[..., Tensor]) -> MomentRule:
    def rule(tensors: Sequence[Any], dim: int = 0) -> Moments:
        parts = [_as_moments(t) for t in tensors]
        mean = join([p.mean for p in parts], dim)
        if all(p.variance is None for p in parts):
            return Moments(mean)
        return Moments(mean, join([p.variance_or_zeros() for p in parts], dim))

    return rule


register_moment_rule(torch.cat, torch.concat)(_joining(torch.cat))
register_moment_rule(torch.stack)(_joining(torch.stack))


@register_moment_rule(torch.mean, "mean")
def _mean(
    x: Moments, dim: int | Sequence[int] | None = None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> Moments:
    """Mean over ``dim`` of independent values: ``Var = sum(v) / n^2``."""
    dims = tuple(range(x.mean.dim())) if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
    mean = x.mean.mean(dims, keepdim=keepdim, dtype=dtype)
    if x.variance is None:
        return Moments(mean)
    count = math.prod(x.mean.shape[d] for d in dims)
    return Moments(mean, x.variance.mean(dims, keepdim=keepdim, dtype=dtype) / count)


# ----------------------------------------------------------------------------- pooling
@register_moment_rule(nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)
def _avg_pool_module(module: nn.Module, x: Moments) -> Moments:
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        d = int(type(module).__name__[-2])
        return _avg_pool(
            x,
            d,
            module.kernel_size,
            module.stride,
            module.padding,
            module.ceil_mode,
            module.count_include_pad,
            getattr(module, "divisor_override", None),
        )
    d = int(type(module).__name__[-2])  # AdaptiveAvgPool{1,2,3}d
    return _adaptive_avg_pool(x, d, module.output_size)


def _tuple(value: Any, d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


def _avg_pool(
    x: Moments,
    d: int,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Moments:
    """Average pooling; each output is ``sum(window) / n`` with ``n`` set by torch's
    padding and divisor rules, so ``Var = sum(window of v) / n^2 = avg_pool(v) / n``."""
    kernel, pad = _tuple(kernel_size, d), _tuple(padding, d)
    step = _tuple(stride if stride else kernel_size, d)
    if d == 1:  # avg_pool1d has no divisor_override: pool 1-d as 2-d with a unit height
        lifted = _avg_pool(
            _both(lambda t: t.unsqueeze(-2), x),
            2,
            (1, *kernel),
            (1, *step),
            (0, *pad),
            ceil_mode,
            count_include_pad,
            divisor_override,
        )
        return _both(lambda t: t.squeeze(-2), lifted)
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d

    def apply(t: Tensor, divisor: int | None = divisor_override) -> Tensor:
        return pool(t, kernel, step, pad, ceil_mode, count_include_pad, divisor)

    mean = apply(x.mean)
    if x.variance is None:
        return Moments(mean)
    ones = x.mean.new_ones((1,) * (x.mean.dim() - d) + tuple(x.mean.shape[-d:]))
    inverse_divisor = apply(ones) / apply(ones, 1)  # (count / n) / count
    return Moments(mean, apply(x.variance) * inverse_divisor)


def _adaptive_avg_pool(x: Moments, d: int, output_size: Any) -> Moments:
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[d]
    mean = pool(x.mean, output_size)
    if x.variance is None:
        return Moments(mean)
    # torch's windows: [floor(i L / out), ceil((i + 1) L / out)) along each dimension.
    inverse_size = x.mean.new_ones(())
    for length, out in zip(x.mean.shape[-d:], mean.shape[-d:]):
        i = torch.arange(out, device=x.mean.device)
        sizes = torch.div((i + 1) * length + out - 1, out, rounding_mode="floor") - torch.div(
            i * length, out, rounding_mode="floor"
        )
        inverse_size = inverse_size.unsqueeze(-1) * sizes.to(x.mean.dtype).reciprocal()
    return Moments(mean, pool(x.variance, output_size) * inverse_size)


@register_moment_rule(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _avg_pool_function(
    x: Moments,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Moments:
    d = x.mean.dim() - 2 if x.mean.dim() > 2 else 1
    return _avg_pool(x, d, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@register_moment_rule(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _adaptive_avg_pool_function(x: Moments, output_size: Any) -> Moments:
    d = len(output_size) if isinstance(output_size, (tuple, list)) else x.mean.dim() - 2
    return _adaptive_avg_pool(x, d, output_size)


@register_moment_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _max_pool_module(module: nn.modules.pooling._MaxPoolNd, x: Moments) -> Moments:
    d = int(type(module).__name__[-2])
    if module.return_indices:
        raise _unsupported(f"{type(module).__name__}(return_indices=True)")
    return _max_pool(x, d, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)


def _max_pool(
    x: Moments, d: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool
) -> Moments:
    """Max pooling by Clark's moment matching (an approximation): the maximum over a box is
    taken one axis at a time, folding Clark's pairwise maximum over each window's elements."""
    kernel, pad, dil = _tuple(kernel_size, d), _tuple(padding, d), _tuple(dilation, d)
    step = _tuple(stride if stride else kernel_size, d)
    if x.variance is None:
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
        return Moments(pool(x.mean, kernel, step, pad, dil, ceil_mode))
    mean, variance = x.mean, x.variance
    for axis in range(d):
        mean, variance = _max_pool_axis(
            mean, variance, mean.dim() - d + axis, kernel[axis], step[axis], pad[axis], dil[axis], ceil_mode
        )
    return Moments(mean, variance)


def _max_pool_axis(
    mean: Tensor, variance: Tensor, dim: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> tuple[Tensor, Tensor]:
    """Clark's maximum over the windows along one dimension, with torch's padding rules:
    padded positions never win (their results are overwritten by the running maximum)."""
    length = mean.shape[dim]
    span = dilation * (kernel - 1) + 1
    out = _pooled_length(length, span, stride, padding, ceil_mode)
    right = max(0, (out - 1) * stride + span - length - padding)
    if padding or right:
        widths = [0, 0] * (mean.dim() - 1 - dim) + [padding, right]
        mean, variance = F.pad(mean, widths), F.pad(variance, widths)

    def element(t: Tensor, j: int) -> Tensor:  # the j-th element of every window
        return t.narrow(dim, j * dilation, (out - 1) * stride + 1)[(slice(None),) * dim + (slice(None, None, stride),)]

    def first_valid(j: int) -> int:  # windows i < this have element j in the left padding
        return min(out, max(0, -(-(padding - j * dilation) // stride)))

    def first_right_pad(j: int) -> int:  # windows i >= this have element j in the right padding
        return min(out, max(0, -(-(length + padding - j * dilation) // stride)))

    best_mean, best_variance = element(mean, 0), element(variance, 0)
    for j in range(1, kernel):
        new_mean, new_variance = _clark_max(best_mean, best_variance, element(mean, j), element(variance, j))
        fixes = (
            (0, first_valid(j), best_mean, best_variance),  # element j is padding
            (first_valid(j), first_valid(j - 1), element(mean, j), element(variance, j)),  # all before were
            (first_right_pad(j), out, best_mean, best_variance),
        )  # element j is padding
        for begin, end, source_mean, source_variance in fixes:
            if end > begin:
                new_mean.narrow(dim, begin, end - begin).copy_(source_mean.narrow(dim, begin, end - begin))
                new_variance.narrow(dim, begin, end - begin).copy_(source_variance.narrow(dim, begin, end - begin))
        best_mean, best_variance = new_mean, new_variance
    return best_mean.contiguous(), best_variance.contiguous()


def _pooled_length(length: int, span: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """torch's output length of a pooling window (``pooling_output_shape``)."""
    numerator = length + 2 * padding - span + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    return out


@register_moment_rule(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def _max_pool_function(
    x: Moments,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Moments:
    if return_indices:
        raise _unsupported("max pooling with return_indices=True")
    d = x.mean.dim() - 2 if x.mean.dim() > 2 else 1
    return _max_pool(x, d, kernel_size, stride, padding, dilation, ceil_mode)


# ----------------------------------------------------------------------------- nonlinearities
def _relu_parts(mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(2 Phi(-a), E[relu(x)], mean - E[relu(x)])`` for ``x ~ N(mean, variance)``, ``a = m / s``.

    ``E[relu(x)] = m Phi(a) + s phi(a)``. The difference ``m - E = m Phi(-a) - s phi(a)`` is
    computed directly (not by subtraction) so that ``Var[relu(x)] = v Phi(a) + E (m - E)``
    keeps its precision when ``a >> 1``. ``2 Phi(-a) = erfc(a / sqrt 2)``, exact in the tail
    (and erfc is much faster than ndtr on the CPU). Work happens in place in few buffers:
    every fresh activation-sized allocation costs page faults on the CPU. Where the variance
    is 0, ``a`` is +-inf (or 0 for a zero mean), which every step below handles.
    """
    if torch.is_grad_enabled() and (mean.requires_grad or variance.requires_grad):
        return _relu_parts_differentiable(mean, variance)
    scaled_std = torch.mul(variance, 2.0).sqrt_().clamp_min_(torch.finfo(variance.dtype).tiny)  # s sqrt 2
    b = torch.div(mean, scaled_std)  # a / sqrt 2
    tail = torch.erfc(b)  # 2 Phi(-a)
    minus_density = b.square_().neg_().exp_().mul_(scaled_std).mul_(-0.5 / math.sqrt(math.pi))  # -s phi(a)
    remainder = torch.addcmul(minus_density, mean, tail, value=0.5)  # m Phi(-a) - s phi(a)
    return tail, torch.sub(mean, remainder), remainder


def _relu_parts_differentiable(mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_relu_parts` without in-place steps, for autograd (sampling-free training).

    The floor on the std keeps ``a`` finite where the variance is 0 (its gradient too)."""
    scaled_std = (2.0 * variance).clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
    b = mean / scaled_std
    tail = torch.erfc(b)
    minus_density = torch.exp(-b.square()) * scaled_std * (-0.5 / math.sqrt(math.pi))
    remainder = minus_density + 0.5 * mean * tail
    return tail, mean - remainder, remainder


def _leaky_relu(x: Moments, negative_slope: float = 0.0) -> Moments:
    """Exact moments of ``max(x, 0) + slope * min(x, 0)`` for Gaussian ``x``.

    ``y = slope x + (1 - slope) relu(x)`` and ``Cov(x, relu(x)) = v Phi(a)`` (Stein), so
    ``Var[y] = slope^2 v + (1 - slope)^2 Var[relu] + 2 slope (1 - slope) v Phi(a)``.
    """
    if x.variance is None:
        return Moments(F.leaky_relu(x.mean, negative_slope))
    tail, expectation, remainder = _relu_parts(x.mean, x.variance)
    if negative_slope == 0.0 and torch.is_grad_enabled() and expectation.requires_grad:  # autograd: no in-place
        return Moments(expectation, (x.variance * (1 - 0.5 * tail) + expectation * remainder).clamp_min(0.0))
    # v Phi(a) + E (m - E), with Phi(a) = 1 - tail / 2
    relu_variance = torch.addcmul(x.variance, x.variance, tail, value=-0.5).addcmul_(expectation, remainder)
    relu_variance.clamp_min_(0.0)
    if negative_slope == 0.0:
        return Moments(expectation, relu_variance)
    a, b = negative_slope, 1.0 - negative_slope
    cdf = tail.mul_(-0.5).add_(1.0)
    mean = torch.add(expectation * b, x.mean, alpha=a)
    variance = (relu_variance * b**2).add_(x.variance * (a * a + 2 * a * b * cdf))
    return Moments(mean, variance.clamp_min_(0.0))


def _clark_max(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor]:
    """Clark's (1961) Gaussian matching ``max(a, b)`` of independent Gaussians.

    ``max(a, b) = b + relu(a - b)``, with ``a - b ~ N(ma - mb, va + vb)`` and
    ``Cov(b, relu(a - b)) = -vb Phi``, so ``Var = va Phi + vb (1 - Phi) + Var-part of the relu``
    ``= va - (va - vb) Phi(-) + E (d - E)``.
    """
    tail, expectation, remainder = _relu_parts(mean_a - mean_b, var_a + var_b)
    variance = tail.mul_(var_b - var_a).mul_(0.5).add_(var_a).addcmul_(expectation, remainder).clamp_min_(0.0)
    return expectation.add_(mean_b), variance


@register_moment_rule(nn.ReLU, nn.LeakyReLU)
def _relu_module(module: nn.Module, x: Moments) -> Moments:
    return _leaky_relu(x, getattr(module, "negative_slope", 0.0))


@register_moment_rule(F.relu, torch.relu, "relu")
def _relu_function(x: Moments, inplace: bool = False) -> Moments:
    return _leaky_relu(x)


@register_moment_rule(F.leaky_relu)
def _leaky_relu_function(x: Moments, negative_slope: float = 0.01, inplace: bool = False) -> Moments:
    return _leaky_relu(x, negative_slope)


def _quadrature(fn: Callable[[Tensor], Tensor], x: Moments) -> Moments:
    """``E[f(x)]`` and ``Var[f(x)]`` by Gauss-Hermite quadrature with :data:`QUADRATURE_NODES`
    nodes. The variance is accumulated around ``f(mean)`` to avoid cancellation."""
    if x.variance is None:
        return Moments(fn(x.mean))
    points, masses = _standard_normal_nodes(QUADRATURE_NODES)
    nodes, weights = points.tolist(), masses.tolist()
    std = x.variance.sqrt()
    center = fn(x.mean)
    shift = torch.zeros_like(center)  # E[f - f(m)]
    second = torch.zeros_like(center)  # E[(f - f(m))^2]
    for node, weight in zip(nodes, weights):
        delta = fn(torch.add(x.mean, std, alpha=node)).sub_(center)
        shift.add_(delta, alpha=weight)
        second.addcmul_(delta, delta, value=weight)
    return Moments(center.add_(shift), second.addcmul_(shift, shift, value=-1.0).clamp_min_(0.0))


def _smooth(fn: Callable[[Tensor], Tensor]) -> Callable[[Moments], Moments]:
    return lambda x: _quadrature(fn, x)


@register_moment_rule(nn.GELU)
def _gelu_module(module: nn.GELU, x: Moments) -> Moments:
    return _quadrature(lambda t: F.gelu(t, approximate=module.approximate), x)


@register_moment_rule(F.gelu)
def _gelu_function(x: Moments, approximate: str = "none") -> Moments:
    return _quadrature(lambda t: F.gelu(t, approximate=approximate), x)


@register_moment_rule(nn.SiLU)
def _silu_module(module: nn.Module, x: Moments) -> Moments:
    return _quadrature(F.silu, x)


@register_moment_rule(F.silu)
def _silu_function(x: Moments, inplace: bool = False) -> Moments:
    return _quadrature(F.silu, x)


@register_moment_rule(nn.Sigmoid, nn.Tanh)
def _squashing_module(module: nn.Module, x: Moments) -> Moments:
    return _quadrature(torch.sigmoid if isinstance(module, nn.Sigmoid) else torch.tanh, x)


register_moment_rule(torch.sigmoid, F.sigmoid, "sigmoid")(_smooth(torch.sigmoid))
register_moment_rule(torch.tanh, F.tanh, "tanh")(_smooth(torch.tanh))


@register_moment_rule(nn.Softplus)
def _softplus_module(module: nn.Softplus, x: Moments) -> Moments:
    return _quadrature(lambda t: F.softplus(t, module.beta, module.threshold), x)


@register_moment_rule(F.softplus)
def _softplus_function(x: Moments, beta: float = 1.0, threshold: float = 20.0) -> Moments:
    return _quadrature(lambda t: F.softplus(t, beta, threshold), x)


@register_moment_rule(torch.exp, "exp")
def _exp(x: Moments) -> Moments:
    """Log-normal moments, exact: ``E = exp(m + v/2)``, ``Var = (exp(v) - 1) E^2``."""
    if x.variance is None:
        return Moments(x.mean.exp())
    mean = torch.exp(x.mean + x.variance / 2)
    return Moments(mean, torch.expm1(x.variance) * mean.square())
