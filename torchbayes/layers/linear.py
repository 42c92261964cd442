"""Bayesian-Torch's fully connected layers, as front doors on :class:`~torchbayes.nn.BayesLinear`."""

from __future__ import annotations

from torchbayes.layers.base import PRIOR_ARGUMENTS, REQUIRED, ReferenceLayer, posterior_alias, reference_signature
from torchbayes.nn.linear import BayesLinear

__all__ = ["LinearReparameterization", "LinearFlipout"]

_LINEAR_SIGNATURE = reference_signature(
    (("in_features", REQUIRED), ("out_features", REQUIRED), *PRIOR_ARGUMENTS, ("bias", True))
)


def _linear_doc(name: str, estimator: str) -> str:
    return f"""Bayesian-Torch's ``{name}``: a :class:`~torchbayes.nn.BayesLinear` with ``estimator="{estimator}"``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        prior_mean: mean of the Gaussian prior.
        prior_variance: the prior's STANDARD DEVIATION (the reference's name is kept,
            and so is its meaning: it is used as sigma, not sigma squared).
        posterior_mu_init: mean of the initial draw ``mu ~ N(posterior_mu_init, 0.1)``.
        posterior_rho_init: mean of the initial draw ``rho ~ N(posterior_rho_init, 0.1)``
            (``sigma = softplus(rho)``).
        bias: if ``False``, no bias.

    Shape:
        - Input: :math:`(*, H_{{in}})`; output: :math:`(*, H_{{out}})`.

    ``forward(x, return_kl=True)`` returns ``(out, kl)`` with the reference's ``kl``
    (:meth:`kl_loss`); see :class:`~torchbayes.layers.base.ReferenceLayer`. The
    parameters are also reachable as ``mu_weight``, ``rho_weight``, ``mu_bias``,
    ``rho_bias`` and are saved under those names.

    Example:
        >>> layer = {name}(20, 10, prior_variance=0.1)
        >>> out, kl = layer(torch.randn(8, 20))
    """


class _ReferenceLinear(ReferenceLayer, BayesLinear):
    __signature__ = _LINEAR_SIGNATURE
    _reference_weight = "weight"
    mu_weight = posterior_alias("weight_mu", "Posterior means of the weight (native ``weight_mu``).")
    rho_weight = posterior_alias("weight_rho", "Posterior rho of the weight (native ``weight_rho``).")


class LinearReparameterization(_ReferenceLinear):
    __doc__ = _linear_doc("LinearReparameterization", "reparameterization")
    _estimator = "reparameterization"


class LinearFlipout(_ReferenceLinear):
    __doc__ = _linear_doc("LinearFlipout", "flipout")
    _estimator = "flipout"
