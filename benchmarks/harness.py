"""Shared pieces of the benchmark scripts: the architectures, the reference's conversion,
and an interleaved median timer.

Every script runs all of its variants in ONE process with ``torch.set_num_threads(2)``
and interleaves them in rounds, so that drift in machine load hits all variants alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["mlp", "lenet", "resnet18", "reference_bnn", "torchbayes_bnn", "time_interleaved", "markdown_table"]


def mlp() -> nn.Module:
    """The MLP 784-400-400-10 of the issues' measurements."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                         nn.Linear(400, 10))


def lenet() -> nn.Module:
    """LeNet-5 on 1x28x28 inputs: conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, 10."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 with 10 classes, the seed's example (run on 3x32x32 inputs)."""
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def reference_bnn(build: Callable[[], nn.Module], estimator: str) -> nn.Module | None:
    """The architecture converted by bayesian-torch 0.5.0's own ``dnn_to_bnn`` (None if absent)."""
    try:
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn
    except ImportError:
        return None
    model = build()
    dnn_to_bnn(model, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
                       "posterior_rho_init": -3.0, "type": estimator.capitalize(),
                       "moped_enable": False, "moped_delta": 0.5})
    return model


def torchbayes_bnn(build: Callable[[], nn.Module], estimator: str) -> nn.Module:
    """The architecture converted by torchbayes (its Bayesian twin, same hyperparameters)."""
    from torchbayes.conversion import dnn_to_bnn

    return dnn_to_bnn(build(), {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
                                "posterior_rho_init": -3.0, "type": estimator,
                                "moped_enable": False, "moped_delta": 0.5})


def time_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 7, iters: int = 15,
                     warmup: int = 5) -> dict[str, float]:
    """Median wall time (ms) of each callable, measured in interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(iters):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in samples.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table."""
    def fmt(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
