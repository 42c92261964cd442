"""Smoke test of an installed torchbayes wheel: run by .ci/wheel_smoke.sh inside a fresh venv.

Usage: python wheel_smoke.py WHEEL_FILE
"""

import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

import torchbayes

wheel = Path(sys.argv[1])
names = zipfile.ZipFile(wheel).namelist()
assert "torchbayes/py.typed" in names, "the wheel lacks torchbayes/py.typed"
assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), \
    "the wheel lacks the LICENSE file"
assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names), "the wheel carries non-package files"

package = Path(torchbayes.__file__).resolve().parent
assert "site-packages" in package.parts, f"torchbayes imported from {package}, not from the installed wheel"
assert (package / "py.typed").is_file()
assert torchbayes.__version__ == wheel.name.split("-")[1], (torchbayes.__version__, wheel.name)

torch.manual_seed(0)
model = torchbayes.dnn_to_bnn(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
                              estimator="flipout", prior_sigma=0.1)
assert all(m.estimator == "flipout" for m in model.modules() if isinstance(m, torchbayes.nn.BayesianModule))
result = torchbayes.predict(model, torch.randn(5, 4), num_samples=8, seed=0)
assert result.mean.shape == (5, 3) and torch.allclose(result.mean.sum(-1), torch.ones(5))
assert bool((result.mutual_information >= 0).all())
print(f"wheel smoke test passed: {wheel.name} imported from {package}")
