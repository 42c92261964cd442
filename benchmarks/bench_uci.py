"""The UCI regression benchmark (issue 21): every method on the five sets, all 20 standard splits.

Protocol of the published tables (PBP, MC dropout, deep ensembles, DVI): the standard
train/test splits of ``../shared/data/uci`` (`torchbayes.datasets.load_uci`), inputs and
target standardised on the training split, one hidden layer of 50 ReLU units, test RMSE
and average test log-likelihood per point in the target's original units, mean ± standard
error over the splits.

Hyperparameters are chosen per split on an inner 80/20 train/validation split of the
TRAINING rows (the 2018 protocol of the MC dropout repository), never on the test rows;
the chosen setting is then retrained on the whole training split and scored on its test
rows. What is chosen: the number of full-batch Adam steps (from checkpoints of one inner
run) and, for the recipe, the prior's standard deviation from ``--prior-grid``.

Methods (all with a heteroscedastic Gaussian head, `torchbayes.nn.HeteroscedasticGaussian`,
except where said; every prediction goes through `torchbayes.predict`):

- ``recipe``: the recommended Bayesian regression recipe: ``BayesLinear`` 50 ReLU
  ``BayesLinear``, mean-field Gaussian posterior, N(0, sigma_p^2) prior, trained on the
  sampling-free ELBO (`torchbayes.elbo.regression_elbo_loss(method="moments")`: closed-form
  expected log-likelihood from propagated moments, Wu et al. 2019), full batch; predicted
  by 100 Monte Carlo samples (the mixture's log-likelihood, as published).
- ``recipe-moments-pred``: the same models predicted in one moment-propagation pass
  (a single Gaussian, no sampling at all).
- ``mc-training``: the recipe with the Monte Carlo ELBO instead (one weight sample per step,
  local reparameterization), same chosen hyperparameters: the ablation of the closed form.
- ``plain``: the deterministic network with learned (heteroscedastic) noise, Adam with
  weight decay, early-stopped on validation.
- ``mc-dropout``: the plain network with dropout (p = ``--dropout``) after the hidden layer,
  100 MC dropout samples.
- ``ensemble-5``: 5 plain heteroscedastic networks from different initialisations
  (Lakshminarayanan et al. 2017, without their adversarial training), vmapped training
  (`torchbayes.fit_ensemble`), predicted as their Gaussian mixture; steps as chosen for
  ``plain``.

Rows go to a JSON-lines file (one per data set, split and method); finished rows are
skipped, so the benchmark runs in pieces. Run, then print the table::

    python benchmarks/bench_uci.py                      # every set, 20 splits
    python benchmarks/bench_uci.py --datasets yacht --splits 0 1
    python benchmarks/bench_uci.py --table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import torchbayes
from torchbayes.datasets import UCI_DATASETS, UCISplit, load_uci
from torchbayes.elbo import regression_elbo_loss
from torchbayes.metrics import interval_coverage, regression_calibration_error, rmse
from torchbayes.nn import BayesLinear, HeteroscedasticGaussian

ROOT = Path(os.environ.get("TORCHBAYES_UCI_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "uci"))
RESULTS = Path(__file__).resolve().parent / "results" / "bench_uci.jsonl"
METHODS = ("recipe", "recipe-moments-pred", "mc-training", "plain", "mc-dropout", "ensemble-5")
#: What a plain run does; the MC-training ablation costs as much as the recipe, so it is asked for
#: by name (``--methods mc-training``; it reuses the recipe's chosen hyperparameters).
DEFAULT_METHODS = ("recipe", "recipe-moments-pred", "plain", "mc-dropout", "ensemble-5")
HIDDEN = 50

#: Published test RMSE and log-likelihood (mean over the 20 splits; ± standard error where given).
#: PBP: Hernández-Lobato & Adams 2015, Table 1 (as in Gal & Ghahramani 2016). MC dropout 2018:
#: yaringal/DropoutUncertaintyExps readme at 6eb4497 ("Grid Search" columns, standard errors).
#: Deep ensembles: Lakshminarayanan et al. 2017, Table 1 (NLL sign flipped). DVI: Wu et al.
#: 2019, Table 2 (log-likelihood only).
PUBLISHED: dict[str, dict[str, tuple[float | None, float | None, float, float | None]]] = {
    "bostonHousing": {
        "PBP": (3.01, 0.18, -2.57, 0.09),
        "MC dropout 2018": (2.90, 0.18, -2.40, 0.04),
        "deep ensemble": (3.28, None, -2.41, None),
        "DVI": (None, None, -2.41, 0.02),
    },
    "concrete": {
        "PBP": (5.67, 0.09, -3.16, 0.02),
        "MC dropout 2018": (4.82, 0.16, -2.93, 0.02),
        "deep ensemble": (6.03, None, -3.06, None),
        "DVI": (None, None, -3.06, 0.01),
    },
    "energy": {
        "PBP": (1.80, 0.05, -2.04, 0.02),
        "MC dropout 2018": (0.54, 0.06, -1.21, 0.01),
        "deep ensemble": (2.09, None, -1.38, None),
        "DVI": (None, None, -1.01, 0.06),
    },
    "wine-quality-red": {
        "PBP": (0.64, 0.01, -0.97, 0.01),
        "MC dropout 2018": (0.62, 0.01, -0.93, 0.01),
        "deep ensemble": (0.64, None, -0.94, None),
        "DVI": (None, None, -0.90, 0.01),
    },
    "yacht": {
        "PBP": (1.02, 0.05, -1.63, 0.02),
        "MC dropout 2018": (0.67, 0.05, -1.25, 0.01),
        "deep ensemble": (1.58, None, -1.18, None),
        "DVI": (None, None, -0.47, 0.03),
    },
}


@dataclass(frozen=True)
class Settings:
    steps: int = 1000
    lr: float = 2e-2
    prior_grid: tuple[float, ...] = (1.0,)
    checkpoints: int = 4
    samples: int = 100
    dropout: float = 0.05
    weight_decay: float = 1e-4
    plain_steps: int = 1000
    plain_lr: float = 1e-2


# ----------------------------------------------------------------------------- models
def bayes_net(features: int, prior_sigma: float) -> nn.Module:
    kwargs = {"prior_sigma": prior_sigma, "posterior_rho_init": -5.0}
    return nn.Sequential(
        BayesLinear(features, HIDDEN, **kwargs), nn.ReLU(), BayesLinear(HIDDEN, 2, **kwargs), HeteroscedasticGaussian(1)
    )


def plain_net(features: int, dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(features, HIDDEN), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(HIDDEN, 2), HeteroscedasticGaussian(1))


def checkpoint_steps(steps: int, count: int) -> list[int]:
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def train(
    model: nn.Module,
    step: Callable[[], Tensor],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    evaluate: Callable[[], float] | None = None,
    checkpoints: list[int] | None = None,
) -> dict[int, float]:
    """Full-batch Adam for ``steps`` steps; ``evaluate()`` at each checkpoint (validation LL)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scores: dict[int, float] = {}
    for i in range(1, steps + 1):
        model.train()
        loss = step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if evaluate is not None and checkpoints and i in checkpoints:
            scores[i] = evaluate()
    return scores


def validation_ll(model: nn.Module, data: UCISplit, **kwargs: object) -> float:
    with torch.no_grad():
        result = torchbayes.predict(model, data.x_test, task="regression", **kwargs)  # type: ignore[arg-type]
    value = float(result.log_likelihood(data.y_test).mean())
    return value if math.isfinite(value) else -math.inf


# ----------------------------------------------------------------------------- scoring
def score(result: torchbayes.RegressionPrediction, data: UCISplit) -> dict[str, float]:
    """Test RMSE and LL in original units, plus 95% coverage and calibration (PIT)."""
    lower, upper = result.interval(0.95)
    return {
        "rmse": float(rmse(result.mean, data.y_test)) * data.y_std,
        "ll": float(data.original_log_likelihood(float(result.log_likelihood(data.y_test).mean()))),
        "coverage95": float(interval_coverage(lower, upper, data.y_test)),
        "calibration": float(regression_calibration_error(result.cdf(data.y_test), power=1)),
    }


def best(scores: dict[int, float]) -> int:
    return max(scores, key=lambda k: (scores[k], -k))


# ----------------------------------------------------------------------------- methods
def choose_recipe(inner: UCISplit, settings: Settings, seed: int) -> dict[str, float]:
    """The prior sigma and step count of the best validation log-likelihood (moments prediction)."""
    features, checkpoints = inner.x_train.shape[1], checkpoint_steps(settings.steps, settings.checkpoints)
    choice: tuple[float, int, float] = (settings.prior_grid[0], settings.steps, -math.inf)
    for prior_sigma in settings.prior_grid:
        torch.manual_seed(seed)
        model = bayes_net(features, prior_sigma)
        scores = train(
            model,
            lambda m=model: regression_elbo_loss(m, inner.x_train, inner.y_train, len(inner.x_train), method="moments"),
            settings.steps,
            settings.lr,
            evaluate=lambda m=model: validation_ll(m, inner, method="moments"),
            checkpoints=checkpoints,
        )
        steps = best(scores)
        if scores[steps] > choice[2]:
            choice = (prior_sigma, steps, scores[steps])
    return {"prior_sigma": choice[0], "steps": choice[1]}


def run_recipe(
    data: UCISplit, chosen: dict[str, float], objective: str, settings: Settings, seed: int
) -> dict[str, dict]:
    """Train the recipe with the chosen hyperparameters on the training split and score it."""
    torch.manual_seed(seed)
    model = bayes_net(data.x_train.shape[1], chosen["prior_sigma"])
    start = time.perf_counter()
    train(
        model,
        lambda: regression_elbo_loss(model, data.x_train, data.y_train, len(data.x_train), method=objective),
        int(chosen["steps"]),
        settings.lr,
    )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        mc = torchbayes.predict(model, data.x_test, settings.samples, task="regression", seed=seed)
        if objective == "mc":
            return {"mc-training": {**score(mc, data), "train_s": seconds, **chosen}}
        moments = torchbayes.predict(model, data.x_test, method="moments", task="regression")
    return {
        "recipe": {**score(mc, data), "train_s": seconds, **chosen},
        "recipe-moments-pred": {**score(moments, data), "train_s": seconds, **chosen},
    }


def _plain_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    head = model[-1]
    return lambda: head.nll(model(x), y)  # type: ignore[operator]


def run_plain_family(data: UCISplit, inner: UCISplit, settings: Settings, seed: int) -> dict[str, dict]:
    """The plain network and MC dropout (steps chosen on the inner split), and the ensemble."""
    features, checkpoints = data.x_train.shape[1], checkpoint_steps(settings.plain_steps, settings.checkpoints)
    rows = {}
    chosen_plain_steps = settings.plain_steps
    for name, dropout in (("plain", 0.0), ("mc-dropout", settings.dropout)):
        predict_kwargs: dict[str, object] = (
            {"num_samples": settings.samples, "dropout": True, "seed": seed} if dropout else {}
        )

        def evaluate(
            model: nn.Module, part: UCISplit, kwargs: dict[str, object] = predict_kwargs, dropout: float = dropout
        ) -> float:
            target = model if dropout else torchbayes.Ensemble([model])
            return validation_ll(target, part, **kwargs)

        torch.manual_seed(seed)
        model = plain_net(features, dropout)
        scores = train(
            model,
            _plain_step(model, inner.x_train, inner.y_train),
            settings.plain_steps,
            settings.plain_lr,
            settings.weight_decay,
            evaluate=lambda m=model: evaluate(m, inner),
            checkpoints=checkpoints,
        )
        steps = best(scores)
        if name == "plain":
            chosen_plain_steps = steps
        torch.manual_seed(seed)
        model = plain_net(features, dropout)
        start = time.perf_counter()
        train(model, _plain_step(model, data.x_train, data.y_train), steps, settings.plain_lr, settings.weight_decay)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            target = model if dropout else torchbayes.Ensemble([model])
            result = torchbayes.predict(target, data.x_test, task="regression", **predict_kwargs)  # type: ignore[arg-type]
        rows[name] = {**score(result, data), "train_s": seconds, "steps": steps}
    torch.manual_seed(seed)
    members = [plain_net(features) for _ in range(5)]
    ensemble = torchbayes.Ensemble(members)
    head = members[0][-1]
    start = time.perf_counter()
    torchbayes.fit_ensemble(
        ensemble,
        data.x_train,
        data.y_train,
        loss=head.nll,  # type: ignore[arg-type]
        epochs=chosen_plain_steps,
        batch_size=len(data.x_train),
        lr=settings.plain_lr,
        weight_decay=settings.weight_decay,
        seed=seed,
    )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        result = torchbayes.predict(ensemble, data.x_test, task="regression")
    rows["ensemble-5"] = {**score(result, data), "train_s": seconds, "steps": chosen_plain_steps}
    return rows


# ----------------------------------------------------------------------------- driver
def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:  # whole lines, flushed: a killed run loses at most this split
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


def run(
    datasets: list[str], splits: list[int] | None, methods: list[str], settings: Settings, out: Path, root: Path
) -> None:
    for name in datasets:
        for split in splits if splits is not None else range(torchbayes.datasets.uci_num_splits(name, root)):
            rows_so_far = {(r["method"]): r for r in read_rows(out) if r["dataset"] == name and r["split"] == split}
            todo = [m for m in methods if m not in rows_so_far]
            if not todo:
                continue
            start = time.perf_counter()
            data = load_uci(name, root, split)
            inner = load_uci(name, root, split, validation_fraction=0.2, seed=split)
            rows: dict[str, dict] = {}
            if {"recipe", "recipe-moments-pred", "mc-training"} & set(todo):
                recipe_row = rows_so_far.get("recipe")
                chosen = (
                    {"prior_sigma": recipe_row["prior_sigma"], "steps": recipe_row["steps"]}
                    if recipe_row
                    else choose_recipe(inner, settings, seed=split)
                )
                if {"recipe", "recipe-moments-pred"} & set(todo):
                    rows.update(run_recipe(data, chosen, "moments", settings, seed=split))
                if "mc-training" in todo:
                    rows.update(run_recipe(data, chosen, "mc", settings, seed=split))
            if {"plain", "mc-dropout", "ensemble-5"} & set(todo):
                rows.update(run_plain_family(data, inner, settings, split))
            elapsed = time.perf_counter() - start
            rows = {m: r for m, r in rows.items() if m in todo}
            append_rows(
                out, [{"dataset": name, "split": split, "method": m, **r, "split_s": elapsed} for m, r in rows.items()]
            )
            summary = " ".join(f"{m}={r['ll']:.2f}/{r['rmse']:.2f}" for m, r in rows.items())
            print(f"{name} split {split} ({elapsed:.0f} s): {summary}", flush=True)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def table(out: Path) -> str:
    rows = read_rows(out)
    by: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by.setdefault((row["dataset"], row["method"]), []).append(row)
    lines = ["Test log-likelihood (higher is better), mean ± SE over the splits:", ""]
    head = ["data set", "splits", *METHODS, "PBP", "MC dropout 2018", "deep ensemble", "DVI"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, fmt in (("ll", "{:.2f} ± {:.2f}"), ("rmse", "{:.2f} ± {:.2f}")):
        if metric == "rmse":
            lines += ["", "Test RMSE (lower is better), mean ± SE:", "", "| " + " | ".join(head) + " |"]
            lines.append("|" + "---|" * len(head))
        for name in UCI_DATASETS:
            cells = [name, str(len(by.get((name, "recipe"), [])))]
            for method in METHODS:
                values = [r[metric] for r in by.get((name, method), [])]
                cells.append(fmt.format(*mean_se(values)) if values else "")
            for reference in ("PBP", "MC dropout 2018", "deep ensemble", "DVI"):
                r, r_se, ll, ll_se = PUBLISHED[name][reference]
                value, se = (ll, ll_se) if metric == "ll" else (r, r_se)
                cells.append("" if value is None else f"{value:.2f}" + (f" ± {se:.2f}" if se is not None else ""))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "95% interval coverage and mean absolute calibration error (PIT, 19 levels), mean over splits:", ""]
    lines += ["| data set | " + " | ".join(METHODS) + " |", "|" + "---|" * (len(METHODS) + 1)]
    for name in UCI_DATASETS:
        cells = [name]
        for method in METHODS:
            rs = by.get((name, method), [])
            coverage = statistics.fmean(r["coverage95"] for r in rs) if rs else math.nan
            calibration = statistics.fmean(r["calibration"] for r in rs) if rs else math.nan
            cells.append(f"{coverage:.2f} / {calibration:.3f}" if rs else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bars of issue 21 for the recipe (mean over the splits measured):", ""]
    lines += [
        "| data set | LL >= MC dropout 2018 - 1 SE | LL > PBP | RMSE <= 1.1 x MC dropout 2018 |",
        "|---|---|---|---|",
    ]
    counts = [0, 0, 0]
    for name in UCI_DATASETS:
        rs = by.get((name, "recipe"), [])
        if not rs:
            continue
        ll, r = statistics.fmean(x["ll"] for x in rs), statistics.fmean(x["rmse"] for x in rs)
        mcd_rmse, _, mcd_ll, mcd_se = PUBLISHED[name]["MC dropout 2018"]
        pbp_ll = PUBLISHED[name]["PBP"][2]
        met = [ll >= mcd_ll - (mcd_se or 0.0), ll > pbp_ll, r <= 1.1 * (mcd_rmse or math.inf)]
        counts = [c + m for c, m in zip(counts, met)]
        cells = [
            f"{ll:.2f} vs {mcd_ll - (mcd_se or 0.0):.2f}: {'met' if met[0] else 'not met'}",
            f"{ll:.2f} vs {pbp_ll:.2f}: {'met' if met[1] else 'not met'}",
            f"{r:.2f} vs {1.1 * (mcd_rmse or math.inf):.2f}: {'met' if met[2] else 'not met'}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"| sets meeting it | {counts[0]} (bar: 4 of 5) | {counts[1]} (bar: 5 of 5) | {counts[2]} (bar: 3 of 5) |"
    )
    runs = {(r["dataset"], r["split"], r["split_s"]) for r in rows}  # rows written together share split_s
    total = sum(seconds for _, _, seconds in runs)
    lines += ["", f"Wall time of the rows above: {total / 60:.1f} min (sum over splits, this machine)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(UCI_DATASETS), choices=UCI_DATASETS)
    parser.add_argument("--splits", nargs="+", type=int, default=None, help="default: all standard splits")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--root", type=Path, default=ROOT, help="folder of the UCI data sets (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--prior-grid", nargs="+", type=float, default=list(Settings.prior_grid))
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 on a loaded machine: tiny ops stall on 2)"
    )
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if not args.root.is_dir():
        sys.exit(f"UCI data not found at {args.root}; pass --root")
    torch.set_num_threads(args.threads)
    settings = Settings(steps=args.steps, prior_grid=tuple(args.prior_grid))
    start = time.perf_counter()
    run(args.datasets, args.splits, args.methods, settings, args.out, args.root)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
