"""INT8 post-training quantization of Bayesian networks whose layers still sample.

:func:`quantize` (or :func:`prepare` then :func:`convert`) turns the Bayesian linear and
convolution layers of any trained model into INT8 layers: posterior means and standard
deviations are stored per output channel in ``int8``, and every Monte Carlo draw runs
oneDNN's integer kernels. See the README section "INT8 quantization".
"""

from torchbayes.quantization.flow import DTYPES, QUANTIZED_TWINS, convert, prepare, quantize
from torchbayes.quantization.kernels import onednn_available
from torchbayes.quantization.layers import (
    QuantizedBayesConv1d,
    QuantizedBayesConv2d,
    QuantizedBayesConv3d,
    QuantizedBayesianModule,
    QuantizedBayesLinear,
)

__all__ = [
    "DTYPES",
    "QUANTIZED_TWINS",
    "QuantizedBayesConv1d",
    "QuantizedBayesConv2d",
    "QuantizedBayesConv3d",
    "QuantizedBayesLinear",
    "QuantizedBayesianModule",
    "convert",
    "onednn_available",
    "prepare",
    "quantize",
]
