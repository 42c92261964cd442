"""Comparing two Monte Carlo output distributions (shared by the compile and export tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def assert_same_output_distribution(draws_a: torch.Tensor, draws_b: torch.Tensor) -> None:
    """Per-output means and variances of two independent sets of S draws agree within MC error.

    Args:
        draws_a, draws_b: ``(S, *output_shape)`` stacks of independent model outputs.
    """
    samples = draws_a.shape[0]
    assert draws_b.shape == draws_a.shape and samples >= 200
    mean_a, mean_b = draws_a.mean(0), draws_b.mean(0)
    var_a, var_b = draws_a.var(0), draws_b.var(0)
    assert (var_a > 0).all() and (var_b > 0).all(), "the outputs do not vary: nothing is sampled"
    # Means: 5 standard errors of the difference; the normal tail beyond 5 SE is 6e-7, so
    # the check stays safe over the few dozen outputs compared.
    se = ((var_a + var_b) / samples).sqrt()
    assert ((mean_a - mean_b).abs() <= 5 * se).all(), float(((mean_a - mean_b).abs() / se).max())
    # Variances: the log ratio of two S-draw sample variances has sd ~ sqrt(4 / S) (0.1 at
    # S = 400) for Gaussian outputs; allow 0.5 because the outputs' tails are not Gaussian.
    assert (var_a / var_b).log().abs().max() < 0.5, float((var_a / var_b).log().abs().max())


def draw(sample_once: Callable[[], torch.Tensor], samples: int) -> torch.Tensor:
    """``(samples, *shape)`` stack of ``sample_once()`` outputs, without autograd.

    One intra-op thread: these models are tiny, and on a busy machine two spinning
    threads per op make thousands of small calls many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return torch.stack([sample_once() for _ in range(samples)])
    finally:
        torch.set_num_threads(threads)
