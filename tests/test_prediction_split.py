"""predict runs sample-independent work once: the graph split, its exactness and its fallbacks.

Exactness is checked against the plain per-sample loop (one ordinary forward per sample)
with the statistics of test_prediction: per-output means and variances (|z| < 5 over a few
hundred statistics, see Z_BOUND there) and per-example correlations between two outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_prediction import NUM_DRAWS, _correlation, assert_same_distribution, plain_loop  # tests/ is on sys.path
from torch import nn

import torchbayes
from torchbayes import predict
from torchbayes.nn import BayesConv2d, BayesLinear
from torchbayes.nn.vectorized import _single_position_taps
from torchbayes.prediction import graph, sampling

torchvision = pytest.importorskip("torchvision")

# Correlation of two outputs of one example, S = 4000 draws each: its standard error is at
# most (1 - r^2) / sqrt(S) <= 0.016; five standard errors of the difference of two
# independent estimates: 5 * sqrt(2) * 0.016 = 0.11.
CORRELATION_DRAWS = 4000
CORRELATION_BOUND = 0.11


def _rows_seen(module: nn.Module) -> list[int]:
    """Rows of every input ``module`` receives from now on (a hook on a leaf keeps the split)."""
    seen: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    return seen


def _assert_once_per_example(seen: list[int], batch: int) -> None:
    """The module ran on the batch once (plus, on first use, a probe of 1 or 2 rows; see
    sampling._rows_follow_the_batch), never on samples x examples rows."""
    assert max(seen) == batch and sum(seen) <= batch + 2, seen


def _randomized_resnet(include: list[str] | None) -> nn.Module:
    net = torchvision.models.resnet18(num_classes=4).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return torchbayes.dnn_to_bnn(net, {"posterior_rho_init": -3.0}, include=include).eval()


def _suffix_modules(model: nn.Module) -> set[str]:
    split = graph.cached_split(model)
    return {str(n.target) for n in split.suffix.graph.nodes if n.op == "call_module"}


def test_resnet_and_mobilenet_split_where_the_bayesian_layers_start() -> None:
    fc = _randomized_resnet(["fc"])
    assert _suffix_modules(fc) == {"fc"}
    layer4 = _randomized_resnet(["layer4", "fc"])
    assert {name.split(".")[0] for name in _suffix_modules(layer4)} == {"layer4", "avgpool", "fc"}
    full = _randomized_resnet(None)  # every layer converted: the stem is random, nothing to save
    assert graph.cached_split(full).trivial
    mobile = torchbayes.dnn_to_bnn(torchvision.models.mobilenet_v3_small(num_classes=4).eval(),
                                   include=["classifier"]).eval()
    assert {name.split(".")[0] for name in _suffix_modules(mobile)} == {"classifier"}


@pytest.mark.parametrize("include", [["fc"], ["layer4", "fc"]])
def test_resnet_prefix_runs_once_and_samples_match_the_loop(include: list[str]) -> None:
    net = _randomized_resnet(include)
    x = torch.randn(3, 3, 8, 8)  # 8x8: layer3 and layer4 see one position (the linear-map convolutions)
    stem, head = _rows_seen(net.conv1), _rows_seen(net.fc)
    result = predict(net, x, NUM_DRAWS, chunk_size=100, seed=1, task="regression")
    _assert_once_per_example(stem, 3)
    assert set(head) == {300}  # 100 samples of 3 examples per pass
    assert_same_distribution(result.samples, plain_loop(net, x, NUM_DRAWS))


def test_mobilenet_classifier_samples_match_the_loop() -> None:
    net = torchbayes.dnn_to_bnn(torchvision.models.mobilenet_v3_small(num_classes=3).eval(),
                                {"posterior_rho_init": -2.0}, include=["classifier"]).eval()
    x = torch.randn(2, 3, 16, 16)
    features = _rows_seen(net.features[0][0])
    result = predict(net, x, NUM_DRAWS, seed=2, task="regression")
    _assert_once_per_example(features, 2)
    assert_same_distribution(result.samples, plain_loop(net, x, NUM_DRAWS))


class _BatchSizeReader(nn.Module):
    """A forward that reads the batch size, reshapes with it, and adds input-derived tensors late."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = BayesLinear(4 * 4 * 4, 6, posterior_rho_init=-1.0)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.relu(self.conv(x)).view(x.size(0), -1)  # per example: b rows here
        out = self.fc(h).reshape(b, 2, 3)  # per sample: b must be the tiled row count
        skip = x.flatten(1)[:, :2].unsqueeze(-1)  # computed once, tiled where it meets `out`
        return self.head(torch.tanh(out + skip)).flatten(1) + x.new_zeros(b, 1)


def test_forward_reading_the_batch_size_stays_exact() -> None:
    model = _BatchSizeReader().eval()
    x = torch.randn(5, 1, 6, 6)
    conv = _rows_seen(model.conv)
    result = predict(model, x, CORRELATION_DRAWS, chunk_size=7, seed=3, task="regression")
    _assert_once_per_example(conv, 5)
    samples, loop = result.samples.double(), plain_loop(model, x, CORRELATION_DRAWS).double()
    assert_same_distribution(samples, loop)
    # Two outputs of one example share the Bayesian layer's draw: their correlation is exact too.
    for b in range(5):
        assert abs(_correlation(samples, (b, 0), (b, 3)) - _correlation(loop, (b, 0), (b, 3))) < CORRELATION_BOUND


class _NoisyInput(nn.Module):
    """Input noise from torch.randn_like before the Bayesian layer: it must be drawn per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = BayesLinear(4, 3, posterior_rho_init=-4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(x + torch.randn_like(x)))


def test_random_functions_and_dropout_are_random_sources() -> None:
    model = _NoisyInput().eval()
    x = torch.randn(4, 4)
    # Shared input noise would leave only the tiny weight noise (sigma ~ 0.02): variances differ.
    assert_same_distribution(predict(model, x, NUM_DRAWS, seed=4, task="regression").samples,
                             plain_loop(model, x, NUM_DRAWS))
    assert graph.is_random_source(BayesLinear(2, 2))
    assert graph.is_random_source(nn.Dropout(0.1).train())
    assert not graph.is_random_source(nn.Dropout(0.1).eval())
    assert not graph.is_random_source(nn.Dropout(0.0).train())
    with torchbayes.posterior_mean(layer := BayesLinear(2, 2)):
        assert not graph.is_random_source(layer)


class _DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.fc = nn.Linear(4, 4), BayesLinear(4, 2, posterior_rho_init=-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if h.sum() > 0:  # torch.fx cannot trace a branch on tensor values
            h = -h
        return self.fc(h)


def test_untraceable_or_hooked_forward_falls_back_to_the_whole_model() -> None:
    model = _DataDependentBranch().eval()
    x = torch.randn(3, 4)
    with pytest.raises(graph.TracingError, match="cannot be traced"):
        graph.cached_split(model)
    pre = _rows_seen(model.pre)
    result = predict(model, x, NUM_DRAWS, chunk_size=50, seed=5, task="regression")
    assert set(pre) == {150}  # the whole model on the tiled batch
    assert_same_distribution(result.samples, plain_loop(model, x, NUM_DRAWS))
    # A hook on the model itself: a traced graph would skip it, so the whole model runs.
    hooked = nn.Sequential(nn.Linear(4, 4), BayesLinear(4, 2, posterior_rho_init=-30.0)).eval()
    hooked.register_forward_hook(lambda _m, _args, out: out * 2)
    with pytest.raises(graph.TracingError, match="hooks"):
        graph.cached_split(hooked)
    samples = predict(hooked, x, 4, task="regression").samples  # sigma ~ 1e-13: every sample the mean
    with torchbayes.posterior_mean(hooked), torch.no_grad():
        torch.testing.assert_close(samples, hooked(x).expand(4, -1, -1))


class _BatchReduction(nn.Module):
    """A value reduced over the examples meets the per-sample part: it cannot be tiled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = BayesLinear(4, 4, posterior_rho_init=-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x.mean(0, keepdim=True)


class _InPlaceOnPrefix(nn.Module):
    """The per-sample part writes into a value computed once (it must not leak across passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.fc = nn.Linear(4, 4), BayesLinear(4, 4, posterior_rho_init=-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return h.add_(self.fc(x))


@pytest.mark.parametrize("model_class", [_BatchReduction, _InPlaceOnPrefix])
def test_values_that_cannot_be_reused_as_is_stay_exact(model_class: type[nn.Module]) -> None:
    model = model_class().eval()
    x = torch.randn(3, 4)
    samples = predict(model, x, NUM_DRAWS, chunk_size=10, seed=6, task="regression").samples
    assert_same_distribution(samples, plain_loop(model, x, NUM_DRAWS))
    if model_class is _BatchReduction:
        split = graph.cached_split(model)
        assert not sampling._rows_follow_the_batch(split, x, split.prefix(x))


def test_split_is_cached_and_follows_mode_changes() -> None:
    net = _randomized_resnet(["fc"])
    x = torch.randn(2, 3, 8, 8)
    first = graph.cached_split(net)
    assert graph.cached_split(net) is first
    net.fc.deterministic = True  # posterior mean: nothing random left, every sample equal
    samples = predict(net, x, 4, task="regression").samples
    assert graph.cached_split(net) is not first
    torch.testing.assert_close(samples, samples[:1].expand_as(samples))
    with torchbayes.posterior_mean(net):
        torch.testing.assert_close(samples[0], net(x))


def _single_position_model() -> nn.Sequential:
    # conv1 sees the shared input; conv2 and the 1x1 conv get per-sample inputs with one position.
    opts = {"posterior_rho_init": -1.5}
    return nn.Sequential(BayesConv2d(2, 6, 3, stride=2, padding=1, **opts), nn.Tanh(),
                         BayesConv2d(6, 5, 3, padding=1, **opts), nn.ReLU(),
                         BayesConv2d(5, 4, 1, **opts), nn.Flatten()).eval()


def test_single_position_convolutions_are_exact() -> None:
    model = _single_position_model()
    x = torch.randn(3, 2, 2, 2)
    assert all(_single_position_taps(m, torch.zeros(1, m.in_channels, *size)) is not None
               for m, size in ((model[0], (2, 2)), (model[2], (1, 1)), (model[4], (1, 1))))
    assert _single_position_taps(model[2], torch.zeros(1, 6, 2, 2)) is None  # four output positions
    samples = predict(model, x, CORRELATION_DRAWS, seed=7, task="regression").samples.double()
    loop = plain_loop(model, x, CORRELATION_DRAWS).double()
    assert_same_distribution(samples, loop)
    # Outputs of one example share every kernel draw: correlations must survive local reparameterization.
    for b in range(3):
        assert abs(_correlation(samples, (b, 0), (b, 1)) - _correlation(loop, (b, 0), (b, 1))) < CORRELATION_BOUND


def test_no_bayesian_layer_left_keeps_the_clear_error() -> None:
    net = torchvision.models.resnet18(num_classes=4).eval()
    with pytest.raises(ValueError, match="no torchbayes Bayesian layers"):
        predict(copy.deepcopy(net), torch.randn(1, 3, 8, 8))
