"""``torchbayes medical``: triage on real patients, deciding which cases to refer to a doctor.

Scikit-learn's breast-cancer data (Wisconsin diagnostic: 569 tumours, 30 features of
the cell nuclei, malignant or benign) with a stratified train/test split and features
standardised by the training statistics. A deterministic MLP is trained first; its
Bayesian twin is converted with :func:`torchbayes.dnn_to_bnn` (MOPED from the trained
weights) and trained on the ELBO. The report's referral curve shows the accuracy on the
cases each model keeps when the most uncertain ones are referred, against the
deterministic model's confidence and random referral.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchbayes.cli.evaluation import ModelEvaluation, describe_data, evaluate_classifier
from torchbayes.cli.report import Report, comparison_table, referral_results, write_report
from torchbayes.cli.training import TrainConfig, train_classifier
from torchbayes.conversion import dnn_to_bnn
from torchbayes.datasets import DatasetSplits

__all__ = ["MedicalResult", "load_breast_cancer_splits", "medical_configs", "run_medical"]

#: Hidden units of the two layers of the triage MLP (30 -> 64 -> 64 -> 2).
HIDDEN_UNITS = 64


@dataclass
class MedicalResult:
    """What :func:`run_medical` produced; ``referral`` is the JSON's ``"referral"`` block."""

    report: Report
    evaluations: list[ModelEvaluation]
    referral: dict[str, Any]
    seconds: float


def load_breast_cancer_splits(*, test_fraction: float = 0.3, seed: int = 0) -> DatasetSplits:
    """Breast-cancer data, stratified split, features standardised with training statistics.

    Args:
        test_fraction: fraction of each class put in the test split.
        seed: seed of the split.

    Returns:
        :class:`~torchbayes.datasets.DatasetSplits` with ``(N, 30)`` float32 features,
        labels 0 = malignant, 1 = benign (scikit-learn's coding), no OOD inputs.

    Example:
        >>> data = load_breast_cancer_splits(seed=0); data.train_x.shape
        torch.Size([398, 30])
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("the breast-cancer data needs scikit-learn: pip install 'torchbayes[data]'") from e
    bunch = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_fraction, stratify=bunch.target, random_state=seed
    )
    scaler = StandardScaler().fit(x_train)  # training statistics only: the test cases stay unseen

    def features(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(scaler.transform(x).astype(np.float32))

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64))

    return DatasetSplits(
        name="breast cancer (Wisconsin diagnostic)",
        train_x=features(x_train),
        train_y=labels(y_train),
        test_x=features(x_test),
        test_y=labels(y_test),
        ood_x=torch.empty(0, bunch.data.shape[1]),
        classes=(0, 1),
        ood_classes=(),
        class_names=tuple(str(n) for n in bunch.target_names),
    )


def medical_configs(quick: bool = False, seed: int = 0) -> tuple[TrainConfig, TrainConfig]:
    """The deterministic and Bayesian training settings (quick: fewer epochs, for tests)."""
    deterministic = TrainConfig(
        dataset="breast-cancer",
        model="mlp",
        method="deterministic",
        test_fraction=0.3,
        epochs=8 if quick else 12,
        batch_size=32,
        lr=1e-3,
        num_samples=32 if quick else 64,
        seed=seed,
    )
    # MOPED from the trained weights, as in the demo; prior N(w, 1) around them.
    bayesian = replace(
        deterministic,
        method="bayesian",
        estimator="flipout",
        moped=True,
        moped_delta=0.1,
        prior_sigma=1.0,
        epochs=5 if quick else 15,
    )
    return deterministic, bayesian


def _triage_mlp(num_features: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(num_features, HIDDEN_UNITS),
        nn.ReLU(),
        nn.Linear(HIDDEN_UNITS, HIDDEN_UNITS),
        nn.ReLU(),
        nn.Linear(HIDDEN_UNITS, 2),
    )


def run_medical(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
) -> MedicalResult:
    """Train both models on breast cancer, compare their referral curves, write the report.

    Args:
        out_dir: the report folder (``report.html``, ``results.json``, ``images/``).
        quick: fewer epochs and Monte Carlo samples (for tests).
        seed: seeds the split, the weights and the noise.
        device: where to train and predict.
        show_progress: progress bars on stderr.
        echo: receives each line of console output.

    Returns:
        A :class:`MedicalResult`.
    """
    start = time.perf_counter()
    det_config, bayes_config = medical_configs(quick, seed)
    data = load_breast_cancer_splits(test_fraction=det_config.test_fraction, seed=seed)
    echo(
        f"data: {data.name}, {len(data.train_x)} training and {len(data.test_x)} test patients, "
        f"{data.train_x.shape[1]} features"
    )

    torch.manual_seed(seed)
    deterministic = _triage_mlp(data.train_x.shape[1])
    echo(f"training the deterministic MLP ({det_config.epochs} epochs)")
    det_history = train_classifier(
        deterministic,
        data,
        det_config,
        device=device,
        show_progress=show_progress,
        on_epoch=lambda s: echo("  " + s.line(det_config.epochs)),
    )
    torch.manual_seed(seed)
    bayesian = dnn_to_bnn(copy.deepcopy(deterministic).cpu(), bayes_config.prior_parameters())
    echo(
        f"training its Bayesian twin: dnn_to_bnn with MOPED (delta {bayes_config.moped_delta}), "
        f"{bayes_config.estimator} estimator ({bayes_config.epochs} epochs)"
    )
    bayes_history = train_classifier(
        bayesian,
        data,
        bayes_config,
        device=device,
        show_progress=show_progress,
        on_epoch=lambda s: echo("  " + s.line(bayes_config.epochs)),
    )

    names = ("deterministic MLP", "Bayesian MLP")
    evaluations = [
        evaluate_classifier(
            model,
            data,
            name=name,
            num_samples=bayes_config.num_samples,
            device=device,
            seed=seed,
            show_progress=show_progress,
        )
        for model, name in zip((deterministic, bayesian), names)
    ]
    echo("")
    echo(comparison_table(evaluations))
    settings = {
        "data": describe_data(data),
        "features": "standardised with the training split's mean and std",
        "deterministic": det_config.to_dict(),
        "bayesian": bayes_config.to_dict(),
        "architecture": f"{data.train_x.shape[1]}-{HIDDEN_UNITS}-{HIDDEN_UNITS}-2 MLP",
        "quick": quick,
    }
    summary = (
        "Which patients should a doctor look at? A deterministic MLP and its Bayesian twin "
        "(torchbayes.dnn_to_bnn, MOPED from the deterministic weights, trained on the ELBO) classify "
        "breast tumours as malignant or benign from 30 features of the cell nuclei; each model refers "
        "the cases it is least sure of and is scored on those it keeps."
    )
    report = write_report(
        out_dir,
        evaluations,
        title="torchbayes medical: referring uncertain breast-cancer diagnoses",
        summary=summary,
        settings=settings,
        histories={names[0]: [asdict(h) for h in det_history], names[1]: [asdict(h) for h in bayes_history]},
        referral=True,
    )
    referral = referral_results(evaluations)
    echo("")
    for label, accuracy in referral["accuracy"].items():
        shown = [(f, a) for f, a in zip(referral["fractions"], accuracy) if f in (0, 0.1, 0.3, 0.5)]
        echo(f"referral, {label}: " + "  ".join(f"{100 * f:.0f}% -> {100 * a:.1f}%" for f, a in shown))
    seconds = time.perf_counter() - start
    echo(f"report: {report.html}  (numbers: {report.json}; {seconds:.0f} s)")
    return MedicalResult(report, evaluations, referral, seconds)
