"""Metrics for predictive uncertainty: one module per kind of task.

- :mod:`torchbayes.metrics.classification`: accuracy, NLL, Brier, calibration error
  (equal-width and adaptive bins), OOD detection (AUROC, AUPR) and selective prediction
  (risk-coverage, referral curves).

Every public metric is importable from ``torchbayes.metrics`` directly.
"""

from torchbayes.metrics.classification import (
    CalibrationBins,
    accuracy,
    area_under_risk_coverage,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    ood_aupr,
    ood_auroc,
    referral_curve,
    risk_coverage_curve,
)

__all__ = [
    "CalibrationBins",
    "accuracy",
    "negative_log_likelihood",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "ood_auroc",
    "ood_aupr",
    "risk_coverage_curve",
    "area_under_risk_coverage",
    "referral_curve",
]
