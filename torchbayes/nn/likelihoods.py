r"""Gaussian likelihood heads: the last module of a regression network.

A head turns the network's last features into the parameters of a Gaussian over the
target, ``p(y | x, w) = N(y; mean(x, w), variance(x, w))``, packed in one output tensor
``(..., 2 D)``: ``D`` means followed by ``D`` log-variances. Every head has the same
output layout, so one log-likelihood, one prediction path and one report serve both:

- `HomoscedasticGaussian`: the network predicts the ``D`` means; the noise
  variance is one learned number per output (a point estimate, ``log_variance``).
- `HeteroscedasticGaussian`: the network predicts ``2 D`` numbers, the means and
  raw variances; ``variance = softplus(raw) + min_variance`` (positive, bounded away
  from 0 so that the likelihood cannot diverge on a point fitted exactly).

They differ only where the math differs: how the variance is parametrised
(`GaussianLikelihood.forward`) and the closed-form expected log-likelihood under
Gaussian uncertainty about the head's input (`GaussianLikelihood.expected_log_likelihood`,
the sampling-free objective of Wu et al. 2019, "Deterministic Variational Inference for
Robust Bayesian Neural Networks"). `torchbayes.predict` recognises a head inside a model,
so ``predict(model, x, task="regression")`` needs no ``output_variance``.

Example:
    >>> model = nn.Sequential(BayesLinear(13, 50), nn.ReLU(), BayesLinear(50, 2), HeteroscedasticGaussian(1))
    >>> head = model[-1]
    >>> loss = torchbayes.elbo_loss(head.nll(model(x), y), model, num_data=len(train_x))
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["GaussianLikelihood", "HeteroscedasticGaussian", "HomoscedasticGaussian", "find_likelihood"]

_LOG_2PI = math.log(2 * math.pi)

#: Gauss-Hermite nodes of the heteroscedastic head's expected log-likelihood.
QUADRATURE_NODES = 32


@functools.lru_cache(maxsize=8)
def _standard_normal_nodes(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``z_k`` and weights ``w_k`` with ``E[f(Z)] ~= sum_k w_k f(z_k)`` for ``Z ~ N(0, 1)``."""
    points, masses = np.polynomial.hermite.hermgauss(count)
    return points * math.sqrt(2.0), masses / math.sqrt(math.pi)


def _quadrature_points(mean: Tensor, variance: Tensor, nodes: int) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite points ``(..., nodes)`` of ``N(mean, variance)`` and their weights ``(nodes,)``."""
    points, weights = _standard_normal_nodes(nodes)
    z = torch.as_tensor(points, dtype=mean.dtype, device=mean.device)
    w = torch.as_tensor(weights, dtype=mean.dtype, device=mean.device)
    return mean.unsqueeze(-1) + variance.clamp_min(0).sqrt().unsqueeze(-1) * z, w


class GaussianLikelihood(nn.Module):
    r"""Base class of Gaussian heads: ``(..., F) -> (..., 2 D)`` means then log-variances.

    A subclass defines `forward` (how the variance is parametrised) and
    `expected_log_likelihood` (its closed form under Gaussian input uncertainty);
    the log-likelihood, its split and the checks are shared.

    Args:
        out_features: ``D``, the number of regression targets per example.
        min_variance: a floor added to every predicted variance (> 0), in the units of the
            (standardised) target squared.

    Attributes:
        output_variance: ``"log_variance"``: the layout `torchbayes.predict` reads.
    """

    output_variance = "log_variance"
    out_features: int
    min_variance: float

    def __init__(self, out_features: int, min_variance: float = 1e-6) -> None:
        super().__init__()
        if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features must be an int >= 1, got {out_features!r}")
        if isinstance(min_variance, bool) or not isinstance(min_variance, (int, float)) or not min_variance > 0:
            raise ValueError(f"min_variance must be a positive float, got {min_variance!r}")
        if not math.isfinite(min_variance):
            raise ValueError(f"min_variance must be finite, got {min_variance!r}")
        self.out_features = out_features
        self.min_variance = float(min_variance)

    @property
    def in_features(self) -> int:
        """The width of the input this head expects."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> Tensor:
        """Map the network's last features ``(..., in_features)`` to ``(..., 2 D)``."""
        raise NotImplementedError

    def expected_log_likelihood(self, mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
        """``E[log N(target; mu, sigma^2)]`` per example, ``(...,)``, when the head's input is
        Gaussian with elementwise ``mean`` and ``variance`` (independent elements)."""
        raise NotImplementedError

    def _check_input(self, features: Tensor) -> None:
        if isinstance(features, fx.Proxy):  # traced by torch.fx (prediction's graph split): shapes unknown
            return
        if not isinstance(features, Tensor) or features.dim() < 1 or features.shape[-1] != self.in_features:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"{type(self).__name__}({self.out_features}) expects inputs (..., {self.in_features}), got {shape}"
            )

    def split(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_variance)``, each ``(..., D)``, of a packed output ``(..., 2 D)``."""
        if not isinstance(output, Tensor) or output.dim() < 1 or output.shape[-1] != 2 * self.out_features:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"output must have shape (..., {2 * self.out_features}) (means, log-variances), got {shape}"
            )
        mean, log_variance = output.split(self.out_features, dim=-1)
        return mean, log_variance

    def _check_target(self, target: Tensor, batch_shape: torch.Size) -> Tensor:
        if not isinstance(target, Tensor) or not target.is_floating_point():
            raise TypeError(f"target must be a floating-point tensor, got {getattr(target, 'dtype', type(target))}")
        expected = (*batch_shape, self.out_features)
        if target.shape != expected:
            if self.out_features == 1 and target.shape == batch_shape:
                return target.unsqueeze(-1)  # (B,) targets of a single-output regression
            raise ValueError(f"target must have shape {expected}, got {tuple(target.shape)}")
        return target

    def log_likelihood(self, output: Tensor, target: Tensor) -> Tensor:
        """``log N(target; mean, exp(log_variance))`` of each example, summed over the ``D`` outputs.

        Args:
            output: the model's packed output ``(..., 2 D)``.
            target: ``(..., D)`` (or ``(...,)`` when ``D = 1``).

        Returns:
            ``(...,)`` log densities, in nats.
        """
        mean, log_variance = self.split(output)
        target = self._check_target(target, mean.shape[:-1])
        return gaussian_log_density(target, mean, log_variance).sum(-1)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean negative log-likelihood over the batch: the ``nll`` of `torchbayes.elbo_loss`.

        Example:
            >>> loss = torchbayes.elbo_loss(head.nll(model(x), y), model, num_data=N)
        """
        return -self.log_likelihood(output, target).mean()

    def expected_nll(self, mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
        """The batch mean of ``-expected_log_likelihood``: the sampling-free ``nll``."""
        return -self.expected_log_likelihood(mean, variance, target).mean()

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, min_variance={self.min_variance:g}"


def gaussian_log_density(target: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """Elementwise ``log N(target; mean, exp(log_variance))``."""
    return -0.5 * (_LOG_2PI + log_variance + (target - mean).square() * torch.exp(-log_variance))


class HomoscedasticGaussian(GaussianLikelihood):
    r"""Gaussian noise of one learned variance per output: ``y ~ N(f(x), sigma^2)``.

    ``forward`` appends ``log(sigma^2 + min_variance)`` to the ``D`` predicted means.

    Args:
        out_features: ``D``.
        init_std: the initial noise standard deviation (in the target's units).
        min_variance: floor of the variance.

    Shape:
        - Input: :math:`(*, D)` means.
        - Output: :math:`(*, 2D)`: means, then log-variances.

    Attributes:
        log_variance: the learned ``log sigma^2``, shape ``(D,)``.

    Example:
        >>> model = nn.Sequential(nn.Linear(13, 50), nn.ReLU(), nn.Linear(50, 1), HomoscedasticGaussian(1))
        >>> model[-1].noise_std   # sigma, (1,)
    """

    def __init__(self, out_features: int, init_std: float = 1.0, min_variance: float = 1e-6) -> None:
        super().__init__(out_features, min_variance)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not 0 < init_std < math.inf:
            raise ValueError(f"init_std must be a positive finite float, got {init_std!r}")
        self.init_std = float(init_std)
        self.log_variance = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the noise back to ``init_std``."""
        with torch.no_grad():
            self.log_variance.fill_(2 * math.log(self.init_std))

    @property
    def in_features(self) -> int:
        """``D``: the means."""
        return self.out_features

    @property
    def variance(self) -> Tensor:
        """The noise variance ``exp(log_variance) + min_variance``, ``(D,)``."""
        return self.log_variance.exp() + self.min_variance

    @property
    def noise_std(self) -> Tensor:
        """The noise standard deviation, ``(D,)``."""
        return self.variance.sqrt()

    def forward(self, features: Tensor) -> Tensor:
        self._check_input(features)
        log_variance = torch.log(self.variance).expand_as(features)
        return torch.cat([features, log_variance], dim=-1)

    def expected_log_likelihood(self, mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
        """Exact for any input distribution with this mean and variance:
        ``-1/2 (log 2 pi sigma^2 + ((y - m)^2 + v) / sigma^2)``, summed over outputs."""
        self._check_input(mean)
        target = self._check_target(target, mean.shape[:-1])
        noise = self.variance
        sq = (target - mean).square() + variance
        return (-0.5 * (_LOG_2PI + noise.log() + sq / noise)).sum(-1)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, init_std={self.init_std:g}, min_variance={self.min_variance:g}"


class HeteroscedasticGaussian(GaussianLikelihood):
    r"""Gaussian noise whose variance the network predicts: ``y ~ N(m(x), s(x))``.

    The input holds ``D`` means then ``D`` raw variances ``r``;
    ``s = softplus(r) + min_variance``. Softplus (not ``exp``) keeps the gradient of a
    large raw value bounded, and the floor keeps the density finite (Lakshminarayanan et
    al. 2017 use the same parametrisation).

    Args:
        out_features: ``D``.
        min_variance: floor of the variance.

    Shape:
        - Input: :math:`(*, 2D)`: means, then raw variances.
        - Output: :math:`(*, 2D)`: means, then log-variances.

    Example:
        >>> model = nn.Sequential(BayesLinear(8, 50), nn.ReLU(), BayesLinear(50, 2), HeteroscedasticGaussian(1))
    """

    @property
    def in_features(self) -> int:
        """``2 D``: the means, then the raw variances."""
        return 2 * self.out_features

    def variance_of(self, raw: Tensor) -> Tensor:
        """``softplus(raw) + min_variance``."""
        return F.softplus(raw) + self.min_variance

    def forward(self, features: Tensor) -> Tensor:
        self._check_input(features)
        mean, raw = features.split(self.out_features, dim=-1)
        return torch.cat([mean, torch.log(self.variance_of(raw))], dim=-1)

    def expected_log_likelihood(self, mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
        """``-1/2 (log 2 pi + E[log s] + ((y - E m)^2 + Var m) E[1/s])``, summed over outputs, with
        the mean and raw-variance channels independent (the diagonal approximation of Wu et
        al. 2019) and ``E[log s]``, ``E[1/s]`` by Gauss-Hermite quadrature over the raw value."""
        self._check_input(mean)
        m, raw_mean = mean.split(self.out_features, dim=-1)
        v, raw_variance = variance.split(self.out_features, dim=-1)
        target = self._check_target(target, m.shape[:-1])
        points, weights = _quadrature_points(raw_mean, raw_variance, QUADRATURE_NODES)
        noise = self.variance_of(points)  # (..., D, nodes): one softplus serves both expectations
        expected_log = noise.log() @ weights
        expected_precision = noise.reciprocal() @ weights
        sq = (target - m).square() + v
        return (-0.5 * (_LOG_2PI + expected_log + sq * expected_precision)).sum(-1)


def find_likelihood(model: nn.Module) -> GaussianLikelihood | None:
    """The Gaussian head inside ``model`` (``None`` if there is none).

    Several heads are allowed only when they are equivalent (e.g. the members of an
    ensemble, one head each); heads of different kinds or widths are an error.
    """
    heads = [m for m in model.modules() if isinstance(m, GaussianLikelihood)]
    if not heads:
        return None
    kinds = {(type(h), h.out_features) for h in heads}
    if len(kinds) > 1:
        names = sorted(f"{t.__name__}({d})" for t, d in kinds)
        raise ValueError(f"model holds Gaussian heads of different kinds {names}; a regression model has one")
    return heads[0]
