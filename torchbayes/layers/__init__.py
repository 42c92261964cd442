"""Bayesian-Torch compatibility: the reference's layer names, arguments and conventions.

Code written for Bayesian-Torch 0.5.0 runs after changing its imports from
``bayesian_torch.layers`` to ``torchbayes.layers``. Each Bayesian class here is a thin
front door on a native :mod:`torchbayes.nn` layer (see
:class:`~torchbayes.layers.base.ReferenceLayer`): ``forward(x, return_kl=True)``
returns ``(out, kl)``, ``prior_variance`` is the prior's standard deviation, and
checkpoints use the reference's key names. New code should use :mod:`torchbayes.nn`.

Example:
    >>> from torchbayes.layers import Conv2dReparameterization, LinearFlipout
    >>> out, kl = LinearFlipout(4, 2)(torch.randn(3, 4))
"""

# Each module exports exactly its front doors in its own __all__, so adding a family of
# layers (e.g. recurrent ones) is one import line here; __all__ below picks it up.
from torchbayes.layers.base import ReferenceLayer as ReferenceLayer  # re-exported
from torchbayes.layers.conv import *  # noqa: F403
from torchbayes.layers.linear import *  # noqa: F403
from torchbayes.layers.rnn import *  # noqa: F403
from torchbayes.layers.tuple_passing import *  # noqa: F403

__all__ = sorted(
    name for name, value in dict(globals()).items() if isinstance(value, type) and not name.startswith("_")
)
