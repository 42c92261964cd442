"""Mixed precision and devices: autocast (bfloat16 on CPU), float64 and device placement.

Every Bayesian layer family is run with every estimator it supports under
``torch.autocast("cpu", dtype=torch.bfloat16)`` and in float64, and compared with its
``torch.nn`` twin (``layer.to_torch()``, same weights). Noise is observed by wrapping
``torchbayes.nn.noise.randn`` / ``normal_`` / ``random_signs``, through which all layer randomness goes.
The ``device`` fixture also runs on CUDA when a GPU is present (skipped otherwise; CI has none).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import torchbayes
from torchbayes.nn import (
    ESTIMATORS,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose2d,
    BayesGRU,
    BayesLinear,
    BayesLSTM,
    noise,
)
from torchbayes.nn.rnn import RNN_ESTIMATORS

BF16 = torch.bfloat16

# name -> (constructor taking the Bayesian keywords, input shape)
LAYERS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "linear": (lambda **kw: BayesLinear(5, 3, **kw), (4, 5)),
    "conv1d": (lambda **kw: BayesConv1d(2, 3, 3, padding=1, **kw), (2, 2, 7)),
    "conv2d": (lambda **kw: BayesConv2d(2, 3, 3, **kw), (2, 2, 6, 6)),
    "conv3d": (lambda **kw: BayesConv3d(2, 3, 2, **kw), (2, 2, 4, 4, 4)),
    "convtranspose2d": (lambda **kw: BayesConvTranspose2d(2, 3, 3, stride=2, **kw), (2, 2, 4, 4)),
    "lstm": (lambda **kw: BayesLSTM(3, 4, **kw), (5, 2, 3)),
    "gru": (lambda **kw: BayesGRU(3, 4, **kw), (5, 2, 3)),
}
RECURRENT = ("lstm", "gru")
CASES = [pytest.param(name, est, id=f"{name}-{est}")
         for name in LAYERS for est in (RNN_ESTIMATORS if name in RECURRENT else ESTIMATORS)]

# torch.testing's default bfloat16 tolerance: rtol 1.6e-2 is two units in the last place
# (bfloat16 keeps 8 significant bits, so one ulp is at most 2**-7 = 7.8e-3 relative).
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-5}


def make(name: str, estimator: str, **kwargs) -> tuple[nn.Module, Tensor]:
    build, shape = LAYERS[name]
    layer = build(estimator=estimator, **kwargs)
    factory = {k: v for k, v in kwargs.items() if k in ("dtype", "device")}
    return layer, torch.randn(shape, **factory)


def first(output: Tensor | tuple) -> Tensor:
    """The output tensor (recurrent layers return ``(output, state)``)."""
    return output[0] if isinstance(output, tuple) else output


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)"))])
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def noise_log(monkeypatch) -> list[Tensor]:
    """Every noise tensor the layers draw during the test, in order."""
    log: list[Tensor] = []

    def recorded(draw):
        def wrapper(shape, like):
            out = draw(shape, like)
            log.append(out)
            return out
        return wrapper

    def recorded_fill(fill):
        def wrapper(out):
            log.append(fill(out))
            return out
        return wrapper

    monkeypatch.setattr(noise, "randn", recorded(noise.randn))
    monkeypatch.setattr(noise, "normal_", recorded_fill(noise.normal_))
    monkeypatch.setattr(noise, "random_signs", recorded(noise.random_signs))
    return log


def small_classifier(**kwargs) -> nn.Module:
    return nn.Sequential(BayesConv2d(1, 4, 3, **kwargs), nn.ReLU(), nn.Flatten(),
                         BayesLinear(4 * 6 * 6, 5, **kwargs))


# --------------------------------------------------------------------- (a) autocast bfloat16
@pytest.mark.parametrize("name, estimator", CASES)
def test_autocast_bf16_forward_and_elbo_backward(name, estimator):
    layer, x = make(name, estimator)
    twin = layer.to_torch()
    with torch.autocast("cpu", dtype=BF16):
        y = first(layer(x))
        expected_dtype = first(twin(x)).dtype
        kl = layer.kl_divergence()
        loss = torchbayes.elbo_loss(y.float().square().mean(), layer, num_data=100)
    assert y.dtype == expected_dtype
    assert torch.isfinite(y).all()
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    loss.backward()
    for name_, mu, rho, _ in layer.variational_parameters():
        for p in (mu, rho):
            assert p.dtype == torch.float32, name_
            assert p.grad is not None and p.grad.dtype == torch.float32, name_
            assert torch.isfinite(p.grad).all(), name_
        assert rho.grad.abs().sum() > 0, f"{name_}: no gradient reached rho"


@pytest.mark.parametrize("name, estimator", CASES)
def test_autocast_bf16_sigma_to_zero_matches_twin(name, estimator):
    # sigma = softplus(-30) ~ 1e-13: every perturbation is below float32/bfloat16 resolution
    # of the mean output, so the layer and its twin run the same bfloat16 kernels on the
    # same rounded operands and can differ by final rounding only (BF16_TOL = 2 ulp).
    layer, x = make(name, estimator, posterior_rho_init=-30.0)
    twin = layer.to_torch()
    with torch.autocast("cpu", dtype=BF16):
        y = first(layer(x))
        expected = first(twin(x))
    if name in RECURRENT and estimator == "flipout":
        # The flipout recurrence is not torch's kernel: its matmuls run in bfloat16 under
        # autocast and its gate arithmetic in float32, while CPU torch runs LSTM wholly in
        # bfloat16 and GRU wholly in float32. Each gate pre-activation sums 7 products
        # (|w| <= 1/2, |x| ~ 1, |h| < 1), each operand rounded to bfloat16 in one of the two
        # (<= 2**-9 relative): <= 7 * 0.5 * 2 * 2**-9 ~ 7e-3 per step, and the gates are
        # contractions (sigmoid' <= 1/4, tanh' <= 1). 3e-2 allows 4 such steps of drift
        # (measured over 30 seeds: at most 4e-3).
        torch.testing.assert_close(y, expected, rtol=0, atol=3e-2)
    else:
        torch.testing.assert_close(y, expected, **BF16_TOL)


# ------------------------------------------------------------------------- (b) float64
@pytest.mark.parametrize("name, estimator", CASES)
def test_float64_outputs_noise_and_kl(name, estimator, noise_log):
    layer, x = make(name, estimator, dtype=torch.float64)
    y = first(layer(x))
    kl = layer.kl_divergence()
    assert y.dtype == torch.float64 and kl.dtype == torch.float64
    assert noise_log, "the layer drew no noise"
    assert {t.dtype for t in noise_log} == {torch.float64}
    # posterior-mean mode computes in float64 too and agrees with the float64 twin
    layer.deterministic = True
    torch.testing.assert_close(first(layer(x)), first(layer.to_torch()(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_double_converts_parameters_and_priors(name, noise_log):
    layer, x = make(name, "flipout" if name in RECURRENT else "local")
    layer = layer.double()
    for _, mu, rho, prior in layer.variational_parameters():
        assert mu.dtype == rho.dtype == torch.float64
        assert all(b.dtype == torch.float64 for b in prior.buffers())
    assert first(layer(x.double())).dtype == torch.float64
    assert layer.kl_divergence().dtype == torch.float64
    assert {t.dtype for t in noise_log} == {torch.float64}


class _WithKL(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return first(self.layer(x)), self.layer.kl_divergence()


TINY = {
    "linear": (lambda **kw: BayesLinear(3, 2, **kw), (2, 3)),
    "conv1d": (lambda **kw: BayesConv1d(1, 2, 2, **kw), (1, 1, 4)),
    "convtranspose2d": (lambda **kw: BayesConvTranspose2d(1, 1, 2, **kw), (1, 1, 2, 2)),
    "lstm": (lambda **kw: BayesLSTM(2, 1, **kw), (2, 1, 2)),
    "gru": (lambda **kw: BayesGRU(2, 1, **kw), (2, 1, 2)),
}


@pytest.mark.parametrize("name, estimator", [
    pytest.param(name, est, id=f"{name}-{est}")
    for name in TINY for est in (RNN_ESTIMATORS if name in RECURRENT else ESTIMATORS)])
def test_float64_gradcheck_with_fixed_noise(name, estimator):
    build, shape = TINY[name]
    model = _WithKL(build(estimator=estimator, dtype=torch.float64, posterior_rho_init=-1.0))
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def fn(x, *values):
        # The same seed in every call: the function of (x, mu, rho) is deterministic.
        with torchbayes.noise_generator(3):
            return torch.func.functional_call(model, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


# ---------------------------------------------------------------------------- (c) devices
@pytest.mark.parametrize("name, estimator", CASES)
def test_outputs_and_noise_follow_the_device(name, estimator, device, noise_log):
    layer, x = make(name, estimator, device=device)
    out = layer(x)
    tensors = list(out) if isinstance(out, tuple) else [out]
    tensors = [t for item in tensors for t in (item if isinstance(item, tuple) else (item,))]
    assert all(t.device == x.device for t in tensors)
    assert layer.kl_divergence().device == x.device
    assert noise_log and all(t.device == x.device for t in noise_log)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cpu_noise_generator_drives_a_model_on_the_device(estimator, device):
    # noise_generator(seed) makes a CPU generator; on another device the noise is drawn on
    # the CPU and moved, so the device model sees exactly the CPU model's noise.
    cpu_model = small_classifier(estimator=estimator)
    model = small_classifier(estimator=estimator).to(device)
    model.load_state_dict(cpu_model.state_dict())
    x = torch.rand(3, 1, 8, 8)
    with torchbayes.noise_generator(7):
        y = model(x.to(device))
    with torchbayes.noise_generator(7):
        expected = cpu_model(x)
    with torchbayes.noise_generator(8):
        other = model(x.to(device))
    assert y.device == x.to(device).device
    # Same noise, same weights: only the devices' float32 kernels differ (cuDNN may use
    # TF32, 10 mantissa bits: ~1e-3 relative on outputs of size ~1).
    torch.testing.assert_close(y.cpu(), expected, rtol=2e-3, atol=2e-3)
    assert not torch.allclose(other.cpu(), expected, rtol=2e-3, atol=2e-3)
    # A generator on the device itself works too and is reproducible.
    with torchbayes.noise_generator(torch.Generator(device=device).manual_seed(5)):
        a = model(x.to(device))
    with torchbayes.noise_generator(torch.Generator(device=device).manual_seed(5)):
        b = model(x.to(device))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_predict_results_live_on_the_input_device(device):
    model = small_classifier().to(device)
    x = torch.rand(6, 1, 8, 8, device=device)
    result = torchbayes.predict(model, x, 8, seed=0)
    for field in ("samples", "mean", "probabilities", "predictive_entropy", "expected_entropy",
                  "mutual_information", "predicted_class", "confidence"):
        assert getattr(result, field).device == x.device, field
    regression = torchbayes.predict(model, x, 4, task="regression", seed=0)
    assert regression.variance.device == x.device


def test_predict_rejects_input_on_another_device_or_dtype(device):
    model = small_classifier().to(device)
    elsewhere = torch.device("meta") if device.type == "cpu" else torch.device("cpu")
    with pytest.raises(ValueError, match=r"x is on .* but the model's parameters are on"):
        torchbayes.predict(model, torch.rand(2, 1, 8, 8, device=elsewhere), 4)
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the model's parameters have dtype "
                                         r"torch.float32"):
        torchbayes.predict(model, torch.rand(2, 1, 8, 8, device=device, dtype=torch.float64), 4)
    assert all(m.training for m in model.modules())  # the failed calls left the model as it was


# ----------------------------------------------------------------- (d) predict, precisions
def test_predict_float64():
    model = small_classifier().double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    result = torchbayes.predict(model, x, 16, seed=0)
    assert result.probabilities.dtype == result.mean.dtype == torch.float64
    assert torch.isfinite(result.probabilities).all()
    # softmax in float64: rows sum to 1 up to a few float64 ulps (1e-16 each)
    torch.testing.assert_close(result.mean.sum(-1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (result.mutual_information >= -1e-12).all()


def test_predict_under_autocast_bf16_summarises_in_float32():
    model = small_classifier(posterior_rho_init=-2.0)
    x = torch.rand(16, 1, 8, 8)
    with torch.autocast("cpu", dtype=BF16):
        result = torchbayes.predict(model, x, 32, seed=0)
    reference = torchbayes.predict(model, x, 32, seed=0)
    assert result.probabilities.dtype == result.mean.dtype == torch.float32
    assert torch.isfinite(result.probabilities).all()
    # float32 softmax of the (bfloat16) logits: rows sum to 1 within float32 rounding
    torch.testing.assert_close(result.mean.sum(-1), torch.ones(16), rtol=0, atol=1e-5)
    # Same seed, same weight draws: only bfloat16 arithmetic separates the two. The logits
    # (|z| < 3, asserted) carry a few roundings of 2**-8 relative each, say <= 3 * 3 * 2**-8
    # = 0.035; softmax moves each probability by at most half the largest logit change (the
    # rows of its Jacobian have absolute sums 2 p (1 - p) <= 1/2): <= 0.018 < 0.02.
    assert reference.samples.abs().max() < 3
    torch.testing.assert_close(result.mean, reference.mean, rtol=0, atol=0.02)
    assert (result.mutual_information >= -1e-6).all()
