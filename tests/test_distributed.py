"""DistributedDataParallel and FSDP training of a converted Bayesian model (2 CPU ranks, gloo).

One spawn runs every distributed check (process start-up dominates the cost); each rank
writes what it saw to a file and the assertions run here, in the test process, against
single-process computations on the same data.

What is compared with a single process, and why it can be exact:

* posterior-mean mode: the forward draws no noise, so a DDP step on two shards of a
  global batch must equal ONE single-process step on the concatenated batch (same
  ELBO: mean NLL + KL / N), up to float summation order.
* sampling mode: each rank draws its own noise (seed 100 + rank). The DDP gradient must
  equal the average of the single-process gradients of the two shards computed with the
  same two seeds. This pins down that mu and rho gradients are averaged and the KL is
  counted once; since each shard's gradient is an unbiased estimate of its ELBO
  gradient, the DDP step also matches the single-process global-batch step in
  expectation.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes import ModelWithKL, dnn_to_bnn, elbo_loss, load_checkpoint, posterior_mean, save_checkpoint
from torchbayes.distributed import seed_per_rank

WORLD = 2
SHARD = 32  # examples per rank per step
PRIOR = {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
         "type": "Reparameterization", "moped_enable": False, "moped_delta": 0.5}


def make_model() -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank and in the test process
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return dnn_to_bnn(base, PRIOR)


def loss_on(model: nn.Module, forward: nn.Module, x, y, num_data: int) -> torch.Tensor:
    return elbo_loss(F.cross_entropy(forward(x), y), model, num_data=num_data)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        n = len(y)
        shard = slice(rank * SHARD, (rank + 1) * SHARD)
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        report: dict = {}

        # 1. Posterior-mean mode: deterministic gradients.
        with posterior_mean(model):
            loss_on(model, ddp, x[shard], y[shard], n).backward()
        report["grad_mean_mode"] = grads(model)
        model.zero_grad()

        # 2. Sampling with per-rank noise.
        report["seed"] = seed_per_rank(100)
        loss_on(model, ddp, x[shard], y[shard], n).backward()
        report["grad_sampling"] = grads(model)
        model.zero_grad()
        report["probe"] = model(x[:8]).detach()  # same input on both ranks, own noise

        # 3. Several training steps on disjoint shards.
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with torch.no_grad(), posterior_mean(model):
            report["full_loss_before"] = float(F.cross_entropy(model(x), y))
        for step in range(40):
            start = (step * WORLD + rank) * SHARD % (n - SHARD)
            loss = loss_on(model, ddp, x[start:start + SHARD], y[start:start + SHARD], n)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad(), posterior_mean(model):
            report["full_loss_after"] = float(F.cross_entropy(model(x), y))
        report["params_after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        # 4. A checkpoint saved on rank 0 (from the DDP wrapper) loads on rank 1.
        path = os.path.join(out_dir, "ddp.pt")
        if rank == 0:
            save_checkpoint(ddp, path)
        dist.barrier()
        if rank == 1:
            fresh = make_model()
            load_checkpoint(path, fresh)
            report["loaded_equal"] = all(torch.equal(a, b) for a, b in
                                         zip(fresh.state_dict().values(), model.state_dict().values()))

        # 5. FSDP2 (fully_shard) on CPU: one SGD step in posterior-mean mode.
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # pragma: no cover - torch without FSDP2
            report["fsdp"] = f"unavailable: {exc}"
        else:
            fsdp_model = make_model()
            wrapped = ModelWithKL(fsdp_model)
            fully_shard(wrapped, mesh=init_device_mesh("cpu", (WORLD,)))
            sgd = torch.optim.SGD(wrapped.parameters(), lr=0.5)
            with posterior_mean(fsdp_model):
                out, kl = wrapped(x[:WORLD * SHARD][shard])
                (F.cross_entropy(out, y[:WORLD * SHARD][shard]) + kl / n).backward()
            sgd.step()
            report["fsdp_local_shape"] = tuple(fsdp_model[1].weight_mu.to_local().shape)
            report["fsdp_params"] = {k: v.full_tensor().detach().clone()
                                     for k, v in fsdp_model.named_parameters()}
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, digits):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("ddp")
    # The data travel with the spawn: loading them in each child costs seconds.
    # spawn, not fork: forking a process that has run autograd (any earlier test) breaks it.
    mp.spawn(_worker, args=(_free_port(), str(out), digits.train_x, digits.train_y), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process_grads(x, y, n, seed: int | None) -> dict[str, torch.Tensor]:
    model = make_model()
    if seed is None:
        with posterior_mean(model):
            loss_on(model, model, x, y, n).backward()
    else:
        torch.manual_seed(seed)
        loss_on(model, model, x, y, n).backward()
    return grads(model)


def assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # Only the summation order differs (gloo all-reduce vs one batch): float32 rounding.
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_ddp_posterior_mean_step_equals_single_process_global_batch(ranks, digits):
    _, reports = ranks
    x, y = digits.train_x, digits.train_y
    expected = single_process_grads(x[:WORLD * SHARD], y[:WORLD * SHARD], len(y), seed=None)
    for report in reports:
        assert_grads_close(report["grad_mean_mode"], expected)
    # The KL's gradient reaches rho exactly once: (KL / N)'s gradient, not W times it.
    model = make_model()
    (torchbayes.kl_divergence(model) / len(y)).backward()
    torch.testing.assert_close(expected["1.weight_rho"], model[1].weight_rho.grad, rtol=1e-5, atol=0)


def test_ddp_sampling_gradient_is_the_average_of_per_rank_draws(ranks, digits):
    _, reports = ranks
    x, y = digits.train_x, digits.train_y
    per_rank = [single_process_grads(x[r * SHARD:(r + 1) * SHARD], y[r * SHARD:(r + 1) * SHARD], len(y),
                                     seed=100 + r) for r in range(WORLD)]
    expected = {k: (per_rank[0][k] + per_rank[1][k]) / WORLD for k in per_rank[0]}
    assert [r["seed"] for r in reports] == [100, 101]
    for report in reports:
        assert_grads_close(report["grad_sampling"], expected)
    # Different noise per rank: the two shards' rho gradients are not the same draw.
    assert not torch.allclose(per_rank[0]["1.weight_rho"], per_rank[1]["1.weight_rho"])


def test_ddp_ranks_draw_different_noise(ranks, digits):
    _, (r0, r1) = ranks
    assert not torch.allclose(r0["probe"], r1["probe"])


def test_ddp_training_keeps_ranks_identical_and_lowers_the_loss(ranks, digits):
    out, (r0, r1) = ranks
    for k in r0["params_after"]:
        assert torch.equal(r0["params_after"][k], r1["params_after"][k]), k
    assert r0["full_loss_after"] < 0.5 * r0["full_loss_before"]
    # The checkpoint rank 0 wrote from the DDP wrapper loads into plain models anywhere.
    assert r1["loaded_equal"]
    here = make_model()
    load_checkpoint(out / "ddp.pt", here)
    for k, v in here.state_dict().items():
        assert torch.equal(v, r0["params_after"][k]), k


def test_fsdp_fully_shard_step_equals_single_process_step(ranks, digits):
    _, (r0, r1) = ranks
    if isinstance(r0.get("fsdp"), str):
        pytest.skip(f"FSDP2 fully_shard: {r0['fsdp']}")
    assert r0["fsdp_local_shape"] == (16, 64)  # parameters really are sharded over 2 ranks
    x, y = digits.train_x, digits.train_y
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    with posterior_mean(model):
        loss_on(model, model, x[:WORLD * SHARD], y[:WORLD * SHARD], len(y)).backward()
    sgd.step()
    for report in (r0, r1):
        for k, v in model.named_parameters():
            torch.testing.assert_close(report["fsdp_params"][k], v.detach(), rtol=1e-5, atol=1e-7, msg=k)
