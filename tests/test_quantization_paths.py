"""The fast paths of the INT8 layers: shared group noise, fused ReLUs, channels-last
outputs, fixed-grid kernel draws and reused scratch buffers (torchbayes.quantization)."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.nn import BayesConv2d, BayesLinear, noise_generator, posterior_mean
from torchbayes.nn.vectorized import sample_groups
from torchbayes.quantization import kernels, quantize
from torchbayes.quantization import layers as quantization_layers
from torchbayes.quantization.layers import _KERNEL_GRID_SIGMAS

from test_quantization import _randomize_posterior  # pytest puts tests/ (no __init__) on sys.path


def _closed_form(layer: BayesLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a Bayesian linear layer's output on the rows of x."""
    sigma_w, sigma_b = layer.posterior_sigma("weight"), layer.posterior_sigma("bias")
    mean = F.linear(x, layer.weight_mu, layer.bias_mu).detach()
    var = (F.linear(x ** 2, sigma_w ** 2) + sigma_b ** 2).detach()
    return mean, var


def _check_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, rel: float) -> None:
    n = samples.shape[0]
    # 5 standard errors of the sample mean (sd sqrt(var / n)) and of the sample variance
    # (relative sd sqrt(2 / (n - 1))), plus `rel` for the INT8 rounding (as in
    # test_quantization: 8-bit x, x^2, mu and sigma^2 leave a few percent).
    assert ((samples.mean(0) - mean).abs() <= 5 * (var / n).sqrt() + rel * mean.abs() + 1e-3).all()
    assert ((samples.var(0) / var - 1).abs() <= 5 * math.sqrt(2 / (n - 1)) + rel).all()


# ------------------------------------------------------------ shared group noise


@pytest.mark.parametrize("shared_input", [False, True])
def test_group_noise_is_shared_by_a_group_and_each_example_is_exact(shared_input):
    layer = _randomize_posterior(BayesLinear(12, 5)).eval()
    qlayer = quantize(nn.Sequential(layer).eval())[0]
    x = torch.randn(3, 12)
    g = 3000
    # each group holds the 3 examples, and example 0 twice (rows 0 and 3)
    block = torch.cat([x, x[:1]])
    tiled = block.repeat(g, 1)
    with noise_generator(0), sample_groups(g, shared_input=tiled if shared_input else None):
        out = qlayer(tiled).view(g, 4, 5)
    # one noise draw per group and output unit: identical inputs of a group, identical outputs
    assert torch.equal(out[:, 0], out[:, 3])
    # ... while each example's outputs over the groups are exact posterior draws
    mean, var = _closed_form(layer, block)
    _check_moments(out, mean, var, 0.05)
    # and different groups draw independently: correlation of consecutive groups ~ 0
    # (sd 1/sqrt(g) ~ 0.018; 5 of them)
    centred = (out[:, 0] - out[:, 0].mean(0)) / out[:, 0].std(0)
    assert ((centred[1:] * centred[:-1]).mean(0).abs() < 5 / math.sqrt(g)).all()


def test_plain_forward_draws_fresh_noise_per_example():
    layer = _randomize_posterior(BayesLinear(12, 5)).eval()
    qlayer = quantize(nn.Sequential(layer).eval())[0]
    x = torch.randn(1, 12).expand(4000, 12).contiguous()
    with noise_generator(0):
        out = qlayer(x)
    assert not torch.equal(out[0], out[1])
    mean, var = _closed_form(layer, x[:1])
    _check_moments(out, mean[0], var[0], 0.05)


def test_sequence_inputs_share_one_weight_draw_per_group():
    """Extra dims take one weight draw per group, as the float layer does."""
    layer = _randomize_posterior(BayesLinear(6, 4)).eval()
    qlayer = quantize(nn.Sequential(layer).eval())[0]
    g, n, t = 5, 2, 3
    x = torch.randn(n, 1, 6).expand(n, t, 6).repeat(g, 1, 1)  # positions of an example equal
    with noise_generator(0), sample_groups(g):
        out = qlayer(x).view(g, n, t, 4)
    assert torch.equal(out[:, :, 0], out[:, :, 2])  # same weights at every position
    assert not torch.equal(out[0], out[1])  # and another draw in the next group


# ------------------------------------------------------------ fused ReLU


def test_relu_after_a_quantized_layer_is_fused_with_the_same_values():
    model = _randomize_posterior(nn.Sequential(
        BayesConv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), BayesLinear(3 * 6 * 6, 5), nn.ReLU(inplace=True),
        BayesLinear(5, 2))).eval()
    qmodel = quantize(model)
    assert isinstance(qmodel[1], nn.Identity) and isinstance(qmodel[4], nn.Identity)
    assert qmodel[0].fused_relu and qmodel[3].fused_relu and not qmodel[5].fused_relu
    assert isinstance(model[1], nn.ReLU)  # the float model is untouched
    x = torch.rand(7, 1, 8, 8)
    unfused = quantize(model)
    for layer in (unfused[0], unfused[3]):
        layer.fused_relu = False
    unfused[1], unfused[4] = nn.ReLU(), nn.ReLU()
    with posterior_mean(qmodel), posterior_mean(unfused):
        assert torch.equal(qmodel(x), unfused(x))
    # sampled: the same draws give the same values (ReLU inside the kernel or after it)
    with noise_generator(1):
        fused_out = qmodel(x)
    with noise_generator(1):
        unfused_out = unfused(x)
    assert torch.allclose(fused_out, unfused_out, atol=1e-5)
    assert (qmodel[0](x) >= 0).all()


def test_relu_with_hooks_or_not_following_a_quantized_layer_is_kept():
    relu = nn.ReLU()
    relu.register_forward_hook(lambda *args: None)
    model = nn.Sequential(BayesLinear(4, 4), relu, nn.Linear(4, 4), nn.ReLU(), BayesLinear(4, 2)).eval()
    qmodel = quantize(model, bayesian_only=True)  # the nn.Linear stays float
    assert isinstance(qmodel[1], nn.ReLU) and isinstance(qmodel[3], nn.ReLU)
    assert not qmodel[0].fused_relu
    # By default the deterministic nn.Linear is INT8 too, and its ReLU is fused into it.
    qmodel = quantize(model)
    assert isinstance(qmodel[1], nn.ReLU) and isinstance(qmodel[3], nn.Identity) and qmodel[2].fused_relu


# ------------------------------------------------------------ memory layout


class _ViewNet(nn.Module):
    """A custom forward that flattens with .view, which needs a contiguous tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(BayesConv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.head = BayesLinear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).view(x.size(0), -1))


def test_channels_last_outputs_only_where_a_flatten_follows_in_the_sequential():
    lenet_like = _randomize_posterior(nn.Sequential(
        BayesConv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), BayesConv2d(6, 4, 3), nn.ReLU(),
        nn.Flatten(), BayesLinear(4 * 3 * 3, 3))).eval()
    qmodel = quantize(lenet_like)
    assert qmodel[0].channels_last_output and qmodel[3].channels_last_output
    x = torch.rand(5, 1, 12, 12)
    y = qmodel[0](x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    # the layout never reaches the caller: Flatten reorders into the logical order
    with posterior_mean(qmodel), posterior_mean(lenet_like):
        out, ref = qmodel(x), lenet_like(x)
    assert out.is_contiguous() and torch.allclose(out, ref, atol=0.05 * ref.abs().max().item())

    view_net = _randomize_posterior(_ViewNet()).eval()
    qview = quantize(view_net)
    assert not qview.features[0].channels_last_output  # the Sequential ends without Flatten
    x = torch.rand(5, 3, 8, 8)
    assert qview.features[0](x).is_contiguous()
    assert torchbayes.predict(qview, x, 4, seed=0).samples.shape == (4, 5, 2)


def test_channels_last_input_gives_channels_last_output():
    qconv = quantize(nn.Sequential(_randomize_posterior(BayesConv2d(3, 4, 3))).eval())[0]
    x = torch.rand(2, 3, 8, 8)
    with posterior_mean(qconv):
        a = qconv(x)
        b = qconv(x.contiguous(memory_format=torch.channels_last))
    assert a.is_contiguous() and b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_quantizing_a_channels_last_activation_reads_it_in_place():
    x = torch.randn(4, 6, 5, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    a, b = kernels.quantize_activation(x), kernels.quantize_activation(cl)
    assert (a.scale, a.zero_point) == (b.scale, b.zero_point) and torch.equal(a.data, b.data)


# ------------------------------------------------------------ kernel draws


def test_kernel_draw_grid_covers_six_sigmas_and_draws_match_the_posterior():
    layer = _randomize_posterior(BayesConv2d(2, 3, 3)).eval()
    qconv = quantize(nn.Sequential(layer).eval())[0]
    mu, sigma, step = qconv._kernel_grid()
    # every weight's |mu| + 6 sigma lies on the int8 grid (no clamping short of 6 sigma)
    assert ((mu.abs() + _KERNEL_GRID_SIGMAS * sigma) <= 127.0 + 1e-4).all()
    with noise_generator(0):
        q, draw_step, _ = qconv._draw_kernels(4000)
    weights = q.float() * draw_step.view(-1, 1, 1, 1)
    mu_w = kernels.dequantize_per_channel(qconv.weight_mu_int8, qconv.weight_mu_scale)
    sd_w = kernels.dequantize_per_channel(qconv.weight_sigma_int8, qconv.weight_sigma_scale)
    # rounding on the grid adds at most step / 2 to each draw: a bias <= step / 2 and a
    # variance change <= step^2 / 4 + sd * step; 5 standard errors for 4000 draws
    half = draw_step.view(-1, 1, 1, 1) / 2
    assert ((weights.mean(0) - mu_w).abs() <= 5 * sd_w / math.sqrt(4000) + half).all()
    assert ((weights.std(0) - sd_w).abs() <= 5 * sd_w * math.sqrt(0.5 / 4000) + half).all()


# ------------------------------------------------------------ scratch buffers


@pytest.mark.parametrize("scratch_limit", [None, 0])  # kept per thread / per prediction
def test_outputs_never_alias_the_reused_buffers(monkeypatch, scratch_limit):
    if scratch_limit is not None:
        monkeypatch.setattr(quantization_layers, "_SCRATCH_MAX_NUMEL", scratch_limit)
    qmodel = quantize(_randomize_posterior(nn.Sequential(
        BayesConv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), BayesLinear(2 * 6 * 6, 6), nn.ReLU(),
        BayesLinear(6, 3))).eval())
    fresh = copy.deepcopy(qmodel)  # no buffers yet
    x1, x2 = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)
    cache: dict = {}  # one prediction's cache, shared by its passes
    with noise_generator(0), sample_groups(4, cache=cache):
        first = qmodel(x1)
    kept = first.clone()
    with noise_generator(1), sample_groups(4, cache=cache):
        second = qmodel(x2)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    with noise_generator(1), sample_groups(4):
        assert torch.equal(fresh(x2), second)  # reused buffers give the same values


def test_layers_can_run_in_several_threads_at_once():
    qmodel = quantize(_randomize_posterior(nn.Sequential(
        BayesConv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), BayesLinear(4 * 6 * 6, 64), nn.ReLU(),
        BayesLinear(64, 3))).eval())
    inputs = [torch.rand(32, 2, 8, 8) for _ in range(4)]
    expected = []
    for i, x in enumerate(inputs):
        with noise_generator(i):
            expected.append(qmodel(x))
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(20):
            with noise_generator(i):
                results[i] = qmodel(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(4))


def test_float_fallback_agrees_with_onednn_when_sampling(monkeypatch):
    if not kernels.onednn_available():
        pytest.skip("oneDNN INT8 kernels not available here")
    model = _randomize_posterior(nn.Sequential(
        BayesConv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), BayesLinear(4 * 25, 300), nn.ReLU(),
        BayesLinear(300, 3))).eval()
    x = torch.randn(256, 2, 5, 5)  # 256 x 300 outputs: the accumulate-into-zeros path too
    with noise_generator(0):
        onednn = quantize(model)(x)
    monkeypatch.setattr(kernels, "_ONEDNN", False)
    with noise_generator(0):
        fallback = quantize(model)(x)
    # same integers and noise, float instead of int32 accumulation: float rounding only
    assert torch.allclose(onednn, fallback, atol=1e-3, rtol=1e-3)


def test_calibrated_range_clamps_values_outside_it():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = kernels.quantize_activation(x, (0.0, 1.0))
    assert torch.allclose(q.dequantize(), torch.tensor([[0.0, 0.0, 0.5, 1.0]]), atol=q.scale / 2 + 1e-6)
