"""Metrics for predictive uncertainty: one module per kind of task.

- :mod:`torchbayes.metrics.classification`: accuracy, NLL, Brier, calibration error
  (equal-width and adaptive bins, classwise, SmoothECE), OOD detection (AUROC, AUPR)
  and selective prediction (risk-coverage, risk at a coverage, referral curves).
- :mod:`torchbayes.metrics.ood`: OOD scores from logits (energy, max logit) and FPR at
  95% TPR.
- :mod:`torchbayes.metrics.conformal`: coverage and size of prediction sets, and
  coverage and size by uncertainty (what `torchbayes.conformal` reports).
- :mod:`torchbayes.metrics.regression`: RMSE, Gaussian and mixture log-likelihood,
  interval coverage and width, quantile calibration (PIT), CRPS.

Every public metric is importable from ``torchbayes.metrics`` directly.
"""

from torchbayes.metrics.classification import (
    CalibrationBins,
    accuracy,
    area_under_risk_coverage,
    brier_score,
    calibration_bins,
    classwise_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    ood_aupr,
    ood_auroc,
    referral_curve,
    risk_coverage_curve,
    selective_risk,
    smooth_calibration_error,
)
from torchbayes.metrics.conformal import (
    UncertaintyStrata,
    set_coverage,
    set_size,
    size_by_uncertainty,
)
from torchbayes.metrics.ood import energy_score, fpr_at_tpr, max_logit_score
from torchbayes.metrics.regression import (
    crps_gaussian,
    crps_mixture,
    crps_samples,
    gaussian_log_likelihood,
    interval_coverage,
    interval_width,
    mixture_log_likelihood,
    regression_calibration_curve,
    regression_calibration_error,
    rmse,
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
    "classwise_calibration_error",
    "smooth_calibration_error",
    "selective_risk",
    "energy_score",
    "max_logit_score",
    "fpr_at_tpr",
    "UncertaintyStrata",
    "set_coverage",
    "set_size",
    "size_by_uncertainty",
    "rmse",
    "gaussian_log_likelihood",
    "mixture_log_likelihood",
    "interval_coverage",
    "interval_width",
    "regression_calibration_curve",
    "regression_calibration_error",
    "crps_gaussian",
    "crps_mixture",
    "crps_samples",
]
