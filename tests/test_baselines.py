"""MC dropout through ``predict(..., dropout=True)`` and deep ensembles (``torchbayes.Ensemble``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchbayes import predict
from torchbayes.cli.models import LeNet5
from torchbayes.ensemble import Ensemble, fit_ensemble
from torchbayes.nn import BayesLinear
from torchbayes.nn.stacked import BLOCK_ROWS
from torchbayes.uncertainty import entropy_decomposition

# Statistical checks: each z below is ~N(0, 1) under the claim (CLT at S >= 4000); a test
# compares at most ~20 statistics, so P(any |z| > 5) < 20 * 5.7e-7, while a wrong
# distribution (a mask shared by rows, a missing 1/(1-p) scale) is off by tens of SEs.
Z_BOUND = 5.0


def _mlp(dropout: float = 0.0, width: int = 16) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(6, width), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, 3))


# ------------------------------------------------------------------ MC dropout
def test_dropout_samples_match_the_closed_form() -> None:
    # y = w . dropout(x): E[y] = w . x and Var[y] = p / (1 - p) * sum_i (w_i x_i)^2,
    # since each kept input is scaled by 1 / (1 - p) and dropped with probability p.
    p, num_samples = 0.3, 20000
    model = nn.Sequential(nn.Dropout(p), nn.Linear(5, 1, bias=False)).eval()
    x = torch.randn(4, 5)
    samples = predict(model, x, num_samples, task="regression", dropout=True, seed=0).sample_means[..., 0].double()
    w = model[1].weight.detach().double()[0]
    mean = x.double() @ w
    variance = p / (1 - p) * (x.double() * w).square().sum(-1)
    z_mean = (samples.mean(0) - mean) / (variance / num_samples).sqrt()
    # SE of a sample variance: sqrt((m4 - var^2) / S), with the sample's 4th central moment.
    m4 = ((samples - samples.mean(0)) ** 4).mean(0)
    z_var = (samples.var(0) - variance) / ((m4 - variance**2) / num_samples).sqrt()
    assert z_mean.abs().max() < Z_BOUND and z_var.abs().max() < Z_BOUND, (z_mean, z_var)


def test_dropout_rows_get_their_own_masks_and_match_the_plain_loop() -> None:
    torch.manual_seed(1)
    model = _mlp(dropout=0.5).eval()
    x = torch.randn(1, 6).expand(2, 6).contiguous()  # the same input twice
    num_samples = 4000
    vectorized = predict(model, x, num_samples, task="regression", dropout=True, seed=0).samples
    # Two rows of one pass are independent draws: identical inputs, uncorrelated outputs.
    a, b = vectorized[:, 0, 0].double(), vectorized[:, 1, 0].double()
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(correlation) * num_samples**0.5 < Z_BOUND  # sd of a null correlation ~ 1/sqrt(S)
    model[2].train()
    with torch.no_grad():
        loop = torch.stack([model(x[:1])[0] for _ in range(num_samples)]).double()  # the plain loop
    model.eval()
    va, vb = vectorized[:, 0].double(), loop
    z_mean = (va.mean(0) - vb.mean(0)) / ((va.var(0) + vb.var(0)) / num_samples).sqrt()
    assert z_mean.abs().max() < Z_BOUND
    # Variances: log ratio of two S-draw sample variances, sd <= ~sqrt(2 * kurtosis / S);
    # 0.2 is > 5 sd at S = 4000 for the (bounded-kurtosis) outputs of this small net.
    assert (va.var(0) / vb.var(0)).log().abs().max() < 0.2


def test_dropout_modes_restored_seeded_and_global_rng_untouched() -> None:
    model = _mlp(dropout=0.5).eval()
    x = torch.randn(3, 6)
    state = torch.get_rng_state()
    first = predict(model, x, 8, dropout=True, seed=3).samples
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, predict(model, x, 8, dropout=True, seed=3).samples)
    assert not torch.equal(first, predict(model, x, 8, dropout=True, seed=4).samples)
    assert not any(m.training for m in model.modules())
    model.train()
    predict(model, x, 8, dropout=True, seed=3)
    assert all(m.training for m in model.modules())
    # Without dropout=True the dropout modules are in eval mode: all samples equal... and
    # a plain network has no Bayesian layer, which predict refuses.
    with pytest.raises(ValueError, match="no torchbayes Bayesian layers"):
        predict(model, x, 8)


def test_dropout_with_bayesian_layers_samples_both() -> None:
    model = nn.Sequential(BayesLinear(6, 8, posterior_rho_init=-1.0), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3)).eval()
    x = torch.randn(2, 6)
    weights_only = predict(model, x, 2000, seed=0).samples.var(0)
    both = predict(model, x, 2000, seed=0, dropout=True).samples.var(0)
    assert (both > weights_only).all()  # dropout adds variance on top of the weights'


def test_dropout_without_dropout_modules_is_an_error() -> None:
    with pytest.raises(ValueError, match="dropout=True needs dropout modules"):
        predict(_mlp(), torch.randn(2, 6), 4, dropout=True)


# ------------------------------------------------------------------ deep ensembles
def _lenet_ensemble(members: int = 5) -> Ensemble:
    return Ensemble([LeNet5((1, 12, 12), 4) for _ in range(members)]).eval()


@pytest.mark.parametrize("build", [_lenet_ensemble, lambda: Ensemble([_mlp() for _ in range(4)]).eval()])
def test_vectorized_members_equal_the_loop(build) -> None:
    ensemble = build()
    x = torch.randn(3, 1, 12, 12) if isinstance(ensemble.members[0], LeNet5) else torch.randn(3, 6)
    assert ensemble.loop_reason() is None
    with torch.no_grad():
        vectorized, loop = ensemble(x), ensemble.loop_forward(x)
    assert vectorized.shape == (ensemble.num_members, 3, loop.shape[-1])
    torch.testing.assert_close(vectorized, loop, rtol=1e-5, atol=1e-6)  # float32 summation order only


def test_predict_on_an_ensemble_is_member_averaging() -> None:
    ensemble = _lenet_ensemble(3)
    x = torch.randn(5, 1, 12, 12)
    result = predict(ensemble, x, num_samples=32)
    with torch.no_grad():
        probs = torch.stack([F.softmax(m(x), -1) for m in ensemble.members])
    torch.testing.assert_close(result.mean, probs.mean(0), rtol=1e-5, atol=1e-6)
    _, expected, mutual = entropy_decomposition(probs.double())
    torch.testing.assert_close(result.mutual_information.double(), mutual, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.expected_entropy.double(), expected, rtol=1e-4, atol=1e-6)
    assert result.samples.shape[0] == 3  # samples = members; num_samples unused


def test_parameter_changes_reach_the_vectorized_path() -> None:
    ensemble = Ensemble([_mlp() for _ in range(3)]).eval()
    x = torch.randn(2, 6)
    before = ensemble.member_outputs(x)
    with torch.no_grad():
        ensemble.members[1][0].weight.add_(1.0)
    after = ensemble.member_outputs(x)
    torch.testing.assert_close(after, ensemble.loop_forward(x).detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])


class _Branching(nn.Module):
    """Data-dependent control flow: vmap cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return out if float(out.detach().sum()) > 0 else -out


def test_loop_fallbacks_give_the_loop_result() -> None:
    x = torch.randn(4, 6)
    mixed = Ensemble([_mlp(width=16), _mlp(width=8)]).eval()
    assert "differs in architecture" in (mixed.loop_reason() or "")
    branching = Ensemble([_Branching(), _Branching()]).eval()
    batchnorm = Ensemble([nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)) for _ in range(2)]).train()
    assert "BatchNorm" in (batchnorm.loop_reason() or "")
    for ensemble in (mixed, branching, batchnorm):
        with torch.no_grad():
            reference = copy.deepcopy(ensemble).loop_forward(x)
            torch.testing.assert_close(ensemble(x), reference)
    assert "cannot run the members' forward" in (branching.loop_reason() or "")
    assert "vectorized=False" in repr(mixed)


def test_batchnorm_in_eval_mode_is_vectorized() -> None:
    ensemble = Ensemble([nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)) for _ in range(3)])
    for i, member in enumerate(ensemble.members):  # distinct running statistics
        member[1].running_mean.fill_(float(i))
    ensemble.eval()
    x = torch.randn(2, 6)
    assert ensemble.loop_reason() is None
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), ensemble.loop_forward(x), rtol=1e-5, atol=1e-6)


def test_bayesian_members_draw_num_samples_each() -> None:
    ensemble = Ensemble([nn.Sequential(BayesLinear(6, 3, posterior_rho_init=-1.0)) for _ in range(2)]).eval()
    x = torch.randn(4, 6)
    result = predict(ensemble, x, num_samples=400, seed=0)
    assert result.samples.shape == (800, 4, 3)  # S = members x num_samples: the mixture
    assert torch.equal(result.samples, predict(ensemble, x, num_samples=400, seed=0).samples)
    # Block m holds member m's posterior: its mean is near that member's posterior-mean output.
    for m, member in enumerate(ensemble.members):
        layer = member[0]
        block = result.samples[400 * m: 400 * (m + 1)]
        with torch.no_grad():
            centre = F.linear(x, layer.weight_mu, layer.bias_mu)
        se = (block.var(0) / 400).sqrt()
        assert ((block.mean(0) - centre).abs() < Z_BOUND * se).all()


def test_fit_ensemble_vectorized_equals_the_loop_and_members_differ() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    ensemble = Ensemble([_mlp() for _ in range(3)])
    vectorized, loop = copy.deepcopy(ensemble), copy.deepcopy(ensemble)
    history_v = fit_ensemble(vectorized, x, y, epochs=3, batch_size=32, lr=1e-2, seed=1, vectorize=True)
    history_l = fit_ensemble(loop, x, y, epochs=3, batch_size=32, lr=1e-2, seed=1, vectorize=False)
    # Same minibatches and Adam steps; only float32 summation order differs (3 x 21 steps).
    for a, b in zip(vectorized.parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert history_v == pytest.approx(history_l, rel=1e-4)
    assert history_v[-1] < history_v[0]
    with torch.no_grad():
        outputs = vectorized(x)
    assert not torch.allclose(outputs[0], outputs[1])


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])
    with pytest.raises(TypeError, match=r"members\[1\]"):
        Ensemble([_mlp(), "net"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"iterable of nn\.Module"):
        Ensemble(_mlp())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one device"):
        Ensemble([_mlp(), _mlp().to("meta")])
    with pytest.raises(ValueError, match="different shapes"):
        Ensemble([nn.Linear(6, 3), nn.Linear(6, 2)])(torch.randn(2, 6))
    mixed = Ensemble([_mlp(width=16), _mlp(width=8)])
    with pytest.raises(ValueError, match="vectorize=True"):
        fit_ensemble(mixed, torch.randn(4, 6), torch.zeros(4, dtype=torch.long), vectorize=True)
    with pytest.raises(ValueError, match="epochs"):
        fit_ensemble(mixed, torch.randn(4, 6), torch.zeros(4, dtype=torch.long), epochs=0)
    with pytest.raises(ValueError, match="same number"):
        fit_ensemble(mixed, torch.randn(4, 6), torch.zeros(3, dtype=torch.long))


# ====================================================================== issue 22, section 3 (reliab-ens)
# Every batched path (the stacked pass on the CPU in eval mode without gradients, vmap
# with gradients) is compared with the plain loop over the members.
def _both_paths(ensemble: Ensemble, x: torch.Tensor) -> list[torch.Tensor]:
    """The ensemble's output on its prediction path (stacked) and its gradient path (vmap)."""
    ensemble.eval()
    with torch.no_grad():
        stacked = ensemble(x)
    with torch.enable_grad():
        vmapped = ensemble(x).detach()
    return [stacked, vmapped]


def _assert_equals_loop(ensemble: Ensemble, x: torch.Tensor) -> None:
    ensemble.eval()
    with torch.no_grad():
        loop = ensemble.loop_forward(x)
    for out in _both_paths(ensemble, x):
        torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)  # float32 summation order only


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = h + torch.tanh(self.conv2(h))
        h = self.pool(h)
        return self.fc(h.view(h.size(0), -1)) * 2.0


class _Sequence(nn.Module):
    """A linear layer on (B, T, F) inputs, then a mean over time."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x)).flatten(1)
        return self.out(h.view(h.size(0), 4, 5)[:, 0] + h[:, :5])


class _BatchFromInput(nn.Module):
    """Reshapes with the batch size read from the input: the stacked pass must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        return self.fc(self.conv(x).view(n, -1))


def _trained_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return model


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: LeNet5((1, 12, 12), 4), (1, 12, 12)),
        (lambda: LeNet5((1, 12, 12), 4, dropout=0.3), (1, 12, 12)),
        (lambda: _mlp(dropout=0.2), (6,)),
        (lambda: _trained_batchnorm(_Residual()), (3, 6, 6)),
        (_Sequence, (4, 6)),
        (_BatchFromInput, (1, 6, 6)),
        (_Branching, (6,)),
    ],
    ids=["lenet", "lenet-dropout", "mlp", "residual-bn-grouped", "sequence", "batch-from-input", "branching"],
)
@pytest.mark.parametrize("batch", [1, 3, 9])
def test_every_batched_path_equals_the_loop(build, shape: tuple[int, ...], batch: int) -> None:
    torch.manual_seed(batch)
    ensemble = Ensemble([build() for _ in range(3)])
    _assert_equals_loop(ensemble, torch.randn(batch, *shape))
    # Refused by the stacked pass (untraceable; a reshape by the input's batch size when the
    # members run as blocks of one batch): the loop ran, and loop_reason says why.
    if build is _Branching or (build is _BatchFromInput and batch <= BLOCK_ROWS):
        assert "stacked pass cannot run" in (ensemble.loop_reason() or "")
    else:
        assert ensemble.loop_reason() is None


@pytest.mark.parametrize("grad", [False, True], ids=["stacked", "vmap"])
def test_a_wrongly_shaped_input_raises_the_loop_error_and_changes_no_mode(grad: bool) -> None:
    for ensemble, good, bad in (
        (Ensemble([_mlp() for _ in range(3)]).eval(), torch.randn(4, 6), torch.randn(4, 5)),
        (_lenet_ensemble(3), torch.randn(2, 1, 12, 12), torch.randn(2, 3, 12, 12)),
    ):
        with torch.set_grad_enabled(grad):
            ensemble(good)
            with pytest.raises(RuntimeError, match="shape|size|channels"):
                ensemble(bad)
            with pytest.raises(RuntimeError, match="shape|size|channels"):
                ensemble(bad[:, None])
        assert ensemble.loop_reason() is None  # still batched: the caller's error is not the members'
        assert ensemble._vmap_failed is None
        _assert_equals_loop(ensemble, good)


def test_members_changed_after_the_first_call_are_seen() -> None:
    torch.manual_seed(0)
    ensemble = Ensemble([_mlp() for _ in range(3)]).eval()
    x = torch.randn(5, 6)
    _both_paths(ensemble, x)  # builds every cache
    for member in ensemble.members:  # a module replaced in every member
        member[1] = nn.Tanh()
    _assert_equals_loop(ensemble, x)
    with torch.no_grad():
        assert not torch.allclose(ensemble(x), torch.stack([m[2](F.relu(m[0](x))) for m in ensemble.members]))
    ensemble.members[2][0].weight = nn.Parameter(torch.randn(16, 6))  # a parameter re-bound
    ensemble.members[0][2].bias = nn.Parameter(torch.zeros(3))
    _assert_equals_loop(ensemble, x)
    ensemble.members[1] = _mlp()  # a member replaced
    _assert_equals_loop(ensemble, x)
    ensemble.members[1][0].padding = 3  # a setting changed in place in one member: refresh() reads it
    ensemble.members[1][0].negative_slope = 0.5
    ensemble.refresh()
    assert "differs in architecture" in (ensemble.loop_reason() or "")


@pytest.mark.parametrize("kind", ["forward", "pre"])
@pytest.mark.parametrize("where", [0, 2])
def test_hooks_on_any_member_are_called(kind: str, where: int) -> None:
    ensemble = Ensemble([_mlp() for _ in range(3)]).eval()
    x = torch.randn(4, 6)
    _both_paths(ensemble, x)
    layer = ensemble.members[where][2]
    if kind == "forward":
        handle = layer.register_forward_hook(lambda m, args, out: out + 100.0)
    else:
        handle = layer.register_forward_pre_hook(lambda m, args: (args[0] * 0.0,))
    assert f"forward hooks on members[{where}] ('2')" in (ensemble.loop_reason() or "")
    for out in _both_paths(ensemble, x):
        with torch.no_grad():
            torch.testing.assert_close(out, ensemble.loop_forward(x))
        hooked = out[where] - (100.0 if kind == "forward" else 0.0)
        assert (hooked - layer.bias).abs().max() > 1e-3 if kind == "forward" else torch.allclose(
            hooked, layer.bias.detach().expand_as(hooked)
        )
    handle.remove()
    assert ensemble.loop_reason() is None
    _assert_equals_loop(ensemble, x)


def test_repeated_members_and_fully_shared_parameters_are_refused() -> None:
    net = _mlp()
    with pytest.raises(ValueError, match=r"members\[1\] is the same module object as members\[0\].*\[net\] \* M"):
        Ensemble([net] * 4)
    with pytest.raises(ValueError, match=r"members\[2\] is the same module object as members\[0\]"):
        Ensemble([net, _mlp(), net])
    linear = nn.Linear(6, 3)
    with pytest.raises(ValueError, match=r"members\[1\] shares all its parameters with members\[0\]"):
        Ensemble([nn.Sequential(linear), nn.Sequential(linear, nn.ReLU())])
    ensemble = Ensemble([_mlp(), _mlp()])
    ensemble.members[1] = ensemble.members[0]  # after construction: refused at the next call
    with pytest.raises(ValueError, match="same module object"):
        ensemble(torch.randn(2, 6))
    # A shared backbone with members' own heads is a valid design: the members disagree.
    backbone = nn.Linear(6, 8)
    shared = Ensemble([nn.Sequential(backbone, nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]).eval()
    assert "shares parameters with members[0]" in (shared.loop_reason() or "")
    _assert_equals_loop(shared, torch.randn(4, 6))
    assert float(predict(shared, torch.randn(4, 6)).mutual_information.min()) > 0


class _WithAux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc(x)
        return out, out.detach().abs().mean()


def test_members_returning_tuples_are_read_from_the_first_element() -> None:
    ensemble = Ensemble([_WithAux() for _ in range(3)])
    x = torch.randn(4, 6)
    _assert_equals_loop(ensemble, x)
    with torch.no_grad():
        expected = torch.stack([m(x)[0] for m in ensemble.members])
    torch.testing.assert_close(ensemble.loop_forward(x), expected)
    result = predict(ensemble, x)
    torch.testing.assert_close(result.samples, expected)
    y = torch.randint(0, 3, (40,))
    history = fit_ensemble(ensemble, torch.randn(40, 6), y, epochs=2, batch_size=8, vectorize=True)
    assert len(history) == 2


@pytest.mark.parametrize("vectorize", [None, True, False])
def test_fit_refuses_a_loss_per_example_on_every_path(vectorize: bool | None) -> None:
    ensemble = Ensemble([_mlp() for _ in range(2)])
    before = copy.deepcopy(ensemble.state_dict())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for loss in (lambda out, t: F.cross_entropy(out, t, reduction="none"), lambda out, t: (out, t)):
        with pytest.raises(ValueError, match=r"loss must return one scalar per minibatch.*reduction='mean'"):
            fit_ensemble(ensemble, x, y, loss=loss, vectorize=vectorize)
    for key, value in ensemble.state_dict().items():  # nothing was trained
        assert torch.equal(value, before[key])


def test_fit_trains_bayesian_members_on_their_elbo() -> None:
    from torchbayes import elbo_loss

    torch.manual_seed(0)
    members = [nn.Sequential(BayesLinear(6, 8), nn.ReLU(), BayesLinear(8, 3)) for _ in range(2)]
    ensemble, reference = Ensemble(members), copy.deepcopy(members)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    torch.manual_seed(5)
    history = fit_ensemble(ensemble, x, y, epochs=2, batch_size=8, seed=3)
    # The same training written out: per member, Adam on cross-entropy + KL / N.
    generator = torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(24, generator=generator) for _ in range(4)]).view(2, 2, 24)
    torch.manual_seed(5)
    totals = [0.0, 0.0]
    for i, member in enumerate(reference):
        optimizer = torch.optim.Adam(member.parameters(), lr=1e-3)
        member.train()
        for epoch in range(2):
            for first in range(0, 24, 8):
                idx = orders[epoch, i, first : first + 8]
                loss = elbo_loss(F.cross_entropy(member(x[idx]), y[idx]), member, num_data=24)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                totals[epoch] += float(loss.detach()) * 8
    for a, b in zip(ensemble.parameters(), (p for m in reference for p in m.parameters())):
        torch.testing.assert_close(a, b)
    assert history == pytest.approx([t / 48 for t in totals])


class _ItemCall(nn.Module):
    """``.item()`` in forward: vmap cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (1.0 if x.abs().max().item() >= 0 else -1.0)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x[:, None])
        return self.fc(out[:, -1])


@pytest.mark.parametrize("member", [_ItemCall, _Recurrent])
def test_fit_falls_back_to_the_loop_when_vmap_fails(member: type[nn.Module]) -> None:
    torch.manual_seed(0)
    ensemble = Ensemble([member() for _ in range(2)])
    loop = copy.deepcopy(ensemble)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with pytest.raises(ValueError, match="vectorize=True but vmap cannot train the members"):
        fit_ensemble(copy.deepcopy(ensemble), x, y, epochs=1, vectorize=True)
    history = fit_ensemble(ensemble, x, y, epochs=2, batch_size=8, seed=1)
    expected = fit_ensemble(loop, x, y, epochs=2, batch_size=8, seed=1, vectorize=False)
    assert history == pytest.approx(expected)
    for a, b in zip(ensemble.parameters(), loop.parameters()):
        torch.testing.assert_close(a, b)
    _assert_equals_loop(ensemble, x)
