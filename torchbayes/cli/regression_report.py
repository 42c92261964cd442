"""Evaluating a regressor on a table, and its report: metrics in the target's units and the figures.

Predictions go through `torchbayes.predict` (``task="regression"``): Monte Carlo samples of
a Bayesian network, MC dropout masks, or an ensemble's members, each a Gaussian from the
model's head, so the predictive distribution is their equal-weight mixture (one Gaussian
for a deterministic network). The samples are brought back to the target's units (the
standardisation stored in the checkpoint) before anything is measured, so RMSE, interval
widths and the log-likelihood are comparable with the published UCI tables.

The report folder has the classifier report's layout (``report.html``, ``results.json``,
``images/``) and is written through `torchbayes.cli.report.write_report_folder` (atomic).
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes import plots
from torchbayes.cli.progress import progress_bar
from torchbayes.cli.report import (
    IMAGES_DIR,
    REPORT_HTML,
    REPORT_JSON,
    Cell,
    Figure,
    Report,
    Table,
    _data_uri,
    _FigureView,
    _json_safe,
    _render,
    _slug,
    aligned_text,
    write_report_folder,
)
from torchbayes.datasets import Standardization
from torchbayes.ensemble import Ensemble
from torchbayes.metrics import regression as regression_metrics
from torchbayes.prediction import RegressionPrediction, predict, summarize

__all__ = [
    "INTERVAL_LEVEL",
    "COVERAGE_LEVELS",
    "REGRESSION_METRIC_LABELS",
    "RegressionEvaluation",
    "predict_table",
    "evaluate_regressor",
    "regression_table",
    "write_regression_report",
]

#: The level of the intervals in the metrics table, the figures and ``torchbayes predict``'s columns.
INTERVAL_LEVEL = 0.9
#: Levels of the calibration curve (expected vs observed coverage): 5%, 10%, ..., 95%.
COVERAGE_LEVELS: tuple[float, ...] = tuple(i / 20 for i in range(1, 20))

#: Metric keys of :attr:`RegressionEvaluation.metrics` and their labels (rows of the table).
REGRESSION_METRIC_LABELS: dict[str, str] = {
    "rmse": "RMSE (lower is better)",
    "log_likelihood": "test log-likelihood per row (higher is better)",
    "coverage": f"coverage of {100 * INTERVAL_LEVEL:.0f}% intervals (nominal {INTERVAL_LEVEL:.2f})",
    "width": f"mean width of {100 * INTERVAL_LEVEL:.0f}% intervals",
    "calibration_error": "quantile calibration error (lower is better)",
    "crps": "CRPS (lower is better)",
    "predict_ms_per_row": "prediction time, ms per row",
    "train_seconds": "training time, s (pre-training included)",
}
_HIGHER_IS_BETTER = {
    "rmse": False,
    "log_likelihood": True,
    "calibration_error": False,
    "crps": False,
    "predict_ms_per_row": False,
    "train_seconds": False,
}


@dataclass
class RegressionEvaluation:
    """A regressor's predictions of the test rows (target's units) and the metrics from them."""

    name: str
    num_samples: int
    prediction: RegressionPrediction
    target: Tensor
    coverage_curve: list[float]
    metrics: dict[str, float | None] = field(default_factory=dict)


def _stochastic(model: nn.Module, method: str) -> bool:
    return method in ("bayesian", "dropout") or isinstance(model, Ensemble)


def predict_table(
    model: nn.Module,
    x: Tensor,
    target_scaling: Standardization,
    *,
    method: str,
    num_samples: int = 100,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    seed: int = 0,
    show_progress: bool = False,
    desc: str = "predicting",
) -> RegressionPrediction:
    """The predictive distribution of each row of ``x`` (standardised inputs), in the target's units.

    Args:
        model: a regressor of `torchbayes.cli.regression` (output: mean, log-variance).
        x: ``(N, D)`` standardised inputs, on the CPU.
        target_scaling: the target's standardisation (from the checkpoint).
        method: the model's ``--method`` (``dropout`` predicts by MC dropout).
        num_samples: Monte Carlo samples (an ensemble's members are its samples).
        batch_size, device, seed, show_progress, desc: rows per call, where, noise seed, progress bar.

    Returns:
        A `torchbayes.prediction.RegressionPrediction` of ``(N, 1)`` means, variances,
        intervals, in the target's units.
    """
    device = torch.device(device)
    model.eval()
    parts = []
    for i, first in enumerate(progress_bar(range(0, len(x), batch_size), desc=desc, enabled=show_progress)):
        batch = x[first : first + batch_size].to(device)
        if _stochastic(model, method):
            result = predict(
                model,
                batch,
                num_samples,
                task="regression",
                output_variance="log_variance",
                seed=seed + i,
                dropout=method == "dropout",
            )
            parts.append(result.samples.cpu())
        else:
            with torch.no_grad():
                parts.append(model(batch).unsqueeze(0).cpu())
    samples = torch.cat(parts, 1).double()
    mean, log_variance = samples.split(1, dim=-1)
    scale, shift = target_scaling.std[0], target_scaling.mean[0]
    samples = torch.cat([mean * scale + shift, log_variance + 2 * math.log(scale)], -1)
    result = summarize(samples, task="regression", output_variance="log_variance")
    assert isinstance(result, RegressionPrediction)
    return result


def evaluate_regressor(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    target_scaling: Standardization,
    *,
    name: str,
    method: str,
    num_samples: int = 100,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    seed: int = 0,
    show_progress: bool = False,
) -> RegressionEvaluation:
    """Predict the test rows and compute every metric of the report, in the target's units.

    Metrics (keys of :data:`REGRESSION_METRIC_LABELS`): RMSE of the predictive mean; the
    mean log density of the targets under the predictive mixture (the UCI tables' "test
    log-likelihood"); the share of targets inside the central 90% intervals and their mean
    width; the quantile calibration error of the PIT values ``F(y)`` (Kuleshov et al. 2018,
    `torchbayes.metrics.regression.regression_calibration_error`); the mean CRPS; the time.
    The calibration curve is the observed coverage of the central intervals at 5%, ..., 95%.

    Args:
        model, x, target_scaling, method, num_samples, batch_size, device, seed,
            show_progress: see :func:`predict_table`.
        target: ``(N,)`` or ``(N, 1)`` targets in their own units.
        name: the model's name in tables and reports.

    Returns:
        A :class:`RegressionEvaluation`.
    """
    start = time.perf_counter()
    prediction = predict_table(
        model,
        x,
        target_scaling,
        method=method,
        num_samples=num_samples,
        batch_size=batch_size,
        device=device,
        seed=seed,
        show_progress=show_progress,
        desc=f"{name}: test",
    )
    seconds = time.perf_counter() - start
    y = target.double().reshape(-1, 1)
    lower, upper = prediction.interval(INTERVAL_LEVEL)
    pit = prediction.cdf(y)  # F(y): a central interval of level c holds y when (1 - c)/2 <= F(y) <= (1 + c)/2
    curve = [float(((pit >= (1 - c) / 2) & (pit <= (1 + c) / 2)).double().mean()) for c in COVERAGE_LEVELS]
    evaluation = RegressionEvaluation(name, prediction.sample_means.shape[0], prediction, y, curve)
    evaluation.metrics = {
        "rmse": float(regression_metrics.rmse(prediction.mean, y)),
        "log_likelihood": float(prediction.log_likelihood(y).mean()),
        "coverage": float(regression_metrics.interval_coverage(lower, upper, y)),
        "width": float(regression_metrics.interval_width(lower, upper)),
        "calibration_error": float(regression_metrics.regression_calibration_error(pit)),
        "crps": float(prediction.crps(y).mean()),
        "predict_ms_per_row": 1000 * seconds / max(1, len(x)),
        "train_seconds": None,
    }
    return evaluation


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key == "coverage":
        return f"{100 * value:.1f}%"
    if key in ("predict_ms_per_row",):
        return f"{value:.4f}"
    if key == "train_seconds":
        return f"{value:.1f}"
    return f"{value:.4g}" if key in ("rmse", "width", "crps") else f"{value:.4f}"


def _best(evaluations: Sequence[RegressionEvaluation], key: str) -> float | None:
    values = [v for e in evaluations if (v := e.metrics.get(key)) is not None]
    if len(values) < 2:
        return None
    if key == "coverage":  # closest to the nominal level
        return min(values, key=lambda v: abs(v - INTERVAL_LEVEL))
    higher = _HIGHER_IS_BETTER.get(key)
    if higher is None:
        return None
    return max(values) if higher else min(values)


def regression_table(evaluations: Sequence[RegressionEvaluation]) -> str:
    """The models' metrics side by side, as aligned plain text for the console."""
    rows = [
        [label, *(_format(k, e.metrics.get(k)) for e in evaluations)] for k, label in REGRESSION_METRIC_LABELS.items()
    ]
    return aligned_text(["metric", *(e.name for e in evaluations)], rows)


def _metrics_table(evaluations: Sequence[RegressionEvaluation], unit: str) -> Table:
    rows = []
    for key, label in REGRESSION_METRIC_LABELS.items():
        best = _best(evaluations, key)
        rows.append(
            [Cell(label)]
            + [
                Cell(_format(key, e.metrics.get(key)), best=best is not None and e.metrics.get(key) == best)
                for e in evaluations
            ]
        )
    return Table(
        ["metric", *(e.name for e in evaluations)],
        rows,
        note=(
            f"On the test rows, in the target's units ({unit}). Best value per row in bold (coverage: the "
            "closest to nominal). Test log-likelihood: mean log density of the true values under the "
            "predictive distribution (the mixture of the samples' Gaussians). Calibration error: "
            "mean squared gap between p and the share of targets under their predicted p-quantile, "
            "p = 5%, ..., 95% (Kuleshov et al. 2018). CRPS: continuous "
            "ranked probability score (in the target's units)."
        ),
    )


def _make_figures(evaluations: Sequence[RegressionEvaluation], images: Path) -> list[Figure]:
    path = images / "calibration.png"
    plots.coverage_calibration_plot(
        {e.name: (COVERAGE_LEVELS, e.coverage_curve) for e in evaluations},
        title="Calibration of the central intervals (test rows)",
        path=path,
    )
    figures = [
        Figure(
            "Calibration",
            "Calibration curve",
            "Share of the test targets inside each model's central prediction intervals against the "
            "intervals' level; a calibrated model follows the diagonal, curves below it are overconfident.",
            path,
        )
    ]
    for e in evaluations:
        slug = _slug(e.name)
        lower, upper = e.prediction.interval(INTERVAL_LEVEL)
        path = images / f"predicted-vs-true-{slug}.png"
        plots.prediction_interval_plot(
            e.target, e.prediction.mean, lower, upper, level=INTERVAL_LEVEL, title=e.name, path=path
        )
        figures.append(
            Figure(
                "Predicted against true values",
                f"{e.name}: predicted vs true",
                f"Predictive mean and central {100 * INTERVAL_LEVEL:.0f}% interval of each test row against "
                "its true value; red: the interval misses it.",
                path,
            )
        )
    for e in evaluations:
        path = images / f"error-vs-uncertainty-{_slug(e.name)}.png"
        plots.error_uncertainty_plot(e.target, e.prediction.mean, e.prediction.std, title=e.name, path=path)
        figures.append(
            Figure(
                "Error against predicted uncertainty",
                f"{e.name}: error vs uncertainty",
                "Absolute error of each test row against its predicted standard deviation: useful "
                "uncertainty is larger where the errors are.",
                path,
            )
        )
    return figures


_TRAINING_COLUMNS = (
    ("epoch", None, "g"),
    ("loss", None, ".4f"),
    ("NLL", None, ".4f"),
    ("KL / N", "kl_per_example", ".4f"),
    ("validation RMSE", "val_rmse", ".4g"),
    ("validation NLL", "val_nll", ".4f"),
    ("seconds", None, ".1f"),
)


def _training_table(name: str, history: Sequence[Mapping[str, Any]]) -> Table:
    rows = []
    for h in history:
        extra = h.get("extra") or {}
        row = []
        for label, key, spec in _TRAINING_COLUMNS:
            value = extra.get(key) if key in ("val_rmse", "val_nll") else h.get(key or label.lower())
            row.append(
                format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"
            )
        rows.append(row)
    return Table([label for label, _, _ in _TRAINING_COLUMNS], rows, title=name, subsection=True)


def write_regression_report(
    out_dir: str | Path,
    evaluations: Sequence[RegressionEvaluation],
    *,
    title: str,
    target_name: str,
    settings: Mapping[str, Any] | None = None,
    histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    tables: Sequence[Table] = (),
) -> Report:
    """Write ``report.html``, ``results.json`` and ``images/*.png`` of regressors into ``out_dir`` (atomically).

    Args:
        out_dir: the report folder (new, or an earlier report that is replaced).
        evaluations: the models to compare (from :func:`evaluate_regressor`).
        title: the page's title.
        target_name: the target column (the unit of the metrics).
        settings: data and training settings, shown on the page and stored in the JSON.
        histories: per model name, its training epochs.
        tables: more tables under the metrics table.

    Returns:
        A :class:`~torchbayes.cli.report.Report`.
    """
    if not evaluations:
        raise ValueError("write_regression_report needs at least one evaluation")
    from torchbayes import __version__

    def write_files(directory: Path) -> list[Figure]:
        images = directory / IMAGES_DIR
        images.mkdir()
        figures = _make_figures(evaluations, images)
        created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        history_of = dict(histories or {})
        results = {
            "title": title,
            "created": created,
            "torchbayes_version": __version__,
            "task": "regression",
            "settings": dict(settings or {}),
            "models": {
                e.name: {
                    "num_samples": e.num_samples,
                    "metrics": e.metrics,
                    "coverage_curve": {"levels": list(COVERAGE_LEVELS), "observed": e.coverage_curve},
                    "training": list(history_of.get(e.name, [])),
                }
                for e in evaluations
            },
            "metric_labels": REGRESSION_METRIC_LABELS,
            "interval_level": INTERVAL_LEVEL,
            "images": [str(f.path.relative_to(directory)) for f in figures],
        }
        (directory / REPORT_JSON).write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
        sections: dict[str, list[_FigureView]] = {}
        for f in figures:
            href = str(f.path.relative_to(directory))
            sections.setdefault(f.section, []).append(_FigureView(f.title, f.caption, href, _data_uri(f.path)))
        page = _render(
            {
                "title": title,
                "version": __version__,
                "created": created,
                "summary": "",
                "metrics": _metrics_table(evaluations, target_name),
                "tables": list(tables),
                "sections": list(sections.items()),
                "training": [_training_table(name, h) for name, h in history_of.items() if h],
                "settings_json": json.dumps(_json_safe(dict(settings or {})), indent=2),
            }
        )
        (directory / REPORT_HTML).write_text(page, encoding="utf-8")
        return figures

    return write_report_folder(out_dir, write_files)
