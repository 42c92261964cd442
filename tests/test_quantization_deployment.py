"""INT8 deployment of Bayesian CNNs: deterministic layers in INT8, BatchNorm folding, ReLU
fusion, channels-last outputs, one-position convolutions and INT8 checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.nn import BayesConv2d, BayesLinear, noise_generator, posterior_mean
from torchbayes.nn.vectorized import sample_groups
from torchbayes.prediction.graph import cached_split
from torchbayes.quantization import (
    QuantizedBayesConv2d,
    QuantizedBayesLinear,
    QuantizedConv2d,
    QuantizedLinear,
    kernels,
    quantize,
)


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial posteriors (sigma in [0.02, 0.2]) and BatchNorm statistics."""
    with torch.no_grad():
        for _, layer in torchbayes.nn.iter_bayesian_modules(model):
            for _, mu, rho, _ in layer.variational_parameters():
                mu.normal_(0.0, 0.3)
                rho.copy_(torchbayes.nn.functional.inverse_softplus(torch.empty_like(rho).uniform_(0.02, 0.2)))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class Block(nn.Module):
    """A residual block with a custom forward, as torchvision writes them (shared ReLU)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.head_conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # 4x4 -> 2x2
        self.last_conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)  # 2x2 -> 1x1: one position
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.block(self.stem(x)), 2)
        x = F.relu(self.last_conv(F.relu(self.head_conv(x))))
        return self.fc(torch.flatten(x, 1))


def _model(include: list[str] | None) -> nn.Module:
    torch.manual_seed(0)
    return _randomize(torchbayes.dnn_to_bnn(SmallResNet().eval(), include=include, moped=False))


def test_deterministic_layers_become_int8_with_batchnorm_and_relu_folded():
    model = _model(["fc"])
    qmodel = quantize(model, torch.rand(64, 1, 8, 8))
    assert isinstance(qmodel.stem[0], QuantizedConv2d) and isinstance(qmodel.stem[1], nn.Identity)
    assert qmodel.stem[0].fused_relu and isinstance(qmodel.stem[2], nn.Identity)  # ReLU fused, removed
    block = qmodel.block
    assert isinstance(block.conv1, QuantizedConv2d) and isinstance(block.bn1, nn.Identity)
    assert block.conv1.fused_relu and not block.conv2.fused_relu  # conv2's output meets the sum first
    assert isinstance(block.relu, nn.ReLU)  # shared: called twice, so it stays
    assert isinstance(qmodel.fc, QuantizedBayesLinear)
    # Every convolution's output only meets layout-neutral operations before the flatten.
    assert all(m.channels_last_output for m in qmodel.modules() if isinstance(m, QuantizedConv2d))
    # The float model is untouched.
    assert isinstance(model.stem[1], nn.BatchNorm2d) and isinstance(model.block.conv1, nn.Conv2d)


def test_bayesian_only_keeps_deterministic_layers_float():
    qmodel = quantize(_model(["fc"]), bayesian_only=True)
    assert type(qmodel.stem[0]) is nn.Conv2d and isinstance(qmodel.stem[1], nn.BatchNorm2d)
    assert isinstance(qmodel.fc, QuantizedBayesLinear)


def test_int8_network_matches_float_within_quantization_error():
    """Posterior means: 7 INT8 layers in a row against the float network.

    Each layer rounds its input to 1/254 of the calibrated range and its weights to
    1/254 of the per-channel range: about 0.4% relative error per layer at worst,
    typically far less (errors of many products average out). Over 7 layers 5% of the
    logits' range bounds the worst case with room; a wrong fold (a BatchNorm applied
    twice or dropped, a missing bias) moves logits by tens of percent.
    """
    model = _model(["block.conv2", "fc"])
    x = torch.rand(32, 1, 8, 8)
    qmodel = quantize(model, torch.rand(256, 1, 8, 8))
    assert isinstance(qmodel.block.conv2, QuantizedBayesConv2d) and isinstance(qmodel.block.bn2, nn.Identity)
    with posterior_mean(model), posterior_mean(qmodel):
        reference, out = model(x), qmodel(x)
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max()


def test_batchnorm_folded_into_a_bayesian_conv_is_exact_in_distribution():
    """BN(conv_W(x)) with W ~ N(mu, sigma^2): the folded layer's sampled moments match."""
    torch.manual_seed(1)
    conv, bn = BayesConv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)
    model = _randomize(nn.Sequential(conv, bn))
    qmodel = quantize(model)
    assert isinstance(qmodel[1], nn.Identity)
    x = torch.randn(1, 2, 4, 4)
    n = 3000
    tiled = x.expand(n, 2, 4, 4).contiguous()
    with torch.no_grad(), noise_generator(0), sample_groups(n, shared_input=tiled):
        out = qmodel(tiled)
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        mean = bn(F.conv2d(x, conv.weight_mu))[0]
        var = F.conv2d(x**2, conv.posterior_sigma("weight") ** 2)[0] * (a**2)[:, None, None]
    # 5 standard errors of the sample mean and variance (relative sd sqrt(2/(n-1))), plus
    # 4% of the output range for the INT8 rounding of x, mu and sigma (1/254 each).
    assert ((out.mean(0) - mean).abs() <= 5 * (var / n).sqrt() + 0.04 * mean.abs().max()).all()
    assert ((out.var(0) / var - 1).abs() <= 5 * math.sqrt(2 / (n - 1)) + 0.05).all()


def test_one_position_conv_samples_by_local_reparameterization_without_packing(monkeypatch):
    """A conv with one output position is the linear map of its taps: exact local
    reparameterization, and no kernel is drawn or packed per sample."""
    torch.manual_seed(2)
    conv = BayesConv2d(4, 6, 3, stride=2, padding=1)  # 2x2 input -> 1 position, 4 taps on the input
    model = _randomize(nn.Sequential(conv))
    qmodel = quantize(model)
    packs = []
    original = kernels.PackedConv.__init__

    def counting(self, *args, **kwargs):
        packs.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(kernels.PackedConv, "__init__", counting)
    x = torch.randn(1, 4, 2, 2)
    n = 3000
    result = torchbayes.predict(qmodel, x, n, seed=0, task="regression")
    assert not packs
    samples = result.samples[:, 0, :, 0, 0]
    sigma_w, sigma_b = conv.posterior_sigma("weight"), conv.posterior_sigma("bias")
    with torch.no_grad():
        mean = F.conv2d(x, conv.weight_mu, conv.bias_mu, stride=2, padding=1)[0, :, 0, 0]
        var = F.conv2d(x**2, sigma_w**2, sigma_b**2, stride=2, padding=1)[0, :, 0, 0]
    # As above: 5 standard errors plus the INT8 rounding of x, mu and sigma^2.
    assert ((samples.mean(0) - mean).abs() <= 5 * (var / n).sqrt() + 0.04 * mean.abs().max()).all()
    assert ((samples.var(0) / var - 1).abs() <= 5 * math.sqrt(2 / (n - 1)) + 0.05).all()


@pytest.mark.parametrize("include", [["fc"], ["last_conv", "fc"], None])
def test_prediction_matches_float_monte_carlo(include):
    """Predictive mean and variance of INT8 and FP32 Monte Carlo agree (last layer,
    last layers, fully Bayesian), and the deterministic prefix runs once per example."""
    model = _model(include)
    qmodel = quantize(model, torch.rand(256, 1, 8, 8))
    x = torch.rand(6, 1, 8, 8)
    n = 600
    fp32 = torchbayes.predict(model, x, n, seed=0, outputs="logits", task="regression")
    int8 = torchbayes.predict(qmodel, x, n, seed=1, outputs="logits", task="regression")
    sd = fp32.samples.std(0)
    # Two independent means of n draws differ by sd * sqrt(2 / n) at one sd: 5 of them,
    # plus 5% of the logits' range for the INT8 rounding (see the matching test above).
    slack = 0.05 * fp32.mean.abs().max()
    assert ((int8.mean - fp32.mean).abs() <= 5 * sd * math.sqrt(2 / n) + slack).all()
    # Ratio of sample sds: relative sd about sqrt(1 / n) each; 5 of them, plus 10% for the
    # rounding of the posterior sigmas (1/254 of their max per channel) carried through.
    assert ((int8.samples.std(0) / sd - 1).abs() <= 5 * math.sqrt(1 / n) + 0.10).all()
    if include == ["fc"]:
        split = cached_split(qmodel)
        suffix = [n.target for n in split.suffix.graph.nodes if n.op == "call_module"]
        assert suffix == ["fc"]  # everything else runs once, in INT8


def test_int8_checkpoint_loads_with_weights_only_into_a_fresh_quantized_model():
    model = _model(["last_conv", "fc"])
    qmodel = quantize(model, torch.rand(64, 1, 8, 8))
    buffer = io.BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    fresh = quantize(_model(["last_conv", "fc"]))  # same architecture, no calibration
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    x = torch.rand(5, 1, 8, 8)
    with posterior_mean(qmodel), posterior_mean(fresh):
        assert torch.equal(qmodel(x), fresh(x))

    # Tensor bytes (a file of so small a model is mostly zip headers): int8 weights and
    # int8 (mu, sigma) pairs against float32 weights and (mu, rho) pairs, plus scales.
    def nbytes(state: dict) -> int:
        return sum(t.numel() * t.element_size() for t in state.values())

    assert nbytes(model.state_dict()) > 3.5 * nbytes(qmodel.state_dict())


class ViewAfterConv(nn.Module):
    """A forward that views a convolution's output: it must stay contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = BayesLinear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def test_conv_output_stays_contiguous_where_code_could_notice():
    qmodel = quantize(ViewAfterConv().eval())
    assert isinstance(qmodel.conv, QuantizedConv2d) and not qmodel.conv.channels_last_output
    assert qmodel(torch.rand(3, 1, 6, 6)).shape == (3, 3)
    returned = quantize(nn.Sequential(nn.Conv2d(1, 2, 3), BayesConv2d(2, 2, 3)).eval())
    out = returned(torch.rand(2, 1, 7, 7))
    assert out.is_contiguous() and not returned[0].channels_last_output  # the caller gets it


def test_deterministic_linear_twin_matches_float_layer():
    torch.manual_seed(3)
    layer = nn.Linear(20, 7)
    qlayer = QuantizedLinear.from_float(layer)
    x = torch.randn(16, 20)
    reference = layer(x).detach()
    # Rounding of x (1/254 of its range) and of each weight row (1/254 of its max): the
    # products' worst case stays within 2% of the output range for these sizes.
    assert (qlayer(x) - reference).abs().max() <= 0.02 * reference.abs().max()
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        QuantizedLinear.from_float(BayesLinear(20, 7))


def test_quantize_command_reports_float_and_int8_side_by_side(tmp_path):
    import json

    from torchbayes.cli.main import main

    bnn, report = tmp_path / "bnn.pt", tmp_path / "report"
    common = ["--dataset", "digits", "--model", "mlp", "--ood-classes", "8,9", "--quiet"]
    train = ["train", *common, "--pretrain-epochs", "1", "--epochs", "1", "--num-samples", "4", "--out", str(bnn)]
    assert main(train) == 0
    assert main(["quantize", str(bnn), "--report", str(report), "--quiet"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert list(results["models"]) == ["Bayesian mlp FP32", "Bayesian mlp INT8"]
    fp32, int8 = (results["models"][name]["metrics"] for name in results["models"])
    # Same test images and seed; INT8 rounding moves few of the ~450 test predictions.
    assert abs(fp32["accuracy"] - int8["accuracy"]) <= 0.03
    assert (tmp_path / "bnn-int8.pt").exists()
