"""torchbayes.optim.IVON: the same math as ivon-opt 0.1.3, the training loop's contract
(samples, closure, clipping, schedulers, state_dict, parameter groups), DDP, and the
posterior's way into Bayesian layers and back.

Exact comparisons with ivon-opt: both optimizers draw their noise from PyTorch's global
generator in the same order and amount (one ``randn`` of the group's size per sample;
groups below the parallel draw's threshold draw serially), so from the same seed they
see the same noise; only the order of float32 operations differs (ivon-opt works on
concatenated vectors, torchbayes on the parameter list with the state kept as
``h + weight_decay``), which over 10 steps leaves differences of a few ulp, so the
tolerances are float32's (rtol 1e-5, atol 1e-6 on values of order 1).
"""

from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.nn import noise_generator
from torchbayes.optim import IVON, bnn_to_ivon, ivon_to_bnn

ivon = pytest.importorskip("ivon")

X = torch.randn(48, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(2))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    samples: int = 1,
    clip: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    seed: int = 100,
) -> None:
    for step in range(steps):
        torch.manual_seed(seed + step)
        for _ in range(samples):
            with opt.sampled_params(train=True):  # type: ignore[attr-defined]
                opt.zero_grad()
                F.cross_entropy(model(X), Y).backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_as_ivon_opt(ours: IVON, theirs: ivon.IVON) -> None:
    for group, peer in zip(ours.param_groups, theirs.param_groups):
        params = group["params"]
        torch.testing.assert_close(
            torch.cat([p.detach().flatten() for p in params]),
            torch.cat([p.detach().flatten() for p in peer["params"]]),
            rtol=1e-5,
            atol=1e-6,
        )
        torch.testing.assert_close(
            torch.cat([ours.hessian(p).flatten() for p in params]), peer["hess"], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            torch.cat([ours.state[p]["momentum"].flatten() for p in params]), peer["momentum"], rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize(
    "settings",
    [
        {"lr": 0.1, "ess": 100.0, "hess_init": 0.3, "weight_decay": 1e-2, "beta2": 0.99},
        {"lr": 0.05, "ess": 50.0, "hess_init": 1.0, "weight_decay": 0.0, "beta2": 0.999, "beta1": 0.5},
        {"lr": 0.2, "ess": 100.0, "hess_init": 0.5, "weight_decay": 1e-3, "clip_radius": 0.01, "beta2": 0.99},
        {"lr": 0.1, "ess": 100.0, "hess_init": 0.3, "weight_decay": 1e-2, "rescale_lr": False, "debias": False},
        {"lr": 0.1, "ess": 100.0, "hess_init": 0.3, "weight_decay": 1e-2, "mc_samples": 3, "beta2": 0.99},
    ],
    ids=["weight-decay", "no-weight-decay", "clipped", "no-rescale-no-debias", "3-samples"],
)
def test_same_parameters_momentum_and_hessian_as_ivon_opt(settings):
    samples = settings.get("mc_samples", 1)
    a, b = mlp(), mlp()
    ours, theirs = IVON(a.parameters(), **settings), ivon.IVON(b.parameters(), **settings)
    train(a, ours, 10, samples=samples)
    train(b, theirs, 10, samples=samples)
    assert_same_as_ivon_opt(ours, theirs)
    # and the posterior did move: not a comparison of two untouched states
    assert not torch.allclose(a[0].weight, mlp()[0].weight)


def test_parameter_groups_and_lr_scheduler_match_ivon_opt():
    a, b = mlp(), mlp()
    groups = [{"params": m[0].parameters(), "lr": 0.2, "weight_decay": 1e-2} for m in (a, b)]
    rest = [{"params": m[2].parameters(), "hess_init": 2.0} for m in (a, b)]
    ours = IVON([groups[0], rest[0]], lr=0.1, ess=100.0, beta2=0.99, hess_init=0.5)
    theirs = ivon.IVON([groups[1], rest[1]], lr=0.1, ess=100.0, beta2=0.99, hess_init=0.5)
    train(a, ours, 8, scheduler=torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5))
    train(b, theirs, 8, scheduler=torch.optim.lr_scheduler.StepLR(theirs, step_size=3, gamma=0.5))
    assert ours.param_groups[0]["lr"] == pytest.approx(0.2 * 0.25)
    assert_same_as_ivon_opt(ours, theirs)


def test_gradient_clipping_inside_the_block_clips_the_gradient_used():
    model = mlp()
    opt = IVON(model.parameters(), lr=0.1, ess=100.0)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        raw = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert float(raw) > 0.1  # the clipping is active
    # the first momentum is (1 - beta1) * the clipped gradient, of norm 0.05
    norm = torch.sqrt(sum(opt.state[p]["momentum"].square().sum() for p in model.parameters()))
    assert float(norm) == pytest.approx(0.1 * 0.05, rel=1e-4)
    opt.step()


def test_closure_equals_the_context_manager():
    a, b = mlp(), mlp()
    ours, other = (
        IVON(a.parameters(), lr=0.1, ess=100.0, mc_samples=2),
        IVON(b.parameters(), lr=0.1, ess=100.0, mc_samples=2),
    )
    train(a, ours, 4, samples=2)
    losses = []
    for step in range(4):
        torch.manual_seed(100 + step)

        def closure() -> torch.Tensor:
            other.zero_grad()
            loss = F.cross_entropy(b(X), Y)
            loss.backward()
            return loss

        losses.append(other.step(closure))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(loss is not None and loss.ndim == 0 and math.isfinite(float(loss)) for loss in losses)


def test_sampled_params_draws_from_the_posterior_and_restores_the_mean():
    model = nn.Linear(200, 100)  # 20,100 weights: enough for a sharp check of the spread
    opt = IVON(model.parameters(), lr=0.1, ess=50.0, hess_init=2.0, weight_decay=0.5)
    mean = model.weight.detach().clone()
    with opt.sampled_params():
        noise = model.weight.detach() - mean
    torch.testing.assert_close(model.weight, mean, rtol=0, atol=1e-6)  # restored (one rounding)
    sigma = 1.0 / math.sqrt(50.0 * (2.0 + 0.5))
    torch.testing.assert_close(opt.posterior_std(model.weight), torch.full_like(mean, sigma))
    # sample std of n = 20,000 normals: relative standard error 1 / sqrt(2n) = 0.005; 5 of them
    assert float(noise.std()) == pytest.approx(sigma, rel=0.025)
    assert abs(float(noise.mean())) < 5 * sigma / math.sqrt(noise.numel())
    # an error inside the block leaves the means
    with pytest.raises(KeyError), opt.sampled_params(train=True):
        raise KeyError("boom")
    torch.testing.assert_close(model.weight, mean, rtol=0, atol=1e-6)


def test_seeded_draws_are_reproducible_with_noise_generator():
    model = nn.Linear(4, 3)
    opt = IVON(model.parameters(), lr=0.1, ess=10.0)
    outs = []
    for _ in range(2):
        with noise_generator(7), opt.sampled_params():
            outs.append(model(X[:, :4]).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_state_dict_round_trip_continues_identically(tmp_path):
    a = mlp()
    opt = IVON(a.parameters(), lr=0.1, ess=100.0, beta2=0.99, weight_decay=1e-2)
    train(a, opt, 3)
    path = tmp_path / "ivon.pt"
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    assert set(saved["opt"]["state"][0]) == {"momentum", "precision"}  # two buffers, as Adam's
    b = mlp(5)
    b.load_state_dict(saved["model"])
    other = IVON(b.parameters(), lr=0.1, ess=100.0, beta2=0.99, weight_decay=1e-2)
    other.load_state_dict(saved["opt"])
    train(a, opt, 3, seed=500)
    train(b, other, 3, seed=500)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["precision"], other.state[q]["precision"], rtol=0, atol=0)


def test_keep_noise_buffer_false_gives_the_same_steps_and_mean_draws_between_steps():
    a, b = mlp(), mlp()
    kept, freed = (
        IVON(a.parameters(), lr=0.1, ess=100.0),
        IVON(b.parameters(), lr=0.1, ess=100.0, keep_noise_buffer=False),
    )
    train(a, kept, 3)
    train(b, freed, 3)
    assert freed._noise == [None]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # A prediction sample between a training sample and step() leaves the pending estimate.
    c, d = mlp(), mlp()
    one, two = IVON(c.parameters(), lr=0.1, ess=100.0), IVON(d.parameters(), lr=0.1, ess=100.0)
    for model, opt, peek in ((c, one, False), (d, two, True)):
        torch.manual_seed(3)
        with opt.sampled_params(train=True):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
        if peek:
            with opt.sampled_params():
                model(X)
        opt.step()
    for p, q in zip(c.parameters(), d.parameters()):
        # the peek's restore (mean + noise - noise) rounds once: 1 ulp of weights below 1
        torch.testing.assert_close(p, q, rtol=0, atol=1.2e-7)


def test_weight_decay_change_keeps_the_hessian():
    model = nn.Linear(3, 2)
    opt = IVON(model.parameters(), lr=0.1, ess=10.0, hess_init=0.7, weight_decay=0.1)
    opt.param_groups[0]["weight_decay"] = 0.3
    torch.testing.assert_close(opt.hessian(model.weight), torch.full((2, 3), 0.7))
    torch.testing.assert_close(opt.posterior_std(model.weight), torch.full((2, 3), (10.0 * 1.0) ** -0.5))


def test_misuse_raises_clear_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="lr"):
        IVON(model.parameters(), lr=-1.0, ess=10.0)
    with pytest.raises(ValueError, match="ess"):
        IVON(model.parameters(), lr=0.1, ess=0.0)
    with pytest.raises(ValueError, match="hess_init"):
        IVON(model.parameters(), lr=0.1, ess=1.0, hess_init=0.0)
    with pytest.raises(ValueError, match="beta1"):
        IVON(model.parameters(), lr=0.1, ess=1.0, beta1=1.0)
    with pytest.raises(ValueError, match="mc_samples"):
        IVON(model.parameters(), lr=0.1, ess=1.0, mc_samples=0)
    with pytest.raises(ValueError, match="clip_radius"):
        IVON(model.parameters(), lr=0.1, ess=1.0, clip_radius=0.0)
    with pytest.raises(ValueError, match="device and dtype"):
        IVON([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr=0.1, ess=1.0)
    opt = IVON(model.parameters(), lr=0.1, ess=10.0)
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()
    with pytest.raises(RuntimeError, match="already inside"), opt.sampled_params(), opt.sampled_params():
        pass
    with opt.sampled_params(train=True):
        F.cross_entropy(model(X[:, :3]), Y.clamp(max=1)).backward()
    with pytest.raises(RuntimeError, match="mc_samples"), opt.sampled_params(train=True):
        pass
    opt.step()
    with pytest.raises(ValueError, match="not one of"):
        opt.posterior_std(torch.zeros(2))


# ------------------------------------------------------------------ the posterior
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_ivon_to_bnn_layers_carry_the_posterior_and_other_parameters_their_mean():
    model = cnn()
    opt = IVON(model.parameters(), lr=0.1, ess=200.0, hess_init=0.5, weight_decay=1e-2)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step()
    bayes = ivon_to_bnn(model, opt)
    assert isinstance(bayes[0], torchbayes.nn.BayesConv2d) and isinstance(bayes[4], torchbayes.nn.BayesLinear)
    assert isinstance(bayes[1], nn.BatchNorm2d)  # no Bayesian twin: kept, at the mean
    torch.testing.assert_close(bayes[0].weight_mu, model[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.nn.functional.softplus(bayes[4].weight_rho), opt.posterior_std(model[4].weight), rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(bayes[1].weight, model[1].weight, rtol=0, atol=0)
    prior = bayes[4].weight_prior
    assert float(prior.sigma.max()) == pytest.approx(1.0 / math.sqrt(200.0 * 1e-2))
    model.eval()
    bayes.eval()
    # posterior mean = the trained network; samples spread around it with IVON's sigma
    with torchbayes.posterior_mean(bayes):
        torch.testing.assert_close(bayes(x), model(x), rtol=1e-5, atol=1e-5)
    prediction = torchbayes.predict(bayes, x, num_samples=8, seed=0)
    assert prediction.mean.shape == (16, 3)
    assert float(prediction.mutual_information.max()) > 0
    moments = torchbayes.predict(bayes, x, method="moments")
    assert torch.isfinite(moments.mean).all()


def test_ivon_to_bnn_rejects_foreign_parameters_and_sampled_weights():
    model = cnn()
    opt = IVON(model[4].parameters(), lr=0.1, ess=10.0)
    with pytest.raises(ValueError, match="not the optimizer's"):
        ivon_to_bnn(model, opt)
    head = ivon_to_bnn(model, opt, include=["4"])  # only the layer the optimizer trained
    assert isinstance(head[0], nn.Conv2d) and isinstance(head[4], torchbayes.nn.BayesLinear)
    with opt.sampled_params(), pytest.raises(ValueError, match="sampled_params"):
        ivon_to_bnn(model, opt, include=["4"])
    with pytest.raises(TypeError, match="IVON"):
        ivon_to_bnn(model, torch.optim.Adam(model.parameters()))


def test_bnn_to_ivon_round_trip_keeps_means_and_sigmas():
    model = cnn()
    opt = IVON(model.parameters(), lr=0.1, ess=200.0, hess_init=0.5, weight_decay=1e-2)
    with opt.sampled_params(train=True):
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    bayes = ivon_to_bnn(model, opt)
    plain, again = bnn_to_ivon(bayes, lr=0.1, ess=200.0, weight_decay=1e-2)
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(
        again.posterior_std(plain[0].weight), opt.posterior_std(model[0].weight), rtol=1e-4, atol=0
    )
    # BatchNorm had no Bayesian layer: it starts from hess_init
    torch.testing.assert_close(again.hessian(plain[1].weight), torch.ones(4))


def test_converted_posterior_checkpoint_round_trip(tmp_path):
    model = cnn()
    opt = IVON(model.parameters(), lr=0.1, ess=200.0)
    bayes = ivon_to_bnn(model, opt)
    torchbayes.save_checkpoint(bayes, tmp_path / "ivon.pt")
    loaded = torchbayes.rebuild(tmp_path / "ivon.pt", cnn())  # replays the conversion, loads weights and priors
    for (name, p), q in zip(bayes.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ DDP
WORLD = 2


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = mlp()
        opt = IVON(model.parameters(), lr=0.1, ess=100.0, beta2=0.99, weight_decay=1e-2, sync=True)
        for step in range(3):
            shard = slice(rank * 24, (rank + 1) * 24)
            with noise_generator(10 * step + rank), opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(model(X[shard]), Y[shard]).backward()
            opt.step()
        torch.save(
            {
                "params": [p.detach() for p in model.parameters()],
                "precision": [opt.state[p]["precision"] for p in model.parameters()],
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_sync_averages_gradients_and_hessian_estimates_of_per_rank_draws(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # One process, two samples per step: sample r sees shard r and rank r's noise. The
    # average of the two ranks' estimates is exactly this two-sample step.
    model = mlp()
    opt = IVON(model.parameters(), lr=0.1, ess=100.0, beta2=0.99, weight_decay=1e-2, mc_samples=2)
    for step in range(3):
        for rank in range(WORLD):
            shard = slice(rank * 24, (rank + 1) * 24)
            with noise_generator(10 * step + rank), opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(model(X[shard]), Y[shard]).backward()
        opt.step()
    for report in reports:  # ranks identical, and equal to the two-sample step (float32 summation order)
        for got, want in zip(report["params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        for got, p in zip(report["precision"], model.parameters()):
            torch.testing.assert_close(got, opt.state[p]["precision"], rtol=1e-5, atol=1e-6)
    assert os.path.exists(tmp_path / "rank1.pt")


def test_copy_of_optimizer_state_is_independent():
    model = mlp()
    opt = IVON(model.parameters(), lr=0.1, ess=100.0)
    train(model, opt, 1)
    clone = copy.deepcopy(opt.state_dict())
    train(model, opt, 1)
    assert not torch.equal(clone["state"][0]["momentum"], opt.state[model[0].weight]["momentum"])
