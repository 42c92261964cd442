"""torch.export and ONNX export: posterior-mean deployment and stochastic (sampling) graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mc_compare import assert_same_output_distribution, draw
from torchbayes import dnn_to_bnn, posterior_mean
from torchbayes.export import export_onnx, export_program
from torchbayes.nn import BayesianModule

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'export') is not installed")
pytest.importorskip("onnxscript", reason="onnxscript (extra 'export') is needed by torch.onnx.export(dynamo=True)")

PRIOR = {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -2.0,
         "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5}


def bayesian_lenet() -> nn.Module:
    """A converted LeNet-like network whose layers use the three estimators, with BatchNorm."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 32), nn.ReLU(), nn.Linear(32, 10))
    model = dnn_to_bnn(base, PRIOR)
    model[0].estimator = "flipout"
    model[5].estimator = "local"
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def run_onnx(path, x: torch.Tensor, times: int = 1) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graph, many runs: see mc_compare.draw
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return draw(lambda: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), times)


def test_posterior_mean_exports_with_torch_export_and_onnx(tmp_path, digits):
    model = bayesian_lenet()
    x = digits.test_x[:37]  # another batch size than the example: the batch is dynamic
    with torch.no_grad(), posterior_mean(model):
        expected = model(x)
    program = export_program(model, digits.train_x[:8])
    nodes = {str(n.target) for n in program.graph.nodes}
    assert not any("rand" in t or "bernoulli" in t for t in nodes)  # nothing is sampled
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)

    export_onnx(model, digits.train_x[:8], tmp_path / "mean.onnx")
    onnx_out = run_onnx(tmp_path / "mean.onnx", x)[0]
    # ONNX Runtime's kernels sum in another order than PyTorch's: float32 rounding only.
    torch.testing.assert_close(onnx_out, expected, rtol=1e-4, atol=1e-5)
    assert all(not m.deterministic for m in model.modules() if isinstance(m, BayesianModule))


def test_stochastic_torch_export_samples_like_eager(digits):
    model = bayesian_lenet()
    x = digits.test_x[:3]
    program = export_program(model, digits.train_x[:8], stochastic=True).module()
    draws = draw(lambda: program(x), 400)
    assert not torch.equal(draws[0], draws[1])  # one new sample per call
    assert_same_output_distribution(draws, draw(lambda: model(x), 400))


def test_stochastic_onnx_samples_like_eager(tmp_path, digits):
    import onnx

    model = bayesian_lenet()
    x = digits.test_x[:3]
    export_onnx(model, digits.train_x[:8], tmp_path / "bnn.onnx", stochastic=True)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "bnn.onnx")).graph.node}
    assert {"RandomNormalLike", "RandomUniformLike"} <= ops  # Gaussian draws and flipout signs
    draws = run_onnx(tmp_path / "bnn.onnx", x, times=400)
    assert not torch.equal(draws[0], draws[1])
    assert_same_output_distribution(draws, draw(lambda: model(x), 400))


def test_export_leaves_the_model_alone_and_checks_inputs(digits):
    model = bayesian_lenet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_program(model, digits.train_x[:4], stochastic=True)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="batch dimension of size >= 2"):
        export_program(model, digits.train_x[:1])
    program = export_program(model, digits.train_x[:1], dynamic_batch=False)
    with torch.no_grad(), posterior_mean(model.eval()):
        np.testing.assert_allclose(program.module()(digits.train_x[:1]).numpy(),
                                   model(digits.train_x[:1]).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stochastic export needs Bayesian layers"):
        export_program(nn.Linear(3, 2), torch.randn(4, 3), stochastic=True)
