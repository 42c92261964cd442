"""Regression on a table in the command-line tool: the network of each method and its training.

Every method trains the same multilayer perceptron (one hidden layer of 50 ReLU units by
default: the protocol of the UCI benchmark) ending in a Gaussian head of
`torchbayes.nn.likelihoods` (``--noise``): a homoscedastic head learns one noise variance,
a heteroscedastic one predicts a variance per input. The targets are standardised on
the training split; the per-epoch validation numbers are in the target's own units.

- ``bayesian``: deterministic pre-training, then ``dnn_to_bnn`` with MOPED from it, trained on
  the ELBO (one weight sample per step) with the head's Gaussian log-likelihood;
- ``deterministic``: the network and its learned noise, by maximum likelihood;
- ``dropout``: the same with dropout after each hidden layer, predicted by MC dropout;
- ``ensemble``: ``--members`` networks from different initialisations, predicted as the
  Gaussian mixture of the members (Lakshminarayanan et al. 2017).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.cli.progress import progress_bar
from torchbayes.cli.training import (
    TrainConfig,
    TrainingDiverged,
    _last_weight_layers,
    _likely_cause,
)
from torchbayes.conversion import dnn_to_bnn
from torchbayes.datasets import TabularSplits
from torchbayes.elbo import kl_divergence, regression_elbo_loss
from torchbayes.ensemble import Ensemble
from torchbayes.nn import posterior_mean
from torchbayes.nn.likelihoods import GaussianLikelihood, HeteroscedasticGaussian, HomoscedasticGaussian

__all__ = ["DEFAULT_HIDDEN", "DEFAULT_NOISE", "build_regressor", "train_regressor", "epoch_line"]

#: Hidden widths of the tabular MLP unless ``--hidden`` says otherwise (the UCI protocol's network).
DEFAULT_HIDDEN: tuple[int, ...] = (50,)

#: The Gaussian head of each method unless ``--noise`` says otherwise: the baselines a user
#: compares against (a plain network with learned noise, MC dropout with learned noise, a
#: deep ensemble of heteroscedastic members) and a heteroscedastic Bayesian network.
DEFAULT_NOISE: dict[str, str] = {
    "bayesian": "heteroscedastic",
    "deterministic": "homoscedastic",
    "dropout": "homoscedastic",
    "ensemble": "heteroscedastic",
}


def _network(in_features: int, hidden: tuple[int, ...], noise: str, dropout: float = 0.0) -> nn.Sequential:
    """``in_features -> hidden (ReLU[, dropout]) ... -> Gaussian head`` (output: mean, log-variance)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    head: GaussianLikelihood = HomoscedasticGaussian(1) if noise == "homoscedastic" else HeteroscedasticGaussian(1)
    layers += [nn.Linear(width, head.in_features), head]
    return nn.Sequential(*layers)


def build_regressor(
    config: TrainConfig, in_features: int, *, moped_source: dict[str, Tensor] | None = None
) -> nn.Module:
    """The regression network ``config`` describes, for ``in_features`` inputs.

    Args:
        config: the run's settings (``method``, ``noise``, ``hidden``, ``dropout``,
            ``num_members``, the conversion settings of a Bayesian model).
        in_features: columns of the (standardised) inputs.
        moped_source: the trained deterministic twin's ``state_dict`` (required when
            ``config.moped``); its weights become the posterior and prior means.

    Returns:
        The model on the CPU; its output is ``(B, 2)`` (mean, log-variance), ``(M, B, 2)``
        for an ensemble.
    """
    hidden = config.hidden or DEFAULT_HIDDEN
    if config.method == "ensemble":
        return Ensemble([_network(in_features, hidden, config.noise) for _ in range(config.num_members)])
    if config.method == "dropout":
        return _network(in_features, hidden, config.noise, config.dropout)
    model = _network(in_features, hidden, config.noise)
    if not config.bayesian:
        return model
    if config.moped:
        if moped_source is None:
            raise ValueError("moped needs the deterministic model's weights (moped_source)")
        model.load_state_dict(moped_source)
    return dnn_to_bnn(model, config.prior_parameters(), include=_last_weight_layers(model, config.bayesian_layers))


def head_of(model: nn.Module) -> GaussianLikelihood:
    """The model's Gaussian head (an ensemble's members share its kind)."""
    head = next((m for m in model.modules() if isinstance(m, GaussianLikelihood)), None)
    if head is None:
        raise ValueError("the model has no Gaussian head: it is not a regressor of the torchbayes command")
    return head


def train_regressor(
    config: TrainConfig,
    data: TabularSplits,
    *,
    moped_source: dict[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Build and train the regressor ``config`` describes (a Bayesian one in two phases).

    Args:
        config: the run's settings.
        data: the standardised splits of a regression table.
        moped_source: a trained deterministic twin to start MOPED from, instead of pre-training.
        device: where to train.
        show_progress: progress bars on stderr.
        on_epoch: called with each epoch's summary (pre-training included).

    Returns:
        The model (eval mode, on ``device``) and one dict per epoch: ``epoch``, ``loss`` (the
        objective per example, on standardised targets), ``nll`` (training, in the target's
        units), ``kl_per_example``, ``seconds`` and ``extra`` (``val_rmse``, ``val_nll`` of
        the posterior-mean network, ensemble mixture or dropout-free network).
    """
    torch.manual_seed(config.seed)
    in_features = data.input_shape[0]
    history: list[dict[str, Any]] = []
    if config.bayesian and config.pretrain_epochs and moped_source is None:
        pretrain = replace(config, method="deterministic", epochs=config.pretrain_epochs, lr=config.pretrain_lr)
        deterministic = build_regressor(pretrain, in_features)
        history = fit_regressor(
            deterministic, data, pretrain, device=device, show_progress=show_progress, on_epoch=on_epoch
        )
        moped_source = {k: v.cpu() for k, v in deterministic.state_dict().items()}
    model = build_regressor(config, in_features, moped_source=moped_source)
    phase = replace(config, seed=config.seed + 1) if history else config  # a new data order
    history += fit_regressor(
        model, data, phase, device=device, show_progress=show_progress, on_epoch=on_epoch, first_epoch=len(history) + 1
    )
    return model, history


def fit_regressor(
    model: nn.Module,
    data: TabularSplits,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    first_epoch: int = 1,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with Adam on the Gaussian negative log-likelihood (Bayesian:
    the negative ELBO; an ensemble: the sum of its members' NLLs, each member its own gradient).

    Raises:
        TrainingDiverged: the loss or a parameter became NaN or infinite.
    """
    device = torch.device(device)
    model.to(device).train()
    head = head_of(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    num_train = len(data.train_x)
    log_scale = _log_target_scale(data)
    members = model.num_members if isinstance(model, Ensemble) else 0
    history = []
    last_epoch = first_epoch + config.epochs - 1
    for epoch in range(first_epoch, last_epoch + 1):
        start = time.perf_counter()
        order = torch.randperm(num_train, generator=generator)
        totals = {"loss": 0.0, "nll": 0.0}
        batches = range(0, num_train, config.batch_size)
        for step, first in enumerate(
            progress_bar(batches, desc=f"epoch {epoch}/{last_epoch}", enabled=show_progress, unit="batch"), 1
        ):
            idx = order[first : first + config.batch_size]
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            if members:  # (M, B, 2): each member's own likelihood; their sum is the loss
                nll = head.nll(model(x).flatten(0, 1), y.repeat(members, 1))
                loss = nll * members
            elif config.bayesian:  # the ELBO; its likelihood term by one weight sample or in closed form
                loss = regression_elbo_loss(model, x, y, num_train, method=config.objective, kl_weight=config.kl_weight)
                nll = loss - config.kl_weight * kl_divergence(model) / num_train
            else:
                nll = loss = head.nll(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_loss = float(loss.detach())
            if not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"the loss became {step_loss} at epoch {epoch}, batch {step} of "
                    f"{len(batches)}; {_likely_cause(config)}"
                )
            totals["loss"] += step_loss * len(idx)
            totals["nll"] += float(nll.detach()) * len(idx)
        bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise TrainingDiverged(f"parameter {bad!r} became non-finite at epoch {epoch}; {_likely_cause(config)}")
        summary: dict[str, Any] = {
            "epoch": epoch,
            "loss": totals["loss"] / num_train,
            "nll": totals["nll"] / num_train + log_scale,
            "kl_per_example": float(kl_divergence(model).detach()) / num_train if config.bayesian else 0.0,
            "seconds": time.perf_counter() - start,
        }
        if len(data.val_x):
            summary["extra"] = _validation(model, head, data, device)
        history.append(summary)
        if on_epoch is not None:
            on_epoch(summary)
    model.eval()
    return history


def _log_target_scale(data: TabularSplits) -> float:
    """``log std`` of the target: a log-density on standardised targets minus it is one in the target's units."""
    assert data.target_scaling is not None, "a regression table has a target scaling"
    return math.log(data.target_scaling.std[0])


def _validation(
    model: nn.Module, head: GaussianLikelihood, data: TabularSplits, device: torch.device
) -> dict[str, float]:
    """RMSE and mean NLL on the validation rows, in the target's units, of one deterministic
    pass (posterior means, dropout off; an ensemble as the mixture of its members)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), posterior_mean(model):
        output = model(data.val_x.to(device)).cpu()
    model.train(was_training)
    y = data.val_y
    if output.dim() == 3:  # ensemble members: Gaussian mixture
        mean = head.split(output)[0].mean(0)
        log_density = torch.logsumexp(head.log_likelihood(output, y.expand(output.shape[0], *y.shape)), 0)
        log_density = log_density - math.log(output.shape[0])
    else:
        mean = head.split(output)[0]
        log_density = head.log_likelihood(output, y)
    scale = math.exp(_log_target_scale(data))
    return {
        "val_rmse": float((mean - y).square().mean().sqrt()) * scale,
        "val_nll": float(-log_density.mean()) + _log_target_scale(data),
    }


def epoch_line(summary: dict[str, Any], epochs: int) -> str:
    """One console line for a regression epoch."""
    kl = f"  kl/N {summary['kl_per_example']:.4f}" if summary.get("kl_per_example") else ""
    extra = summary.get("extra", {})
    val = f"  val rmse {extra['val_rmse']:.4g}  val nll {extra['val_nll']:.4f}" if extra else ""
    return (
        f"epoch {summary['epoch']:>{len(str(epochs))}}/{epochs}  loss {summary['loss']:.4f}  "
        f"nll {summary['nll']:.4f}{kl}{val}  {summary['seconds']:.1f}s"
    )
