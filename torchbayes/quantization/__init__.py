"""INT8 post-training quantization of Bayesian networks whose layers still sample.

`quantize` (or `prepare` then `convert`) turns the Bayesian linear and convolution
layers of any trained model into INT8 layers (posterior means and standard deviations
stored per output channel in ``int8``; every Monte Carlo draw runs oneDNN's integer
kernels) and its deterministic ``nn.Linear`` / ``nn.Conv*d`` layers into static INT8
layers, with eval-mode BatchNorm folded in and ReLUs fused where the model's graph
allows (`torchbayes.quantization.fusion`). See the guide "INT8 quantization".
"""

from torchbayes.quantization.flow import DETERMINISTIC_TWINS, DTYPES, QUANTIZED_TWINS, convert, prepare, quantize
from torchbayes.quantization.kernels import onednn_available
from torchbayes.quantization.layers import (
    QuantizedBayesConv1d,
    QuantizedBayesConv2d,
    QuantizedBayesConv3d,
    QuantizedBayesianModule,
    QuantizedBayesLinear,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedConv3d,
    QuantizedLinear,
    QuantizedModule,
)

__all__ = [
    "DETERMINISTIC_TWINS",
    "DTYPES",
    "QUANTIZED_TWINS",
    "QuantizedBayesConv1d",
    "QuantizedBayesConv2d",
    "QuantizedBayesConv3d",
    "QuantizedBayesLinear",
    "QuantizedBayesianModule",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedLinear",
    "QuantizedModule",
    "convert",
    "onednn_available",
    "prepare",
    "quantize",
]
