"""torch.compile (default inductor backend, CPU) on Bayesian models.

Compilation costs tens of seconds on 2 cores, so the compiled tests use one small MLP
mixing the three estimators (flipout, local reparameterization, reparameterization),
compiled once for training and once for prediction; the LeNet with Bayesian
convolutions is traced for graph breaks (cheap) and compiled in benchmarks/bench_compile.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

import torchbayes
from mc_compare import assert_same_output_distribution, draw
from torchbayes.nn import ESTIMATORS, BayesConv2d, BayesLinear


def lenet(conv: str = "flipout", hidden: str = "local", out: str = "reparameterization") -> nn.Module:
    return nn.Sequential(BayesConv2d(1, 6, 3, estimator=conv), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         BayesLinear(6 * 3 * 3, 32, estimator=hidden), nn.ReLU(),
                         BayesLinear(32, 10, estimator=out))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), BayesLinear(64, 32, estimator="flipout"), nn.ReLU(),
                         BayesLinear(32, 32, estimator="local"), nn.ReLU(), BayesLinear(32, 10))


def elbo(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torchbayes.elbo_loss(F.cross_entropy(model(x), y), model, num_data=1000)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_no_graph_breaks_in_bayesian_layers(estimator, digits):
    model = lenet(estimator, estimator, estimator)
    x, y = digits.train_x[:16], digits.train_y[:16]
    # A whole training step (forward, KL, loss) and a no-grad prediction: one graph each.
    train = dynamo.explain(lambda a, b: elbo(model, a, b))(x, y)
    assert train.graph_break_count == 0, [r.reason for r in train.break_reasons]
    assert train.graph_count == 1
    with torch.no_grad():
        predict = dynamo.explain(model)(x)
    assert predict.graph_break_count == 0, [r.reason for r in predict.break_reasons]


def test_converted_resnet18_training_step_has_no_graph_breaks():
    torchvision = pytest.importorskip("torchvision", reason="torchvision (extra 'vision') is not installed")
    model = torchbayes.dnn_to_bnn(torchvision.models.resnet18(num_classes=10))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    # Tracing only (inductor compilation of ResNet-18 takes minutes on 2 cores: see the benchmark).
    explained = dynamo.explain(lambda a, b: elbo(model, a, b))(x, y)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


def test_compiled_training_matches_eager_step_for_step(digits):
    """With inductor's ``fallback_random`` the compiled graph draws eager's random numbers,
    so compiled and eager training must agree to float rounding, step after step."""
    torch.manual_seed(0)
    eager = mlp()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-2)
    opt_c = torch.optim.Adam(compiled_model.parameters(), lr=1e-2)
    losses_e, losses_c = [], []
    with inductor_config.patch(fallback_random=True):
        for step in range(6):
            x = digits.train_x[step * 64:(step + 1) * 64]
            y = digits.train_y[step * 64:(step + 1) * 64]
            for model, opt, losses in ((eager, opt_e, losses_e), (compiled, opt_c, losses_c)):
                torch.manual_seed(100 + step)  # the same noise for both
                loss = elbo(model, x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    # Fused kernels reorder float32 sums: differences of a few ulps, amplified by Adam.
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-4, atol=1e-5)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5, msg=name)
    assert losses_e[-1] < losses_e[0]


def test_compiled_prediction_has_eager_statistics(digits):
    """Default settings: inductor draws with its own generator, so single draws differ from
    eager ones; their distribution must not. Compare per-output mean and variance over
    S Monte Carlo draws."""
    model = mlp().eval()
    x = digits.test_x[:4]
    compiled = torch.compile(model)
    samples = 400
    eager_draws = draw(lambda: model(x), samples)
    compiled_draws = draw(lambda: compiled(x), samples)
    assert not torch.equal(compiled_draws[0], compiled_draws[1])  # it really samples
    assert_same_output_distribution(compiled_draws, eager_draws)
