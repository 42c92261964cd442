"""The fused draw + KL autograd node (``functional.posterior_draws``) against plain autograd.

Every path of the node (draw kinds, means output, scalar and per-weight priors, the CPU
fast paths and the sync-free accelerator forms, the stable forms for extreme rho) must
give the values and gradients that autograd computes through the textbook formulas with
the same noise. The comparison is deterministic (the noise is recorded and replayed), so
tolerances are float rounding only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import torchbayes
from torchbayes.nn import BayesConv2d, BayesLinear, noise
from torchbayes.nn import functional as BF


def _plain_kl(mu: Tensor, rho: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    sigma = F.softplus(rho)
    return (torch.log(sigma_p) - torch.log(sigma)
            + (sigma ** 2 + (mu - mu_p) ** 2) / (2 * sigma_p ** 2) - 0.5).sum()


def _plain_draw(mu: Tensor, rho: Tensor, kind: str, eps: Tensor | None) -> Tensor:
    sigma = F.softplus(rho)
    return {"sample": lambda: mu + sigma * eps, "perturbation": lambda: sigma * eps,
            "variance": lambda: sigma ** 2}[kind]()


def _params(shapes, rho_fill=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        mu = (0.3 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
        rho = (torch.full(shape, rho_fill, dtype=dtype) if rho_fill is not None
               else -3.0 + torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
        out.append((mu, rho))
    return out


def _compare(params, kind, priors, with_means, monkeypatch, atol=1e-10):
    """Fused values and gradients equal plain autograd's with the same noise and loss."""
    drawn: list[Tensor] = []
    real_randn, real_normal_ = noise.randn, noise.normal_

    def recording(shape, like):
        eps = real_randn(shape, like)
        drawn.append(eps)
        return eps

    def recording_(out):
        drawn.append(real_normal_(out).clone())
        return out

    monkeypatch.setattr(noise, "randn", recording)
    monkeypatch.setattr(noise, "normal_", recording_)
    result = BF.posterior_draws(params, kind, priors, BF.KLToken(), with_means)
    monkeypatch.setattr(noise, "randn", real_randn)
    monkeypatch.setattr(noise, "normal_", real_normal_)
    eps = iter(drawn)
    plain = [_plain_draw(mu, rho, kind, None if kind == "variance" else next(eps)) for mu, rho in params]
    gen = torch.Generator().manual_seed(1)
    # Random weights on every output, so that each gradient path carries a distinct signal.
    weights = [torch.randn(d.shape, generator=gen, dtype=d.dtype) for d in plain]
    mean_weights = [torch.randn(mu.shape, generator=gen, dtype=mu.dtype) for mu, _ in params]

    def loss(draws, means, kl, kl_parts):
        total = sum((w * d).sum() for w, d in zip(weights, draws))
        if means is not None:
            total = total + sum((w * m).sum() for w, m in zip(mean_weights, means))
        if kl is not None:
            total = total + 0.37 * kl + (kl_parts * torch.arange(1.0, len(params) + 1, dtype=kl.dtype)).sum()
        return total

    leaves = [t for pair in params for t in pair]
    fused_grads = torch.autograd.grad(loss(*result), leaves)
    plain_means = [mu for mu, _ in params] if with_means else None
    plain_parts = None if priors is None else torch.stack(
        [_plain_kl(mu, rho, mp, sp) for (mu, rho), (mp, sp) in zip(params, priors)])
    plain_total = None if plain_parts is None else plain_parts.sum()
    plain_grads = torch.autograd.grad(loss(plain, plain_means, plain_total, plain_parts), leaves)
    for fused, expected in zip(result.draws, plain):
        torch.testing.assert_close(fused, expected, rtol=1e-10, atol=atol)
    if priors is not None:
        torch.testing.assert_close(result.kl, plain_total, rtol=1e-10, atol=atol)
        torch.testing.assert_close(result.kl_parts, plain_parts, rtol=1e-10, atol=atol)
    for fused, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, expected, rtol=1e-9, atol=atol)


SCALAR_PRIOR = (torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
SHIFTED_PRIOR = (torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))


@pytest.mark.parametrize("kind", BF.DRAW_KINDS)
@pytest.mark.parametrize("with_means", [False, True])
@pytest.mark.parametrize("shapes", [[(7, 5), (7,)], [(80, 64), (80,)]], ids=["small", "two-pass-softplus"])
def test_fused_draws_match_plain_autograd(kind, with_means, shapes, monkeypatch):
    # (80, 64) has 5120 >= 4096 weights: sigma from exp then log1p_, not F.softplus.
    params = _params(shapes)
    _compare(params, kind, [SCALAR_PRIOR, SHIFTED_PRIOR], with_means, monkeypatch)


@pytest.mark.parametrize("kind", BF.DRAW_KINDS)
def test_fused_draws_without_prior_match_plain_autograd(kind, monkeypatch):
    _compare(_params([(6, 4), (6,)]), kind, None, True, monkeypatch)


@pytest.mark.parametrize("kind", BF.DRAW_KINDS)
def test_per_weight_prior_matches_plain_autograd(kind, monkeypatch):
    params = _params([(6, 4)])
    gen = torch.Generator().manual_seed(5)
    prior = (0.1 * torch.randn(6, 4, generator=gen, dtype=torch.float64),
             0.2 + torch.rand(6, 4, generator=gen, dtype=torch.float64))
    _compare(params, kind, [prior], True, monkeypatch)


@pytest.mark.parametrize("kind", BF.DRAW_KINDS)
def test_sync_free_accelerator_forms_match(kind, monkeypatch):
    # On accelerators no scalar is read back: scalar priors stay tensors, sigma comes from
    # F.softplus with the stable log / gradient forms, and the KL's incoming gradients stay
    # tensors. Forcing that path on the CPU must not change any value or gradient.
    monkeypatch.setattr(BF, "_host_readable", lambda t: False)
    _compare(_params([(70, 64), (70,)]), kind, [SCALAR_PRIOR, SHIFTED_PRIOR], True, monkeypatch)


@pytest.mark.parametrize("rho_fill", [-95.0, 25.0], ids=["underflowing-sigma", "above-softplus-threshold"])
def test_extreme_rho_matches_plain_autograd(rho_fill, monkeypatch):
    # rho = -95: softplus(rho) is a float32 subnormal; in float64 the plain formulas are
    # still exact, so the stable forms must agree with them. rho = 25: softplus(rho) = rho.
    params = _params([(5, 3), (5,)], rho_fill=rho_fill)
    _compare(params, "sample", [SCALAR_PRIOR, SCALAR_PRIOR], False, monkeypatch, atol=1e-8)


def test_gaussian_kl_is_the_fused_node_without_a_draw():
    (mu, rho), = _params([(9, 4)])
    kl = BF.gaussian_kl(mu, rho, *SHIFTED_PRIOR)
    expected = _plain_kl(mu, rho, *SHIFTED_PRIOR)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(torch.autograd.grad(kl, (mu, rho)), torch.autograd.grad(expected, (mu, rho)),
                               rtol=1e-10, atol=0.0)


def test_priors_must_match_parameters():
    with pytest.raises(ValueError, match="priors"):
        BF.posterior_draws(_params([(2,), (2,)]), "sample", [SCALAR_PRIOR])


# ----------------------------------------------------------------------- layer KL cache
def _layer_with_draw(estimator="reparameterization"):
    torch.manual_seed(0)
    layer = BayesLinear(6, 3, estimator=estimator)
    y = layer(torch.randn(4, 6))
    return layer, y


def _fresh_kl(layer, reduction):
    return sum(p.kl_divergence(mu, rho, reduction) for _, mu, rho, p in layer.variational_parameters())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cached_kl_equals_fresh_kl(reduction):
    layer, _ = _layer_with_draw()
    cached = layer.kl_divergence(reduction)
    # float32 reductions of 21 terms summed in different orders: a few ulps apart.
    torch.testing.assert_close(cached, _fresh_kl(layer, reduction), rtol=1e-6, atol=0.0)
    # Its gradient reaches every posterior parameter through the forward's node.
    grads = torch.autograd.grad(cached, list(layer.parameters()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cache_is_dropped_after_backward_and_after_an_update():
    layer, y = _layer_with_draw()
    first = layer.kl_divergence()
    (y.sum() + first).backward()
    # Backward consumed the node: the next call recomputes (a fresh graph, same value).
    again = layer.kl_divergence()
    assert again.grad_fn is not first.grad_fn
    torch.testing.assert_close(again, first)
    layer(torch.randn(4, 6))
    with torch.no_grad():
        layer.weight_rho.add_(0.5)
    updated = layer.kl_divergence()
    torch.testing.assert_close(updated, _fresh_kl(layer, "sum"))
    assert not torch.allclose(updated, first)


class _KLOf(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self) -> Tensor:
        return self.layer.kl_divergence()


def test_cache_ignores_swapped_parameters():
    # The cache holds the tensors it was computed from; other tensors under the same names
    # (torch.func.functional_call) must get their own KL, not the cached one.
    layer, _ = _layer_with_draw()
    swapped = {f"layer.{name}": p.detach() + 0.1 for name, p in layer.named_parameters()}
    kl = torch.func.functional_call(_KLOf(layer), swapped, ())
    expected = sum(BF.gaussian_kl(swapped[f"layer.{n}_mu"], swapped[f"layer.{n}_rho"], p.mu, p.sigma)
                   for n, _, _, p in layer.variational_parameters())
    torch.testing.assert_close(kl, expected)


# ------------------------------------------------------------------ flipout / local means
@pytest.mark.parametrize("estimator", ["flipout", "local"])
def test_mean_gradient_joins_the_kl_gradient(estimator):
    # Flipout and local compute op(x, mu) on the means returned by the draws' node. The
    # output depends on mu only through op(x, mu), so the gradient w.r.t. the means of
    # (w * y).sum() + KL is that of (w * op(x, mu)).sum() + KL in plain autograd.
    torch.manual_seed(0)
    layer = BayesConv2d(2, 3, 3, estimator=estimator)
    x = torch.randn(4, 2, 6, 6)
    y = layer(x)
    w = torch.randn_like(y)
    means = [layer.weight_mu, layer.bias_mu]
    fused = torch.autograd.grad((w * y).sum() + layer.kl_divergence(), means)
    plain_loss = (w * F.conv2d(x, *means)).sum() + _fresh_kl(layer, "sum")
    plain = torch.autograd.grad(plain_loss, means)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- random signs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_random_signs_are_fair_independent_and_reproducible(dtype):
    n = 200_000
    with torchbayes.noise_generator(0):
        signs = noise.random_signs((n,), torch.empty(0, dtype=dtype))
    with torchbayes.noise_generator(0):
        again = noise.random_signs((n,), torch.empty(0, dtype=dtype))
    assert signs.dtype == dtype and signs.shape == (n,)
    assert torch.equal(signs, again)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    s = signs.double()
    # Mean and lag-1 / lag-32 (bits of neighbouring words) correlations of fair independent
    # signs have standard deviation 1/sqrt(n) ~ 0.0022: 5 sigma is 0.011.
    assert abs(s.mean().item()) < 5 / n ** 0.5
    for lag in (1, 31, 32):
        assert abs((s[:-lag] * s[lag:]).mean().item()) < 5 / n ** 0.5
    # Every bit position of the 32-bit words is used fairly.
    per_bit = s[: n // 32 * 32].view(-1, 32).mean(0)
    assert per_bit.abs().max().item() < 5 / (n // 32) ** 0.5


def test_random_signs_shape_and_odd_sizes():
    for shape in [(1,), (3, 1, 1), (33,), (5, 7)]:
        signs = noise.random_signs(shape, torch.empty(0))
        assert signs.shape == shape and signs.abs().eq(1).all()



# ------------------------------------------------------ folded sigma and parallel noise
@pytest.mark.parametrize("kind", ["sample", "perturbation"])
@pytest.mark.parametrize("used", ["draw-only", "kl-only"])
def test_folded_gradients_with_one_output_unused(kind, used):
    # With a float prior, sigma's buffer holds sigma - sigma_p^2 / sigma after the forward
    # (functional._folded_param_grads): backward through the draw alone, or the KL alone,
    # must still equal plain autograd of the textbook formulas with the same noise.
    params = _params([(40, 30), (40,)])
    with torchbayes.noise_generator(3):
        result = BF.posterior_draws(params, kind, [SHIFTED_PRIOR, SCALAR_PRIOR], BF.KLToken())
    with torchbayes.noise_generator(3):
        eps = [noise.randn(rho.shape, rho) for _, rho in params]
    weights = [torch.randn(d.shape, dtype=d.dtype, generator=torch.Generator().manual_seed(9)) for d in result.draws]
    leaves = [t for pair in params for t in pair]
    if used == "draw-only":
        fused = sum((w * d).sum() for w, d in zip(weights, result.draws))
        plain = sum((w * _plain_draw(mu, rho, kind, e)).sum() for w, (mu, rho), e in zip(weights, params, eps))
    else:
        fused = 0.37 * result.kl
        plain = 0.37 * sum(_plain_kl(mu, rho, *p) for (mu, rho), p in zip(params, [SHIFTED_PRIOR, SCALAR_PRIOR]))
    got = torch.autograd.grad(fused, leaves, allow_unused=True)
    expected = torch.autograd.grad(plain, leaves, allow_unused=True)
    for g, e in zip(got, expected):
        if e is None or not e.any():  # e.g. perturbations do not depend on mu
            assert g is None or not g.any()
        else:  # float64, a few roundings per element
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_large_draws_match_plain_autograd(monkeypatch):
    # 2^20 + 3 weights: the noise comes from the parallel piecewise generator, the
    # gradients from the folded path; both must equal the plain formulas (float64 rounding).
    params = _params([(1024, 1025), (1024,)])
    _compare(params, "sample", [SCALAR_PRIOR, SHIFTED_PRIOR], False, monkeypatch)


def _large_draw(threads: int, seed: int | None = None, dtype=torch.float32) -> Tensor:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if seed is None:
            return noise.randn((3, 1 << 19), torch.empty(0, dtype=dtype))
        with torchbayes.noise_generator(seed):
            return noise.randn((3, 1 << 19), torch.empty(0, dtype=dtype))
    finally:
        torch.set_num_threads(old)


def test_parallel_noise_is_reproducible_whatever_the_thread_count():
    assert noise._LAYOUT is not None, "torch's generator state layout changed: draws fell back to serial"
    torch.manual_seed(5)
    first = _large_draw(2)
    torch.manual_seed(5)
    assert torch.equal(first, _large_draw(1))
    assert torch.equal(_large_draw(2, seed=7), _large_draw(3, seed=7))
    assert not torch.equal(_large_draw(2, seed=7), _large_draw(2, seed=8))
    # The global generator moves on: the next draw is new noise.
    assert not torch.equal(first, _large_draw(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parallel_noise_is_standard_normal_and_pieces_are_independent(dtype):
    x = _large_draw(2, seed=11, dtype=dtype).double().view(-1)
    n = x.numel()  # 1.5M
    assert x.dtype == torch.float64 and torch.isfinite(x).all()
    # N(0, 1): the sample mean has sd 1/sqrt(n) ~ 8e-4, the sample variance sd sqrt(2/n)
    # ~ 1.2e-3, the fourth moment (3) sd sqrt(96/n) ~ 8e-3; 5 sd bounds each.
    assert abs(x.mean().item()) < 5 / n ** 0.5
    assert abs(x.var().item() - 1.0) < 5 * (2 / n) ** 0.5
    assert abs(x.pow(4).mean().item() - 3.0) < 5 * (96 / n) ** 0.5
    # The tail: P(|x| > 3) = 0.0027, binomial sd sqrt(p (1 - p) / n) ~ 4.2e-5.
    p = 0.0026997960632601866
    assert abs(x.abs().gt(3).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    # Pieces (2^18 numbers each, own twister) are uncorrelated with each other, within and
    # across draws: each correlation has sd 1/sqrt(2^18) ~ 0.002.
    pieces = x.view(-1, noise._CHUNK)
    corr = torch.corrcoef(pieces)
    off = corr - torch.diag(torch.diagonal(corr))
    assert off.abs().max().item() < 5 / noise._CHUNK ** 0.5
    other = _large_draw(2, seed=12, dtype=dtype).double().view(-1, noise._CHUNK)
    assert (pieces * other).mean(1).abs().max().item() < 5 / noise._CHUNK ** 0.5


def test_parallel_noise_falls_back_to_one_generator(monkeypatch):
    # Without a verified state layout the draw is torch's plain serial one.
    monkeypatch.setattr(noise, "_LAYOUT", None)
    with torchbayes.noise_generator(4):
        got = noise.randn((1 << 20,), torch.empty(0))
    assert torch.equal(got, torch.randn(1 << 20, generator=torch.Generator().manual_seed(4)))
