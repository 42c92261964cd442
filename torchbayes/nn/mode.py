"""Switching Bayesian modules between sampling and posterior-mean (deterministic) use, and
a model into eval mode for the length of a prediction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType

from torch import nn

from torchbayes.nn.base import BayesianModule

__all__ = ["eval_mode", "posterior_mean", "sampling"]


class _DeterministicSwitch:
    def __init__(self, model: nn.Module, deterministic: bool) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._saved = [(m, m.deterministic) for m in model.modules() if isinstance(m, BayesianModule)]
        for m, _ in self._saved:
            m.deterministic = deterministic

    def __enter__(self) -> _DeterministicSwitch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for m, previous in self._saved:
            m.deterministic = previous


def posterior_mean(model: nn.Module) -> _DeterministicSwitch:
    """Make every Bayesian module of ``model`` use its posterior means (no sampling).

    Works as a plain call (the switch stays on) and as a context manager (the previous
    modes are restored on exit). A single layer is a model too.

    Args:
        model: any module containing torchbayes Bayesian modules.

    Returns:
        A context manager restoring the previous modes.

    Example:
        >>> with posterior_mean(model):
        ...     point_prediction = model(x)
        >>> posterior_mean(model)   # stays deterministic
        >>> sampling(model)         # back to Monte Carlo draws
    """
    return _DeterministicSwitch(model, True)


def sampling(model: nn.Module) -> _DeterministicSwitch:
    """Make every Bayesian module of ``model`` draw weights again (the default).

    Returns:
        A context manager restoring the previous modes, like :func:`posterior_mean`.
    """
    return _DeterministicSwitch(model, False)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for a block; the modules that were training train again after it.

    Only modules in training mode are switched (and switched back): most models arrive in
    eval mode, and ``nn.Module`` attribute writes are slow enough to show at batch 1.

    Args:
        model: any module.

    Returns:
        A context manager.

    Example:
        >>> with eval_mode(model):
        ...     out = model(x)   # BatchNorm uses running statistics, dropout is off
    """
    training = [m for m in model.modules() if m.training]
    try:
        if training:
            model.eval()
        yield
    finally:
        for m in training:
            m.training = True
