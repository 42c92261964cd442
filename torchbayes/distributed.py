"""Training Bayesian models with ``torch.distributed`` (DDP and FSDP).

Bayesian layers are ordinary modules whose parameters are ``*_mu`` and ``*_rho``, so
``DistributedDataParallel`` and ``fully_shard`` need no special support. Three things
need care, and this module documents and helps with them.

**The ELBO's scaling with the world size.** With ``W`` ranks, each holding a shard
``B_r`` of the global batch, every rank minimises the same per-example loss as a
single process does::

    loss_r = mean_{i in B_r} NLL_i + KL / N            # elbo_loss(nll, model, num_data=N)

with ``N`` the size of the WHOLE training set (not of the rank's shard). DDP averages
gradients over ranks, so the step follows ``mean_r grad(mean NLL on B_r) + grad(KL) / N``:
the NLL term is the global-batch mean (equal shard sizes) and the KL, identical on every
rank, is averaged over ``W`` identical copies, i.e. counted exactly once per global step.
Passing the shard size as ``num_data``, or summing instead of averaging, would weight
the KL ``W`` times too much.

**Per-rank noise.** Ranks seeded alike draw identical weight samples, so the ``W``
Monte Carlo draws of a global step collapse into one (still unbiased, but no variance
reduction from more ranks). Call :func:`seed_per_rank` after wrapping the model (DDP
broadcasts rank 0's initial weights, so parameter initialisation may use a common seed).
It seeds PyTorch's global generator, which ``torch.compile`` traces without graph
breaks; :func:`~torchbayes.nn.noise_generator` with ``seed + rank`` works too in eager
mode.

**FSDP.** ``fully_shard`` gathers a module's parameters only around its forward; the
KL, computed from the parameters, must therefore be computed inside the forward of the
sharded module. Wrap the model in :class:`ModelWithKL` and shard the wrapper (its
forward returns ``(output, kl)``); sharding the Bayesian layers individually as well
leaves the KL computed from sharded parameters, which fails.

Example (DDP)::

    model = dnn_to_bnn(resnet18())                      # same seed on every rank
    ddp = DistributedDataParallel(model)
    seed_per_rank(1234)                                  # different noise per rank
    for x, y in loader:                                  # DistributedSampler shards
        loss = elbo_loss(F.cross_entropy(ddp(x), y), model, num_data=len(dataset))
        opt.zero_grad(); loss.backward(); opt.step()
    if dist.get_rank() == 0:
        save_checkpoint(ddp, "bnn.pt")                   # loads into a plain model anywhere
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchbayes.elbo import kl_divergence
from torchbayes.validation import check_seed

__all__ = ["ModelWithKL", "seed_per_rank"]


def seed_per_rank(seed: int, group: dist.ProcessGroup | None = None) -> int:
    """Seed PyTorch's global generator with ``seed + rank`` so each rank draws its own noise.

    Args:
        seed: the run's base seed (a non-negative int).
        group: process group whose rank is used; the default group if ``None``. Without
            an initialised process group the rank is 0 (single-process runs work unchanged).

    Returns:
        The seed set on this rank.

    Example:
        >>> ddp = DistributedDataParallel(model)
        >>> seed_per_rank(0)   # rank r now samples with seed r
    """
    check_seed(seed)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    torch.manual_seed(seed + rank)
    return seed + rank


class ModelWithKL(nn.Module):
    """A module whose forward returns ``(model(*args, **kwargs), kl_divergence(model))``.

    Computing the KL inside ``forward`` is what FSDP (``fully_shard``) needs, since it
    gathers parameters only during the forward of the sharded module; it also puts the
    KL into the same ``torch.compile`` graph as the forward. The wrapped model is the
    ``model`` attribute (save checkpoints from it).

    Args:
        model: any module containing Bayesian layers.

    Shape:
        - Output: the model's output, and a scalar KL tensor (summed over all weights).

    Example:
        >>> wrapped = ModelWithKL(model)
        >>> fully_shard(wrapped)
        >>> out, kl = wrapped(x)
        >>> loss = F.cross_entropy(out, y) + kl / num_data
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelWithKL: model must be an nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
        output = self.model(*args, **kwargs)
        return output, kl_divergence(self.model)
