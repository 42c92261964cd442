"""What every Bayesian-Torch front door shares: arguments, calling convention, checkpoints.

A front door is a thin subclass of a native torchbayes layer that speaks the
reference's (Bayesian-Torch 0.5.0) dialect:

* its constructor takes the reference's arguments in the reference's order, where
  ``prior_variance`` is, as in the reference, the prior's STANDARD DEVIATION;
* ``forward(x, return_kl=True)`` returns ``(out, kl)`` (``out`` alone when
  ``return_kl=False`` or after the reference's ``dnn_to_bnn`` set
  ``dnn_to_bnn_flag = True``), with ``kl`` the reference's value: the KL averaged over
  each parameter tensor and summed over tensors (:meth:`ReferenceLayer.kl_loss`);
* the posterior is initialised as the reference does it: ``mu ~ N(posterior_mu_init, 0.1)``
  and ``rho ~ N(posterior_rho_init, 0.1)``;
* ``state_dict()`` uses the reference's key names (``mu_weight``/``rho_weight`` or
  ``mu_kernel``/``rho_kernel``, ``mu_bias``/``rho_bias``) and, like the reference,
  leaves the (constructor-given) priors out, so checkpoints move both ways;
* the reference's attribute names (``mu_weight``, ``rho_kernel``, ``prior_weight_mu``...)
  read and write the native parameters and prior buffers.

Everything else (sampling, the estimators, the KL itself) is the native layer's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from torchbayes.nn.base import BayesianWeightLayer
from torchbayes.priors import GaussianPrior

__all__ = ["PRIOR_ARGUMENTS", "REQUIRED", "ReferenceLayer", "posterior_alias", "reference_signature"]

#: Marks a constructor argument without default in :func:`reference_signature`.
REQUIRED = inspect.Parameter.empty

#: The reference's prior/posterior arguments and their defaults, in its order.
PRIOR_ARGUMENTS: tuple[tuple[str, Any], ...] = (
    ("prior_mean", 0.0),
    ("prior_variance", 1.0),
    ("posterior_mu_init", 0.0),
    ("posterior_rho_init", -3.0),
)

# The reference draws its initial posterior parameters with this standard deviation.
_REFERENCE_INIT_STD = 0.1


def reference_signature(arguments: Iterable[tuple[str, Any]]) -> inspect.Signature:
    """An ``inspect.Signature`` of ``(name, default)`` pairs (``REQUIRED`` for none).

    Front doors bind their ``*args, **kwargs`` to it, so positional calls written for
    the reference map to the same arguments, and ``help()`` shows the reference's order.
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(name, kind, default=default) for name, default in arguments])


def posterior_alias(native: str, doc: str) -> property:
    """A read/write attribute under the reference's name for the native ``Parameter``."""

    def get(self: nn.Module) -> Tensor | None:
        return getattr(self, native)

    def set(self: nn.Module, value: Tensor) -> None:
        with torch.no_grad():
            getattr(self, native).copy_(value)

    return property(get, set, doc=doc)


def _prior_alias(name: str, attr: str) -> property:
    """The reference's per-weight prior buffer ``prior_{name}_{attr}`` (``None`` without bias)."""

    def get(self: ReferenceLayer) -> Tensor | None:
        if name not in self.variational_names:
            return None
        prior = self._gaussian_prior(name)
        value = getattr(prior, attr)
        shape = getattr(self, f"{name}_mu").shape
        if value.shape != shape:
            # The reference keeps full-size prior tensors and its users edit them in
            # place (fill_, copy_, .data = ...): materialise so such edits take effect.
            value = value.expand(shape).clone()
            setattr(prior, attr, value)
        return value

    def set(self: ReferenceLayer, value: Tensor | float) -> None:
        prior = self._gaussian_prior(name)
        parts = {"mu": prior.mu, "sigma": prior.sigma, attr: value}
        self.set_prior(name, GaussianPrior(parts["mu"], parts["sigma"]))  # validates value

    return property(
        get, set, doc=f"Prior {attr} of ``{name}`` (the reference's ``prior_{name}_{attr}``); per weight once read."
    )


def _check_reference_prior(owner: str, prior_mean: Any, prior_variance: Any) -> None:
    # Checked here so that the error names the argument the user wrote.
    for name, value in (("prior_mean", prior_mean), ("prior_variance", prior_variance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{owner}: {name} must be a finite float, got {value!r}")
    if prior_variance <= 0:
        raise ValueError(
            f"{owner}: prior_variance (the prior's standard deviation, as in "
            f"Bayesian-Torch) must be > 0, got {prior_variance!r}"
        )


class _FrontDoor(Protocol):
    """What the constructor helpers below need of a front door (a weight layer or an LSTM)."""

    __signature__: ClassVar[inspect.Signature]
    prior_mean: float
    prior_variance: float
    dnn_to_bnn_flag: bool

    def register_state_dict_post_hook(self, hook: Any) -> Any: ...

    def register_load_state_dict_pre_hook(self, hook: Any) -> Any: ...


def _bind_reference_arguments(layer: _FrontDoor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A front door's constructor arguments by name (the reference's signature, defaults
    applied), with the prior arguments checked; errors name the class."""
    try:
        bound = layer.__signature__.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{type(layer).__name__}: {error}") from None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    _check_reference_prior(type(layer).__name__, arguments["prior_mean"], arguments["prior_variance"])
    return arguments


def _finish_reference_setup(layer: _FrontDoor, prior_mean: float, prior_variance: float) -> None:
    """The reference's attributes and checkpoint key names on a constructed front door."""
    layer.prior_mean = prior_mean
    layer.prior_variance = prior_variance
    layer.dnn_to_bnn_flag = False
    layer.register_state_dict_post_hook(_save_with_reference_keys)
    layer.register_load_state_dict_pre_hook(_load_reference_keys)


class ReferenceLayer(BayesianWeightLayer):
    """Mixin giving a native weight layer the reference's constructor and conventions.

    A front door is ``class X(ReferenceLayer, NativeLayer)`` with the class attributes
    ``__signature__`` (the reference's arguments, see :func:`reference_signature`),
    ``_estimator`` and ``_reference_weight`` (``"weight"`` for linear layers, ``"kernel"``
    for convolutions: the reference's parameter names are ``mu_{_reference_weight}``...).

    Attributes:
        dnn_to_bnn_flag: when ``True`` (set by the reference's ``dnn_to_bnn``),
            ``forward`` returns the output alone, as a ``torch.nn`` layer does.
        prior_mean, prior_variance: the constructor's values (``prior_variance`` is
            the prior's standard deviation, as in the reference).
    """

    __signature__: ClassVar[inspect.Signature]
    _estimator: ClassVar[str]
    _reference_weight: ClassVar[str]
    prior_mean: float
    prior_variance: float
    dnn_to_bnn_flag: bool

    mu_bias = posterior_alias("bias_mu", "Posterior means of the bias (native ``bias_mu``).")
    rho_bias = posterior_alias("bias_rho", "Posterior rho of the bias (native ``bias_rho``).")
    prior_weight_mu = _prior_alias("weight", "mu")
    prior_weight_sigma = _prior_alias("weight", "sigma")
    prior_bias_mu = _prior_alias("bias", "mu")
    prior_bias_sigma = _prior_alias("bias", "sigma")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = _bind_reference_arguments(self, args, kwargs)
        priors = {name: arguments.pop(name) for name, _ in PRIOR_ARGUMENTS}
        super().__init__(
            **arguments,
            prior_mu=priors["prior_mean"],
            prior_sigma=priors["prior_variance"],
            posterior_mu_init=priors["posterior_mu_init"],
            posterior_rho_init=priors["posterior_rho_init"],
            estimator=self._estimator,
        )
        _finish_reference_setup(self, priors["prior_mean"], priors["prior_variance"])

    def reset_parameters(self) -> None:
        """Draw ``mu ~ N(posterior_mu_init, 0.1)`` and ``rho ~ N(posterior_rho_init, 0.1)``, as the reference."""
        with torch.no_grad():
            for _, mu, rho, _ in self.variational_parameters():
                mu.normal_(self.posterior_mu_init, _REFERENCE_INIT_STD)
                rho.normal_(self.posterior_rho_init, _REFERENCE_INIT_STD)

    def init_parameters(self) -> None:
        """The reference's name for :meth:`reset_parameters`."""
        self.reset_parameters()

    def kl_loss(self) -> Tensor:
        """The reference's KL: the mean KL per weight of each tensor, summed over tensors.

        Not the ELBO's KL (use :meth:`kl_divergence`, which sums over every weight).
        """
        return self.kl_divergence("mean")

    def forward(self, input: Tensor, return_kl: bool = True) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        """The native layer's forward, returning ``(out, kl_loss())`` like the reference.

        Args:
            input: as for the native layer.
            return_kl: return ``(out, kl)`` when ``True`` (the default) unless
                ``dnn_to_bnn_flag`` is set; else ``out``.

        Returns:
            ``(out, kl)`` or ``out``.
        """
        out = super().forward(input)
        if return_kl and not self.dnn_to_bnn_flag:
            return out, self.kl_loss()
        return out

    def _gaussian_prior(self, name: str) -> GaussianPrior:
        prior = getattr(self, f"{name}_prior")
        if not isinstance(prior, GaussianPrior):
            raise TypeError(
                f"{type(self).__name__}: the reference's prior attributes need a "
                f"GaussianPrior on {name!r}, found {type(prior).__name__}"
            )
        return prior

    @classmethod
    def _reference_keys(cls) -> dict[str, str]:
        """Native parameter name -> the reference's name."""
        w = cls._reference_weight
        return {"weight_mu": f"mu_{w}", "weight_rho": f"rho_{w}", "bias_mu": "mu_bias", "bias_rho": "rho_bias"}


def _save_with_reference_keys(
    module: ReferenceLayer, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    # This module's entries are the newest in ``state_dict`` (the hook runs right after
    # they were added), so rebuilding them in order keeps the dict's order.
    names = module._reference_keys()
    priors = tuple(f"{prefix}{name}_prior." for name in module.variational_names)
    mine = [
        key for key in state_dict if key.startswith(priors) or (key.startswith(prefix) and key[len(prefix) :] in names)
    ]
    entries = [(key, state_dict.pop(key)) for key in mine]
    for key, value in entries:
        local = key[len(prefix) :]
        if local in names:  # priors are dropped: the reference does not save them
            state_dict[prefix + names[local]] = value


def _load_reference_keys(module: ReferenceLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for native, reference in module._reference_keys().items():
        if prefix + reference in state_dict:
            state_dict[prefix + native] = state_dict.pop(prefix + reference)
    # Reference checkpoints carry no priors: keep the constructor's.
    for name in module.variational_names:
        prior = getattr(module, f"{name}_prior")
        for buffer_name, buffer in prior.named_buffers():
            state_dict.setdefault(f"{prefix}{name}_prior.{buffer_name}", buffer.detach().clone())
