"""Does AvUC improve calibration? ELBO vs ELBO + AvUC on scikit-learn digits (or MNIST).

Trains the same Bayesian MLP (BayesLinear layers, mean-field Gaussian posterior) with the
ELBO alone and with the ELBO plus the Accuracy-versus-Uncertainty Calibration loss
(Krishnan & Tickoo, NeurIPS 2020), over several seeds, and reports test accuracy, ECE,
NLL, and the OOD AUROC of held-out classes, for Monte Carlo averaged predictions.

The AvUC recipe follows the paper's code: one Monte Carlo sample per step,
``loss = CE + KL / N + beta * AvULoss(logits, y, u_th)`` with ``beta = 3``, the threshold
``u_th`` re-estimated on held-out data (20% of the training set) after each of the first
5 AvUC epochs as the midpoint of the mean predictive entropy of correct and of incorrect
predictions. One change: AvUC is switched on after ``--warmup`` epochs of ELBO alone
(default: half the epochs). Trained from scratch (``--warmup 0``) on this small data
set, the AvU term pushes the still-uncertain model to lower its confidence on correct
predictions and the predictions collapse towards uniform (see the README).

Run:  python examples/avuc_digits.py [--dataset digits|mnist] [--seeds 5] [--epochs 30] [--warmup 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from torchbayes import AvULoss, elbo_loss
from torchbayes.avuc import avu_uncertainty, uncertainty_threshold
from torchbayes.datasets import load_dataset
from torchbayes.metrics import accuracy, expected_calibration_error, negative_log_likelihood, ood_auroc
from torchbayes.nn import BayesLinear
from torchbayes.uncertainty import predictive_entropy


def make_model(in_features: int, num_classes: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Flatten(), BayesLinear(in_features, hidden), nn.ReLU(),
                         BayesLinear(hidden, hidden), nn.ReLU(), BayesLinear(hidden, num_classes))


@torch.no_grad()
def mc_probs(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """``(S, N, C)`` softmax outputs of ``samples`` posterior draws."""
    return torch.stack([F.softmax(model(x), -1) for _ in range(samples)])


def train_and_evaluate(data, *, seed: int, avuc: bool, epochs: int, beta: float = 3.0,
                       batch_size: int = 64, lr: float = 1e-3, threshold_epochs: int = 5, warmup_epochs: int = 0,
                       mc_samples: int = 20) -> dict[str, float]:
    torch.manual_seed(seed)
    # Hold out 20% of the training set to set the AvU threshold (never the test set).
    perm = torch.randperm(len(data.train_y))
    n_val = len(perm) // 5
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    x, y = data.train_x[fit_idx], data.train_y[fit_idx]
    x_val, y_val = data.train_x[val_idx], data.train_y[val_idx]
    model = make_model(x[0].numel(), data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    avu_loss = AvULoss(beta=beta)
    u_th = 1.0  # the paper's initial value, replaced after the first epoch
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(batch_size):
            logits = model(x[idx])
            loss = elbo_loss(F.cross_entropy(logits, y[idx]), model, num_data=len(y))
            if avuc and epoch >= warmup_epochs:
                loss = loss + avu_loss(logits, y[idx], u_th)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if avuc and epoch < warmup_epochs + threshold_epochs:
            with torch.no_grad():
                val_logits = model(x_val)
            u_th = uncertainty_threshold(avu_uncertainty(val_logits), val_logits.argmax(-1) == y_val)
    model.eval()
    probs = mc_probs(model, data.test_x, mc_samples)
    mean = probs.mean(0)
    result = {
        "accuracy": float(accuracy(mean, data.test_y)),
        "ece": float(expected_calibration_error(mean, data.test_y)),
        "nll": float(negative_log_likelihood(mean, data.test_y)),
    }
    if len(data.ood_x):
        ood = mc_probs(model, data.ood_x, mc_samples)
        result["ood_auroc"] = float(ood_auroc(predictive_entropy(probs), predictive_entropy(ood)))
    return result


def compare(dataset: str = "digits", seeds: int = 5, epochs: int = 30, **kwargs) -> dict[str, list[dict[str, float]]]:
    """Train both variants for ``seeds`` seeds; returns ``{"elbo": [...], "elbo+avuc": [...]}``."""
    data = load_dataset(dataset, ood_classes=(8, 9))
    results: dict[str, list[dict[str, float]]] = {"elbo": [], "elbo+avuc": []}
    for seed in range(seeds):
        for name, use_avuc in (("elbo", False), ("elbo+avuc", True)):
            results[name].append(train_and_evaluate(data, seed=seed, avuc=use_avuc, epochs=epochs, **kwargs))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=None, help="ELBO-only epochs before AvUC (default: epochs // 2)")
    parser.add_argument("--beta", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # One thread: the model is tiny, and extra threads only contend on a busy machine.
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    warmup = args.epochs // 2 if args.warmup is None else args.warmup
    results = compare(args.dataset, args.seeds, args.epochs, beta=args.beta, warmup_epochs=warmup)
    print(f"{args.dataset}, classes 8 and 9 held out as OOD, {args.seeds} seeds, {args.epochs} epochs "
          f"(AvUC from epoch {warmup}, beta = {args.beta}), "
          f"MC predictions with 20 samples ({time.perf_counter() - start:.0f} s)")
    keys = list(results["elbo"][0])
    print(f"{'':<10}" + "".join(f"{k:>18}" for k in keys))
    for name, runs in results.items():
        cells = []
        for k in keys:
            values = [r[k] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):>10.4f} ± {sd:.4f}")
        print(f"{name:<10}" + "".join(f"{c:>18}" for c in cells))
    for name, runs in results.items():
        print(f"ECE per seed, {name}: " + ", ".join(f"{r['ece']:.4f}" for r in runs))
    wins = sum(a["ece"] < e["ece"] for a, e in zip(results["elbo+avuc"], results["elbo"]))
    print(f"ELBO + AvUC has the lower ECE in {wins} of {args.seeds} seeds")


if __name__ == "__main__":
    main()
