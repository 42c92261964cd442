"""Bayesian recurrent layers: BayesLSTM, BayesGRU and the reference's LSTM front doors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import torchbayes
import torchbayes.nn.functional as BF
from torchbayes.layers import LSTMFlipout, LSTMReparameterization
from torchbayes.nn import BayesGRU, BayesLinear, BayesLSTM, noise, noise_generator, posterior_mean
from torchbayes.nn.vectorized import sample_groups

ESTIMATORS = ("reparameterization", "flipout")
TWINS = ((BayesLSTM, nn.LSTM), (BayesGRU, nn.GRU))
# softplus(-30) ~ 1e-13: every weight draw equals its mean to float precision.
SIGMA_TO_ZERO = -30.0
# Float32 recurrences computed in a different operation order (Python loop vs
# PyTorch's fused kernel) agree to a few ulps of values of order 1.
LOOP_ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny recurrent models: oneDNN's RNN kernels synchronise their threads at every time
    # step, which gains nothing at these sizes and, when pytest -n 2 (or anything else)
    # oversubscribes the cores, made the training tests ~30x slower with 2 threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _leaves(result: object) -> list[Tensor]:
    return list(torch.utils._pytree.tree_leaves(result))


def _assert_same(actual: object, expected: object, atol: float) -> None:
    for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=atol, rtol=0)


def _initial_state(torch_cls: type[nn.RNNBase], layers: int, batch: int, hidden: int) -> object:
    h0 = torch.randn(layers, batch, hidden)
    return (h0, torch.randn(layers, batch, hidden)) if torch_cls is nn.LSTM else h0


# ------------------------------------------------------------- equality with torch.nn
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first",
                         list(itertools.product((1, 2), (False, True), (False, True))))
@pytest.mark.parametrize("bayes_cls,torch_cls", TWINS, ids=("lstm", "gru"))
def test_sigma_to_zero_reproduces_torch(bayes_cls, torch_cls, num_layers, bidirectional, batch_first,
                                        estimator):
    twin = torch_cls(5, 7, num_layers, batch_first=batch_first, bidirectional=bidirectional)
    layer = bayes_cls.from_torch(twin, posterior_rho_init=SIGMA_TO_ZERO, estimator=estimator)
    x = torch.randn(3, 6, 5)
    hx = _initial_state(torch_cls, num_layers * (2 if bidirectional else 1), 3 if batch_first else 6, 7)
    expected = twin(x)
    _assert_same(layer(x), expected, LOOP_ATOL)
    _assert_same(layer(x, hx), twin(x, hx), LOOP_ATOL)
    # Unbatched input, as torch accepts it.
    _assert_same(layer(x[0]), twin(x[0]), LOOP_ATOL)
    # Posterior-mean mode runs PyTorch's own kernel on the means: bit-for-bit equal.
    with posterior_mean(layer):
        _assert_same(layer(x), expected, 0.0)


@pytest.mark.parametrize("bayes_cls,torch_cls", TWINS, ids=("lstm", "gru"))
def test_packed_sequences_like_torch(bayes_cls, torch_cls):
    twin = torch_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    layer = bayes_cls.from_torch(twin, posterior_rho_init=SIGMA_TO_ZERO)
    packed = pack_padded_sequence(torch.randn(3, 6, 3), torch.tensor([4, 6, 2]), batch_first=True,
                                  enforce_sorted=False)
    hx = _initial_state(torch_cls, 4, 3, 4)  # in the caller's (unsorted) order
    out, expected = layer(packed, hx), twin(packed, hx)
    assert isinstance(out[0], PackedSequence)
    torch.testing.assert_close(out[0].data, expected[0].data, atol=0, rtol=0)
    _assert_same(out[1], expected[1], 0.0)
    layer.estimator = "flipout"
    with pytest.raises(ValueError, match="PackedSequence input needs estimator='reparameterization'"):
        layer(packed)


def test_to_torch_round_trip_and_dropout_modes():
    layer = BayesGRU(4, 6, num_layers=2, dropout=0.5, bidirectional=True)
    twin = layer.to_torch()
    assert isinstance(twin, nn.GRU) and twin.dropout == 0.5 and twin.bidirectional
    twin.eval()
    layer.eval()
    x = torch.randn(5, 2, 4)
    with posterior_mean(layer):
        _assert_same(layer(x), twin(x), 0.0)
    # Dropout between layers is active in training mode, in both code paths (fused and
    # flipout loop); with sigma -> 0 only dropout can make two calls differ.
    with torch.no_grad():
        for _, _, rho, _ in layer.variational_parameters():
            rho.fill_(SIGMA_TO_ZERO)
    layer.train()
    for estimator in ESTIMATORS:
        layer.estimator = estimator
        assert not torch.allclose(layer(x)[0], layer(x)[0])
    layer.eval()
    for estimator in ESTIMATORS:
        layer.estimator = estimator
        torch.testing.assert_close(layer(x)[0], twin(x)[0], atol=LOOP_ATOL, rtol=0)


# ----------------------------------------------------------- one sample per sequence
@pytest.mark.parametrize("bayes_cls,torch_cls", TWINS, ids=("lstm", "gru"))
def test_reparameterization_draws_one_network_per_forward(bayes_cls, torch_cls):
    layer = bayes_cls(3, 5, num_layers=2, posterior_rho_init=-1.0)  # sigma ~ 0.31: visible noise
    x = torch.randn(12, 4, 3)
    with noise_generator(7):
        out = layer(x)
    with noise_generator(7):  # the same draw, made explicit
        weights = layer.sample_weights()
    twin = layer.to_torch()
    with torch.no_grad():
        for name, value in weights.items():
            getattr(twin, name).copy_(value)
    # A fresh draw per time step would not match one fixed network run over the sequence.
    _assert_same(out, twin(x), 0.0)


@pytest.mark.parametrize("bayes_cls,torch_cls", TWINS, ids=("lstm", "gru"))
def test_flipout_gives_each_sequence_its_own_network_for_all_steps(bayes_cls, torch_cls, monkeypatch):
    """Each example b runs ``W_b = mu + diag(r_b) dW diag(s_b)`` at every time step."""
    layer = bayes_cls(3, 4, posterior_rho_init=-1.0, estimator="flipout")
    perturbations: dict[int, Tensor] = {}
    signs: list[Tensor] = []
    sample_perturbation, random_signs = BF.sample_perturbation, noise.random_signs

    def record_perturbation(rho: Tensor) -> Tensor:
        perturbations[id(rho)] = sample_perturbation(rho)
        return perturbations[id(rho)]

    def record_signs(shape, like):
        signs.append(random_signs(shape, like))
        return signs[-1]

    monkeypatch.setattr(BF, "sample_perturbation", record_perturbation)
    monkeypatch.setattr(noise, "random_signs", record_signs)
    x = torch.randn(5, 3, 3)
    x[:, 1] = x[:, 0]  # two identical sequences still get different networks
    out, _ = layer(x)
    assert not torch.allclose(out[:, 0], out[:, 1])
    # Signs are drawn per projection (input-to-hidden, then hidden-to-hidden): in, out.
    (s_ih, r_ih, s_hh, r_hh) = signs
    for b in range(3):
        twin = layer.to_torch()
        with torch.no_grad():
            for name, s, r in (("weight_ih_l0", s_ih, r_ih), ("weight_hh_l0", s_hh, r_hh)):
                delta = perturbations[id(getattr(layer, f"{name}_rho"))]
                getattr(twin, name).add_(r[b, :, None] * delta * s[b, None, :])
                bias = name.replace("weight", "bias")
                getattr(twin, bias).add_(r[b] * perturbations[id(getattr(layer, f"{bias}_rho"))])
        expected, _ = twin(x[:, b:b + 1])
        torch.testing.assert_close(out[:, b:b + 1], expected, atol=LOOP_ATOL, rtol=0)


@pytest.mark.parametrize("batch_first", (False, True))
@pytest.mark.parametrize("bayes_cls,torch_cls", TWINS, ids=("lstm", "gru"))
def test_sample_groups_give_each_block_its_own_network(bayes_cls, torch_cls, batch_first):
    """The vectorized-prediction hook: G blocks of the batch, one posterior draw each."""
    layer = bayes_cls(3, 4, num_layers=2, batch_first=batch_first, posterior_rho_init=-1.0,
                      estimator="flipout")  # blocks use exact draws whatever the estimator
    groups, batch = 3, 2
    x = torch.randn(batch, 5, 3).repeat(groups, 1, 1)  # (G * N, L, H_in), batch first
    x = x if batch_first else x.transpose(0, 1)
    batch_dim = 0 if batch_first else 1
    with noise_generator(5), sample_groups(groups):
        out = layer(x)
    with noise_generator(5):
        draws = [layer.sample_weights() for _ in range(groups)]
    for g, weights in enumerate(draws):
        twin = layer.to_torch()
        with torch.no_grad():
            for name, value in weights.items():
                getattr(twin, name).copy_(value)
        block = x.narrow(batch_dim, g * batch, batch)
        expected = twin(block)
        _assert_same((out[0].narrow(batch_dim, g * batch, batch),
                      *(s.narrow(1, g * batch, batch) for s in _leaves(out[1]))),
                     (expected[0], *_leaves(expected[1])), 0.0)
    with pytest.raises(RuntimeError, match="divisible by 3"), sample_groups(3):
        layer(torch.randn(4, 4, 3))
    # predict() uses the hook: its samples of one input differ across passes and groups.
    model = _Forecaster(BayesLSTM(3, 4, batch_first=True), nn.Linear(4, 1))
    samples = torchbayes.predict(model, torch.randn(2, 5, 3), 8, task="regression", seed=0).samples
    assert samples.shape == (8, 2, 1) and samples[:, 0].unique().numel() == 8


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bayes_cls", (BayesLSTM, BayesGRU))
def test_gradients_reach_mu_and_rho(bayes_cls, estimator):
    layer = bayes_cls(3, 4, num_layers=2, bidirectional=True, estimator=estimator)
    out, state = layer(torch.randn(6, 2, 3))
    (out.square().sum() + sum(s.square().sum() for s in _leaves(state))).backward()
    for name, mu, rho, _ in layer.variational_parameters():
        assert mu.grad is not None and mu.grad.abs().sum() > 0, name
        assert rho.grad is not None and rho.grad.abs().sum() > 0, name


def test_kl_sums_every_gate_weight_in_closed_form():
    layer = BayesLSTM(3, 4, num_layers=2, bidirectional=True, prior_mu=0.1, prior_sigma=0.5,
                      posterior_rho_init=-2.0)
    with torch.no_grad():
        for _, _, rho, _ in layer.variational_parameters():
            rho.add_(torch.rand_like(rho))
    names = [name for name, *_ in layer.variational_parameters()]
    assert len(names) == 16  # 2 layers x 2 directions x (W_ih, W_hh, b_ih, b_hh)
    expected = sum(kl_divergence(Normal(mu, F.softplus(rho)), Normal(0.1, 0.5)).sum()
                   for _, mu, rho, _ in layer.variational_parameters())
    torch.testing.assert_close(layer.kl_divergence(), expected)
    torch.testing.assert_close(torchbayes.kl_divergence(layer), expected)
    # 4 gates x 4 hidden units in every weight matrix: all counted.
    assert sum(mu.numel() for _, mu, _, _ in layer.variational_parameters()) == sum(
        p.numel() for p in layer.to_torch().parameters())


# ---------------------------------------------------------------------- conversion
def _sine_windows(n: int, amplitude: tuple[float, float], generator: torch.Generator,
                  length: int = 20, noise_std: float = 0.05) -> tuple[Tensor, Tensor]:
    """Noisy sine waves of random phase; input: ``length`` values, target: the next one."""
    amp = torch.empty(n, 1).uniform_(*amplitude, generator=generator)
    phase = torch.empty(n, 1).uniform_(0, 2 * math.pi, generator=generator)
    t = torch.arange(length + 1, dtype=torch.float32)
    series = amp * torch.sin(0.4 * t + phase) + noise_std * torch.randn(n, length + 1, generator=generator)
    return series[:, :length, None], series[:, length:]


class _Forecaster(nn.Module):
    def __init__(self, recurrent: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.rnn, self.head = recurrent, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_moped_conversion_of_trained_lstm_keeps_its_outputs():
    generator = torch.Generator().manual_seed(0)
    x, y = _sine_windows(64, (0.5, 1.0), generator)
    model = _Forecaster(nn.LSTM(1, 8, num_layers=2, batch_first=True, bidirectional=True), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # it did learn something: the weights are not the initial ones
    delta = 0.1
    bnn = torchbayes.dnn_to_bnn(copy.deepcopy(model), {
        "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
        "type": "Flipout", "moped_enable": True, "moped_delta": delta})
    assert isinstance(bnn.rnn, BayesLSTM) and bnn.rnn.batch_first and bnn.rnn.num_layers == 2
    with torch.no_grad(), posterior_mean(bnn):
        torch.testing.assert_close(bnn(x), model(x), atol=0, rtol=0)
    for name, mu, rho, prior in bnn.rnn.variational_parameters():
        w = getattr(model.rnn, name)
        torch.testing.assert_close(mu, w)
        torch.testing.assert_close(F.softplus(rho), delta * w.abs(), atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(prior.mu, w)
    with torch.no_grad():
        torch.testing.assert_close(torchbayes.bnn_to_dnn(bnn)(x), model(x), atol=0, rtol=0)


def test_gru_converts_with_all_hyperparameters():
    gru = nn.GRU(3, 5, num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)
    layer = torchbayes.dnn_to_bnn(gru)
    assert isinstance(layer, BayesGRU)
    assert (layer.num_layers, layer.bias, layer.batch_first, layer.dropout, layer.bidirectional) == (
        2, False, True, 0.25, True)
    assert "bias_ih_l0" not in layer.variational_names
    gru.eval()
    layer.eval()
    x = torch.randn(2, 4, 3)
    with posterior_mean(layer):
        _assert_same(layer(x), gru(x), 0.0)


# ------------------------------------------------------------------ a real task
def test_sine_forecaster_trains_and_is_uncertain_outside_training_range():
    """ELBO training on amplitudes in [0.5, 1]; [1.5, 2] and [4, 5] are ever further outside."""
    generator = torch.Generator().manual_seed(0)
    noise_std = 0.05
    x_train, y_train = _sine_windows(512, (0.5, 1.0), generator, noise_std=noise_std)
    x_in, y_in = _sine_windows(256, (0.5, 1.0), generator, noise_std=noise_std)
    x_near, _ = _sine_windows(256, (1.5, 2.0), generator, noise_std=noise_std)
    x_far, _ = _sine_windows(256, (4.0, 5.0), generator, noise_std=noise_std)
    model = _Forecaster(BayesLSTM(1, 16, batch_first=True), BayesLinear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        for batch in torch.randperm(512).split(64):
            # Gaussian likelihood with the known noise level: the ELBO's data term.
            nll = 0.5 * F.mse_loss(model(x_train[batch]), y_train[batch]) / noise_std ** 2
            loss = torchbayes.elbo_loss(nll, model, num_data=512)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    samples = 200
    inside, near, far = (torchbayes.predict(model, x, samples, task="regression", seed=1)
                         for x in (x_in, x_near, x_far))
    # It learned the task: error well below the targets' spread (std ~0.55).
    rmse = (inside.mean - y_in).square().mean().sqrt()
    assert rmse < 0.15, rmse
    std_in, std_near, std_far = (p.epistemic_variance.sqrt().mean() for p in (inside, near, far))
    # Each average is over 256 inputs of a 200-sample standard deviation, whose relative
    # Monte Carlo error is about 1/sqrt(2 * 199) = 5% even if the inputs' errors were fully
    # correlated (they share the weight draws); a ratio of two is within ~7%. A ratio of
    # 1.2 is ~3 such errors above 1 and 1.5 is ~7: uncertainty grows with the distance
    # from the training range (measured: about 1.35 and 1.8).
    assert std_near > 1.2 * std_in, (std_in, std_near)
    assert std_far > std_near and std_far > 1.5 * std_in, (std_in, std_near, std_far)


# ------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    lstm = BayesLSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="3-D"):
        lstm(torch.randn(2, 5, 3, 1))
    with pytest.raises(ValueError, match="3-D"):
        lstm(torch.randn(3))
    with pytest.raises(ValueError, match="input_size=3"):
        lstm(torch.randn(5, 2, 4))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        lstm([[1.0, 2.0, 3.0]])
    good = torch.zeros(2, 2, 4)
    with pytest.raises(ValueError, match=r"h_0.*\(2, 2, 4\).*got \(1, 2, 4\)"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), good))
    with pytest.raises(ValueError, match=r"c_0.*got \(2, 3, 4\)"):
        lstm(torch.randn(5, 2, 3), (good, torch.zeros(2, 3, 4)))
    with pytest.raises(TypeError, match=r"tuple \(h_0, c_0\)"):
        lstm(torch.randn(5, 2, 3), good)
    with pytest.raises(ValueError, match="unbatched"):
        lstm(torch.randn(5, 3), (good, good))
    gru = BayesGRU(3, 4)
    with pytest.raises(ValueError, match=r"hx must have shape"):
        gru(torch.randn(5, 2, 3), torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match="local"):
        BayesGRU(3, 4, estimator="local")
    with pytest.raises(ValueError, match="hidden_size"):
        BayesLSTM(3, 0)
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        BayesLSTM.from_torch(nn.GRU(3, 4))
    with pytest.raises(ValueError, match="proj_size"):
        BayesLSTM.from_torch(nn.LSTM(3, 4, proj_size=2))


# ------------------------------------------------------ the reference's front doors
@pytest.mark.parametrize("ours_name", ("LSTMReparameterization", "LSTMFlipout"))
def test_front_doors_match_the_reference(reference, ours_name):
    ref_layer = getattr(reference.layers, ours_name)(5, 7, posterior_rho_init=SIGMA_TO_ZERO)
    ours = getattr(torchbayes.layers, ours_name)(5, 7, posterior_rho_init=SIGMA_TO_ZERO)
    ours.load_state_dict(ref_layer.state_dict())  # the reference's keys: ih.mu_weight, ...
    x = torch.randn(3, 6, 5)
    states = (torch.randn(3, 7), torch.randn(3, 7))
    for hidden_states in (None, states):
        ref_seq, (ref_seq2, ref_c), ref_kl = ref_layer(x, hidden_states)
        seq, (seq2, c_seq), kl = ours(x, hidden_states)
        for a, e in ((seq, ref_seq), (seq2, ref_seq2), (c_seq, ref_c)):
            assert a.shape == e.shape == (3, 6, 7)
            torch.testing.assert_close(a, e, atol=LOOP_ATOL, rtol=0)
        # The reference adds its (per-tensor mean) KL once per time step.
        torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=0)
    # Gradients through every returned tensor match the reference's (its ih / hh layers),
    # up to float32 rounding of sums over 6 steps x 3 sequences taken in another order.
    (ref_seq.sum() + ref_c.square().sum()).backward()
    (seq.sum() + c_seq.square().sum()).backward()
    for native, ref_param in (("weight_ih_l0_mu", ref_layer.ih.mu_weight),
                              ("weight_hh_l0_mu", ref_layer.hh.mu_weight),
                              ("bias_hh_l0_mu", ref_layer.hh.mu_bias)):
        torch.testing.assert_close(getattr(ours, native).grad, ref_param.grad, atol=1e-4, rtol=1e-4)
    ours.dnn_to_bnn_flag = True
    assert len(ours(x)) == 2 and len(ours(x, return_kl=True)) == 2
    ours.dnn_to_bnn_flag = False
    assert len(ours(x, return_kl=False)) == 2
    # Checkpoints go back to the reference too.
    back = getattr(reference.layers, ours_name)(5, 7)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.hh.mu_weight, ours.weight_hh_l0_mu)


def test_front_door_bad_input():
    lstm = LSTMReparameterization(3, 4)
    with pytest.raises(ValueError, match=r"X must be 3-D \(batch, sequence, in_features=3\)"):
        lstm(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"c_0 must have shape \(batch, out_features\) = \(2, 4\)"):
        lstm(torch.randn(2, 5, 3), (torch.zeros(2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="prior_variance"):
        LSTMFlipout(3, 4, prior_variance=0.0)
