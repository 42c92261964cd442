"""Training a deterministic or Bayesian classifier, and its checkpoints.

The Bayesian model is the deterministic architecture converted with
:func:`torchbayes.dnn_to_bnn`, optionally initialised by MOPED from a trained
deterministic model, and trained on the ELBO (one Monte Carlo sample per step),
optionally plus the AvUC loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes import checkpoint
from torchbayes.avuc import AvULoss, avu_uncertainty, uncertainty_threshold
from torchbayes.checkpoint import CheckpointError
from torchbayes.cli.models import build_model
from torchbayes.cli.progress import progress_bar
from torchbayes.conversion import dnn_to_bnn
from torchbayes.datasets import DatasetSplits
from torchbayes.elbo import elbo_loss, kl_divergence
from torchbayes.nn import posterior_mean
from torchbayes.nn.base import canonical_estimator

__all__ = ["TrainConfig", "EpochSummary", "build_classifier", "train_classifier", "accuracy_of",
           "save_checkpoint", "load_checkpoint", "Checkpoint"]

@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoint).

    Attributes:
        dataset, data_root, image_size, ood_classes, test_fraction: the data, see
            :func:`torchbayes.datasets.load_image_dataset`.
        model: architecture name, see :func:`torchbayes.cli.models.build_model`.
        bayesian: convert the architecture with ``dnn_to_bnn`` and train on the ELBO.
        estimator, prior_mu, prior_sigma, posterior_rho_init: conversion settings (the
            reference's ``bnn_prior_parameters`` dictionary).
        moped, moped_delta: initialise the posterior from a deterministic model (MOPED,
            prior means = its weights, sigma = delta * |w|).
        epochs, batch_size, lr: Adam training; ``num_samples``: Monte Carlo samples at
            evaluation; ``avuc``/``avuc_beta``: add the AvUC loss with this weight.
        seed: seeds the weights, the shuffling and the weight noise.
    """

    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    ood_classes: tuple[int, ...] = ()
    test_fraction: float = 0.25
    model: str = "mlp"
    bayesian: bool = True
    estimator: str = "reparameterization"
    prior_mu: float = 0.0
    prior_sigma: float = 1.0
    posterior_rho_init: float = -3.0
    moped: bool = False
    moped_delta: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    num_samples: int = 32
    avuc: bool = False
    avuc_beta: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.ood_classes = tuple(int(c) for c in self.ood_classes)
        for name in ("epochs", "batch_size", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "prior_sigma", "moped_delta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.estimator = canonical_estimator(self.estimator)
        if self.avuc and not self.bayesian:
            raise ValueError("avuc needs a Bayesian model (its uncertainty comes from weight samples)")

    def prior_parameters(self) -> dict[str, Any]:
        """The reference's ``bnn_prior_parameters`` dictionary for :func:`torchbayes.dnn_to_bnn`."""
        return {"prior_mu": self.prior_mu, "prior_sigma": self.prior_sigma, "posterior_mu_init": 0.0,
                "posterior_rho_init": self.posterior_rho_init, "type": self.estimator,
                "moped_enable": self.moped, "moped_delta": self.moped_delta}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ood_classes"] = list(self.ood_classes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EpochSummary:
    """Averages over one epoch; ``kl_per_example`` is 0 for a deterministic model."""

    epoch: int
    loss: float
    nll: float
    kl_per_example: float
    train_accuracy: float
    test_accuracy: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    def line(self, epochs: int) -> str:
        """One line for the console."""
        kl = f"  kl/N {self.kl_per_example:.4f}" if self.kl_per_example else ""  # deterministic: no KL
        text = (f"epoch {self.epoch:>{len(str(epochs))}}/{epochs}  loss {self.loss:.4f}  nll {self.nll:.4f}{kl}"
                f"  train acc {100 * self.train_accuracy:5.1f}%  test acc {100 * self.test_accuracy:5.1f}%"
                f"  {self.seconds:.1f}s")
        return text + "".join(f"  {k} {v:.4f}" for k, v in self.extra.items())


def build_classifier(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int, *,
                     moped_source: dict[str, Tensor] | None = None) -> nn.Module:
    """The model ``config`` describes: deterministic, or converted to Bayesian.

    Args:
        config: the run's settings.
        input_shape: ``(C, H, W)``; num_classes: logits.
        moped_source: state_dict of the trained deterministic twin (required when
            ``config.moped``); its weights become posterior and prior means.

    Returns:
        The model on the CPU.
    """
    model = build_model(config.model, input_shape, num_classes)
    if not config.bayesian:
        return model
    if config.moped:
        if moped_source is None:
            raise ValueError("moped needs the deterministic model's weights (moped_source)")
        try:
            model.load_state_dict(moped_source)
        except RuntimeError as e:
            raise CheckpointError(f"the MOPED source does not fit model {config.model!r} for inputs "
                                  f"{tuple(input_shape)} and {num_classes} classes: {_first_line(e)}") from e
    return dnn_to_bnn(model, config.prior_parameters())


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]


def accuracy_of(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> float:
    """Accuracy of ``model`` (posterior means if Bayesian) on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad(), posterior_mean(model):
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size].to(device))
            correct += int((logits.argmax(-1).cpu() == y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(x))


def train_classifier(model: nn.Module, data: DatasetSplits, config: TrainConfig, *,
                     device: torch.device | str = "cpu", show_progress: bool = True,
                     on_epoch: Callable[[EpochSummary], None] | None = None) -> list[EpochSummary]:
    """Train ``model`` in place with Adam on ``data``'s training split.

    Deterministic models minimise the cross-entropy; Bayesian ones the negative ELBO
    per example (:func:`torchbayes.elbo_loss`, one weight sample per step), plus
    ``avuc_beta`` times the AvUC loss when ``config.avuc``.

    Args:
        model: the classifier (moved to ``device``).
        data: the splits; the test split gives each epoch's test accuracy.
        config: epochs, batch size, learning rate, seed, AvUC.
        device: where to train.
        show_progress: a progress bar per epoch on stderr.
        on_epoch: called with each epoch's summary (e.g. to print it).

    Returns:
        One :class:`EpochSummary` per epoch.
    """
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    num_train = len(data.train_x)
    bayesian = config.bayesian
    avuc = AvULoss(beta=config.avuc_beta) if config.avuc else None
    # AvUC's uncertainty threshold (Krishnan & Tickoo, 2020): first from the untrained
    # model's training-set uncertainties, then from each epoch's (uncertainty_threshold).
    threshold = _initial_avuc_threshold(model, data, config, device) if avuc is not None else 0.0
    history = []
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(num_train, generator=generator)
        totals = {"loss": 0.0, "nll": 0.0, "avuc": 0.0, "correct": 0.0}
        seen_uncertainty, seen_correct = [], []
        batches = range(0, num_train, config.batch_size)
        for first in progress_bar(batches, desc=f"epoch {epoch}/{config.epochs}", enabled=show_progress,
                                  unit="batch"):
            idx = order[first:first + config.batch_size]
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            logits = model(x)
            nll = F.cross_entropy(logits, y)
            loss = elbo_loss(nll, model, num_train) if bayesian else nll
            if avuc is not None:
                avuc_term = avuc(logits, y, threshold)
                loss = loss + avuc_term
                totals["avuc"] += float(avuc_term.detach()) * len(idx)
                seen_uncertainty.append(avu_uncertainty(logits.detach()))
                seen_correct.append(logits.detach().argmax(-1) == y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["loss"] += float(loss.detach()) * len(idx)
            totals["nll"] += float(nll.detach()) * len(idx)
            totals["correct"] += float((logits.argmax(-1) == y).sum())
        if avuc is not None:
            threshold = uncertainty_threshold(torch.cat(seen_uncertainty), torch.cat(seen_correct))
        kl = float(kl_divergence(model).detach()) / num_train if bayesian else 0.0
        summary = EpochSummary(
            epoch=epoch, loss=totals["loss"] / num_train, nll=totals["nll"] / num_train, kl_per_example=kl,
            train_accuracy=totals["correct"] / num_train,
            test_accuracy=accuracy_of(model, data.test_x, data.test_y, 512, device),
            seconds=time.perf_counter() - start,
            extra={"avuc": totals["avuc"] / num_train} if avuc is not None else {},
        )
        history.append(summary)
        if on_epoch is not None:
            on_epoch(summary)
    model.eval()
    return history


def _initial_avuc_threshold(model: nn.Module, data: DatasetSplits, config: TrainConfig,
                            device: torch.device) -> float:
    uncertainty, correct = [], []
    with torch.no_grad():
        for first in range(0, len(data.train_x), 512):
            logits = model(data.train_x[first:first + 512].to(device))
            uncertainty.append(avu_uncertainty(logits))
            correct.append(logits.argmax(-1).cpu() == data.train_y[first:first + 512])
    return uncertainty_threshold(torch.cat(uncertainty).cpu(), torch.cat(correct))


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model, its settings and what it was trained on."""

    model: nn.Module
    config: TrainConfig
    input_shape: tuple[int, ...]
    num_classes: int
    history: list[dict[str, Any]]
    int8: bool = False


#: Key of the command's settings inside the checkpoint's ``extra`` dict.
_EXTRA_KEY = "torchbayes_cli"


def save_checkpoint(path: str | Path, model: nn.Module, config: TrainConfig, input_shape: tuple[int, ...],
                    num_classes: int, history: Sequence[EpochSummary | Mapping[str, Any]] = (), *,
                    int8: bool = False) -> Path:
    """Save weights and settings with :func:`torchbayes.save_checkpoint` (atomically).

    :func:`load_checkpoint` rebuilds the model from the architecture name, input shape
    and class count stored beside the weights.

    Args:
        path: the file.
        model: the trained model (or its INT8 version, with ``int8=True``).
        config, input_shape, num_classes: what the model was built and trained with.
        history: the training epochs (summaries or their dicts).
        int8: ``model`` was quantized with :func:`torchbayes.quantization.quantize`.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [h if isinstance(h, Mapping) else asdict(h) for h in history]
    extra = {_EXTRA_KEY: {"config": config.to_dict(), "input_shape": list(input_shape),
                          "num_classes": int(num_classes), "history": epochs, "int8": int8}}
    checkpoint.save_checkpoint(model, path, extra=extra)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (never unpickles code).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a checkpoint of the torchbayes command, corrupted, or its
            weights do not fit the architecture it names.
    """
    payload = checkpoint.read_checkpoint(path)
    settings = (payload.get("extra") or {}).get(_EXTRA_KEY)
    if not isinstance(settings, dict):
        raise CheckpointError(f"{str(path)!r} is a torchbayes checkpoint but not one written by the "
                              "torchbayes command (no model settings in it)")
    config = TrainConfig.from_dict(settings["config"])
    input_shape = tuple(int(s) for s in settings["input_shape"])
    num_classes = int(settings["num_classes"])
    int8 = bool(settings.get("int8", False))
    if int8:
        # Same architecture, quantized; every INT8 tensor and range is then loaded.
        from torchbayes.quantization import quantize

        model = quantize(build_classifier(replace(config, moped=False), input_shape, num_classes).eval())
        checkpoint.load_checkpoint(path, model)
    elif config.bayesian:
        # rebuild() replays the recorded dnn_to_bnn call, then loads weights and priors.
        model = checkpoint.rebuild(path, build_model(config.model, input_shape, num_classes))
    else:
        model = build_model(config.model, input_shape, num_classes)
        checkpoint.load_checkpoint(path, model)
    model.eval()
    return Checkpoint(model, config, input_shape, num_classes, list(settings.get("history", [])), int8)
