"""How much of a model is Bayesian: parameter counts and memory."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from torchbayes.nn.base import iter_bayesian_modules

__all__ = ["LayerSummary", "ModelSummary", "model_summary"]


@dataclass(frozen=True)
class LayerSummary:
    """Parameter counts of one module that holds parameters itself."""

    name: str
    type: str
    bayesian_weights: int
    deterministic_parameters: int


@dataclass(frozen=True)
class ModelSummary:
    """Parameter counts and memory of a model, split into Bayesian and deterministic.

    Attributes:
        bayesian_layers: number of Bayesian modules.
        bayesian_weights: weights with a posterior (elements of the posterior means).
        variational_parameters: trainable numbers behind them (means and rhos: twice
            ``bayesian_weights`` for a mean-field Gaussian).
        deterministic_parameters: elements of every other parameter.
        prior_elements: elements stored by the priors (1 per scalar prior, one per
            weight for MOPED's per-weight priors).
        bayesian_bytes, deterministic_bytes, prior_bytes: memory of the above.
        buffer_bytes: memory of the other buffers (BatchNorm statistics...).
        layers: one row per module holding parameters directly.

    A parameter shared by several modules is counted once.
    """

    bayesian_layers: int
    bayesian_weights: int
    variational_parameters: int
    deterministic_parameters: int
    prior_elements: int
    bayesian_bytes: int
    deterministic_bytes: int
    prior_bytes: int
    buffer_bytes: int
    layers: tuple[LayerSummary, ...]

    @property
    def total_parameters(self) -> int:
        """Every trainable number: variational plus deterministic parameters."""
        return self.variational_parameters + self.deterministic_parameters

    @property
    def total_bytes(self) -> int:
        """Memory of all parameters and buffers."""
        return self.bayesian_bytes + self.deterministic_bytes + self.prior_bytes + self.buffer_bytes

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'type':<22} {'bayesian':>12} {'deterministic':>14}"]
        for r in self.layers:
            lines.append(f"{r.name:<{width}}  {r.type:<22} {r.bayesian_weights:>12,} {r.deterministic_parameters:>14,}")
        mib = 2.0**20
        lines += [
            f"Bayesian layers: {self.bayesian_layers}; weights with a posterior: "
            f"{self.bayesian_weights:,} ({self.variational_parameters:,} variational parameters, "
            f"{self.bayesian_bytes / mib:.2f} MiB)",
            f"Deterministic parameters: {self.deterministic_parameters:,} ({self.deterministic_bytes / mib:.2f} MiB)",
            f"Priors: {self.prior_elements:,} numbers ({self.prior_bytes / mib:.2f} MiB); "
            f"other buffers {self.buffer_bytes / mib:.2f} MiB; total {self.total_bytes / mib:.2f} MiB",
        ]
        return "\n".join(lines)


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def model_summary(model: nn.Module) -> ModelSummary:
    """Count a model's Bayesian and deterministic parameters and their memory.

    Args:
        model: any module (a plain ``torch.nn`` model has no Bayesian part).

    Returns:
        A :class:`ModelSummary`; ``print`` it for a table.

    Example:
        >>> print(model_summary(dnn_to_bnn(resnet18(num_classes=10), include=["fc"])))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_summary: model must be an nn.Module, got {type(model).__name__}")
    bayesian_layers = list(iter_bayesian_modules(model))
    means: set[int] = set()
    variational: set[int] = set()
    prior_buffers: set[int] = set()
    for _, layer in bayesian_layers:
        for _, mu, rho, prior in layer.variational_parameters():
            means.add(id(mu))
            variational.update((id(mu), id(rho)))
            prior_buffers.update(id(b) for b in prior.buffers())
    rows = []
    for name, module in model.named_modules():
        own = [p for p in module._parameters.values() if p is not None]
        if own:
            rows.append(
                LayerSummary(
                    name,
                    type(module).__name__,
                    sum(p.numel() for p in own if id(p) in means),
                    sum(p.numel() for p in own if id(p) not in variational),
                )
            )
    params = list(model.parameters())
    buffers = list(model.buffers())
    return ModelSummary(
        bayesian_layers=len(bayesian_layers),
        bayesian_weights=sum(p.numel() for p in params if id(p) in means),
        variational_parameters=sum(p.numel() for p in params if id(p) in variational),
        deterministic_parameters=sum(p.numel() for p in params if id(p) not in variational),
        prior_elements=sum(b.numel() for b in buffers if id(b) in prior_buffers),
        bayesian_bytes=sum(_bytes(p) for p in params if id(p) in variational),
        deterministic_bytes=sum(_bytes(p) for p in params if id(p) not in variational),
        prior_bytes=sum(_bytes(b) for b in buffers if id(b) in prior_buffers),
        buffer_bytes=sum(_bytes(b) for b in buffers if id(b) not in prior_buffers),
        layers=tuple(rows),
    )
