"""The sweep that chose ``torchbayes train --data``'s defaults for tables (docs/cli.md).

Every method of the command (``deterministic``, ``dropout``, ``ensemble``, ``bayesian``,
with their default noise models) is trained by the command's own pipeline
(:func:`torchbayes.cli.regression.train_regressor`) on two real tables that are NOT the
UCI benchmark sets (scikit-learn's diabetes, mlxtend's auto MPG), and scored on the
VALIDATION split the command carves (10% of the rows; the test split is never read):
each epoch's validation NLL in the target's units is in the training history, so one
long run per (method, table, seed) gives the whole curve. The table printed is the mean
validation NLL at 25, 50, 100, 200 and 400 epochs (Bayesian: after as many epochs of
deterministic pre-training, capped at 100).

Run: ``cpujob python benchmarks/sweep_table_defaults.py --seeds 0 1 2`` (one thread;
about a minute per seed on this 2-core machine).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from torchbayes.cli.regression import DEFAULT_NOISE, train_regressor
from torchbayes.cli.training import TrainConfig
from torchbayes.datasets import read_table, split_table

CHECKPOINTS = (25, 50, 100, 200, 400)


def _tables(folder: Path) -> dict[str, Path]:
    """The two tables as CSV files (through the command's own reader)."""
    from mlxtend.data import autompg_data
    from sklearn.datasets import load_diabetes

    diabetes = load_diabetes()
    x, y = autompg_data()
    x = x[:, ~np.isnan(x).any(0)]  # mlxtend's last column (car name) is not numeric
    tables = {
        "diabetes": ([*diabetes.feature_names, "target"], np.column_stack([diabetes.data, diabetes.target])),
        "autompg": ([f"x{i}" for i in range(x.shape[1])] + ["target"], np.column_stack([x, y])),
    }
    paths = {}
    for name, (header, values) in tables.items():
        path = folder / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(values.tolist())
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=max(CHECKPOINTS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny MLPs: a second thread only adds synchronisation
    curves: dict[tuple[str, str], list[list[float]]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for table_name, path in _tables(Path(folder)).items():
            table = read_table(path, target="target")
            for seed in args.seeds:
                data = split_table(table, test_fraction=0.2, val_fraction=0.1, seed=seed)
                for method in ("deterministic", "dropout", "ensemble", "bayesian"):
                    config = TrainConfig(
                        dataset=str(path),
                        method=method,
                        task="regression",
                        noise=DEFAULT_NOISE[method],
                        hidden=(50,),
                        epochs=args.epochs,
                        pretrain_epochs=100,
                        moped=method == "bayesian",
                        batch_size=32,
                        lr=1e-3,
                        pretrain_lr=1e-3,
                        dropout=0.05,
                        seed=seed,
                        test_fraction=0.2,
                        val_fraction=0.1,
                    )
                    _, history = train_regressor(config, data, show_progress=False)
                    if method == "bayesian":
                        history = history[100:]  # the curve after the pre-training
                    curves.setdefault((table_name, method), []).append([h["extra"]["val_nll"] for h in history])
    print("mean validation NLL (target's units) after E epochs; seeds", args.seeds)
    print("| table | method | " + " | ".join(f"E = {e}" for e in CHECKPOINTS) + " |")
    print("|---|---|" + "---|" * len(CHECKPOINTS))
    for (table_name, method), runs in curves.items():
        cells = [f"{statistics.mean(run[e - 1] for run in runs):.4f}" for e in CHECKPOINTS if e <= args.epochs]
        print(f"| {table_name} | {method} | " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
