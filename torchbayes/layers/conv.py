"""Bayesian-Torch's (transposed) convolutions, as front doors on the native ``BayesConv*`` layers.

Argument orders are the reference's, which differ between classes (its
``Conv3dReparameterization`` takes the prior arguments before ``stride``; its
``ConvTranspose2d/3dFlipout`` put ``output_padding`` before ``dilation``). The prior
arguments, which the reference requires for ``Conv3dReparameterization``, have defaults here.
"""

from __future__ import annotations

from torchbayes.layers.base import PRIOR_ARGUMENTS, REQUIRED, ReferenceLayer, posterior_alias, reference_signature
from torchbayes.nn.conv import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
)

__all__ = [
    "Conv1dReparameterization",
    "Conv2dReparameterization",
    "Conv3dReparameterization",
    "ConvTranspose1dReparameterization",
    "ConvTranspose2dReparameterization",
    "ConvTranspose3dReparameterization",
    "Conv1dFlipout",
    "Conv2dFlipout",
    "Conv3dFlipout",
    "ConvTranspose1dFlipout",
    "ConvTranspose2dFlipout",
    "ConvTranspose3dFlipout",
]

_CHANNELS = (("in_channels", REQUIRED), ("out_channels", REQUIRED), ("kernel_size", REQUIRED))
_GEOMETRY = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_OUTPUT_PADDING = (("output_padding", 0),)
_BIAS = (("bias", True),)

_CONV = reference_signature(_CHANNELS + _GEOMETRY + PRIOR_ARGUMENTS + _BIAS)
_CONV3D_REPARAMETERIZATION = reference_signature(_CHANNELS + PRIOR_ARGUMENTS + _GEOMETRY + _BIAS)
_TRANSPOSE = reference_signature(_CHANNELS + _GEOMETRY + _OUTPUT_PADDING + PRIOR_ARGUMENTS + _BIAS)
_TRANSPOSE_OUTPUT_PADDING_FIRST = reference_signature(
    _CHANNELS + _GEOMETRY[:2] + _OUTPUT_PADDING + _GEOMETRY[2:] + PRIOR_ARGUMENTS + _BIAS
)


def _conv_doc(name: str, native: str, estimator: str) -> str:
    return f"""Bayesian-Torch's ``{name}``: a :class:`~torchbayes.nn.{native}` with ``estimator="{estimator}"``.

    Takes the reference's arguments in its order (see ``inspect.signature``): the
    geometry (``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups`` and,
    for transposed layers, ``output_padding``) as in ``torch.nn``, and

    Args:
        prior_mean: mean of the Gaussian prior.
        prior_variance: the prior's STANDARD DEVIATION (the reference's name is kept,
            and so is its meaning: it is used as sigma, not sigma squared).
        posterior_mu_init: mean of the initial draw ``mu ~ N(posterior_mu_init, 0.1)``.
        posterior_rho_init: mean of the initial draw ``rho ~ N(posterior_rho_init, 0.1)``.
        bias: if ``False``, no bias.

    Shape:
        As the ``torch.nn`` twin of :class:`~torchbayes.nn.{native}`.

    ``forward(x, return_kl=True)`` returns ``(out, kl)`` with the reference's ``kl``
    (:meth:`kl_loss`); see :class:`~torchbayes.layers.base.ReferenceLayer`. The
    parameters are also reachable as ``mu_kernel``, ``rho_kernel``, ``mu_bias``,
    ``rho_bias`` and are saved under those names.

    Example:
        >>> layer = {name}(3, 8, 3)
        >>> out, kl = layer(torch.randn(2, 3, {", ".join(["8"] * int(native[-2]))}))
    """


class _ReferenceConv(ReferenceLayer):
    _reference_weight = "kernel"
    mu_kernel = posterior_alias("weight_mu", "Posterior means of the kernel (native ``weight_mu``).")
    rho_kernel = posterior_alias("weight_rho", "Posterior rho of the kernel (native ``weight_rho``).")


class _Reparameterization(_ReferenceConv):
    _estimator = "reparameterization"


class _Flipout(_ReferenceConv):
    _estimator = "flipout"


class Conv1dReparameterization(_Reparameterization, BayesConv1d):
    __doc__ = _conv_doc("Conv1dReparameterization", "BayesConv1d", "reparameterization")
    __signature__ = _CONV


class Conv2dReparameterization(_Reparameterization, BayesConv2d):
    __doc__ = _conv_doc("Conv2dReparameterization", "BayesConv2d", "reparameterization")
    __signature__ = _CONV


class Conv3dReparameterization(_Reparameterization, BayesConv3d):
    __doc__ = _conv_doc("Conv3dReparameterization", "BayesConv3d", "reparameterization")
    __signature__ = _CONV3D_REPARAMETERIZATION


class ConvTranspose1dReparameterization(_Reparameterization, BayesConvTranspose1d):  # type: ignore[misc]  # reference forward(x, return_kl)
    __doc__ = _conv_doc("ConvTranspose1dReparameterization", "BayesConvTranspose1d", "reparameterization")
    __signature__ = _TRANSPOSE


class ConvTranspose2dReparameterization(_Reparameterization, BayesConvTranspose2d):  # type: ignore[misc]  # reference forward(x, return_kl)
    __doc__ = _conv_doc("ConvTranspose2dReparameterization", "BayesConvTranspose2d", "reparameterization")
    __signature__ = _TRANSPOSE


class ConvTranspose3dReparameterization(_Reparameterization, BayesConvTranspose3d):  # type: ignore[misc]  # reference forward(x, return_kl)
    __doc__ = _conv_doc("ConvTranspose3dReparameterization", "BayesConvTranspose3d", "reparameterization")
    __signature__ = _TRANSPOSE


class Conv1dFlipout(_Flipout, BayesConv1d):
    __doc__ = _conv_doc("Conv1dFlipout", "BayesConv1d", "flipout")
    __signature__ = _CONV


class Conv2dFlipout(_Flipout, BayesConv2d):
    __doc__ = _conv_doc("Conv2dFlipout", "BayesConv2d", "flipout")
    __signature__ = _CONV


class Conv3dFlipout(_Flipout, BayesConv3d):
    __doc__ = _conv_doc("Conv3dFlipout", "BayesConv3d", "flipout")
    __signature__ = _CONV


class ConvTranspose1dFlipout(_Flipout, BayesConvTranspose1d):  # type: ignore[misc]  # reference forward(x, return_kl)
    __doc__ = _conv_doc("ConvTranspose1dFlipout", "BayesConvTranspose1d", "flipout")
    __signature__ = _TRANSPOSE


class ConvTranspose2dFlipout(_Flipout, BayesConvTranspose2d):  # type: ignore[misc]  # reference forward(x, return_kl)
    __doc__ = _conv_doc("ConvTranspose2dFlipout", "BayesConvTranspose2d", "flipout")
    __signature__ = _TRANSPOSE_OUTPUT_PADDING_FIRST


class ConvTranspose3dFlipout(_Flipout, BayesConvTranspose3d):  # type: ignore[misc]  # reference forward(x, return_kl)
    __doc__ = _conv_doc("ConvTranspose3dFlipout", "BayesConvTranspose3d", "flipout")
    __signature__ = _TRANSPOSE_OUTPUT_PADDING_FIRST
