"""The sweep that chose ``torchbayes train``'s default Bayesian recipe (docs/quality.md).

Every configuration is a :class:`torchbayes.cli.training.TrainConfig` trained by the
command's own pipeline (:func:`torchbayes.cli.training.train_model`) on the MNIST task of
issue 13 (``load_dataset("mnist", ood_classes=(8, 9), seed=s)``, the CLI's LeNet) and
scored on a VALIDATION split carved from the training split (20%, seeded): the test
split is never read. OOD AUROC uses one half of the held-out digits (the other half is
left for nothing here; the benchmark reports all of them).

Results go to a JSON-lines file, one line per (configuration, seed); configurations
already there are skipped, so the sweep runs in pieces (``--budget-s``)::

    flock /tmp/cpu.lock python benchmarks/sweep_recipe.py --stage coarse --budget-s 300
    flock /tmp/cpu.lock python benchmarks/sweep_recipe.py --stage confirm --seeds 0 1 2
    cpujob python benchmarks/sweep_recipe.py --stage ivon --seeds 0    # issue 20
    python benchmarks/sweep_recipe.py --table        # the markdown table of docs/quality.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from torchbayes.cli.evaluation import evaluate_classifier
from torchbayes.cli.training import TrainConfig, train_model
from torchbayes.datasets import DatasetSplits, load_dataset

RESULTS = Path(__file__).with_name("results") / "sweep_recipe.jsonl"

#: Settings shared by every configuration: the demo's deterministic optimiser settings.
BASE: dict[str, Any] = {"dataset": "mnist", "model": "lenet", "ood_classes": (8, 9), "batch_size": 64, "lr": 2e-3,
                            "num_samples": 32}
#: Pre-trained, MOPED-initialised, flipout, the LeNet's 3 fully connected layers Bayesian.
RECIPE: dict[str, Any] = {"method": "bayesian", "pretrain_epochs": 10, "moped": True, "moped_delta": 0.3,
                          "estimator": "flipout", "bayesian_layers": 3, "prior_sigma": 1.0, "kl_weight": 1.0,
                          "epochs": 3}

#: name -> settings over BASE. Baselines first, then one lever changed at a time from RECIPE.
COARSE: dict[str, dict[str, Any]] = {
    "plain": {"method": "deterministic", "epochs": 10},
    "mc-dropout": {"method": "dropout", "dropout": 0.25, "epochs": 10},
    "ensemble-5": {"method": "ensemble", "num_members": 5, "epochs": 10},
    "from scratch (old CLI default)": {"method": "bayesian", "pretrain_epochs": 0, "moped": False,
                                       "bayesian_layers": 0, "estimator": "reparameterization", "epochs": 10,
                                       "lr": 1e-3, "batch_size": 128, "prior_sigma": 1.0, "moped_delta": 0.1},
    "recipe": RECIPE,
    "all layers": {**RECIPE, "bayesian_layers": 0},
    "last layer": {**RECIPE, "bayesian_layers": 1},
    "delta 0.1": {**RECIPE, "moped_delta": 0.1},
    "delta 0.5": {**RECIPE, "moped_delta": 0.5},
    "prior sigma 0.1": {**RECIPE, "prior_sigma": 0.1},
    "prior sigma 0.05": {**RECIPE, "prior_sigma": 0.05},
    "kl weight 0.1": {**RECIPE, "kl_weight": 0.1},
    "reparameterization": {**RECIPE, "estimator": "reparameterization"},
    "local": {**RECIPE, "estimator": "local"},
    "pretrain 5": {**RECIPE, "pretrain_epochs": 5},
    "pretrain 5, 6 epochs": {**RECIPE, "pretrain_epochs": 5, "epochs": 6},
    "1 epoch": {**RECIPE, "epochs": 1},
    "6 epochs": {**RECIPE, "epochs": 6},
    "lr 1e-3": {**RECIPE, "lr": 1e-3},  # the Bayesian phase's (pre-training keeps 2e-3)
    "lr 1e-3, 5 epochs": {**RECIPE, "lr": 1e-3, "epochs": 5},
    "lr 1e-3, 5 epochs, delta 0.1": {**RECIPE, "lr": 1e-3, "epochs": 5, "moped_delta": 0.1},
    "lr 1e-3, 5 epochs, last layer": {**RECIPE, "lr": 1e-3, "epochs": 5, "bayesian_layers": 1},
    "lr 1e-3, 5 epochs, reparameterization": {**RECIPE, "lr": 1e-3, "epochs": 5, "estimator": "reparameterization"},
    "no MOPED, pretrain 0, 13 epochs": {**RECIPE, "pretrain_epochs": 0, "moped": False, "epochs": 13},
}

#: Issue 20: IVON (torchbayes.optim.IVON, then ivon_to_bnn) on the plain LeNet; ess = the
#: training part's size. The learning rate and the length of training matter most (issue
#: 20's first look); epochs stop at 12, within the time bar of 1.3x the plain network's 10.
IVON_BASE: dict[str, Any] = {"method": "ivon", "ivon_lr": 0.3, "hess_init": 0.5, "weight_decay": 1e-4,
                             "ivon_epochs": 10}  # the configurations spell out every setting they change
IVON: dict[str, dict[str, Any]] = {
    "ivon lr 0.1": {**IVON_BASE, "ivon_lr": 0.1},
    "ivon lr 0.2": {**IVON_BASE, "ivon_lr": 0.2},
    "ivon lr 0.3": IVON_BASE,
    "ivon lr 0.5": {**IVON_BASE, "ivon_lr": 0.5},
    "ivon lr 0.3, hess_init 0.1": {**IVON_BASE, "hess_init": 0.1},
    "ivon lr 0.3, hess_init 1": {**IVON_BASE, "hess_init": 1.0},
    "ivon lr 0.3, weight decay 1e-3": {**IVON_BASE, "weight_decay": 1e-3},
    "ivon lr 0.3, 12 epochs": {**IVON_BASE, "ivon_epochs": 12},
    "ivon lr 0.5, 12 epochs": {**IVON_BASE, "ivon_lr": 0.5, "ivon_epochs": 12},
    # second round, from the first's trends (larger lr, smaller hess_init, weight decay 1e-3 helped)
    "ivon lr 0.8, 12 epochs": {**IVON_BASE, "ivon_lr": 0.8, "ivon_epochs": 12},
    "ivon lr 0.5, 12 epochs, hess_init 0.1": {**IVON_BASE, "ivon_lr": 0.5, "ivon_epochs": 12, "hess_init": 0.1},
    "ivon lr 0.5, 12 epochs, hess_init 0.1, wd 1e-3": {**IVON_BASE, "ivon_lr": 0.5, "ivon_epochs": 12,
                                                        "hess_init": 0.1, "weight_decay": 1e-3},
    "ivon lr 1, 12 epochs, hess_init 0.1, wd 1e-3": {**IVON_BASE, "ivon_lr": 1.0, "ivon_epochs": 12,
                                                      "hess_init": 0.1, "weight_decay": 1e-3},
    "ivon lr 2, 12 epochs, hess_init 0.1, wd 1e-3": {**IVON_BASE, "ivon_lr": 2.0, "ivon_epochs": 12,
                                                      "hess_init": 0.1, "weight_decay": 1e-3},
}
STAGES = {"coarse": COARSE, "confirm": COARSE, "ivon": {**IVON, **COARSE}}


def validation_task(seed: int) -> DatasetSplits:
    """The MNIST task's training split cut into training (80%) and validation (20%) parts."""
    data = load_dataset("mnist", ood_classes=(8, 9), seed=seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    order = torch.randperm(len(data.train_x), generator=generator)
    held = order[: len(order) // 5]
    kept = order[len(order) // 5:]
    ood = data.ood_x[torch.randperm(len(data.ood_x), generator=generator)[: len(data.ood_x) // 2]]
    return dataclasses.replace(data, train_x=data.train_x[kept], train_y=data.train_y[kept],
                               test_x=data.train_x[held], test_y=data.train_y[held], ood_x=ood)


#: (seed, pre-training epochs, lr, batch size) -> (the pre-trained weights, seconds it took).
_PRETRAINED: dict[tuple[Any, ...], tuple[dict[str, torch.Tensor], float]] = {}


def _pretrained(config: TrainConfig, data: DatasetSplits) -> tuple[dict[str, torch.Tensor], float]:
    # The deterministic phase is the same for every configuration that shares these
    # settings: it is trained once per sweep process (exactly as train_model does) and its
    # time is added to each configuration's.
    key = (config.seed, config.pretrain_epochs, config.pretrain_lr, config.batch_size)
    if key not in _PRETRAINED:
        phase = dataclasses.replace(config, method="deterministic", epochs=config.pretrain_epochs,
                                    lr=config.pretrain_lr)
        start = time.perf_counter()
        model, _ = train_model(phase, data, show_progress=False)
        _PRETRAINED[key] = ({k: v.clone() for k, v in model.state_dict().items()}, time.perf_counter() - start)
    return _PRETRAINED[key]


def run(name: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one configuration on one seed's training part; its validation metrics."""
    data = validation_task(seed)
    config = TrainConfig(**{**BASE, **settings, "seed": seed})
    source, seconds = (_pretrained(config, data) if config.bayesian and config.pretrain_epochs
                       else (None, 0.0))
    start = time.perf_counter()
    # With a MOPED source, train_model skips pre-training; seed + 1 as its second phase uses.
    phase = dataclasses.replace(config, seed=seed + 1) if source is not None else config
    model, _ = train_model(phase, data, moped_source=source, show_progress=False)
    seconds += time.perf_counter() - start
    evaluation = evaluate_classifier(model, data, name=name, num_samples=config.num_samples, seed=seed,
                                     show_progress=False, dropout=config.method == "dropout")
    return {"name": name, "seed": seed, "settings": config.to_dict(), "train_s": seconds, **evaluation.metrics}


def _done(path: Path) -> set[tuple[str, int]]:
    if not path.exists():
        return set()
    return {(r["name"], r["seed"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def table(path: Path) -> str:
    """Mean ± std over seeds of every configuration in ``path``, as markdown."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in map(json.loads, path.read_text().splitlines()):
        if all(r["seed"] != record["seed"] for r in rows.get(record["name"], [])):  # first run of a pair
            rows.setdefault(record["name"], []).append(record)
    keys = ("accuracy", "nll", "ece", "ood_auroc_entropy", "ood_auroc_mutual_information", "train_s")
    lines = ["| configuration | seeds | accuracy | NLL | ECE | OOD AUROC (entropy) | OOD AUROC (MI) | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, records in rows.items():
        cells = []
        for key in keys:
            values = [r[key] for r in records if r.get(key) is not None]
            if not values:
                cells.append("")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}")
        lines.append(f"| {name} | {len(records)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(STAGES), default="coarse",
                        help="coarse/confirm: the ELBO recipe (issue 13); ivon: IVON's settings (issue 20)")
    parser.add_argument("--names", nargs="*", help="only these configurations (confirm: the top few)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--budget-s", type=float, default=300, help="start no configuration after this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the results table and exit")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads (2 for timings; 1 gives more throughput on a crowded machine)")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    configurations = STAGES[args.stage]
    names = args.names or list(IVON if args.stage == "ivon" else COARSE)
    done = _done(args.out)
    start = time.perf_counter()
    for seed in args.seeds:
        for name in names:
            if (name, seed) in done:
                continue
            if time.perf_counter() - start > args.budget_s:
                print("budget spent; run again to continue")
                return
            record = run(name, configurations[name], seed)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{name} seed {seed}: nll {record['nll']:.4f} ece {record['ece']:.4f} "
                  f"acc {record['accuracy']:.4f} auroc MI {record['ood_auroc_mutual_information']} "
                  f"{record['train_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
