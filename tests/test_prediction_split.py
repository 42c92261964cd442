"""predict runs sample-independent work once: the graph split, its exactness and its fallbacks.

Exactness is checked against the plain per-sample loop (one ordinary forward per sample)
with the statistics of test_prediction: per-output means and variances (|z| < 5 over a few
hundred statistics, see Z_BOUND there) and per-example correlations between two outputs.
"""

from __future__ import annotations

import contextlib
import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_prediction import NUM_DRAWS, _correlation, assert_same_distribution, plain_loop  # tests/ is on sys.path
from torch import nn
from torch.overrides import TorchFunctionMode

import torchbayes
from torchbayes import predict
from torchbayes.nn import BayesConv2d, BayesLinear
from torchbayes.nn.vectorized import _single_position_taps
from torchbayes.prediction import graph, sampling, whole_model_reason

torchvision = pytest.importorskip("torchvision")

# Correlation of two outputs of one example, S = 4000 draws each: its standard error is at
# most (1 - r^2) / sqrt(S) <= 0.016; five standard errors of the difference of two
# independent estimates: 5 * sqrt(2) * 0.016 = 0.11.
CORRELATION_DRAWS = 4000
CORRELATION_BOUND = 0.11


class _RowsInto(TorchFunctionMode):
    """Rows of every input that ``F.conv2d``/``F.linear``/``F.embedding`` receive together
    with ``weight``: watches a module run without a hook (a hook would make predict run the
    whole model, one sample per pass)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.seen = weight, list[int]()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if len(args) > 1 and args[1] is self.weight:
            self.seen.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def _assert_once_per_example(seen: list[int], batch: int) -> None:
    """The module ran on the batch once (plus, on first use, a probe of 1 or 2 rows; see
    sampling._rows_follow_the_batch), never on samples x examples rows."""
    assert max(seen) == batch and sum(seen) <= batch + 2, seen


def _assert_exact(model: nn.Module, x: torch.Tensor, pairs: list[tuple[tuple, tuple]],
                  watch: tuple[torch.Tensor, ...] = (), **kwargs) -> list[list[int]]:
    """predict's samples against the plain per-sample loop: per-output means and variances
    and, for each ``(a, b)`` in ``pairs``, the correlation of outputs ``a`` and ``b``
    (CORRELATION_DRAWS draws then). Returns the rows each ``watch`` weight saw in predict."""
    draws = CORRELATION_DRAWS if pairs else NUM_DRAWS
    watchers = [_RowsInto(w) for w in watch]
    with contextlib.ExitStack() as stack:
        for watcher in watchers:
            stack.enter_context(watcher)
        samples = predict(model, x, draws, task="regression", **kwargs).samples.double()
    loop = plain_loop(model, x, draws).double()
    assert_same_distribution(samples, loop)
    for a, b in pairs:
        assert abs(_correlation(samples, a, b) - _correlation(loop, a, b)) < CORRELATION_BOUND, (a, b)
    return [w.seen for w in watchers]


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
    assert isinstance(split, graph.SampleSplit), split
    return {str(n.target) for n in split.suffix.graph.nodes if n.op == "call_module"}


def test_resnet_and_mobilenet_split_where_the_bayesian_layers_start() -> None:
    fc = _randomized_resnet(["fc"])
    assert _suffix_modules(fc) == {"fc"}
    layer4 = _randomized_resnet(["layer4", "fc"])
    assert {name.split(".")[0] for name in _suffix_modules(layer4)} == {"layer4", "avgpool", "fc"}
    full = _randomized_resnet(None)  # every layer converted: the stem is random, nothing to save
    assert "first operation is random" in graph.cached_split(full).reason  # type: ignore[union-attr]
    mobile = torchbayes.dnn_to_bnn(torchvision.models.mobilenet_v3_small(num_classes=4).eval(),
                                   include=["classifier"]).eval()
    assert {name.split(".")[0] for name in _suffix_modules(mobile)} == {"classifier"}


@pytest.mark.parametrize("include", [["fc"], ["layer4", "fc"]])
def test_resnet_prefix_runs_once_and_samples_match_the_loop(include: list[str]) -> None:
    net = _randomized_resnet(include)
    x = torch.randn(3, 3, 8, 8)  # 8x8: layer3 and layer4 see one position (the linear-map convolutions)
    with _RowsInto(net.conv1.weight) as stem:
        result = predict(net, x, NUM_DRAWS, chunk_size=100, seed=1, task="regression")
    _assert_once_per_example(stem.seen, 3)
    assert whole_model_reason(net) is None
    assert_same_distribution(result.samples, plain_loop(net, x, NUM_DRAWS))


def test_mobilenet_classifier_samples_match_the_loop() -> None:
    net = torchbayes.dnn_to_bnn(torchvision.models.mobilenet_v3_small(num_classes=3).eval(),
                                {"posterior_rho_init": -2.0}, include=["classifier"]).eval()
    x = torch.randn(2, 3, 16, 16)
    with _RowsInto(net.features[0][0].weight) as features:
        result = predict(net, x, NUM_DRAWS, seed=2, task="regression")
    _assert_once_per_example(features.seen, 2)
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
    with _RowsInto(model.conv.weight) as conv:
        result = predict(model, x, CORRELATION_DRAWS, chunk_size=7, seed=3, task="regression")
    _assert_once_per_example(conv.seen, 5)
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
    assert "cannot be traced" in graph.cached_split(model).reason  # type: ignore[union-attr]
    with _RowsInto(model.pre.weight) as pre:
        result = predict(model, x, NUM_DRAWS, chunk_size=50, seed=5, task="regression")
    assert set(pre.seen) == {150}  # the whole model on the tiled batch
    assert "cannot be traced" in str(whole_model_reason(model))
    assert_same_distribution(result.samples, plain_loop(model, x, NUM_DRAWS))
    # A hook on the model itself: a traced graph would skip it, so the whole model runs.
    hooked = nn.Sequential(nn.Linear(4, 4), BayesLinear(4, 2, posterior_rho_init=-30.0)).eval()
    hooked.register_forward_hook(lambda _m, _args, out: out * 2)
    assert "hooks" in graph.cached_split(hooked).reason  # type: ignore[union-attr]
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
        assert isinstance(split, graph.SampleSplit)
        assert "does not keep one row per example" in str(sampling._rows_follow_the_batch(split, x, split.prefix(x)))
        assert "'mean'" in str(whole_model_reason(model))
    else:  # the per-sample part writes into a value computed once: the whole model runs
        assert "writes in place" in str(whole_model_reason(model))


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


# ----------------------------------------------------------------- transformers (issue 24)
# Shape queries (`n, c, h, w = x.shape`, `expand(n, -1, -1)`, `batch_size = ids.shape[0]`)
# are answered where used: the encoder runs once per example, the suffix asks again on
# the tiled rows. Tiny configurations; benchmarks/bench_predict.py runs the real ones.
def _tiny_vit(include: list[str], exclude: list[str] | None = None) -> nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=24, num_classes=3).eval()
    return torchbayes.dnn_to_bnn(vit, {"posterior_rho_init": -2.0}, include=include, exclude=exclude).eval()


@pytest.mark.parametrize("last_block", [False, True])
def test_vision_transformer_runs_its_encoder_once_and_matches_the_loop(last_block: bool) -> None:
    block = "encoder.layers.encoder_layer_1"
    # The attention's out_proj is read as a raw weight by nn.MultiheadAttention: left deterministic.
    vit = _tiny_vit(["heads", block], [f"{block}.self_attention"]) if last_block else _tiny_vit(["heads"])
    x = torch.randn(3, 3, 8, 8)
    first_mlp = vit.encoder.layers.encoder_layer_0.mlp[0].weight
    # Outputs of one example are correlated only through the Bayesian block (a lone Bayesian
    # head on a fixed input gives independent outputs): correlations are checked there.
    pairs = [((b, 0), (b, 1)) for b in range(3)] if last_block else []
    patches, encoder = _assert_exact(vit, x, pairs, (vit.conv_proj.weight, first_mlp), seed=8)
    _assert_once_per_example(patches, 3)
    _assert_once_per_example(encoder, 3)
    assert whole_model_reason(vit) is None
    expected = {"heads.head"} | ({f"{block}.mlp.0", f"{block}.mlp.3"} if last_block else set())
    assert expected <= _suffix_modules(vit) and "conv_proj" not in _suffix_modules(vit)


class _TinyBert(nn.Module):
    """A BERT-like classifier: token embedding, a CLS token through expand(batch_size, ...),
    positions sliced by the sequence length, nn.TransformerEncoder, a (Bayesian) head whose
    output is reshaped with the batch size read from the input."""

    def __init__(self, vocab: int = 11, dim: int = 16, max_len: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, max_len + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2 * classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len = ids.shape
        tokens = torch.cat([self.cls.expand(batch_size, -1, -1), self.embed(ids)], dim=1)
        h = self.encoder(tokens + self.pos[:, : seq_len + 1])
        logits = self.head(self.norm(h[:, 0]))
        return logits.reshape(batch_size, 2, -1).sum(1)  # per sample: batch_size is the tiled row count


def test_bert_like_classifier_runs_its_encoder_once_and_matches_the_loop() -> None:
    torch.manual_seed(1)
    model = torchbayes.dnn_to_bnn(_TinyBert().eval(), {"posterior_rho_init": -2.0}, include=["head"]).eval()
    ids = torch.randint(0, 11, (4, 6))
    (embedded,) = _assert_exact(model, ids, [], (model.embed.weight,), seed=9)  # independent outputs: no correlations
    _assert_once_per_example(embedded, 4)
    assert _suffix_modules(model) == {"head"} and whole_model_reason(model) is None


class _ReshapeBetweenBayesianLayers(nn.Module):
    """x.size(0) reshapes between two Bayesian layers (three rows per example in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = BayesLinear(64, 12, posterior_rho_init=-1.5)
        self.fc2 = BayesLinear(4, 2, posterior_rho_init=-1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).reshape(x.size(0), -1)
        h = torch.tanh(self.fc1(h)).reshape(x.size(0) * 3, x.numel() // x.size(0) // 9)
        return self.fc2(h).view(x.size(0), -1)


def test_reshapes_with_the_batch_size_between_bayesian_layers_match_the_loop() -> None:
    torch.manual_seed(2)
    model = _ReshapeBetweenBayesianLayers().eval()
    x = torch.randn(3, 1, 6, 6)
    (conv,) = _assert_exact(model, x, [((b, 0), (b, 5)) for b in range(3)], (model.conv.weight,), chunk_size=64,
                            seed=10)
    _assert_once_per_example(conv, 3)
    assert whole_model_reason(model) is None


# ----------------------------------------------------------------- hostile forwards (issue 22, section 2)
# Forwards whose split would silently change the samples. Each must run the whole model
# (one sample per pass where a tiled batch would share a draw) and match the plain
# per-sample loop in mean and variance; whole_model_reason says why. The Bayesian layer's
# tiny sigma (rho = -4: 0.018) leaves the forward's own randomness the dominant variance,
# so a frozen or shared draw fails the variance comparison by far.
class _Hostile(nn.Module):
    def __init__(self, forward: str) -> None:
        super().__init__()
        self.kind = forward
        self.f = nn.Linear(4, 4)
        self.b = BayesLinear(4, 4, posterior_rho_init=-4.0)
        self.p = nn.Parameter(torch.full((4,), 0.5))
        self.rng = np.random.default_rng()
        self.noise = _Noise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, h = self.kind, self.f(x)
        if k == "in-place after use":
            y = self.b(h)
            h.add_(1.0)
            return y + h
        if k == "in-place through a view":
            y, view = self.b(h), h[:, :2]
            view.mul_(3.0)
            return y + h
        if k == "per-sample write into a prefix value":
            h.add_(self.b(x))
            return torch.tanh(h) + h
        if k == "in-place on the input":
            x.mul_(1.0)
            return self.b(h)
        if k == "torch.randn(4)":
            return self.b(h) + torch.randn(4)
        if k == "torch.rand(4) in a submodule":
            return self.b(self.noise(h))
        if k == "random.random()":
            return self.b(h) * (1 + random.random())
        if k == "random branch":
            return self.b(h) + (1.0 if random.random() < 0.5 else -1.0)
        if k == "numpy.random":
            return self.b(h) + float(np.random.normal())  # noqa: NPY002 (the legacy global generator, on purpose)
        if k == "a module's numpy Generator":
            return self.b(h) + float(self.rng.normal())
        if k == "DropConnect on a weight":
            return self.b(F.linear(x, F.dropout(self.f.weight, 0.5, training=True)))
        if k == "bernoulli of a parameter":
            return self.b(h) + torch.bernoulli(self.p)
        return self.b(h)  # hooks and replaced forwards: set up by the test


class _Noise(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.rand(4)


def _noisy_hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + torch.randn_like(out)


def _noisy_pre_hook(_module: nn.Module, args: tuple) -> tuple:
    return (args[0] + torch.randn_like(args[0]),)


_HOSTILE = {  # forward -> words of the reason
    "in-place after use": "reads before it",
    "in-place through a view": "reads before it",
    "per-sample write into a prefix value": "computed once",
    "in-place on the input": "the input",
    "torch.randn(4)": "freeze",
    "torch.rand(4) in a submodule": "freeze",
    "random.random()": "freeze",
    "random branch": "freeze",
    "numpy.random": "freeze",
    "a module's numpy Generator": "freeze",
    "DropConnect on a weight": "shaped by a parameter",
    "bernoulli of a parameter": "shaped by a parameter",
    "forward hook on a leaf": "hooks",
    "forward pre-hook on a leaf": "hooks",
    "forward hook on the model": "hooks",
    "forward replaced on a leaf": "replaced",
}


@pytest.mark.parametrize("forward", list(_HOSTILE))
def test_hostile_forwards_run_the_whole_model_and_match_the_loop(forward: str) -> None:
    torch.manual_seed(3)
    model = _Hostile(forward).eval()
    if forward == "forward hook on a leaf":
        model.f.register_forward_hook(_noisy_hook)
    elif forward == "forward pre-hook on a leaf":
        model.f.register_forward_pre_hook(_noisy_pre_hook)
    elif forward == "forward hook on the model":
        model.register_forward_hook(_noisy_hook)
    elif forward == "forward replaced on a leaf":
        model.f.forward = lambda t: F.linear(t, model.f.weight, model.f.bias) + torch.randn_like(t)
    x = torch.randn(3, 4)
    samples = predict(model, x.clone(), NUM_DRAWS, task="regression").samples
    assert_same_distribution(samples, plain_loop(model, x.clone(), NUM_DRAWS))
    assert _HOSTILE[forward] in str(whole_model_reason(model)), whole_model_reason(model)


def test_tracing_leaves_the_random_states_as_they_were() -> None:
    model = _Hostile("random.random()").eval()
    random.seed(0)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    expected = random.random()
    random.seed(0)
    assert isinstance(graph.cached_split(model), graph.WholeModel)
    assert random.random() == expected  # the trace's draw was undone
    assert torch.equal(torch.get_rng_state(), torch_state) and np.random.get_state()[2] == np_state[2]  # noqa: NPY002
    benign = _Hostile("plain").eval()  # the same model without its random call splits
    assert isinstance(graph.cached_split(benign), graph.SampleSplit) and _suffix_modules(benign) == {"b"}


class _DropoutInsideALeaf(nn.Module):
    """MC dropout inside a torch.nn module that tracing keeps whole (a leaf): the leaf is random."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3)  # sequence-first: the slow path
        self.head = BayesLinear(8, 2, posterior_rho_init=-4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x.unsqueeze(0)).squeeze(0))


def test_mc_dropout_inside_a_leaf_module_is_drawn_per_sample() -> None:
    torch.manual_seed(4)
    model = _DropoutInsideALeaf().eval()
    x = torch.randn(3, 8)
    samples = predict(model, x, NUM_DRAWS, task="regression", dropout=True).samples
    for m in torchbayes.prediction.dropout_modules(model):
        m.train()
    with torch.no_grad():
        loop = torch.stack([model(x) for _ in range(NUM_DRAWS)])
    model.eval()
    assert_same_distribution(samples, loop)
