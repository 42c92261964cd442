"""INT8 post-training quantization (torchbayes.quantization)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.nn import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose2d,
    BayesLinear,
    noise_generator,
    posterior_mean,
)
from torchbayes.nn.vectorized import sample_groups
from torchbayes.quantization import (
    QuantizedBayesConv2d,
    QuantizedBayesLinear,
    convert,
    kernels,
    prepare,
    quantize,
)


def _randomize_posterior(model: nn.Module, sigma_range: tuple[float, float] = (0.02, 0.2)) -> nn.Module:
    """Give every Bayesian layer non-trivial means and per-weight standard deviations."""
    lo, hi = sigma_range
    with torch.no_grad():
        for _, layer in torchbayes.nn.iter_bayesian_modules(model):
            for _, mu, rho, _ in layer.variational_parameters():
                mu.normal_(0.0, 0.3)
                sigma = torch.empty_like(rho).uniform_(lo, hi)
                rho.copy_(torchbayes.nn.functional.inverse_softplus(sigma))
    return model


def _quantize_layer(layer: nn.Module) -> nn.Module:
    return quantize(nn.Sequential(layer).eval())[0]


def _input_step(x: torch.Tensor) -> float:
    """The quantization step of a dynamically quantized activation (see kernels)."""
    return (max(x.max().item(), 0.0) - min(x.min().item(), 0.0)) / 254.0


def _mean_error_bound(x: torch.Tensor, mu: torch.Tensor, op) -> torch.Tensor:
    """Worst-case |op(x_q, mu_q) - op(x, mu)| from the two rounding errors.

    x is rounded by at most step/2 per element, mu by at most scale_c/2 (its per-channel
    step), so the error of a linear op is <= op(step/2, |mu_q|) + op(|x|, scale/2) +
    op(step/2, scale/2).
    """
    q, scale = kernels.quantize_per_channel(mu)
    mu_q = kernels.dequantize_per_channel(q, scale)
    half_w = (scale / 2).reshape(-1, *([1] * (mu.dim() - 1))).expand_as(mu)
    half_x = torch.full_like(x, _input_step(x) / 2)
    return op(half_x, mu_q.abs()) + op(x.abs(), half_w) + op(half_x, half_w)


# --------------------------------------------------------------------- accuracy


def test_linear_posterior_mean_within_quantization_error_bound():
    layer = _randomize_posterior(BayesLinear(50, 20)).eval()
    x = torch.randn(64, 50)
    qlayer = _quantize_layer(layer)
    assert isinstance(qlayer, QuantizedBayesLinear)
    with posterior_mean(layer), posterior_mean(qlayer):
        expected, got = layer(x), qlayer(x)
    bound = _mean_error_bound(x, layer.weight_mu.detach(), lambda a, w: F.linear(a, w))
    # float32 accumulation slack on top of the exact integer bound
    assert ((got - expected).abs() <= bound + 1e-4).all()
    # and the error is small in absolute terms: a few percent of the output scale
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


CONV_CASES = [
    (BayesConv1d, dict(kernel_size=3, padding=1), (4, 3, 20)),
    (BayesConv2d, dict(kernel_size=3, stride=2, padding=1, dilation=2), (4, 4, 12, 12)),
    (BayesConv2d, dict(kernel_size=3, padding="same", padding_mode="reflect"), (4, 4, 9, 9)),
    (BayesConv2d, dict(kernel_size=4, padding="same"), (4, 4, 9, 9)),  # asymmetric "same"
    (BayesConv2d, dict(kernel_size=3, groups=2, padding=1, bias=False), (4, 4, 9, 9)),
    (BayesConv3d, dict(kernel_size=3, padding=1), (2, 4, 6, 6, 6)),
]


@pytest.mark.parametrize("cls, kwargs, shape", CONV_CASES)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's, float layer
def test_conv_posterior_mean_within_quantization_error_bound(cls, kwargs, shape):
    layer = _randomize_posterior(cls(shape[1], 6, **kwargs)).eval()
    x = torch.randn(shape)
    qlayer = _quantize_layer(layer)
    with posterior_mean(layer), posterior_mean(qlayer):
        expected, got = layer(x), qlayer(x)
    assert got.shape == expected.shape

    def op(a, w):  # the layer's own convolution (padding modes included), no bias
        return layer._op(a, w, None)

    bound = _mean_error_bound(x, layer.weight_mu.detach(), op)
    assert ((got - expected).abs() <= bound + 1e-4).all()


def test_unbatched_conv_input():
    layer = _randomize_posterior(BayesConv2d(3, 5, 3)).eval()
    qlayer = _quantize_layer(layer)
    x = torch.randn(3, 8, 8)
    with posterior_mean(qlayer):
        assert torch.equal(qlayer(x), qlayer(x.unsqueeze(0)).squeeze(0))


def _sampled_moments_check(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                           mean_slack: torch.Tensor, var_rel_slack: float) -> None:
    n = samples.shape[0]
    # 5 standard errors: the sample mean has sd sqrt(var / n); the sample variance of a
    # Gaussian has relative sd sqrt(2 / (n - 1)). Quantization adds the given slack.
    assert ((samples.mean(0) - mean).abs() <= 5 * (var / n).sqrt() + mean_slack).all()
    rel = samples.var(0) / var - 1
    assert (rel.abs() <= 5 * math.sqrt(2 / (n - 1)) + var_rel_slack).all()


def test_linear_sampling_statistics_match_float_closed_form():
    layer = _randomize_posterior(BayesLinear(30, 6)).eval()
    qlayer = _quantize_layer(layer)
    x = torch.randn(1, 30).expand(4000, 30).contiguous()  # 4000 draws for one input
    out = qlayer(x)
    sigma_w, sigma_b = layer.posterior_sigma("weight"), layer.posterior_sigma("bias")
    mean = F.linear(x[:1], layer.weight_mu, layer.bias_mu)[0].detach()
    var = (F.linear(x[:1] ** 2, sigma_w ** 2) + sigma_b ** 2)[0].detach()
    bound = _mean_error_bound(x[:1], layer.weight_mu.detach(), lambda a, w: F.linear(a, w))[0]
    # var path: sigma^2 per channel rounded by <= 1/254 of its max, x^2 by 1/254 of max x^2;
    # 4% relative covers both for sigma in [0.02, 0.2] (the ratio max/mean of sigma^2 <= ~8)
    _sampled_moments_check(out.detach(), mean, var, bound, 0.04)


def test_conv_sampling_statistics_and_spatial_correlation_match_float():
    """Kernel draws: per-position moments AND the covariance of neighbouring positions."""
    layer = _randomize_posterior(BayesConv1d(2, 3, 3, bias=False)).eval()
    qlayer = _quantize_layer(layer)
    x = torch.randn(1, 2, 6)
    n = 2000
    tiled = x.expand(n, 2, 6).contiguous()
    # n independent kernel draws in one pass (the path torchbayes.predict takes)
    with noise_generator(0), sample_groups(n, shared_input=tiled):
        out = qlayer(tiled)  # (n, C_out, L_out)
    var_w = layer.posterior_sigma("weight").detach() ** 2
    mean = F.conv1d(x, layer.weight_mu.detach())[0]
    var = F.conv1d(x ** 2, var_w)[0]
    bound = _mean_error_bound(x, layer.weight_mu.detach(), lambda a, w: F.conv1d(a, w))[0]
    _sampled_moments_check(out, mean, var, bound, 0.05)
    # Positions 0 and 1 share the kernel: cov = sum_k x[k] x[k+1] var_w[k] (closed form).
    cov = F.conv1d(x[..., :-1] * x[..., 1:], var_w)[0, :, 0]
    centred = out - out.mean(0)
    sample_cov = (centred[:, :, 0] * centred[:, :, 1]).mean(0)
    # Monte Carlo sd of a sample covariance <= sqrt(var_0 var_1 (1 + rho^2) / n) <= sqrt(2 var_0 var_1 / n)
    se = (2 * var[:, 0] * var[:, 1] / out.shape[0]).sqrt()
    assert ((sample_cov - cov).abs() <= 5 * se + 0.05 * cov.abs()).all()


def test_vectorized_prediction_matches_one_sample_per_pass():
    """torchbayes.predict's sample groups give the same predictive distribution as single passes."""
    model = _randomize_posterior(nn.Sequential(BayesConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                               BayesLinear(4 * 6 * 6, 3))).eval()
    qmodel = quantize(model)
    x = torch.rand(4, 1, 8, 8)
    n = 400
    grouped = torchbayes.predict(qmodel, x, n, chunk_size=n, seed=0).samples
    single = torch.stack([qmodel(x) for _ in range(n)])
    sd = single.std(0)
    # difference of two independent means of n draws has sd sd * sqrt(2 / n): 5 SE; the
    # ratio of two sample sds has relative sd about sqrt(1 / n): 5 of them
    assert ((grouped.mean(0) - single.mean(0)).abs() <= 5 * sd * math.sqrt(2 / n)).all()
    assert ((grouped.std(0) / sd - 1).abs() <= 5 * math.sqrt(1 / n)).all()
    shared = torchbayes.predict(qmodel, x, 8, shared_weights=True, seed=0)
    assert shared.samples.shape == (8, 4, 3) and torch.isfinite(shared.samples).all()


@pytest.fixture(scope="module")
def digits_mlp(digits_ood) -> nn.Module:
    """A small Bayesian MLP trained on digits 0-7 (trained once for the module)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), BayesLinear(64, 64), nn.ReLU(), BayesLinear(64, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    n = len(digits_ood.train_x)
    for _ in range(8):
        for idx in torch.randperm(n).split(64):
            nll = F.cross_entropy(model(digits_ood.train_x[idx]), digits_ood.train_y[idx])
            loss = torchbayes.elbo_loss(nll, model, n)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_accuracy_calibration_and_ood_preserved_on_digits(digits_ood, digits_mlp):
    from torchbayes.metrics import expected_calibration_error, ood_auroc

    model = digits_mlp
    qmodel = quantize(model)
    x, y = digits_ood.test_x, digits_ood.test_y
    with posterior_mean(model), posterior_mean(qmodel):
        changed = (model(x).argmax(-1) != qmodel(x).argmax(-1)).float().mean().item()
    # deterministic: only the rounding errors differ; at most 1% of the test digits flip
    assert changed <= 0.01
    results = {}
    for name, m in (("fp32", model), ("int8", qmodel)):
        test = torchbayes.predict(m, x, 256, seed=0)
        ood = torchbayes.predict(m, digits_ood.ood_x, 256, seed=1)
        results[name] = ((test.predicted_class == y).float().mean().item(),
                         expected_calibration_error(test.mean, y).item(),
                         ood_auroc(test.mutual_information, ood.mutual_information).item())
    (acc32, ece32, auc32), (acc8, ece8, auc8) = results["fp32"], results["int8"]
    assert acc32 > 0.9  # the model learned something
    # 256-sample predictions differ by Monte Carlo noise as well as quantization (two
    # FP32 runs with other seeds differ by ~0.005 in each); 1.5 points of 270 test
    # digits is 4 digits, and 0.02 is the bound for ECE and the MI AUROC.
    assert abs(acc8 - acc32) <= 0.015
    assert abs(ece8 - ece32) <= 0.02
    assert abs(auc8 - auc32) <= 0.02


# ------------------------------------------------------------------ save / load


def _mixed_model() -> nn.Module:
    return _randomize_posterior(nn.Sequential(
        nn.Flatten(), BayesLinear(64, 200), nn.ReLU(), nn.Unflatten(1, (1, 200)),
        BayesConv1d(1, 4, 3), nn.Flatten(), BayesLinear(4 * 198, 8))).eval()


def test_state_dict_round_trip_with_weights_only_and_is_smaller(digits_ood):
    model = _mixed_model()
    qmodel = quantize(model, digits_ood.train_x[:128])
    buffer = io.BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    fp32 = io.BytesIO()
    torch.save(model.state_dict(), fp32)
    assert fp32.getbuffer().nbytes >= 3 * buffer.getbuffer().nbytes
    buffer.seek(0)
    restored = quantize(_mixed_model())
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = digits_ood.test_x[:16]
    with noise_generator(3):
        a = qmodel(x)
    with noise_generator(3):
        b = restored(x)
    assert torch.equal(a, b)
    assert torch.equal(restored[1].input_range, qmodel[1].input_range)


# ------------------------------------------------------------- flows and modes


def test_calibration_makes_outputs_independent_of_the_batch(digits_ood, digits_mlp):
    model = digits_mlp
    prepared = prepare(model)
    with torch.no_grad():
        prepared(digits_ood.train_x[:256])
    qmodel = convert(prepared)
    assert torch.isfinite(qmodel[1].input_range).all()
    x = digits_ood.test_x[:32]
    with posterior_mean(qmodel):
        # static ranges: each row's result does not depend on the other rows
        assert torch.equal(qmodel(x)[:1], qmodel(x[:1]))
    same = quantize(model, digits_ood.train_x[:256])
    assert torch.equal(same[1].input_range, qmodel[1].input_range)
    # the prepared model is unchanged by convert, and the float model by both
    assert isinstance(model[1], BayesLinear) and prepared[1]._observed is not None


def test_resnet18_from_dnn_to_bnn_quantizes_and_predicts():
    torchvision = pytest.importorskip("torchvision")
    dnn_to_bnn = getattr(torchbayes, "dnn_to_bnn", None)
    if dnn_to_bnn is None:
        pytest.skip("torchbayes.dnn_to_bnn is not available")
    model = dnn_to_bnn(torchvision.models.resnet18(num_classes=10)).eval()
    qmodel = quantize(model)
    kinds = {type(m) for m in qmodel.modules()}
    assert QuantizedBayesConv2d in kinds and QuantizedBayesLinear in kinds
    assert not any(isinstance(m, (BayesConv2d, BayesLinear)) for m in qmodel.modules())
    result = torchbayes.predict(qmodel, torch.rand(2, 3, 32, 32), 3, seed=0)
    assert result.samples.shape == (3, 2, 10)
    assert torch.isfinite(result.samples).all() and torch.isfinite(result.mutual_information).all()


def test_unsupported_layers_stay_float_and_the_model_is_not_modified():
    model = nn.Sequential(BayesConvTranspose2d(2, 3, 3), nn.Flatten(), BayesLinear(3 * 7 * 7, 4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize(model)
    assert isinstance(qmodel[0], BayesConvTranspose2d) and isinstance(qmodel[2], QuantizedBayesLinear)
    assert isinstance(model[2], BayesLinear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert qmodel(torch.rand(2, 2, 5, 5)).shape == (2, 4)


def test_float_fallback_kernels_agree_with_onednn(monkeypatch):
    if not kernels.onednn_available():
        pytest.skip("oneDNN INT8 kernels not available here")
    model = _randomize_posterior(nn.Sequential(BayesConv2d(2, 4, 3, padding=1), nn.ReLU(),
                                               nn.Flatten(), BayesLinear(4 * 25, 3))).eval()
    x = torch.randn(5, 2, 5, 5)
    with posterior_mean(model):
        onednn = quantize(model)(x)
        monkeypatch.setattr(kernels, "_ONEDNN", False)
        fallback = quantize(model)(x)
    # same integers, float instead of int32 accumulation: only float rounding differs
    assert torch.allclose(onednn, fallback, atol=1e-4, rtol=1e-4)


def test_quantized_model_has_no_kl():
    qmodel = quantize(nn.Sequential(BayesLinear(3, 2)).eval())
    with pytest.raises(TypeError, match="no KL term"):
        torchbayes.kl_divergence(qmodel)


def test_no_warnings_in_normal_use(digits_ood):
    model = nn.Sequential(nn.Flatten(), BayesLinear(64, 16), nn.ReLU(), BayesLinear(16, 8)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = quantize(model, digits_ood.train_x[:64])
        torchbayes.predict(qmodel, digits_ood.test_x[:8], 4)
        convert(prepare(model))


# ------------------------------------------------------------------- bad input


def test_training_mode_is_rejected():
    model = nn.Sequential(BayesLinear(3, 2))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        quantize(model)


def test_model_without_bayesian_layers_is_rejected():
    with pytest.raises(ValueError, match="no torchbayes Bayesian layers"):
        quantize(nn.Sequential(nn.Linear(3, 2)).eval())
    with pytest.raises(TypeError, match="nn.Module"):
        quantize("not a model")  # type: ignore[arg-type]


def test_unsupported_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype must be one of"):
        quantize(nn.Sequential(BayesLinear(3, 2)).eval(), dtype="int4")


def test_calibration_data_of_the_wrong_shape_is_rejected_and_nothing_changes():
    model = nn.Sequential(nn.Flatten(), BayesLinear(64, 8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"calibration_data does not fit the model.*\(4, 1, 5, 5\)"):
        quantize(model, torch.rand(4, 1, 5, 5))
    with pytest.raises(TypeError, match="calibration_data"):
        quantize(model, 3.0)  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], BayesLinear)


def test_quantized_layer_rejects_inputs_of_the_wrong_shape():
    qmodel = quantize(nn.Sequential(BayesLinear(5, 2), BayesConv2d(1, 1, 1)).eval())
    with pytest.raises(ValueError, match="in_features=5"):
        qmodel[0](torch.rand(3, 4))
    with pytest.raises(ValueError, match="C=1"):
        qmodel[1](torch.rand(3, 2, 4, 4))


def test_non_finite_input_is_rejected():
    qmodel = quantize(nn.Sequential(BayesLinear(3, 2)).eval())
    with pytest.raises(ValueError, match="NaN or infinity"):
        qmodel(torch.tensor([[1.0, math.nan, 0.0]]))
