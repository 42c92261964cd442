"""Optimizers that learn a posterior: `IVON` (variational online Newton) and its conversions.

`IVON` trains an ordinary network and holds a mean-field Gaussian posterior over its
weights; `ivon_to_bnn` turns the pair into a model of torchbayes' Bayesian layers (for
`torchbayes.predict`, checkpoints, quantization and export) and `bnn_to_ivon` goes back,
so a Bayesian model can be fine-tuned with the optimizer.
"""

from torchbayes.optim.ivon import IVON
from torchbayes.optim.posterior import bnn_to_ivon, ivon_to_bnn

__all__ = ["IVON", "bnn_to_ivon", "ivon_to_bnn"]
