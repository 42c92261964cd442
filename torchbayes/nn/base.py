"""The base classes shared by every Bayesian layer.

:class:`BayesianModule` owns what all Bayesian layers have in common: a mean-field
Gaussian posterior ``N(mu, softplus(rho)^2)`` over some named parameters, a prior for
each, the KL term, the Monte Carlo estimator in use and the posterior-mean switch.

:class:`BayesianWeightLayer` adds the three Monte Carlo estimators for layers whose
output is a linear map of the input, ``op(x, W, b)`` (linear, convolution, transposed
convolution). A subclass only says what ``op`` is and what a valid input looks like.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from torchbayes.nn import functional as BF
from torchbayes.nn import noise, vectorized
from torchbayes.priors import GaussianPrior, Prior

__all__ = ["ESTIMATORS", "BayesianModule", "BayesianWeightLayer", "canonical_estimator", "iter_bayesian_modules"]

#: The Monte Carlo estimators every weight layer supports.
ESTIMATORS: tuple[str, ...] = ("reparameterization", "flipout", "local")

Op = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def canonical_estimator(estimator: str) -> str:
    """Normalise an estimator name (case-insensitive; the reference's ``"Reparameterization"``
    and ``"Flipout"`` are accepted) or raise ``ValueError`` naming the valid choices."""
    if isinstance(estimator, str) and estimator.lower() in ESTIMATORS:
        return estimator.lower()
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def _check_finite_scalar(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


#: Largest initial posterior sigma: its square (a weight variance) must be finite in float32.
MAX_POSTERIOR_SIGMA = math.sqrt(torch.finfo(torch.float32).max)
#: Smallest: float32's smallest positive (subnormal) number, below which sigma is 0.
MIN_POSTERIOR_SIGMA = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23


def _check_posterior_rho(name: str, value: float) -> float:
    rho = _check_finite_scalar(name, value)
    sigma = rho if rho > 30 else math.log1p(math.exp(rho))  # softplus, without overflow
    if not sigma <= MAX_POSTERIOR_SIGMA:
        raise ValueError(
            f"{name}={value!r} gives a posterior sigma softplus(rho) = {sigma:.3g}, whose square "
            f"overflows float32 (sigma must be <= {MAX_POSTERIOR_SIGMA:.3g}; -3 gives sigma 0.049)"
        )
    if sigma < MIN_POSTERIOR_SIGMA:
        raise ValueError(
            f"{name}={value!r} gives a posterior sigma softplus(rho) = {sigma:.3g}, which is 0 in float32 "
            f"(the KL's log sigma would be -inf; rho must be >= {math.log(MIN_POSTERIOR_SIGMA):.1f}; -3 gives 0.049)"
        )
    return rho


class BayesianModule(nn.Module):
    """Base class of modules with a mean-field Gaussian posterior over named parameters.

    For each variational parameter ``name`` a subclass registers with
    :meth:`register_variational`, the module holds ``{name}_mu`` and ``{name}_rho``
    (``nn.Parameter``) and a prior module ``{name}_prior``. The posterior standard
    deviation is ``softplus(rho)``.

    Args:
        prior_mu: prior mean; a float, or a tensor broadcastable to every variational
            parameter (use :meth:`set_prior` for per-parameter tensors).
        prior_sigma: prior standard deviation (> 0), float or broadcastable tensor.
        posterior_mu_init: offset added to the posterior means' default initialisation.
        posterior_rho_init: initial ``rho`` (``sigma = softplus(rho)``;
            ``-3.0`` gives ``sigma ~= 0.049``).
        estimator: ``"reparameterization"``, ``"flipout"`` or ``"local"``.
        prior: a :class:`~torchbayes.priors.Prior` used (copied) for every variational
            parameter instead of the Gaussian given by ``prior_mu``/``prior_sigma``,
            e.g. a :class:`~torchbayes.priors.ScaleMixturePrior`.

    Attributes:
        deterministic: when ``True`` the module uses the posterior means and draws no
            noise (see :func:`torchbayes.nn.posterior_mean`).
    """

    #: whether this module draws one posterior sample per block of its batch when
    #: :func:`torchbayes.nn.vectorized.sample_groups` is active (see that module)
    supports_sample_groups: bool = False
    #: the prior copied to each variational parameter (a plain attribute, see __init__)
    _prior_template: Prior
    posterior_mu_init: float
    posterior_rho_init: float
    deterministic: bool

    def __init__(
        self,
        *,
        prior_mu: float | Tensor = 0.0,
        prior_sigma: float | Tensor = 1.0,
        posterior_mu_init: float = 0.0,
        posterior_rho_init: float = -3.0,
        estimator: str = "reparameterization",
        prior: Prior | None = None,
    ) -> None:
        super().__init__()
        if prior is not None and not isinstance(prior, Prior):
            raise TypeError(f"prior must be a torchbayes.priors.Prior, got {type(prior).__name__}")
        # Validated once here and copied per parameter by register_variational; kept out of
        # the module tree (object.__setattr__) so it is neither a submodule nor in state_dict.
        template = prior if prior is not None else GaussianPrior(prior_mu, prior_sigma)
        object.__setattr__(self, "_prior_template", template)
        self.posterior_mu_init = _check_finite_scalar("posterior_mu_init", posterior_mu_init)
        self.posterior_rho_init = _check_posterior_rho("posterior_rho_init", posterior_rho_init)
        self.estimator = canonical_estimator(estimator)
        self.deterministic = False
        self._variational_names: list[str] = []
        self._custom_priors: set[str] = set()  # names given a prior by set_prior (kept by resets)
        # The KL computed together with the last forward's draws, keyed by the names drawn
        # (see _draw_all): (kl, kl_parts, the mu/rho tensors drawn, their versions, token).
        self._kl_cache: dict[tuple[str, ...], tuple[Tensor, Tensor, list[Tensor], list[int], BF.KLToken]] = {}

    @property
    def estimator(self) -> str:
        """The Monte Carlo estimator: ``"reparameterization"``, ``"flipout"`` or ``"local"``.

        Every assignment (constructor, ``layer.estimator = ...``, checkpoint loading) goes
        through :func:`canonical_estimator`: ``"Flipout"`` is stored as ``"flipout"`` and an
        unknown name raises ``ValueError`` (the forward compares the stored name exactly).
        """
        return self._estimator_name

    @estimator.setter
    def estimator(self, value: str) -> None:
        self._estimator_name = canonical_estimator(value)

    # ----------------------------------------------------------------- parameters
    def register_variational(
        self,
        name: str,
        shape: tuple[int, ...],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Create ``{name}_mu``, ``{name}_rho`` and ``{name}_prior`` for a parameter of ``shape``."""
        self.register_parameter(f"{name}_mu", nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.register_parameter(f"{name}_rho", nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        prior = copy.deepcopy(self._prior_template)
        prior.check_shape(torch.Size(shape), name)
        self.add_module(f"{name}_prior", prior.to(device=device, dtype=dtype))
        self._variational_names.append(name)

    @property
    def variational_names(self) -> tuple[str, ...]:
        """Names of the parameters that have a posterior (e.g. ``("weight", "bias")``)."""
        return tuple(self._variational_names)

    def variational_parameters(self) -> Iterator[tuple[str, Tensor, Tensor, Prior]]:
        """Yield ``(name, mu, rho, prior)`` for each variational parameter."""
        for name in self._variational_names:
            yield (name, getattr(self, f"{name}_mu"), getattr(self, f"{name}_rho"), getattr(self, f"{name}_prior"))

    def posterior_sigma(self, name: str) -> Tensor:
        """Posterior standard deviation ``softplus(rho)`` of variational parameter ``name``."""
        self._check_name(name)
        return BF.softplus(getattr(self, f"{name}_rho"))

    def set_prior(self, name: str, prior: Prior) -> None:
        """Replace the prior of variational parameter ``name`` (e.g. a per-weight Gaussian)."""
        self._check_name(name)
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a torchbayes.priors.Prior, got {type(prior).__name__}")
        mu = getattr(self, f"{name}_mu")
        prior.check_shape(mu.shape, name)
        setattr(self, f"{name}_prior", prior.to(device=mu.device, dtype=mu.dtype))
        self._custom_priors.add(name)

    def _check_name(self, name: str) -> None:
        if name not in self._variational_names:
            raise KeyError(
                f"{name!r} is not a variational parameter of "
                f"{type(self).__name__}; expected one of {self.variational_names}"
            )

    def reset_variational_parameters(self) -> None:
        """Fill every ``rho`` with ``posterior_rho_init``, shift every ``mu`` by ``posterior_mu_init``
        and give each prior not set by :meth:`set_prior` its constructor values again.

        Subclasses initialise the means like their ``torch.nn`` twin first, then call this.
        Resetting the priors makes ``to_empty()`` followed by ``reset_parameters()`` a valid layer.
        """
        custom: set[str] = getattr(self, "_custom_priors", set())
        template: Prior = self.__dict__["_prior_template"]
        with torch.no_grad():
            for name, mu, rho, prior in self.variational_parameters():
                mu.add_(self.posterior_mu_init)
                rho.fill_(self.posterior_rho_init)
                if name not in custom:
                    for buffer_name, value in template.named_buffers():
                        buffer = getattr(prior, buffer_name)
                        if buffer.shape == value.shape:
                            buffer.copy_(value)
                        else:
                            setattr(prior, buffer_name, value.to(device=buffer.device, dtype=buffer.dtype))

    def _invalid_prior(self) -> str | None:
        """A message if some Gaussian prior's sigma is not a positive finite number, else None."""
        for name, _, _, prior in self.variational_parameters():
            sigma = getattr(prior, "sigma", None)
            if (
                isinstance(sigma, Tensor)
                and not sigma.is_meta
                and not bool((torch.isfinite(sigma) & (sigma > 0)).all())
            ):
                return (
                    f"{type(self).__name__}: {name}_prior.sigma is not a positive finite number "
                    "(uninitialised memory after to_empty()? call reset_parameters() or "
                    "load_state_dict() first)"
                )
        return None

    # ------------------------------------------------------------------------ KL
    def _draw_all(self, kind: str, with_means: bool = False) -> BF.PosteriorDraws:
        """Posterior draws of every variational parameter, in :attr:`variational_names` order
        (and their means, see ``functional.posterior_draws``).

        All of them go through one autograd node (``functional.posterior_draws``; see
        ``functional.DRAW_KINDS`` for ``kind``). While training with autograd, the same node
        also computes their KL (they share ``softplus(rho)`` and the backward pass) and caches
        it for the next :meth:`kl_divergence` call, which takes it if the parameters are
        unchanged and it has not been back-propagated yet; otherwise the KL is computed afresh.
        """
        names = tuple(self._variational_names)
        params = self._mu_rho_pairs()
        priors = [self._modules[name + "_prior"] for name in names]
        gaussian = [prior for prior in priors if isinstance(prior, GaussianPrior)]
        self._kl_cache.clear()
        fuse = (
            torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and len(gaussian) == len(priors)
            and any(rho.requires_grad for _, rho in params)
        )
        if not fuse:
            return BF.posterior_draws(params, kind, with_means=with_means)
        token = BF.KLToken()
        try:
            result = BF.posterior_draws(params, kind, [(p.mu, p.sigma) for p in gaussian], token, with_means)
        except (ZeroDivisionError, ValueError) as exc:
            raise ValueError(self._invalid_prior() or str(exc)) from exc
        tensors = [t for pair in params for t in pair]
        assert result.kl is not None and result.kl_parts is not None  # priors were given
        self._kl_cache[names] = (result.kl, result.kl_parts, tensors, [t._version for t in tensors], token)
        return result

    def _cached_kl(self) -> tuple[Tensor, Tensor] | None:
        """``(kl, kl_parts)`` of the last forward's draws, if still valid (see :meth:`_draw_all`):
        the same parameter tensors, unmodified since, and not back-propagated yet."""
        entry = self._kl_cache.pop(tuple(self._variational_names), None)
        if entry is None or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return None
        kl, kl_parts, tensors, versions, token = entry
        current = [t for pair in self._mu_rho_pairs() for t in pair]
        fresh = (
            not token.consumed
            and all(a is b for a, b in zip(current, tensors))
            and [t._version for t in tensors] == versions
        )
        return (kl, kl_parts) if fresh else None

    def _mu_rho_pairs(self) -> list[tuple[Tensor, Tensor]]:
        # The parameter dict directly: a per-step path, where Module.__getattr__ adds up.
        # Variational parameters are always registered, never None.
        params = cast("dict[str, Tensor]", self._parameters)
        return [(params[name + "_mu"], params[name + "_rho"]) for name in self._variational_names]

    def kl_divergence(self, reduction: str = "sum") -> Tensor:
        """``KL(q || p)`` of this module's posterior from its prior.

        Args:
            reduction: ``"sum"`` over every weight (the ELBO's term), or ``"mean"``:
                the mean over each parameter tensor, summed over tensors (what the
                reference Bayesian-Torch calls the KL; not an ELBO term).

        Returns:
            A scalar tensor, exact for Gaussian priors and a Monte Carlo estimate for
            the scale-mixture prior.
        """
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        cached = self._cached_kl()
        if cached is not None:
            kl, kl_parts = cached
            if reduction == "sum":
                return kl
            sizes = [mu.numel() for mu, _ in self._mu_rho_pairs()]
            return torch.dot(kl_parts, kl_parts.new_tensor(sizes).reciprocal_())
        try:
            terms = [prior.kl_divergence(mu, rho, reduction) for _, mu, rho, prior in self.variational_parameters()]
        except (ZeroDivisionError, ValueError) as exc:
            raise ValueError(self._invalid_prior() or str(exc)) from exc
        return torch.stack(terms).sum() if len(terms) > 1 else terms[0]

    def __getstate__(self) -> dict:
        # The cache holds autograd graphs, which neither deepcopy nor pickle can copy.
        state = super().__getstate__()
        state["_kl_cache"] = {}
        return state

    def extra_repr(self) -> str:
        text = f"estimator={self.estimator}"
        if self.deterministic:
            text += ", deterministic=True"
        return text


class BayesianWeightLayer(BayesianModule):
    """Base of Bayesian layers computing ``op(x, W, b)``, linear in ``x``.

    The three Monte Carlo estimators are implemented once here:

    * ``reparameterization``: one weight sample ``W = mu + sigma * eps`` per forward,
      shared by the whole batch (Blundell et al., 2015).
    * ``flipout``: ``op(x, mu) + op(x * s, sigma * eps) * r`` with random signs ``s``
      and ``r`` per example and channel, giving each example a pseudo-independent
      weight perturbation (Wen et al., 2018).
    * ``local``: pre-activations drawn from ``N(op(x, mu), op(x^2, sigma^2))``
      (Kingma et al., 2015). Exact for linear layers (each example gets an independent
      weight sample); an approximation for convolutions, see their docstrings.

    Subclasses define :meth:`_op`, :meth:`_check_input` and :attr:`_num_spatial_dims`.
    """

    weight_mu: Tensor
    weight_rho: Tensor
    bias_mu: Tensor | None
    bias_rho: Tensor | None
    #: number of trailing spatial dimensions that share one sign per channel in flipout
    _num_spatial_dims: int = 0
    #: implements the sample-groups hook of :mod:`torchbayes.nn.vectorized` (in ``_estimate``)
    supports_sample_groups: bool = True
    #: the ``torch.nn`` twin, and the constructor arguments this layer and its twin share
    #: under the same names (``bias``, ``device`` and ``dtype`` are handled separately)
    _torch_cls: type[nn.Module]
    _twin_args: tuple[str, ...] = ()

    def _register_weight_and_bias(
        self,
        weight_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.register_variational("weight", weight_shape, device=device, dtype=dtype)
        if bias_shape is not None:
            self.register_variational("bias", bias_shape, device=device, dtype=dtype)
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)

    @classmethod
    def from_torch(cls, module: nn.Module, **bayes_kwargs: Any) -> BayesianWeightLayer:
        """The Bayesian twin of a ``torch.nn`` layer, whose posterior means are its weights.

        Every constructor argument of ``module`` (stride, padding, groups, ``bias``,
        dtype, device...) is kept, so in posterior-mean mode the new layer computes what
        ``module`` computes (plus ``posterior_mu_init``, 0 by default). ``module`` is not
        modified.

        Args:
            module: an instance of this layer's ``torch.nn`` twin (subclasses included).
            **bayes_kwargs: ``prior_mu``, ``prior_sigma``, ``posterior_mu_init``,
                ``posterior_rho_init``, ``estimator``, ``prior``.

        Returns:
            A new layer, in ``module``'s training mode, with ``requires_grad`` of its
            posterior parameters copied from ``module``'s weight.

        Example:
            >>> BayesLinear.from_torch(nn.Linear(4, 2), estimator="flipout")
        """
        if not isinstance(module, cls._torch_cls):
            raise TypeError(
                f"{cls.__name__}.from_torch: module must be a torch.nn."
                f"{cls._torch_cls.__name__}, got {type(module).__name__}"
            )
        weight = module.weight
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"{cls.__name__}.from_torch: {type(module).__name__}.weight is not a tensor ({type(weight).__name__})"
            )
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{cls.__name__}.from_torch: {type(module).__name__} is not "
                "initialised yet (lazy module); run one forward pass first"
            )
        args = {name: getattr(module, name) for name in cls._twin_args}
        layer = cls(
            **args,
            bias=module.bias is not None,
            device=weight.device,  # type: ignore[call-arg]
            dtype=weight.dtype,
            **bayes_kwargs,
        )
        with torch.no_grad():
            for name, mu, rho, _ in layer.variational_parameters():
                mu.copy_(getattr(module, name))
                if layer.posterior_mu_init:
                    mu.add_(layer.posterior_mu_init)
                mu.requires_grad_(weight.requires_grad)
                rho.requires_grad_(weight.requires_grad)
        return layer.train(module.training)

    def to_torch(self) -> nn.Module:
        """A plain ``torch.nn`` layer whose weights are this layer's posterior means.

        Returns:
            A new module of this layer's twin type (same constructor arguments, device,
            dtype and training mode); this layer is not modified.

        Example:
            >>> BayesConv2d(3, 8, 3, padding=1).to_torch()
            Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
        """
        args = {name: getattr(self, name) for name in self._twin_args}
        module = self._torch_cls(
            **args, bias=self.bias_mu is not None, device=self.weight_mu.device, dtype=self.weight_mu.dtype
        )
        with torch.no_grad():
            for name, mu, _, _ in self.variational_parameters():
                getattr(module, name).copy_(mu)
        return module.train(self.training)

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _check_input(self, input: Tensor) -> None:
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return self._estimate(input, self._op)

    def _estimate(self, input: Tensor, op: Op) -> Tensor:
        if self.deterministic:
            return op(input, self.weight_mu, self.bias_mu)
        groups = vectorized.active_sample_groups()
        if groups is not None:  # several Monte Carlo samples in this pass (torchbayes.predict)
            return vectorized.forward_sample_groups(self, input, op, groups)
        if self.estimator == "reparameterization":
            return self._forward_reparameterization(input, op)
        if self.estimator == "flipout":
            return self._forward_flipout(input, op)
        return self._forward_local(input, op)

    def _draw_weight_and_bias(self, kind: str) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(weight draw, bias draw, weight mean, bias mean)``; the means carry their
        gradient through the draws' node (see ``functional.posterior_draws``)."""
        result = self._draw_all(kind, with_means=kind != "sample")
        has_bias = len(result.draws) > 1
        if result.means:
            weight_mean, bias_mean = result.means[0], result.means[1] if has_bias else None
        else:
            weight_mean, bias_mean = self.weight_mu, self.bias_mu
        return result.draws[0], result.draws[1] if has_bias else None, weight_mean, bias_mean

    def _forward_reparameterization(self, x: Tensor, op: Op) -> Tensor:
        weight, bias, _, _ = self._draw_weight_and_bias("sample")
        return op(x, weight, bias)

    def _sign_shape(self, t: Tensor) -> tuple[int, ...]:
        # One sign per example and channel; spatial positions share it, so each example's
        # perturbation is a genuine kernel sample (the flipped kernel has q's distribution).
        d = self._num_spatial_dims
        return tuple(t.shape[: t.dim() - d]) + (1,) * d

    def _flipout_signs(self, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """Flipout's input and output signs for input ``x`` and output shape ``out``, from one draw."""
        shape_in, shape_out = self._sign_shape(x), self._sign_shape(out)
        num_in = math.prod(shape_in)
        signs = noise.random_signs((num_in + math.prod(shape_out),), x)
        sign_out = signs[num_in:].view(shape_out)
        if sign_out.dtype != out.dtype:  # autocast: keep the output in the op's dtype
            sign_out = sign_out.to(out.dtype)
        return signs[:num_in].view(shape_in), sign_out

    def _forward_flipout(self, x: Tensor, op: Op) -> Tensor:
        delta_w, delta_b, mean_w, mean_b = self._draw_weight_and_bias("perturbation")
        mean = op(x, mean_w, mean_b)
        sign_in, sign_out = self._flipout_signs(x, mean)
        perturbation = op(x * sign_in, delta_w, delta_b)
        # In place: the op's output is ours and its backward does not need it, and an
        # activation-sized allocation less matters for wide convolutions.
        return mean.addcmul_(perturbation, sign_out)

    def _forward_local(self, x: Tensor, op: Op) -> Tensor:
        var_w, var_b, mean_w, mean_b = self._draw_weight_and_bias("variance")
        mean = op(x, mean_w, mean_b)
        # Clamp keeps sqrt's gradient finite where the input (hence the variance) is 0.
        std = op(x * x, var_w, var_b).clamp_min(1e-16).sqrt()
        return mean.addcmul_(std, noise.randn(mean.shape, mean))  # in place, as in flipout


def iter_bayesian_modules(model: nn.Module) -> Iterator[tuple[str, BayesianModule]]:
    """Yield ``(qualified_name, module)`` for every :class:`BayesianModule` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, BayesianModule):
            yield name, module
