"""Post-hoc calibration: temperature scaling (Guo et al., 2017).

One scalar ``T > 0`` divides the logits; it is fitted on held-out data by minimising the
negative log-likelihood. It does not change which class is predicted (so accuracy is
unchanged); it makes over-confident models (``T > 1``) or under-confident ones
(``T < 1``) better calibrated.

For a Bayesian model there are two ways to use it:

- pass Monte Carlo logits ``(S, N, C)``: every sample is divided by ``T`` and the
  softmax outputs are averaged (Laves et al., 2019);
- pass the log of the MC-averaged probabilities ``log(mean_s p_s)`` as ``(N, C)``
  "logits": ``softmax(log p / T)`` sharpens or flattens the averaged predictive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes.metrics.classification import _check_logits, _check_logits_labels, _wide_dtype

__all__ = ["TemperatureScaling"]


class TemperatureScaling(nn.Module):
    """Divide logits by one learned temperature.

    Args:
        temperature: initial temperature (> 0).

    Shape:
        - input: ``(N, C)`` or ``(S, N, C)`` logits.
        - output: same shape, divided by ``T``.

    Attributes:
        log_temperature: the parameter, ``log T`` (so that ``T`` stays positive).

    Example:
        >>> scaler = TemperatureScaling().fit(val_logits, val_labels)
        >>> probs = scaler.predict_proba(test_logits)
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"TemperatureScaling: temperature must be a finite number > 0, got {temperature!r}")
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    @property
    def temperature(self) -> float:
        """The current temperature ``T``."""
        return float(self.log_temperature.detach().exp())

    def forward(self, logits: Tensor) -> Tensor:
        _check_logits(logits, "TemperatureScaling")
        return logits / self.log_temperature.exp().to(logits.dtype)

    def predict_proba(self, logits: Tensor) -> Tensor:
        """Calibrated predictive probabilities, ``(N, C)`` (MC samples averaged)."""
        probs = F.softmax(self(logits), dim=-1)
        return probs.mean(0) if logits.dim() == 3 else probs

    @staticmethod
    def _nll(logits: Tensor, labels: Tensor, log_temperature: Tensor) -> Tensor:
        log_probs = F.log_softmax(logits / log_temperature.exp(), dim=-1)
        if logits.dim() == 3:  # log of the MC-averaged probabilities
            log_probs = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
        return F.nll_loss(log_probs, labels)

    def fit(self, logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> TemperatureScaling:
        """Fit ``T`` on held-out logits by minimising the NLL (L-BFGS on ``log T``).

        The inputs are detached and the optimisation runs in float64; the module's
        temperature changes only if the fit ends at a finite temperature.

        Args:
            logits: held-out ``(N, C)`` logits (or log mean probabilities), or ``(S, N, C)``
                Monte Carlo logits.
            labels: ``(N,)`` class indices.
            max_iter: L-BFGS iterations.

        Returns:
            ``self``.

        Raises:
            RuntimeError: if the optimisation does not reach a finite temperature.
        """
        _check_logits_labels(logits, labels, "TemperatureScaling.fit")
        if not torch.isfinite(logits).all():
            raise ValueError("TemperatureScaling.fit: logits contain NaN or infinite values")
        wide = _wide_dtype(logits.device)
        x = logits.detach().to(wide)
        log_t = torch.zeros((), dtype=wide, device=logits.device, requires_grad=True)
        with torch.no_grad():
            log_t.copy_(self.log_temperature.detach())
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = self._nll(x, labels, log_t)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        if not torch.isfinite(log_t).all():
            raise RuntimeError("TemperatureScaling.fit: the optimisation diverged; temperature left unchanged")
        with torch.no_grad():
            self.log_temperature.copy_(log_t.detach())
        return self

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}"
