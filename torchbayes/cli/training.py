"""Training a deterministic or Bayesian classifier, and its checkpoints.

The Bayesian model is the deterministic architecture converted with
:func:`torchbayes.dnn_to_bnn`, optionally initialised by MOPED from a trained
deterministic model, and trained on the ELBO (one Monte Carlo sample per step),
optionally plus the AvUC loss.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import types
import typing
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
from torchbayes.conversion import DEFAULT_SETTINGS, dnn_to_bnn
from torchbayes.datasets import DatasetSplits, TableSchema
from torchbayes.elbo import elbo_loss, kl_divergence
from torchbayes.ensemble import Ensemble
from torchbayes.nn import posterior_mean
from torchbayes.nn.base import canonical_estimator
from torchbayes.priors import smallest_prior_sigma

__all__ = [
    "METHODS",
    "NOISE_MODELS",
    "TrainConfig",
    "EpochSummary",
    "TrainingDiverged",
    "build_classifier",
    "model_label",
    "train_model",
    "train_classifier",
    "training_warnings",
    "accuracy_of",
    "batch_bounds",
    "save_checkpoint",
    "load_checkpoint",
    "Checkpoint",
]

#: Bounds of the settings a checkpoint may carry (they are read from files a stranger may write).
MAX_TEXT = 4096
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32 bits; torch and default_rng take more
MAX_EPOCHS = 10**6
MAX_CLASSES = 100_000
MAX_SIDE = 65_536
MAX_HISTORY = 10**6
#: Images: the largest height and width, and the most values of one input (4 channels at
#: that size). A checkpoint's input shape decides the size of the test forward made when
#: the model is built, so it is bounded like the --image-size a user gives.
MAX_IMAGE_SIDE = 1024
MAX_INPUT_VALUES = 4 * MAX_IMAGE_SIDE**2
#: The most Monte Carlo samples of an evaluation (the estimate's error is already ~1% at 10,000).
MAX_SAMPLES = 10_000


#: What ``torchbayes train --method`` trains (see :class:`TrainConfig`).
METHODS: tuple[str, ...] = ("bayesian", "deterministic", "dropout", "ensemble", "ivon")
#: Gaussian heads of a regressor (``torchbayes train --noise``): one learned noise
#: variance, or a variance the network predicts per input.
NOISE_MODELS: tuple[str, ...] = ("homoscedastic", "heteroscedastic")


class TrainingDiverged(RuntimeError):
    """The loss or a parameter became NaN or infinite while training."""


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it has the type ``hint`` (bool, int, float, str, ``X | None``, ``tuple[int, ...]``)
    of a :class:`TrainConfig` field, an int promoted to float; else ``ValueError``."""
    if isinstance(hint, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{name} must be a list of integers, got {_show(value)}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, float, str) and type(value) is hint:
        return value
    # A field type this check does not know: plain values only.
    if hint not in (bool, int, float, str) and isinstance(value, (bool, int, float, str, type(None))):
        return value
    raise ValueError(f"{name} must be {getattr(hint, '__name__', hint)}, got {_show(value)}")


def _show(value: Any) -> str:
    """A short, printable rendering of a value that may come from a crafted file."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_range(name: str, value: Any, low: int, high: int) -> None:
    if value is not None and not (low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {_show(value)}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoint).

    Attributes:
        dataset, data_root, image_size, ood_classes, test_fraction: the data, see
            :func:`torchbayes.datasets.load_image_dataset`.
        model: architecture name, see :func:`torchbayes.cli.models.build_model`.
        method: what is trained (:data:`METHODS`): ``"bayesian"`` (``dnn_to_bnn`` and the
            ELBO, after ``pretrain_epochs`` of deterministic training that MOPED starts
            from), ``"deterministic"``, ``"dropout"`` (the architecture with dropout
            ``p = dropout`` before its fully connected layers, predicted by MC dropout) or
            ``"ensemble"`` (``num_members`` networks from different initialisations, a
            :class:`torchbayes.Ensemble`) or ``"ivon"`` (the plain network trained by the
            variational optimizer `torchbayes.optim.IVON` for ``ivon_epochs`` at learning
            rate ``ivon_lr``, then converted to Bayesian layers by
            `torchbayes.optim.ivon_to_bnn`; ``hess_init`` and ``weight_decay`` are IVON's,
            its effective sample size the training set's size).
        pretrain_epochs: deterministic epochs before the conversion (Bayesian; 0: none).
        pretrain_lr: their Adam learning rate (``lr`` is the main training's).
        bayesian_layers: how many of the last weight layers are Bayesian (0: all).
        kl_weight: multiplier of the KL term of the ELBO (1: the ELBO; < 1 tempers it).
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
    # The defaults are the recommended recipe, chosen by benchmarks/sweep_recipe.py on a
    # validation split (docs/quality.md): 10 deterministic epochs, then MOPED into
    # flipout layers for the fully connected head, 3 epochs on the ELBO.
    method: str = "bayesian"
    pretrain_epochs: int = 10
    pretrain_lr: float = 2e-3
    bayesian_layers: int = 3
    kl_weight: float = 1.0
    dropout: float = 0.25
    num_members: int = 5
    # IVON (method "ivon"): chosen by benchmarks/sweep_recipe.py --stage ivon on a validation
    # split (docs/quality.md#ivon); 12 epochs stay within 1.3x the plain network's 10.
    ivon_lr: float = 0.5
    ivon_epochs: int = 12
    hess_init: float = 0.5
    weight_decay: float = 1e-4
    # The conversion half of the recipe: dnn_to_bnn's native defaults (one place).
    estimator: str = DEFAULT_SETTINGS.estimator
    prior_mu: float = DEFAULT_SETTINGS.prior_mu
    prior_sigma: float = DEFAULT_SETTINGS.prior_sigma
    posterior_rho_init: float = DEFAULT_SETTINGS.posterior_rho_init
    moped: bool = DEFAULT_SETTINGS.moped
    moped_delta: float = DEFAULT_SETTINGS.moped_delta
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    num_samples: int = 32
    avuc: bool = False
    avuc_beta: float = 3.0
    seed: int = 0
    # Tables (``--data``): the task, the Gaussian head of a regressor, the MLP's hidden
    # widths (empty: the architecture's default) and the validation share of the rows.
    task: str = "classification"
    noise: str = "heteroscedastic"
    hidden: tuple[int, ...] = ()
    val_fraction: float = 0.0
    # A Bayesian regressor's expected log-likelihood: "mc" (one weight sample per step) or
    # "moments" (sampling-free, propagated moments; torchbayes.regression_elbo_loss).
    objective: str = "mc"

    def __post_init__(self) -> None:
        # Types and ranges of every field: the values may come from a checkpoint file.
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), hints[f.name]))
        for name in ("epochs", "batch_size", "num_samples"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_range("epochs", self.epochs, 1, MAX_EPOCHS)
        for name in ("lr", "pretrain_lr", "prior_sigma", "moped_delta", "avuc_beta", "ivon_lr", "hess_init"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("prior_mu", "posterior_rho_init"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.bayesian and self.prior_sigma < smallest_prior_sigma():
            raise ValueError(
                f"prior_sigma must be >= {smallest_prior_sigma():.3g} (the KL term "
                f"1/(2 sigma^2) would overflow in float32), got {self.prior_sigma:g}"
            )
        _check_range("seed", self.seed, 0, MAX_SEED)
        _check_range("image_size", self.image_size, 1, MAX_IMAGE_SIDE)
        _check_range("num_samples", self.num_samples, 1, MAX_SAMPLES)
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if len(self.ood_classes) > MAX_CLASSES or any(not 0 <= c < MAX_CLASSES for c in self.ood_classes):
            raise ValueError(f"ood_classes must be class ids in [0, {MAX_CLASSES}), got {_show(self.ood_classes)}")
        for name in ("dataset", "model", "data_root"):
            text = getattr(self, name)
            if text is not None and not (0 < len(text) <= MAX_TEXT and "\0" not in text):
                raise ValueError(f"{name} must be a non-empty text of at most {MAX_TEXT} characters, got {_show(text)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {_show(self.method)}")
        _check_range("pretrain_epochs", self.pretrain_epochs, 0, MAX_EPOCHS)
        _check_range("bayesian_layers", self.bayesian_layers, 0, MAX_EPOCHS)
        _check_range("num_members", self.num_members, 1, 1000)
        _check_range("ivon_epochs", self.ivon_epochs, 1, MAX_EPOCHS)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {self.kl_weight!r}")
        if not 0 < self.dropout < 1:
            raise ValueError(f"dropout must be in (0, 1), got {self.dropout!r}")
        self.estimator = canonical_estimator(self.estimator)
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be classification or regression, got {_show(self.task)}")
        if self.objective not in ("mc", "moments"):
            raise ValueError(f"objective must be mc or moments, got {_show(self.objective)}")
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {_show(self.noise)}")
        if len(self.hidden) > 100 or any(not 1 <= h <= MAX_SIDE for h in self.hidden):
            raise ValueError(f"hidden must be at most 100 widths in [1, {MAX_SIDE}], got {_show(self.hidden)}")
        if not 0 <= self.val_fraction < 1 or self.test_fraction + self.val_fraction >= 1:
            raise ValueError(f"val_fraction must be in [0, 1 - test_fraction), got {self.val_fraction!r}")
        if self.avuc and not self.bayesian:
            raise ValueError("avuc needs a Bayesian model (its uncertainty comes from weight samples)")

    @property
    def bayesian(self) -> bool:
        """The trained model has Bayesian layers: ``method`` is ``"bayesian"`` or ``"ivon"``."""
        return self.method in ("bayesian", "ivon")

    def prior_parameters(self) -> dict[str, Any]:
        """The reference's ``bnn_prior_parameters`` dictionary for :func:`torchbayes.dnn_to_bnn`."""
        return {
            "prior_mu": self.prior_mu,
            "prior_sigma": self.prior_sigma,
            "posterior_mu_init": 0.0,
            "posterior_rho_init": self.posterior_rho_init,
            "type": self.estimator,
            "moped_enable": self.moped,
            "moped_delta": self.moped_delta,
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain Python types (for JSON and checkpoints)."""
        data = asdict(self)
        data["ood_classes"] = list(self.ood_classes)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The settings of :meth:`to_dict`; unknown keys and bad values raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"config must be a dict, got {type(data).__name__}")
        if "bayesian" in data:  # checkpoints written before ``method`` existed: bayesian = True/False
            legacy = data["bayesian"]
            data = {k: v for k, v in data.items() if k != "bayesian"}
            if not isinstance(legacy, bool):
                raise ValueError(f"bayesian must be true or false, got {_show(legacy)}")
            data.setdefault("method", "bayesian" if legacy else "deterministic")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k)[:40] for k in data if k not in known)
        if unknown:
            raise ValueError(f"config has unknown settings {unknown[:5]}")
        return cls(**data)


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
        text = (
            f"epoch {self.epoch:>{len(str(epochs))}}/{epochs}  loss {self.loss:.4f}  nll {self.nll:.4f}{kl}"
            f"  train acc {100 * self.train_accuracy:5.1f}%  test acc {100 * self.test_accuracy:5.1f}%"
            f"  {self.seconds:.1f}s"
        )
        return text + "".join(f"  {k} {v:.4f}" for k, v in self.extra.items())


def build_classifier(
    config: TrainConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    moped_source: dict[str, Tensor] | None = None,
) -> nn.Module:
    """The model ``config`` describes: deterministic, or converted to Bayesian.

    Args:
        config: the run's settings.
        input_shape: ``(C, H, W)``; num_classes: logits.
        moped_source: state_dict of the trained deterministic twin (required when
            ``config.moped``); its weights become posterior and prior means.

    Returns:
        The model on the CPU.
    """
    if config.method == "ensemble":
        return Ensemble(
            [
                build_model(config.model, input_shape, num_classes, hidden=config.hidden)
                for _ in range(config.num_members)
            ]
        )
    if config.method == "dropout":
        model = build_model(config.model, input_shape, num_classes, dropout=config.dropout, hidden=config.hidden)
        if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ValueError(
                f"method 'dropout' needs dropout layers: model {config.model!r} has none (use mlp, "
                "lenet or a torchvision model with dropout, e.g. mobilenet_v3_small)"
            )
        return model
    model = build_model(config.model, input_shape, num_classes, hidden=config.hidden)
    if not config.bayesian:
        return model
    if config.method == "ivon":  # the architecture ivon_to_bnn gives: every layer Bayesian
        return dnn_to_bnn(model, estimator=config.estimator, moped=False, prior_mu=0.0, posterior_mu_init=0.0)
    if config.moped:
        if moped_source is None:
            raise ValueError("moped needs the deterministic model's weights (moped_source)")
        try:
            model.load_state_dict(moped_source)
        except RuntimeError as e:
            raise CheckpointError(
                f"the MOPED source does not fit model {config.model!r} for inputs "
                f"{tuple(input_shape)} and {num_classes} classes: {_first_line(e)}"
            ) from e
    return dnn_to_bnn(model, config.prior_parameters(), include=_last_weight_layers(model, config.bayesian_layers))


def model_label(config: TrainConfig) -> str:
    """How reports name the model ``config`` trains, e.g. ``"Bayesian lenet"``."""
    kind = {
        "bayesian": "Bayesian",
        "deterministic": "deterministic",
        "dropout": "MC dropout",
        "ensemble": f"{config.num_members}-member ensemble of",
        "ivon": "IVON",
    }[config.method]
    return f"{kind} {config.model}"


def _last_weight_layers(model: nn.Module, count: int) -> list[str] | None:
    """Qualified names of the last ``count`` layers ``dnn_to_bnn`` converts (``None``: all)."""
    if count == 0:
        return None
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    return names[-count:]


def train_model(
    config: TrainConfig,
    data: DatasetSplits,
    *,
    moped_source: dict[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    on_epoch: Callable[[EpochSummary], None] | None = None,
) -> tuple[nn.Module, list[EpochSummary]]:
    """Build and train the model ``config`` describes, whatever its method.

    A Bayesian model with ``pretrain_epochs`` is trained in two phases: the
    deterministic architecture first (cross-entropy, same optimiser settings), then its
    MOPED conversion on the ELBO for ``epochs`` (the recipe of ``docs/quality.md``).

    Args:
        config: the run's settings.
        data: the splits.
        moped_source: a trained deterministic twin's state_dict to start MOPED from
            (instead of pre-training).
        device: where to train.
        show_progress: progress bars on stderr.
        on_epoch: called with each epoch's summary, pre-training included.

    Returns:
        The trained model (in eval mode, on ``device``) and every epoch's summary.
    """
    torch.manual_seed(config.seed)
    history: list[EpochSummary] = []
    if config.method == "ivon":
        return _train_ivon(config, data, device=device, show_progress=show_progress, on_epoch=on_epoch)
    if config.method == "bayesian" and config.pretrain_epochs and moped_source is None:
        pretrain = replace(
            config, method="deterministic", epochs=config.pretrain_epochs, lr=config.pretrain_lr, avuc=False
        )
        deterministic = build_classifier(pretrain, data.input_shape, data.num_classes)
        history = train_classifier(
            deterministic,
            data,
            pretrain,
            device=device,
            show_progress=show_progress,
            on_epoch=on_epoch,
            advice=lambda: _likely_cause(config, pretraining=True),
        )
        moped_source = {k: v.cpu() for k, v in deterministic.state_dict().items()}
    model = build_classifier(config, data.input_shape, data.num_classes, moped_source=moped_source)
    # A different seed for the second phase: its data order should not replay the first's.
    phase = replace(config, seed=config.seed + 1) if history else config
    history += train_classifier(
        model, data, phase, device=device, show_progress=show_progress, on_epoch=on_epoch, first_epoch=len(history) + 1
    )
    return model, history


def _train_ivon(
    config: TrainConfig,
    data: DatasetSplits,
    *,
    device: torch.device | str,
    show_progress: bool,
    on_epoch: Callable[[EpochSummary], None] | None,
) -> tuple[nn.Module, list[EpochSummary]]:
    """The plain network trained by IVON, converted to the Bayesian layers of its posterior."""
    from torchbayes.optim import IVON, ivon_to_bnn

    network = build_model(config.model, data.input_shape, data.num_classes)  # images only (tables refuse ivon)
    optimizer = IVON(
        network.parameters(),
        lr=config.ivon_lr,
        ess=len(data.train_x),
        hess_init=config.hess_init,
        weight_decay=config.weight_decay,
    )
    phase = replace(config, epochs=config.ivon_epochs)
    history = train_classifier(
        network, data, phase, device=device, show_progress=show_progress, on_epoch=on_epoch, optimizer=optimizer
    )
    model = ivon_to_bnn(network, optimizer, estimator=config.estimator)
    return model.eval(), history


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
            logits = model(x[start : start + batch_size].to(device))
            if isinstance(model, Ensemble):
                logits = _ensemble_logits(logits)
            correct += int((logits.argmax(-1).cpu() == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(x))


def train_classifier(
    model: nn.Module,
    data: DatasetSplits,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    on_epoch: Callable[[EpochSummary], None] | None = None,
    first_epoch: int = 1,
    advice: Callable[[], str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[EpochSummary]:
    """Train ``model`` in place with Adam on ``data``'s training split.

    Deterministic models minimise the cross-entropy; Bayesian ones the negative ELBO
    per example (:func:`torchbayes.elbo_loss`, one weight sample per step, the KL
    weighted by ``config.kl_weight``), plus ``avuc_beta`` times the AvUC loss when
    ``config.avuc``. An :class:`~torchbayes.Ensemble` minimises the sum of its members'
    cross-entropies: each member gets exactly its own gradient (Adam is per parameter),
    so this is ``M`` independent trainings in one loop.

    Args:
        model: the classifier (moved to ``device``).
        data: the splits; the test split gives each epoch's test accuracy.
        config: epochs, batch size, learning rate, seed, AvUC.
        device: where to train.
        show_progress: a progress bar per epoch on stderr.
        on_epoch: called with each epoch's summary (e.g. to print it).
        first_epoch: number of the first epoch (after a pre-training phase).
        advice: the likely cause of a divergence, named in the error (default: the
            settings of ``config`` most likely to blame).
        optimizer: instead of Adam at ``config.lr``; a `torchbayes.optim.IVON` gets
            each step's forward and backward inside its ``sampled_params`` block.

    Returns:
        One :class:`EpochSummary` per epoch.
    """
    device = torch.device(device)
    model.to(device).train()
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    sampled = getattr(optimizer, "sampled_params", None)  # IVON: one weight sample per step
    generator = torch.Generator().manual_seed(config.seed)
    num_train = len(data.train_x)
    bayesian = config.method == "bayesian"  # the ELBO (IVON's KL is in its update)
    avuc = AvULoss(beta=config.avuc_beta) if config.avuc else None
    # AvUC's uncertainty threshold (Krishnan & Tickoo, 2020): first from the untrained
    # model's training-set uncertainties, then from each epoch's (uncertainty_threshold).
    threshold = _initial_avuc_threshold(model, data, config, device) if avuc is not None else 0.0
    history = []
    last_epoch = first_epoch + config.epochs - 1
    members = model.num_members if isinstance(model, Ensemble) else 0
    for epoch in range(first_epoch, last_epoch + 1):
        start = time.perf_counter()
        order = torch.randperm(num_train, generator=generator)
        totals = {"loss": 0.0, "nll": 0.0, "avuc": 0.0, "correct": 0.0}
        seen_uncertainty, seen_correct = [], []
        batches = batch_bounds(num_train, config.batch_size, model)
        for step, (first, stop) in enumerate(
            progress_bar(batches, desc=f"epoch {epoch}/{last_epoch}", enabled=show_progress, unit="batch"), 1
        ):
            idx = order[first:stop]
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            sample = sampled(train=True) if sampled is not None else contextlib.nullcontext()
            with sample:
                logits = model(x)
                if members:  # (M, B, C): the members' mean NLL; their sum is the loss
                    nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(members))
                    loss = nll * members
                    logits = _ensemble_logits(logits)
                else:
                    nll = F.cross_entropy(logits, y)
                    loss = elbo_loss(nll, model, num_train, kl_weight=config.kl_weight) if bayesian else nll
                if avuc is not None:
                    avuc_term = avuc(logits, y, threshold)
                    loss = loss + avuc_term
                    totals["avuc"] += float(avuc_term.detach()) * len(idx)
                    seen_uncertainty.append(avu_uncertainty(logits.detach()))
                    seen_correct.append(logits.detach().argmax(-1) == y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            step_loss = float(loss.detach())
            if not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"the loss became {step_loss} at epoch {epoch}, batch {step} of "
                    f"{len(batches)}; {advice() if advice else _likely_cause(config)}"
                )
            totals["loss"] += step_loss * len(idx)
            totals["nll"] += float(nll.detach()) * len(idx)
            totals["correct"] += float((logits.argmax(-1) == y).sum())
        if avuc is not None:
            threshold = uncertainty_threshold(torch.cat(seen_uncertainty), torch.cat(seen_correct))
        bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:  # the last step's update; earlier ones show in the next loss
            cause = advice() if advice else _likely_cause(config)
            raise TrainingDiverged(f"parameter {bad!r} became non-finite at epoch {epoch}; {cause}")
        kl = float(kl_divergence(model).detach()) / num_train if bayesian else 0.0
        summary = EpochSummary(
            epoch=epoch,
            loss=totals["loss"] / num_train,
            nll=totals["nll"] / num_train,
            kl_per_example=kl,
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


def batch_bounds(num_train: int, batch_size: int, model: nn.Module) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of each minibatch of an epoch over ``num_train`` shuffled examples.

    BatchNorm cannot train on a batch of one example (no variance): for a model with
    BatchNorm, a last batch of one is merged into the one before (every example is still
    seen once per epoch), and a batch size of 1, or a single training example, is refused.

    Raises:
        ValueError: BatchNorm with ``batch_size`` 1 or one training example.
    """
    starts = list(range(0, num_train, batch_size))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if batch_size < 2 or num_train < 2:
            what = f"--batch-size {batch_size}" if batch_size < 2 else f"{num_train} training example"
            raise ValueError(
                f"the model has BatchNorm layers, which need at least 2 examples per batch to train; got {what}"
            )
        if num_train - starts[-1] == 1:
            starts.pop()
    return [
        (start, min(start + batch_size, num_train) if i < len(starts) - 1 else num_train)
        for i, start in enumerate(starts)
    ]


def _ensemble_logits(member_logits: Tensor) -> Tensor:
    """Log of the members' mean probabilities, ``(B, C)``, from their logits ``(M, B, C)``."""
    return torch.logsumexp(F.log_softmax(member_logits, -1), 0) - math.log(member_logits.shape[0])


#: Settings that can make a training diverge, with their flags: the advice names the ones
#: changed from the recipe's defaults when none is extreme.
_UNSTABLE_SETTINGS = {
    "lr": "--lr",
    "kl_weight": "--kl-weight",
    "prior_mu": "--prior-mu",
    "prior_sigma": "--prior-sigma",
    "posterior_rho_init": "--posterior-rho-init",
    "moped_delta": "--moped-delta",
    "avuc_beta": "--avuc-beta",
}


def _likely_cause(config: TrainConfig, *, pretraining: bool = False) -> str:
    """The setting most likely to blame for a divergence, and the flag to change.

    ``pretraining``: the deterministic pre-training diverged (only ``--pretrain-lr`` acts there).
    """
    if pretraining:
        if config.pretrain_lr > 0.05:
            return f"likely cause: --pretrain-lr {config.pretrain_lr:g} is too large; try 2e-3"
        return f"in the deterministic pre-training; try a smaller --pretrain-lr than {config.pretrain_lr:g}"
    bayesian = config.method == "bayesian"
    extreme = [
        # (condition, flag and value, why, what to try)
        (
            bayesian and not config.moped and config.posterior_rho_init > 5,
            "--posterior-rho-init",
            f"(initial posterior sigma {F.softplus(torch.tensor(config.posterior_rho_init)).item():.3g}) is too large",
            "-3",
        ),
        (bayesian and config.prior_sigma < 1e-3, "--prior-sigma", "is tiny, so the KL term dominates", "0.1 to 1"),
        (bayesian and config.kl_weight > 10, "--kl-weight", "makes the KL term dominate", "1"),
        (
            bayesian and config.moped and config.moped_delta > 1,
            "--moped-delta",
            "makes the posterior sigma larger than the weights",
            "0.1 to 0.5",
        ),
        (bayesian and abs(config.prior_mu) > 1, "--prior-mu", "pulls every weight far from 0", "0"),
        (config.avuc and config.avuc_beta > 10, "--avuc-beta", "makes the AvUC term dominate", "3"),
        (config.lr > 0.05, "--lr", "is too large", "1e-3"),
    ]
    for condition, flag, why, advice in extreme:
        if condition:
            value = getattr(config, flag[2:].replace("-", "_"))
            return f"likely cause: {flag} {value:g} {why}; try {advice}"
    default = TrainConfig()
    changed = [
        f"{flag} {getattr(config, name):g}"
        for name, flag in _UNSTABLE_SETTINGS.items()
        if name != "lr" and getattr(config, name) != getattr(default, name) and (bayesian or name == "avuc_beta")
    ]
    if changed:
        return f"try a smaller --lr than {config.lr:g}, or the defaults instead of {', '.join(changed)}"
    return f"try a smaller --lr than {config.lr:g}"


def training_warnings(history: Sequence[EpochSummary], data: DatasetSplits, config: TrainConfig) -> list[str]:
    """Warnings about a finished training: a loss that exploded, or a model at chance level.

    Args:
        history: the epochs of :func:`train_classifier`.
        data: the splits it was trained on.
        config: its settings (named in the advice).

    Returns:
        One line per problem (empty for a healthy run).
    """
    lines: list[str] = []
    if not history:
        return lines
    # The recipe's pre-training minimises the cross-entropy, then the ELBO (which adds the KL
    # term): each phase's losses are compared among themselves only.
    two_phases = config.method == "bayesian" and len(history) == config.pretrain_epochs + config.epochs
    pretrained = config.pretrain_epochs if two_phases else 0
    for pretraining, losses in (
        (True, [h.loss for h in history[:pretrained]]),
        (False, [h.loss for h in history[pretrained:]]),
    ):
        if len(losses) > 1 and losses[-1] > 10 * abs(min(losses)) and losses[-1] - min(losses) > 1:
            phase = "of the pre-training " if pretraining else ""
            lines.append(
                f"the loss {phase}exploded from {min(losses):.4g} to {losses[-1]:.4g}: training is unstable "
                f"({_likely_cause(config, pretraining=pretraining)})"
            )
    # Chance: always answering the most frequent class. Above it, a model learnt something;
    # 3 binomial standard errors of that rate on N training examples is the margin of noise.
    counts = torch.bincount(data.train_y, minlength=data.num_classes).double()
    n = float(counts.sum())
    majority = float(counts.max()) / n
    margin = 3 * math.sqrt(majority * (1 - majority) / n)
    accuracy = history[-1].train_accuracy
    if accuracy <= majority + margin:
        lines.append(
            f"the final training accuracy {100 * accuracy:.1f}% is at chance level "
            f"({100 * majority:.1f}% for always answering the most frequent class): the model "
            f"did not learn ({_likely_cause(config)})"
        )
    return lines


def _initial_avuc_threshold(model: nn.Module, data: DatasetSplits, config: TrainConfig, device: torch.device) -> float:
    uncertainty, correct = [], []
    with torch.no_grad():
        for first in range(0, len(data.train_x), 512):
            logits = model(data.train_x[first : first + 512].to(device))
            uncertainty.append(avu_uncertainty(logits))
            correct.append(logits.argmax(-1).cpu() == data.train_y[first : first + 512])
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
    table: TableSchema | None = None


#: Key of the command's settings inside the checkpoint's ``extra`` dict.
_EXTRA_KEY = "torchbayes_cli"


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: TrainConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    history: Sequence[EpochSummary | Mapping[str, Any]] = (),
    *,
    int8: bool = False,
    table: TableSchema | None = None,
) -> Path:
    """Save weights and settings with :func:`torchbayes.save_checkpoint` (atomically).

    :func:`load_checkpoint` rebuilds the model from the architecture name, input shape
    and class count stored beside the weights.

    Args:
        path: the file.
        model: the trained model (or its INT8 version, with ``int8=True``).
        config, input_shape, num_classes: what the model was built and trained with.
        history: the training epochs (summaries or their dicts).
        int8: ``model`` was quantized with :func:`torchbayes.quantization.quantize`.
        table: a model trained on a table: its columns, classes and standardisation.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [h if isinstance(h, Mapping) else asdict(h) for h in history]
    extra = {
        _EXTRA_KEY: {
            "config": config.to_dict(),
            "input_shape": list(input_shape),
            "num_classes": int(num_classes),
            "history": epochs,
            "int8": int8,
        }
    }
    if table is not None:
        extra[_EXTRA_KEY]["table"] = table.to_dict()
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
    extra = payload.get("extra")
    settings = extra.get(_EXTRA_KEY) if isinstance(extra, dict) else None
    if not isinstance(settings, dict):
        raise CheckpointError(
            f"{str(path)!r} is a torchbayes checkpoint but not one written by the "
            "torchbayes command (no model settings in it)"
        )
    try:
        config, input_shape, num_classes, history, int8, table = _read_settings(settings)
    except ValueError as e:  # the settings are not covered by the digest: a crafted file lands here
        raise CheckpointError(f"{str(path)!r} has malformed settings: {e}") from None
    for name, tensor in payload["state_dict"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{str(path)!r} holds non-finite values (NaN or infinity) in {name!r}: "
                "the training that wrote it diverged; retrain it"
            )
    _check_size(path, payload["state_dict"], config, input_shape, num_classes)
    if config.task == "regression":
        from torchbayes.cli.regression import build_regressor

        base = replace(config, method="deterministic", moped=False) if config.bayesian else config
        if config.bayesian:
            model = checkpoint.rebuild(path, build_regressor(base, input_shape[0]))
        else:
            model = build_regressor(config, input_shape[0])
            checkpoint.load_checkpoint(path, model)
    elif int8:
        # Same architecture, quantized; every INT8 tensor and range is then loaded.
        from torchbayes.quantization import quantize

        model = quantize(build_classifier(replace(config, moped=False), input_shape, num_classes).eval())
        checkpoint.load_checkpoint(path, model)
    elif config.bayesian:
        # rebuild() replays the recorded dnn_to_bnn call, then loads weights and priors.
        model = checkpoint.rebuild(path, build_model(config.model, input_shape, num_classes, hidden=config.hidden))
    else:  # deterministic, dropout or ensemble: the same architecture, then its weights
        model = build_classifier(config, input_shape, num_classes)
        checkpoint.load_checkpoint(path, model)
    model.eval()
    return Checkpoint(model, config, input_shape, num_classes, history, int8, table)


def _check_size(
    path: str | Path, state: Mapping[str, Tensor], config: TrainConfig, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """Refuse settings that describe a larger model than the file's tensors, before building it.

    The settings (architecture, input shape, class count, ensemble members) are not covered
    by the digest and decide how much memory the model takes: the deterministic architecture
    they describe is built on the meta device (no memory), and its values must not
    outnumber the stored ones (a Bayesian or INT8 model stores at least as many). The real
    model is then at most a few times the file's tensors.
    """
    if config.method == "ensemble":
        stored = {key.split(".", 2)[1] for key in state if key.startswith("members.")}
        if len(stored) != config.num_members:
            raise CheckpointError(
                f"{str(path)!r} has malformed settings: num_members is {config.num_members} but the file "
                f"holds the weights of {len(stored)} members"
            )
    base = replace(config, method="deterministic", moped=False) if config.bayesian else replace(config, moped=False)
    with torch.device("meta"):
        try:
            model = _base_model(base, input_shape, num_classes)
        except Exception as e:  # the settings name an architecture that cannot be built
            raise CheckpointError(f"{str(path)!r}: its settings do not describe a model: {_first_line(e)}") from None
    needed = sum(t.numel() for t in model.state_dict().values())
    held = sum(t.numel() for t in state.values())
    if needed > held:
        raise CheckpointError(
            f"{str(path)!r} does not fit its settings: a {config.model!r} model for inputs {tuple(input_shape)} "
            f"and {num_classes} classes has {needed:,} values, but the file holds {held:,}"
        )


_SETTINGS_KEYS = frozenset({"config", "input_shape", "num_classes", "history", "int8", "table"})


#: The most weights of a table's MLP (all members of an ensemble): 10^8 float32 are 400 MB.
MAX_TABLE_WEIGHTS = 10**8


def check_table_network(config: TrainConfig, in_features: int, outputs: int) -> None:
    """Raise ``ValueError`` when the MLP ``config`` describes for a table is too large to build
    (a crafted checkpoint, or ``--hidden 65536,65536``, would otherwise allocate gigabytes)."""
    widths = [in_features, *(config.hidden or (50,)), outputs]
    weights = sum((a + 1) * b for a, b in itertools.pairwise(widths))
    weights *= config.num_members if config.method == "ensemble" else 1
    if weights > MAX_TABLE_WEIGHTS:
        raise ValueError(
            f"the network for {in_features} inputs with hidden widths {list(config.hidden)} has {weights:,} "
            f"weights, more than the {MAX_TABLE_WEIGHTS:,} allowed"
        )


def _read_settings(
    settings: Mapping[str, Any],
) -> tuple[TrainConfig, tuple[int, ...], int, list[dict[str, Any]], bool, TableSchema | None]:
    """Validate the command's settings stored in a checkpoint (types, ranges, known keys)."""
    unknown = sorted(str(k)[:40] for k in settings if k not in _SETTINGS_KEYS)
    if unknown or not {"config", "input_shape", "num_classes"} <= settings.keys():
        raise ValueError(f"expected the keys {sorted(_SETTINGS_KEYS)}, got {sorted(str(k)[:40] for k in settings)}")
    config = TrainConfig.from_dict(settings["config"])
    table = TableSchema.from_dict(settings["table"]) if settings.get("table") is not None else None
    shape = settings["input_shape"]
    if table is not None:  # a table: one input per column
        if (
            not isinstance(shape, (list, tuple))
            or not all(type(s) is int for s in shape)
            or list(shape) != [len(table.feature_names)]
        ):
            raise ValueError(
                f"input_shape must be [{len(table.feature_names)}] (the table's columns), got {_show(shape)}"
            )
        if table.task != config.task:
            raise ValueError(f"the table's task {table.task!r} is not the config's {config.task!r}")
        check_table_network(config, shape[0], max(2, len(table.classes)))
    elif config.task != "classification":
        raise ValueError(f"a {config.task} model needs its table schema")
    elif (
        not isinstance(shape, (list, tuple))
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
        or max(shape[1:]) > MAX_IMAGE_SIDE
        or math.prod(shape) > MAX_INPUT_VALUES
    ):
        raise ValueError(
            f"input_shape must be (channels, height, width): positive integers, height and width at most "
            f"{MAX_IMAGE_SIDE}, at most {MAX_INPUT_VALUES:,} values, got {_show(shape)}"
        )
    num_classes = settings["num_classes"]
    low = 0 if config.task == "regression" else 2
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not low <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be an integer in [{low}, {MAX_CLASSES}], got {_show(num_classes)}")
    if table is not None and table.task == "classification" and num_classes != len(table.classes):
        raise ValueError(f"num_classes {num_classes} is not the table's {len(table.classes)} classes")
    int8 = settings.get("int8", False)
    if not isinstance(int8, bool):
        raise ValueError(f"int8 must be true or false, got {_show(int8)}")
    history = _read_history(settings.get("history", []))
    return config, tuple(shape), num_classes, history, int8, table


_EPOCH_FIELDS = {f.name for f in fields(EpochSummary)}


def _base_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The deterministic architecture ``config`` describes (see :func:`_check_size`)."""
    if config.task == "regression":
        from torchbayes.cli.regression import build_regressor

        return build_regressor(config, input_shape[0])
    return build_classifier(config, input_shape, num_classes)


def _read_history(history: Any) -> list[dict[str, Any]]:
    """The training epochs stored in a checkpoint, each an :class:`EpochSummary` as a dict."""
    if not isinstance(history, (list, tuple)) or len(history) > MAX_HISTORY:
        raise ValueError(f"history must be a list of at most {MAX_HISTORY} epochs, got {_show(history)}")
    epochs = []
    for i, entry in enumerate(history):
        where = f"history[{i}]"
        if not isinstance(entry, dict) or not set(entry) <= _EPOCH_FIELDS:
            raise ValueError(f"{where} must be a dict with keys among {sorted(_EPOCH_FIELDS)}, got {_show(entry)}")
        for key, value in entry.items():
            if key == "extra":
                if (
                    not isinstance(value, dict)
                    or len(value) > 100
                    or not all(isinstance(k, str) and len(k) <= 100 and _is_number(v) for k, v in value.items())
                ):
                    raise ValueError(f"{where}['extra'] must map names to numbers, got {_show(value)}")
            elif not _is_number(value):
                raise ValueError(f"{where}[{key!r}] must be a finite number, got {_show(value)}")
        epoch = entry.get("epoch", 1)
        if not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCHS:
            raise ValueError(f"{where}['epoch'] must be an integer in [1, {MAX_EPOCHS}], got {_show(epoch)}")
        for key in ("train_accuracy", "test_accuracy"):
            if not 0 <= entry.get(key, 0) <= 1:
                raise ValueError(f"{where}[{key!r}] must be in [0, 1], got {_show(entry[key])}")
        epochs.append(dict(entry))
    return epochs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
