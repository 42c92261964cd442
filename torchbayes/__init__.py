"""torchbayes: Bayesian deep learning and uncertainty quantification on PyTorch."""

from torchbayes import avuc, calibration, layers, metrics, nn, optim, priors, quantization
from torchbayes.avuc import AUAvULoss, AvULoss, accuracy_vs_uncertainty, eval_avu
from torchbayes.calibration import TemperatureScaling
from torchbayes.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, rebuild, save_checkpoint
from torchbayes.conversion import bnn_to_dnn, conversion_history, dnn_to_bnn, moped, register_conversion
from torchbayes.distributed import ModelWithKL, seed_per_rank
from torchbayes.elbo import elbo_loss, get_kl_loss, kl_divergence, regression_elbo_loss
from torchbayes.ensemble import Ensemble, fit_ensemble
from torchbayes.export import export_onnx, export_program
from torchbayes.interchange import load_reference_state_dict, reference_state_dict
from torchbayes.nn import noise_generator, posterior_mean, sampling
from torchbayes.prediction import ClassificationPrediction, Prediction, RegressionPrediction, predict
from torchbayes.priors import GaussianPrior, ScaleMixturePrior
from torchbayes.summary import model_summary
from torchbayes.uncertainty import expected_entropy, mutual_information, predictive_entropy, variance_decomposition

__version__ = "0.1.0"

__all__ = [
    "AUAvULoss",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "rebuild",
    "save_checkpoint",
    "AvULoss",
    "ModelWithKL",
    "export_onnx",
    "export_program",
    "seed_per_rank",
    "TemperatureScaling",
    "accuracy_vs_uncertainty",
    "avuc",
    "bnn_to_dnn",
    "conversion_history",
    "dnn_to_bnn",
    "load_reference_state_dict",
    "model_summary",
    "moped",
    "reference_state_dict",
    "register_conversion",
    "calibration",
    "eval_avu",
    "metrics",
    "GaussianPrior",
    "ScaleMixturePrior",
    "elbo_loss",
    "regression_elbo_loss",
    "Ensemble",
    "fit_ensemble",
    "get_kl_loss",
    "kl_divergence",
    "layers",
    "nn",
    "optim",
    "noise_generator",
    "posterior_mean",
    "priors",
    "quantization",
    "sampling",
    "ClassificationPrediction",
    "Prediction",
    "RegressionPrediction",
    "predict",
    "expected_entropy",
    "mutual_information",
    "predictive_entropy",
    "variance_decomposition",
]
