"""Bayesian fully connected layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes.nn.base import BayesianWeightLayer
from torchbayes.priors import Prior

__all__ = ["BayesLinear"]


class BayesLinear(BayesianWeightLayer):
    r"""Linear layer with a mean-field Gaussian posterior over weight and bias.

    Each forward pass computes :math:`y = x W^T + b` with ``W`` and ``b`` drawn from the
    posterior by the chosen Monte Carlo estimator. ``local`` is exact here: each example
    receives an independent weight sample at the cost of one extra matmul.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer has no bias.
        device: factory argument, as in ``torch.nn.Linear``.
        dtype: factory argument, as in ``torch.nn.Linear``.
        prior_mu: prior mean (see :class:`~torchbayes.nn.BayesianModule` for these six).
        prior_sigma: prior standard deviation, > 0.
        posterior_mu_init: added to the initial posterior means.
        posterior_rho_init: initial ``rho``; the posterior sigma is ``softplus(rho)``.
        estimator: ``"reparameterization"``, ``"flipout"`` or ``"local"``.
        prior: a :class:`~torchbayes.priors.Prior` instead of the Gaussian prior.

    Shape:
        - Input: :math:`(*, H_{in})` with :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})` with :math:`H_{out} = \text{out\_features}`.

    Attributes:
        weight_mu, weight_rho: posterior parameters of shape ``(out_features, in_features)``;
            ``weight_mu`` is initialised like ``torch.nn.Linear.weight``.
        bias_mu, bias_rho: posterior parameters of shape ``(out_features,)``.

    Example:
        >>> layer = BayesLinear(20, 30, estimator="flipout")
        >>> layer(torch.randn(128, 20)).shape
        torch.Size([128, 30])
        >>> layer.kl_divergence()  # summed over all weights
    """

    _torch_cls = nn.Linear
    _twin_args = ("in_features", "out_features")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        prior_mu: float | Tensor = 0.0,
        prior_sigma: float | Tensor = 1.0,
        posterior_mu_init: float = 0.0,
        posterior_rho_init: float = -3.0,
        estimator: str = "reparameterization",
        prior: Prior | None = None,
    ) -> None:
        super().__init__(
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            posterior_mu_init=posterior_mu_init,
            posterior_rho_init=posterior_rho_init,
            estimator=estimator,
            prior=prior,
        )
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self._register_weight_and_bias((out_features, in_features), (out_features,) if bias else None, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Means as ``torch.nn.Linear`` initialises its weights, then the posterior offsets."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if self.bias_mu is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias_mu, -bound, bound)
        self.reset_variational_parameters()

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input must have shape (*, in_features="
                f"{self.in_features}), got {tuple(input.shape)}"
            )

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias_mu is not None}, {super().extra_repr()}"
        )
