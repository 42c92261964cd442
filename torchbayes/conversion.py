"""Turning a deterministic network into a Bayesian one and back.

:func:`dnn_to_bnn` replaces, in place, every ``torch.nn`` layer that has a Bayesian twin
(``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, subclasses included)
by that twin. Layers are matched by type (``isinstance``), never by class name, through
a registry that other layer families join with one call to :func:`register_conversion`.
:func:`moped` sets MOPED empirical-Bayes priors (Krishnan et al., AAAI 2020) on an
already Bayesian model from a pretrained deterministic one, and :func:`bnn_to_dnn`
returns a plain ``torch.nn`` copy whose weights are the posterior means.

Conversion is atomic: every replacement is built and checked before the first one is
swapped in, so a failure leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, Protocol, TypeVar, cast

import torch
from torch import Tensor, nn

from torchbayes.nn import functional as BF
from torchbayes.nn.base import BayesianModule, canonical_estimator
from torchbayes.nn.conv import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
)
from torchbayes.nn.linear import BayesLinear
from torchbayes.nn.rnn import BayesGRU, BayesLSTM
from torchbayes.priors import GaussianPrior, Prior, ScaleMixturePrior
from torchbayes.validation import check_flag

__all__ = [
    "DEFAULT_SETTINGS",
    "REFERENCE_PRIOR_PARAMETERS",
    "ConversionReport",
    "ConversionSettings",
    "bnn_to_dnn",
    "conversion_history",
    "dnn_to_bnn",
    "moped",
    "normalize_prior_parameters",
    "register_conversion",
    "register_opaque_module",
]

ModelT = TypeVar("ModelT", bound=nn.Module)
Predicate = Callable[[str, nn.Module], bool]
Selector = str | Iterable[str] | Predicate | None

#: Attribute of a converted model holding its list of :class:`ConversionReport`.
HISTORY_ATTRIBUTE = "torchbayes_conversions"


class _BayesianTwin(Protocol):
    """What :func:`register_conversion` checks a Bayesian class provides."""

    @classmethod
    def from_torch(cls, module: nn.Module, **bayes_kwargs: Any) -> BayesianModule: ...

    def to_torch(self) -> nn.Module: ...


# torch layer type -> Bayesian class with ``from_torch(module, **kw)`` and ``to_torch()``.
_CONVERSIONS: dict[type[nn.Module], type[_BayesianTwin]] = {}
# Modules whose forward reads their children's weights directly (e.g.
# F.multi_head_attention_forward uses out_proj.weight; TransformerEncoderLayer's fast
# path reads linear1.weight): a Bayesian child would be bypassed or crash them.
_OPAQUE_MODULES: list[type[nn.Module]] = [nn.MultiheadAttention, nn.TransformerEncoderLayer]


def register_conversion(torch_type: type[nn.Module], bayes_type: type[nn.Module]) -> None:
    """Make :func:`dnn_to_bnn` replace instances of ``torch_type`` (and its subclasses).

    ``bayes_type`` must provide a classmethod ``from_torch(module, **bayes_kwargs)``
    (receiving ``prior_mu``, ``prior_sigma``, ``posterior_mu_init``,
    ``posterior_rho_init``, ``estimator``) returning a new layer whose posterior means
    are ``module``'s weights, and a method ``to_torch()`` (used by :func:`bnn_to_dnn`).
    MOPED pairs each variational parameter ``name`` of the new layer with the torch
    module's parameter of the same ``name``.

    Args:
        torch_type: a ``torch.nn.Module`` subclass, e.g. ``nn.LSTM``.
        bayes_type: its Bayesian twin, e.g. ``BayesLSTM``.

    Example:
        >>> register_conversion(nn.GRU, BayesGRU)
    """
    if not (isinstance(torch_type, type) and issubclass(torch_type, nn.Module)):
        raise TypeError(f"torch_type must be an nn.Module subclass, got {torch_type!r}")
    if not (isinstance(bayes_type, type) and issubclass(bayes_type, BayesianModule)):
        raise TypeError(f"bayes_type must be a BayesianModule subclass, got {bayes_type!r}")
    for method in ("from_torch", "to_torch"):
        if not callable(getattr(bayes_type, method, None)):
            raise TypeError(f"bayes_type {bayes_type.__name__} must define {method}()")
    _CONVERSIONS[torch_type] = cast("type[_BayesianTwin]", bayes_type)  # both methods checked above


def register_opaque_module(module_type: type[nn.Module]) -> None:
    """Never convert layers inside ``module_type`` (its forward reads their weights directly).

    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` are registered already.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if module_type not in _OPAQUE_MODULES:
        _OPAQUE_MODULES.append(module_type)


for _torch_type, _bayes_type in (
    (nn.Linear, BayesLinear),
    (nn.Conv1d, BayesConv1d),
    (nn.Conv2d, BayesConv2d),
    (nn.Conv3d, BayesConv3d),
    (nn.ConvTranspose1d, BayesConvTranspose1d),
    (nn.ConvTranspose2d, BayesConvTranspose2d),
    (nn.ConvTranspose3d, BayesConvTranspose3d),
    (nn.LSTM, BayesLSTM),
    (nn.GRU, BayesGRU),
):
    register_conversion(_torch_type, _bayes_type)


def _bayesian_twin(module: nn.Module) -> type[_BayesianTwin] | None:
    # The most specific registered base class, so an nn.Linear subclass converts too.
    for klass in type(module).__mro__:
        if klass in _CONVERSIONS:
            return _CONVERSIONS[klass]
    return None


# ---------------------------------------------------------------- the settings
#: Bayesian-Torch's dictionary as in its README.
REFERENCE_PRIOR_PARAMETERS: dict[str, Any] = {
    "prior_mu": 0.0,
    "prior_sigma": 1.0,
    "posterior_mu_init": 0.0,
    "posterior_rho_init": -3.0,
    "type": "Reparameterization",
    "moped_enable": False,
    "moped_delta": 0.5,
}

# The reference's dictionary key -> the setting (keyword) it gives.
_REFERENCE_KEYS = {
    "prior_mu": "prior_mu",
    "prior_sigma": "prior_sigma",
    "posterior_mu_init": "posterior_mu_init",
    "posterior_rho_init": "posterior_rho_init",
    "type": "estimator",
    "moped_enable": "moped",
    "moped_delta": "moped_delta",
}
_SETTING_NAMES = (
    "estimator",
    "prior_mu",
    "prior_sigma",
    "posterior_mu_init",
    "posterior_rho_init",
    "moped",
    "moped_delta",
    "prior",
)


def _finite(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    return float(value)


def _positive(label: str, value: Any) -> float:
    number = _finite(label, value)
    if number <= 0:
        raise ValueError(f"{label} must be > 0, got {value!r}")
    return number


def _checked(name: str, value: Any, label: str) -> Any:
    """Setting ``name`` made canonical, or an error naming ``label`` (how the user spelt it)."""
    if name == "estimator":
        try:
            return canonical_estimator(value)
        except ValueError:
            raise ValueError(
                f"{label} must be 'reparameterization', 'flipout' or 'local' (any case; the "
                f"reference's 'Reparameterization' and 'Flipout' too), got {value!r}"
            ) from None
    if name == "moped":
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be True or False, got {value!r}")
        return value
    if name == "prior":
        if value is not None and not isinstance(value, Prior):
            raise TypeError(
                f"{label} must be a torchbayes.priors.Prior (e.g. ScaleMixturePrior(...)) or "
                f"None, got {type(value).__name__}"
            )
        return value
    if name in ("prior_sigma", "moped_delta"):
        return _positive(label, value)
    return _finite(label, value)


def _unknown(what: str, names: Iterable[str], valid: Iterable[str]) -> str:
    valid = list(valid)
    hints = [
        f"{n!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(n), valid, 1)) else repr(n)
        for n in names
    ]
    return f"{what} {', '.join(hints)}; valid: {', '.join(valid)}"


def _key(name: str) -> str:
    return f"bnn_prior_parameters[{name!r}]"


@dataclass(frozen=True)
class ConversionSettings:
    """The settings of a :func:`dnn_to_bnn` call, checked; fields are its keyword names.

    Attributes:
        estimator: how weights are sampled in training: ``"reparameterization"``,
            ``"flipout"`` or ``"local"`` (local reparameterization), any letter case.
        prior_mu: mean of the Gaussian prior ``N(prior_mu, prior_sigma^2)`` of every weight.
        prior_sigma: its standard deviation, > 0.
        posterior_mu_init: added to the deterministic weights to give the posterior means.
        posterior_rho_init: initial ``rho`` of every weight; the posterior standard
            deviation is ``softplus(rho)`` (-3 gives about 0.049).
        moped: MOPED initialisation from the model's own weights ``w``: posterior
            ``N(w, (moped_delta |w|)^2)``, prior ``N(w, prior_sigma^2)``.
        moped_delta: MOPED's relative posterior scale, > 0.
        prior: a :class:`~torchbayes.priors.Prior` (copied to every weight, e.g. a
            :class:`~torchbayes.priors.ScaleMixturePrior`) instead of the Gaussian given by
            ``prior_mu``/``prior_sigma``; ``None`` for that Gaussian.

    Raises:
        ValueError, TypeError: an invalid value (the message names the field).

    Example:
        >>> ConversionSettings(estimator="Flipout", prior_sigma=0.1).estimator
        'flipout'
    """

    estimator: str = "reparameterization"
    prior_mu: float = 0.0
    prior_sigma: float = 1.0
    posterior_mu_init: float = 0.0
    posterior_rho_init: float = -3.0
    moped: bool = False
    moped_delta: float = 0.5
    prior: Prior | None = None

    def __post_init__(self) -> None:
        for name in _SETTING_NAMES:
            object.__setattr__(self, name, _checked(name, getattr(self, name), name))
        if self.moped and self.prior is not None:
            raise ValueError(
                "moped sets Gaussian priors N(w, prior_sigma^2) centred on the weights; "
                "it cannot be combined with prior="
            )

    def reference_dict(self) -> dict[str, Any]:
        """The same settings as the reference's seven-key ``bnn_prior_parameters``."""
        return {key: getattr(self, name) for key, name in _REFERENCE_KEYS.items()}


#: The native defaults of :func:`dnn_to_bnn` (every setting not given); the one place to change them.
#: The recommended recipe (issue 13, chosen on validation splits; see docs/quality.md): flipout,
#: MOPED from the model's own weights with delta 0.3, prior sigma 1.
DEFAULT_SETTINGS = ConversionSettings(estimator="flipout", moped=True, moped_delta=0.3)


def _resolve(bnn_prior_parameters: Mapping[str, Any] | None, keywords: Mapping[str, Any]) -> ConversionSettings:
    """Defaults, then the dictionary's keys, then the keywords; each setting given at most once."""
    chosen: dict[str, Any] = {}
    if bnn_prior_parameters is not None:
        if not isinstance(bnn_prior_parameters, Mapping):
            raise TypeError(
                "bnn_prior_parameters must be a dict like "
                f"{REFERENCE_PRIOR_PARAMETERS} (any subset of its keys), "
                f"got {type(bnn_prior_parameters).__name__}"
            )
        unknown = [k for k in bnn_prior_parameters if k not in _REFERENCE_KEYS]
        if unknown:
            raise KeyError(
                _unknown("bnn_prior_parameters: unknown key(s)", unknown, _REFERENCE_KEYS)
                + " (or use the keywords: dnn_to_bnn(model, estimator=..., prior_sigma=...))"
            )
        for key, value in bnn_prior_parameters.items():
            chosen[_REFERENCE_KEYS[key]] = _checked(_REFERENCE_KEYS[key], value, _key(key))
    twice = [name for name in keywords if name in chosen]
    if twice:
        raise TypeError(f"dnn_to_bnn: {twice} given both as keyword(s) and in bnn_prior_parameters")
    chosen.update(keywords)
    gaussian = {"prior_mu", "prior_sigma"} & chosen.keys()
    if chosen.get("prior") is not None and gaussian:
        raise ValueError(f"dnn_to_bnn: give either prior= or {sorted(gaussian)} (the Gaussian prior), not both")
    if gaussian:
        chosen.setdefault("prior", None)  # an explicit Gaussian replaces a default prior object
    if chosen.get("prior") is not None or "prior_mu" in chosen:
        # MOPED centres the prior on the weights: an explicit prior object or prior mean turns a
        # default MOPED off instead of being silently overridden (an explicit moped=True stays).
        chosen.setdefault("moped", False)
    return replace(DEFAULT_SETTINGS, **chosen)


def normalize_prior_parameters(bnn_prior_parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check the reference's dictionary and return it complete, with ``"type"`` made canonical.

    Args:
        bnn_prior_parameters: any of the keys of :data:`REFERENCE_PRIOR_PARAMETERS`
            (``prior_mu``, ``prior_sigma``, ``posterior_mu_init``, ``posterior_rho_init``,
            ``type``, ``moped_enable``, ``moped_delta``), as in Bayesian-Torch's README;
            missing keys take :data:`DEFAULT_SETTINGS`' values (``None``: all of them).
            ``type`` is ``"Reparameterization"``, ``"Flipout"`` or ``"local"`` in any
            letter case.

    Returns:
        A new dict with all seven keys, floats for numbers and ``type`` one of
        ``"reparameterization"``, ``"flipout"``, ``"local"``.

    Raises:
        KeyError: an unknown (e.g. misspelt) key; the message names it and the valid ones.
        ValueError: a value is invalid (the message names its key).

    Example:
        >>> normalize_prior_parameters({"type": "Flipout"})["type"]
        'flipout'
    """
    return _resolve(bnn_prior_parameters, {}).reference_dict()


# ------------------------------------------------------------------ selection
def _in_scope(name: str, pattern: str) -> bool:
    # A name selects that module and everything inside it; glob patterns are allowed.
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _compile_selector(selector: Selector, argument: str, names: list[str]) -> Predicate | None:
    if selector is None:
        return None
    if callable(selector) and not isinstance(selector, str):
        return selector
    if not isinstance(selector, Iterable) or isinstance(selector, (bytes, bytearray, Mapping)):
        raise TypeError(
            f"{argument} must be a module name, a list of names/glob patterns, or a "
            f"predicate (name, module) -> bool, got {type(selector).__name__} {selector!r}"[:300]
        )
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(
            f"{argument} must be a module name, a list of names/glob patterns, or a "
            f"predicate (name, module) -> bool, got {selector!r}"
        )
    for pattern in patterns:
        if not any(_in_scope(name, pattern) for name in names):
            raise ValueError(
                f"{argument}: {pattern!r} matches no module of the model; module names look like {names[1:6]}"
            )
    return lambda name, _module: any(_in_scope(name, p) for p in patterns)


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name.startswith(p + ".") for p in prefixes)


def _plan(
    model: nn.Module, include: Predicate | None, exclude: Predicate | None
) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The (name, module) pairs to convert, and the selected ones left alone with why."""
    modules = list(model.named_modules())
    owners: dict[int, list[str]] = {}
    for name, module in modules:
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(name)
    candidates: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    opaque: list[str] = []
    closed: list[str] = []  # converted or Bayesian: nothing inside is looked at
    for name, module in modules:
        if _inside(name, closed):
            continue
        if isinstance(module, BayesianModule):
            closed.append(name)
            continue
        if _bayesian_twin(module) is None:
            if isinstance(module, tuple(_OPAQUE_MODULES)):
                opaque.append(name)
            continue
        if (include is not None and not include(name, module)) or (exclude is not None and exclude(name, module)):
            continue
        closed.append(name)
        parent = next((p for p in reversed(opaque) if _inside(name, [p])), None)
        shared = sorted(
            {o for param in module._parameters.values() if param is not None for o in owners[id(param)] if o != name}
        )
        if parent is not None:
            skipped[name] = (
                f"inside {type(model.get_submodule(parent)).__name__} {parent!r}, "
                "whose forward reads this layer's weights directly"
            )
        elif shared:
            skipped[name] = f"its parameters are shared with {shared} (converting would untie them)"
        else:
            candidates.append((name, module))
    return candidates, skipped


# ---------------------------------------------------------------------- MOPED
def _moped_layer(
    layer: BayesianModule, pretrained: Mapping[str, Tensor], delta: float, prior_sigma: Mapping[str, Tensor | float]
) -> None:
    """Posterior N(w, (delta |w|)^2) and prior N(w, prior_sigma^2) for each parameter."""
    with torch.no_grad():
        for name, mu, rho, _ in layer.variational_parameters():
            w = pretrained[name].detach().to(device=mu.device, dtype=mu.dtype)
            mu.copy_(w)
            # inverse_softplus is stable at w = 0 (sigma floored at 1e-12, rho finite).
            rho.copy_(BF.inverse_softplus(delta * w.abs()))
            layer.set_prior(name, GaussianPrior(w.clone(), prior_sigma[name]))


def _layer_sources(layer: BayesianModule, layer_name: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The pretrained tensor of each variational parameter of ``layer``, shape-checked."""
    found = {}
    for name, mu, _, _ in layer.variational_parameters():
        key = f"{layer_name}.{name}" if layer_name else name
        if key not in state:
            raise KeyError(
                f"moped: the pretrained model has no {key!r} for Bayesian layer {layer_name!r} ({type(layer).__name__})"
            )
        if tuple(state[key].shape) != tuple(mu.shape):
            raise ValueError(
                f"moped: pretrained {key!r} has shape {tuple(state[key].shape)}, but "
                f"{layer_name!r}.{name}_mu has shape {tuple(mu.shape)}"
            )
        found[name] = state[key]
    return found


def moped(
    model: ModelT,
    pretrained: nn.Module | Mapping[str, Tensor],
    delta: float = 0.5,
    *,
    prior_sigma: float | None = None,
    load_deterministic: bool = True,
) -> ModelT:
    """MOPED: priors and posteriors of a Bayesian model from pretrained deterministic weights.

    For every Bayesian layer ``name`` of ``model`` and each of its variational
    parameters ``p`` (``weight``, ``bias``), with ``w`` the pretrained ``name.p``:
    posterior mean ``w``, posterior sigma ``delta * |w|``, prior ``N(w, sigma_p^2)``
    (Krishnan et al., "Specifying weight priors in Bayesian deep neural networks with
    empirical Bayes", AAAI 2020). Layers are matched by qualified name, so ``pretrained``
    must be the deterministic architecture the Bayesian model was converted from.

    Args:
        model: a Bayesian model (e.g. from :func:`dnn_to_bnn`), changed in place.
        pretrained: the deterministic model, or its ``state_dict()``.
        delta: relative posterior scale, > 0 (0.1 to 0.5 in the paper).
        prior_sigma: prior standard deviation; ``None`` keeps each layer's current
            Gaussian prior's sigma.
        load_deterministic: also copy every non-Bayesian parameter and buffer
            (BatchNorm statistics...) from ``pretrained``, as the reference does.

    Returns:
        ``model``. On any error (missing layer, shape mismatch...) it is unchanged.

    Example:
        >>> bnn = dnn_to_bnn(resnet18(num_classes=10))
        >>> moped(bnn, pretrained_resnet.state_dict(), delta=0.1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"moped: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(pretrained, nn.Module):
        state: Mapping[str, Tensor] = pretrained.state_dict()
    elif isinstance(pretrained, Mapping):
        state = pretrained
    else:
        raise TypeError(f"moped: pretrained must be an nn.Module or a state_dict, got {type(pretrained).__name__}")
    delta = _positive("moped: delta", delta)
    layers = _outermost_bayesian(model)
    if not layers:
        raise ValueError("moped: model has no Bayesian layers; convert it with dnn_to_bnn first")
    # Validate everything first; the loops that write below cannot fail.
    plans = []
    for name, layer in layers:
        sources = _layer_sources(layer, name, state)
        sigmas: dict[str, Tensor | float] = {}
        for p, _, _, prior in layer.variational_parameters():
            if prior_sigma is not None:
                sigmas[p] = _positive("moped: prior_sigma", prior_sigma)
            elif isinstance(prior, GaussianPrior):
                sigmas[p] = prior.sigma.clone()
            else:
                raise TypeError(
                    f"moped: layer {name!r} has a {type(prior).__name__} prior; "
                    "MOPED sets Gaussian priors, so give prior_sigma"
                )
        plans.append((layer, sources, sigmas))
    deterministic: dict[str, Tensor] = {}
    if check_flag("load_deterministic", load_deterministic):
        deterministic = _deterministic_state(model, [n for n, _ in layers], state)
    for layer, sources, sigmas in plans:
        _moped_layer(layer, sources, delta, sigmas)
    with torch.no_grad():
        own = model.state_dict(keep_vars=True)
        for key, value in deterministic.items():
            own[key].copy_(value)
    return model


def _deterministic_state(model: nn.Module, bayesian: list[str], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    own = model.state_dict()
    wanted = {k: v for k, v in own.items() if not _inside(k, bayesian)}
    missing = [k for k in wanted if k not in state]
    wrong = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    if missing or wrong:
        raise ValueError(
            f"moped: the pretrained state lacks {missing[:5]} or has other shapes for "
            f"{wrong[:5]}; is it the same architecture? (load_deterministic=False "
            "skips non-Bayesian layers)"
        )
    return {k: state[k] for k in wanted}


# ----------------------------------------------------------------- dnn_to_bnn
def _prior_record(prior: Prior | None) -> dict[str, Any] | None:
    """A plain-types description of a prior object, enough to rebuild the built-in ones."""
    if prior is None:
        return None
    if type(prior) is ScaleMixturePrior:
        return {
            "class": "ScaleMixturePrior",
            "pi": prior.pi,
            "sigma1": prior.sigma1,
            "sigma2": prior.sigma2,
            "num_samples": prior.num_samples,
        }
    if type(prior) is GaussianPrior and prior.mu.numel() == 1 and prior.sigma.numel() == 1:
        return {"class": "GaussianPrior", "mu": float(prior.mu), "sigma": float(prior.sigma)}
    return {"class": f"{type(prior).__module__}.{type(prior).__qualname__}"}


def _prior_from_record(record: Mapping[str, Any] | None) -> Prior | None:
    if record is None:
        return None
    args = {k: v for k, v in record.items() if k != "class"}
    if record["class"] == "ScaleMixturePrior":
        return ScaleMixturePrior(**args)
    if record["class"] == "GaussianPrior":
        return GaussianPrior(**args)
    raise ValueError(
        f"cannot rebuild a {record['class']} prior from a conversion record; convert the "
        "model with the same prior= yourself, then load its state_dict"
    )


@dataclass(frozen=True)
class ConversionReport:
    """What one :func:`dnn_to_bnn` call did; the model keeps a list of them.

    Attributes:
        prior_parameters: the settings used, as the reference's complete seven-key
            dictionary (see :func:`normalize_prior_parameters`).
        converted: qualified names of the layers made Bayesian.
        skipped: qualified name -> reason, for selected layers that were left
            deterministic because they cannot be converted correctly.
        prior: the ``prior=`` object used, described in plain types
            (``{"class": "ScaleMixturePrior", "pi": ..., ...}``); ``None`` for the Gaussian
            given by ``prior_mu``/``prior_sigma``.
    """

    prior_parameters: dict[str, Any]
    converted: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    prior: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types (for JSON or a ``weights_only`` checkpoint)."""
        return {
            "prior_parameters": dict(self.prior_parameters),
            "converted": list(self.converted),
            "skipped": dict(self.skipped),
            "prior": None if self.prior is None else dict(self.prior),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversionReport:
        """Inverse of :meth:`to_dict`."""
        prior = data.get("prior")
        return cls(
            normalize_prior_parameters(data["prior_parameters"]),
            tuple(data["converted"]),
            dict(data.get("skipped", {})),
            None if prior is None else dict(prior),
        )

    def settings(self) -> ConversionSettings:
        """The :class:`ConversionSettings` of the call (rebuilding its ``prior`` object)."""
        named = {_REFERENCE_KEYS[key]: value for key, value in self.prior_parameters.items()}
        return ConversionSettings(**named, prior=_prior_from_record(self.prior))

    def reapply(self, model: ModelT) -> ModelT:
        """Convert the same layers of a fresh copy of the deterministic architecture."""
        return _convert(model, self.settings(), lambda name, _m: name in self.converted, None)


def conversion_history(model: nn.Module) -> tuple[ConversionReport, ...]:
    """The :class:`ConversionReport` of every :func:`dnn_to_bnn` call on ``model``, oldest first."""
    return tuple(getattr(model, HISTORY_ATTRIBUTE, ()))


def _swap(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    # Every slot holding a replaced module, so a module registered twice stays shared.
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, key, replacements[id(child)])


def dnn_to_bnn(
    model: ModelT,
    bnn_prior_parameters: Mapping[str, Any] | None = None,
    *,
    estimator: str | None = None,
    prior_mu: float | None = None,
    prior_sigma: float | None = None,
    posterior_mu_init: float | None = None,
    posterior_rho_init: float | None = None,
    moped: bool | None = None,
    moped_delta: float | None = None,
    prior: Prior | None = None,
    include: Selector = None,
    exclude: Selector = None,
    **unknown: NoReturn,
) -> ModelT:
    """Replace, in place, every layer with a Bayesian twin by that twin.

    Layers are matched by type (``isinstance``): ``nn.Linear``, ``nn.Conv1d/2d/3d``,
    ``nn.ConvTranspose1d/2d/3d``, ``nn.LSTM``, ``nn.GRU`` and their subclasses, plus
    whatever :func:`register_conversion` added. A module merely NAMED like a layer is
    left alone, as are BatchNorm, LayerNorm, embeddings and every other module. Each new
    layer keeps all constructor arguments of the old one and starts with posterior
    means equal to its weights (plus ``posterior_mu_init``); Bayesian-Torch instead
    re-initialises them unless MOPED is on. With ``moped`` the posterior is
    ``N(w, (moped_delta |w|)^2)`` and the prior ``N(w, prior_sigma^2)`` per weight.

    Settings are given as keywords, or as Bayesian-Torch's dictionary (all seven keys as
    in its README, or any subset), or both (each setting once); whatever is not given
    takes its value from :data:`DEFAULT_SETTINGS`, the recommended recipe: flipout, MOPED
    with ``moped_delta=0.3``, prior sigma 1 (``dnn_to_bnn(model)`` on a trained model).

    Layers inside ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (whose
    forward reads their weights directly) and layers sharing a parameter with another
    module are left deterministic: a ``UserWarning`` lists them, and so does the
    returned model's report (``conversion_history(model)[-1].skipped``).

    Args:
        model: any module; changed in place (a bare layer cannot replace itself: its
            Bayesian twin is returned instead).
        bnn_prior_parameters: Bayesian-Torch's dictionary, e.g. ``{"prior_mu": 0.0,
            "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
            "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5}``,
            or part of it (``{"type": "Flipout"}``); ``type`` may also be ``"local"``.
        estimator: ``"reparameterization"``, ``"flipout"`` or ``"local"`` (the
            dictionary's ``type``).
        prior_mu: mean of every weight's Gaussian prior.
        prior_sigma: its standard deviation, > 0.
        posterior_mu_init: added to the weights to give the posterior means.
        posterior_rho_init: initial ``rho``; posterior sigma ``softplus(rho)``.
        moped: MOPED from the model's own weights (the dictionary's ``moped_enable``; on
            by default, so the model should be trained first). Giving ``prior`` or
            ``prior_mu`` turns the default off (MOPED centres the prior on the weights).
        moped_delta: MOPED's relative posterior scale, > 0.
        prior: a :class:`~torchbayes.priors.Prior` object for every weight instead of
            the Gaussian, e.g. ``ScaleMixturePrior(0.5, 1.0, 0.0025)``.
        include: which layers may be converted: a qualified name (``"fc"``; it also
            selects everything inside it, ``"layer4"``), a glob pattern
            (``"layer*.0.conv1"``), a list of these, or a predicate
            ``(name, module) -> bool``. ``None``: all.
        exclude: same forms; these layers stay deterministic (exclude wins).

    Returns:
        ``model``, whose ``torchbayes_conversions`` attribute (read it with
        :func:`conversion_history`) records the settings and converted names.

    Raises:
        TypeError: an unknown keyword (the message names it and the valid ones), a
            setting given twice, or a model that is not an ``nn.Module``.
        KeyError: an unknown dictionary key (named, with the valid keys).
        ValueError: an invalid value (the message names its key or keyword), a name in
            ``include``/``exclude`` that matches no module, or nothing to convert.
            The model is unchanged whenever an error is raised.

    Example:
        >>> model = dnn_to_bnn(torchvision.models.resnet18(), estimator="flipout", prior_sigma=0.1)
        >>> dnn_to_bnn(other, {"type": "Flipout"}, include=["fc"])  # last-layer Bayesian
    """
    if unknown:
        raise TypeError(_unknown("dnn_to_bnn: unknown keyword(s)", unknown, [*_SETTING_NAMES, "include", "exclude"]))
    if not isinstance(model, nn.Module):
        raise TypeError(f"dnn_to_bnn: model must be an nn.Module, got {type(model).__name__}")
    given = {
        "estimator": estimator,
        "prior_mu": prior_mu,
        "prior_sigma": prior_sigma,
        "posterior_mu_init": posterior_mu_init,
        "posterior_rho_init": posterior_rho_init,
        "moped": moped,
        "moped_delta": moped_delta,
        "prior": prior,
    }
    settings = _resolve(bnn_prior_parameters, {k: v for k, v in given.items() if v is not None})
    return _convert(model, settings, include, exclude)


def _convert(model: ModelT, settings: ConversionSettings, include: Selector, exclude: Selector) -> ModelT:
    """:func:`dnn_to_bnn` with its settings resolved."""
    names = [name for name, _ in model.named_modules()]
    candidates, skipped = _plan(
        model, _compile_selector(include, "include", names), _compile_selector(exclude, "exclude", names)
    )
    if not candidates:
        raise ValueError(
            "dnn_to_bnn: nothing to convert: no selected nn.Linear / nn.Conv* / nn.ConvTranspose* "
            f"(or registered) layer in {type(model).__name__}" + (f"; left deterministic: {skipped}" if skipped else "")
        )
    bayes_kwargs: dict[str, Any] = {
        "prior_mu": settings.prior_mu,
        "prior_sigma": settings.prior_sigma,
        "posterior_mu_init": settings.posterior_mu_init,
        "posterior_rho_init": settings.posterior_rho_init,
        "estimator": settings.estimator,
    }
    if settings.prior is not None:
        bayes_kwargs["prior"] = settings.prior
    replacements: dict[int, nn.Module] = {}
    for name, module in candidates:  # builds only; the model is untouched until _swap
        twin = _bayesian_twin(module)
        assert twin is not None  # _plan keeps only layers with a twin
        try:
            layer = twin.from_torch(module, **bayes_kwargs)
        except (TypeError, ValueError) as error:
            raise type(error)(f"dnn_to_bnn: cannot convert {name!r} ({type(module).__name__}): {error}") from error
        if settings.moped:
            sigma: dict[str, Tensor | float] = dict.fromkeys(layer.variational_names, settings.prior_sigma)
            _moped_layer(layer, dict(module.named_parameters(recurse=False)), settings.moped_delta, sigma)
        replacements[id(module)] = layer
    report = ConversionReport(
        settings.reference_dict(), tuple(name for name, _ in candidates), skipped, _prior_record(settings.prior)
    )
    if candidates[0][0] == "":
        model = replacements[id(model)]  # type: ignore[assignment]
    else:
        _swap(model, replacements)
    history = [*conversion_history(model), report]
    object.__setattr__(model, HISTORY_ATTRIBUTE, history)
    if skipped:
        warnings.warn(
            "dnn_to_bnn left these selected layers deterministic: "
            + "; ".join(f"{n!r} ({why})" for n, why in skipped.items())
            + ". Pass exclude=[...] to silence this.",
            UserWarning,
            stacklevel=3,
        )
    return model


# ----------------------------------------------------------------- bnn_to_dnn
def _outermost_bayesian(model: nn.Module) -> list[tuple[str, BayesianModule]]:
    found: list[tuple[str, BayesianModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, BayesianModule) and not _inside(name, [n for n, _ in found]):
            found.append((name, module))
    return found


def bnn_to_dnn(model: nn.Module) -> nn.Module:
    """A plain ``torch.nn`` copy of a Bayesian model, with the posterior means as weights.

    For deployment, export, or comparison with the deterministic network. ``model`` is
    not modified; every other module (BatchNorm...) is deep-copied as it is.

    Args:
        model: a model containing torchbayes Bayesian layers (or one such layer).

    Returns:
        A new model in which each Bayesian layer is replaced by its ``torch.nn`` twin
        (``layer.to_torch()``): it computes what ``model`` computes in posterior-mean mode.

    Example:
        >>> plain = bnn_to_dnn(bayesian_model)
        >>> torch.onnx.export(plain, x, "model.onnx")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bnn_to_dnn: model must be an nn.Module, got {type(model).__name__}")
    layers = _outermost_bayesian(model)
    if not layers:
        raise ValueError(f"bnn_to_dnn: {type(model).__name__} has no Bayesian layers to convert")
    lacking = [n for n, m in layers if not callable(getattr(m, "to_torch", None))]
    if lacking:
        raise TypeError(f"bnn_to_dnn: Bayesian layers {lacking} have no to_torch() method")
    if layers[0][0] == "":
        return cast(_BayesianTwin, layers[0][1]).to_torch()  # every layer has to_torch (checked above)
    plain = copy.deepcopy(model)
    plain.__dict__.pop(HISTORY_ATTRIBUTE, None)
    _swap(plain, {id(m): cast(_BayesianTwin, m).to_torch() for _, m in _outermost_bayesian(plain)})
    return plain
