"""Evaluating a classifier: predictions with uncertainty and the numbers of the report.

A Bayesian model predicts with :func:`torchbayes.predict` (Monte Carlo samples); a
deterministic one with a single forward pass (its mutual information is zero by
definition, so OOD detection by mutual information is reported for Bayesian models only).

With ``conformal=alpha``, split conformal prediction sets (`torchbayes.conformal`: LAC,
APS, RAPS) are calibrated on a stratified half of the **test split** (the model was
trained on the training split, so only test data is unseen; seeded by ``seed``) and
their coverage and size measured on the other half (:func:`conformal_results`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes import metrics
from torchbayes.cli.progress import progress_bar
from torchbayes.conformal import APS, LAC, RAPS, calibration_split, minimum_calibration_size
from torchbayes.datasets import DatasetSplits
from torchbayes.ensemble import Ensemble
from torchbayes.nn.base import iter_bayesian_modules
from torchbayes.prediction import ClassificationPrediction, predict
from torchbayes.uncertainty import predictive_entropy

__all__ = [
    "Predictions",
    "ModelEvaluation",
    "describe_data",
    "predict_dataset",
    "evaluate_classifier",
    "conformal_results",
    "METRIC_LABELS",
    "CONFORMAL_SCORES",
]

#: The conformal scores of ``--conformal``, in the order of the report's table.
CONFORMAL_SCORES = ("LAC", "APS", "RAPS")

#: Metric keys of :attr:`ModelEvaluation.metrics`, with their labels in tables and reports.
METRIC_LABELS: dict[str, str] = {
    "accuracy": "accuracy (higher is better)",
    "nll": "NLL (lower is better)",
    "ece": "ECE, 15 bins (lower is better)",
    "brier": "Brier score (lower is better)",
    "aurc": "AURC by entropy (lower is better)",
    "ood_auroc_entropy": "OOD AUROC by entropy (higher is better)",
    "ood_auroc_mutual_information": "OOD AUROC by mutual information (higher is better)",
    "predict_ms_per_image": "prediction time, ms per image",
    "train_seconds": "training time, s (pre-training included)",
}


@dataclass
class Predictions:
    """Predictive probabilities and uncertainties (nats) of a set of inputs.

    Attributes:
        probs: ``(N, C)`` predictive mean probabilities.
        entropy: ``(N,)`` predictive entropy (total uncertainty).
        mutual_information: ``(N,)`` epistemic part (zeros for a deterministic model).
        seconds: wall-clock time the predictions took.
    """

    probs: Tensor
    entropy: Tensor
    mutual_information: Tensor
    seconds: float


@dataclass
class ModelEvaluation:
    """A model's predictions on the test (and OOD) inputs and the metrics computed from them."""

    name: str
    bayesian: bool
    num_samples: int
    test: Predictions
    test_labels: Tensor
    ood: Predictions | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    #: :func:`conformal_results` when conformal prediction was asked for, else ``None``.
    conformal: dict[str, Any] | None = None

    @property
    def correct(self) -> Tensor:
        """``(N,)`` bools: whether each test prediction is right."""
        return self.test.probs.argmax(-1) == self.test_labels


def describe_data(data: DatasetSplits) -> dict[str, Any]:
    """The data's name, split sizes and classes, as plain values for reports."""
    return {
        "dataset": data.name,
        "train": len(data.train_x),
        "test": len(data.test_x),
        "ood": len(data.ood_x),
        "classes": list(data.classes),
        "ood_classes": list(data.ood_classes),
        "class_names": list(data.class_names),
    }


def _is_bayesian(model: nn.Module) -> bool:
    return next(iter_bayesian_modules(model), None) is not None


def _samples_predictions(model: nn.Module, dropout: bool) -> bool:
    """Whether ``model`` predicts with several samples (Bayesian layers, MC dropout, ensemble)."""
    return dropout or isinstance(model, Ensemble) or _is_bayesian(model)


def predict_dataset(
    model: nn.Module,
    x: Tensor,
    *,
    num_samples: int = 32,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    show_progress: bool = True,
    desc: str = "predicting",
    dropout: bool = False,
    prediction: str = "mc",
) -> Predictions:
    """Predict ``x`` in batches: Monte Carlo for a Bayesian model, one pass otherwise.

    Args:
        model: a classifier returning logits.
        x: ``(N, ...)`` inputs (on the CPU; moved batch by batch).
        num_samples: Monte Carlo samples per input (Bayesian models).
        batch_size: inputs per call of the model.
        device: where the model is.
        seed: seed of the weight noise (each batch gets ``seed + batch index``).
        show_progress: a progress bar on stderr.
        desc: the bar's label.
        dropout: MC dropout (``predict(..., dropout=True)``). An :class:`~torchbayes.Ensemble`
            predicts with its members as the samples.
        prediction: how a Bayesian model predicts: ``"mc"`` (Monte Carlo) or ``"moments"``
            (moment propagation, ``predict(..., method="moments")``; ``num_samples`` logit draws).

    Returns:
        :class:`Predictions` on the CPU.
    """
    device = torch.device(device)
    bayesian = _samples_predictions(model, dropout)
    model.eval()
    probs, entropy, mi = [], [], []
    start = time.perf_counter()
    for i, first in enumerate(
        progress_bar(range(0, len(x), batch_size), desc=desc, enabled=show_progress, unit="batch")
    ):
        batch = x[first : first + batch_size].to(device)
        if bayesian:
            result = predict(model, batch, num_samples, seed=seed + i, dropout=dropout, method=prediction)
            assert isinstance(result, ClassificationPrediction)  # the default task
            probs.append(result.mean.cpu())
            entropy.append(result.predictive_entropy.cpu())
            mi.append(result.mutual_information.cpu())
        else:
            with torch.no_grad():
                p = model(batch).softmax(-1).cpu()
            probs.append(p)
            entropy.append(predictive_entropy(p.unsqueeze(0)))
            mi.append(torch.zeros(len(p)))
    seconds = time.perf_counter() - start
    return Predictions(torch.cat(probs), torch.cat(entropy), torch.cat(mi), seconds)


def conformal_results(evaluation: ModelEvaluation, alpha: float, *, seed: int = 0) -> dict[str, Any]:
    """Split conformal sets from ``evaluation``'s test predictions: calibrated on a stratified
    half of the test split, measured on the other half.

    Args:
        evaluation: a model's test predictions and labels.
        alpha: allowed miscoverage in ``(0, 1)``.
        seed: seed of the calibration carve.

    Returns:
        ``{"alpha", "calibration", "test", "carve", "scores": {score: {"coverage",
        "mean_size", "strata": {"edges", "counts", "coverage", "size"}}}}``, plain values;
        the strata are 5 equal-mass bins of the predictive entropy.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1)``, or a calibration half smaller than
            ``alpha`` needs.
    """
    probs, labels, entropy = evaluation.test.probs, evaluation.test_labels, evaluation.test.entropy
    needed = minimum_calibration_size(alpha)
    if len(labels) // 2 < needed:
        raise ValueError(
            f"conformal prediction at alpha={alpha} needs at least {needed} calibration examples; half of "
            f"the {len(labels)} test examples is too few (use a larger alpha or test split)"
        )
    cal, test = calibration_split(len(labels), 0.5, seed=seed, labels=labels)
    predictors = {"LAC": LAC(alpha), "APS": APS(alpha), "RAPS": RAPS(alpha, penalty=0.01, k_reg=1)}
    scores = {}
    for name, predictor in predictors.items():
        result = predictor.fit(probs[cal], labels[cal]).evaluate(probs[test], labels[test], uncertainty=entropy[test])
        scores[name] = {"coverage": result.coverage, "mean_size": result.mean_size, "strata": result.strata.as_dict()}
    return {
        "alpha": alpha,
        "calibration": len(cal),
        "test": len(test),
        "carve": f"a stratified half of the test split (seed {seed}) calibrates, the other half measures",
        "scores": scores,
    }


def evaluate_classifier(
    model: nn.Module,
    data: DatasetSplits,
    *,
    name: str,
    num_samples: int = 32,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    show_progress: bool = True,
    dropout: bool = False,
    prediction: str = "mc",
    conformal: float | None = None,
) -> ModelEvaluation:
    """Predict ``data``'s test and OOD inputs and compute every metric of the report.

    Metrics (keys of :data:`METRIC_LABELS`): accuracy, NLL, ECE (15 equal-width bins),
    Brier score and AURC on the test split; AUROC of separating the OOD inputs from the
    test inputs by predictive entropy and (Bayesian models) by mutual information, or
    ``None`` without OOD inputs; prediction time per test image.

    Args:
        model: the classifier, in eval mode on ``device``.
        data: the splits.
        name: the model's name in tables and reports.
        num_samples, batch_size, device, seed, show_progress, dropout, prediction: see :func:`predict_dataset`.
        conformal: ``alpha`` of split conformal prediction sets (:func:`conformal_results`,
            in :attr:`ModelEvaluation.conformal`), or ``None``.

    Returns:
        A :class:`ModelEvaluation`.
    """
    bayesian = _samples_predictions(model, dropout)
    samples = model.num_members if isinstance(model, Ensemble) and not _is_bayesian(model) else num_samples
    kwargs: dict[str, Any] = {
        "num_samples": num_samples,
        "batch_size": batch_size,
        "device": device,
        "seed": seed,
        "show_progress": show_progress,
        "dropout": dropout,
        "prediction": prediction,
    }
    test = predict_dataset(model, data.test_x, desc=f"{name}: test", **kwargs)
    ood = predict_dataset(model, data.ood_x, desc=f"{name}: OOD", **kwargs) if len(data.ood_x) else None
    evaluation = ModelEvaluation(name, bayesian, samples if bayesian else 1, test, data.test_y, ood)
    labels = data.test_y
    values: dict[str, Tensor | float | None] = {
        "accuracy": metrics.accuracy(test.probs, labels),
        "nll": metrics.negative_log_likelihood(test.probs, labels),
        "ece": metrics.expected_calibration_error(test.probs, labels, 15),
        "brier": metrics.brier_score(test.probs, labels),
        "aurc": metrics.area_under_risk_coverage(test.entropy, evaluation.correct),
        "ood_auroc_entropy": None if ood is None else metrics.ood_auroc(test.entropy, ood.entropy),
        "ood_auroc_mutual_information": (
            metrics.ood_auroc(test.mutual_information, ood.mutual_information) if ood is not None and bayesian else None
        ),
        "predict_ms_per_image": 1000 * test.seconds / max(1, len(data.test_x)),
        "train_seconds": None,  # known to the caller (the training history), see the demo
    }
    evaluation.metrics = {k: None if v is None else float(v) for k, v in values.items()}
    if conformal is not None:
        evaluation.conformal = conformal_results(evaluation, conformal, seed=seed)
    return evaluation
