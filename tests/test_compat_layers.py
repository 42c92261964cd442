"""torchbayes.layers against Bayesian-Torch 0.5.0 itself (the ``reference`` fixture).

Each front door is built with the same positional arguments as the reference class
(so argument order is checked), receives the reference layer's parameters through
``load_state_dict(reference.state_dict())`` and must then agree with it on outputs,
KL values, return conventions and checkpoints.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

import torchbayes
import torchbayes.layers as tl
from torchbayes.nn import posterior_mean

PRIORS = (0.1, 0.5, 0.0, -3.0)  # prior_mean, prior_variance (a std), posterior_mu_init, posterior_rho_init

# name -> (positional args in the reference's order, input shape)
# Transposed flipout layers use in_channels == out_channels: the reference allocates
# their prior buffers as (out, in // groups, ...), which breaks its own KL otherwise.
CONFIGS = {
    "LinearReparameterization": ((5, 3, *PRIORS, True), (4, 5)),
    "LinearFlipout": ((5, 3, *PRIORS, True), (4, 5)),
    "Conv1dReparameterization": ((4, 6, 3, 2, 1, 1, 2, *PRIORS, True), (2, 4, 9)),
    "Conv2dReparameterization": ((4, 6, 3, 1, 1, 2, 2, *PRIORS, True), (2, 4, 7, 7)),
    "Conv3dReparameterization": ((2, 4, 3, *PRIORS, 1, 1, 1, 1, False), (1, 2, 4, 5, 4)),
    "ConvTranspose1dReparameterization": ((4, 6, 3, 2, 1, 1, 2, 1, *PRIORS, True), (2, 4, 6)),
    "ConvTranspose2dReparameterization": ((3, 4, 3, 2, 0, 1, 1, 1, *PRIORS, True), (2, 3, 4, 4)),
    "ConvTranspose3dReparameterization": ((2, 2, 3, 2, 1, 1, 1, 0, *PRIORS, True), (1, 2, 3, 3, 3)),
    "Conv1dFlipout": ((4, 6, 3, 1, 2, 2, 1, *PRIORS, True), (2, 4, 9)),
    "Conv2dFlipout": ((4, 6, 3, 2, 1, 1, 2, *PRIORS, True), (2, 4, 7, 7)),
    "Conv3dFlipout": ((2, 4, 3, 1, 1, 1, 1, *PRIORS, True), (1, 2, 4, 4, 4)),
    "ConvTranspose1dFlipout": ((4, 4, 3, 2, 1, 1, 2, 1, *PRIORS, True), (2, 4, 6)),
    "ConvTranspose2dFlipout": ((4, 4, 3, 2, 1, 1, 1, 2, *PRIORS, True), (2, 4, 4, 4)),
    "ConvTranspose3dFlipout": ((2, 2, 3, 2, 0, 1, 1, 1, *PRIORS, False), (1, 2, 3, 3, 3)),
}
NAMES = list(CONFIGS)
GEOMETRY = ("stride", "padding", "dilation", "groups", "output_padding")


@pytest.fixture
def ref_layers(reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference imports torch.quantization's eager API
        import bayesian_torch.layers as layers
    return layers


def _pair(ref_layers, name):
    args, shape = CONFIGS[name]
    ref = getattr(ref_layers, name)(*args)
    ours = getattr(tl, name)(*args)
    ours.load_state_dict(ref.state_dict())
    return ref, ours, torch.randn(shape)


def _as_tuple(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def test_every_reference_layer_has_a_front_door(ref_layers):
    wanted = {name for name in dir(ref_layers) if name.endswith(("Reparameterization", "Flipout"))
              and not name.startswith(("Quantized", "LSTM"))}
    assert wanted == set(NAMES)
    for name in ("BatchNorm1dLayer", "BatchNorm2dLayer", "BatchNorm3dLayer", "ReLU", "Dropout"):
        assert hasattr(tl, name)
    assert torchbayes.layers is tl


@pytest.mark.parametrize("name", NAMES)
def test_same_arguments_geometry_and_parameter_shapes(ref_layers, name):
    ref, ours, _ = _pair(ref_layers, name)
    assert isinstance(ours, torchbayes.nn.BayesianWeightLayer)  # a front door, not a copy
    assert ours.estimator == ("flipout" if "Flipout" in name else "reparameterization")
    for attr in GEOMETRY:
        if hasattr(ref, attr):
            expected = getattr(ref, attr)
            if attr != "groups":
                expected = _as_tuple(expected, ours._num_spatial_dims)
            assert getattr(ours, attr) == expected, attr
    for key, value in ref.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape
    assert ours.prior_mean == PRIORS[0] and ours.prior_variance == PRIORS[1]
    # prior_variance is used as the prior's standard deviation, as in the reference
    torch.testing.assert_close(ours.prior_weight_sigma, torch.full_like(ours.weight_mu, PRIORS[1]))


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_kl_equal_reference(ref_layers, name):
    ref, ours, x = _pair(ref_layers, name)
    # Same parameters: the KL the layer returns and kl_loss() are the reference's numbers
    # (same float32 formula, summation order aside: rtol 1e-5).
    ref_out, ref_kl = ref(x)
    out, kl = ours(x)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.kl_loss(), ref.kl_loss().detach(), rtol=1e-5, atol=1e-6)
    # Posterior-mean mode equals the reference with sigma -> 0 (rho = -30: sigma ~ 1e-13,
    # below float32 resolution of outputs ~1).
    with torch.no_grad():
        for p_name, p in ref.named_parameters():
            if p_name.startswith("rho"):
                p.fill_(-30.0)
    with posterior_mean(ours):
        torch.testing.assert_close(ours(x, return_kl=False), ref(x, return_kl=False), rtol=1e-5, atol=1e-5)
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)  # sampling, sigma -> 0


@pytest.mark.parametrize("name", ["LinearReparameterization", "LinearFlipout", "Conv2dReparameterization",
                                  "Conv2dFlipout", "ConvTranspose1dReparameterization"])
def test_kl_gradients_equal_reference(ref_layers, name):
    ref, ours, x = _pair(ref_layers, name)
    # The KL returned by forward (fused with the weight draw while training) must carry
    # the reference's gradient, and kl_loss() too.
    for kl_of in (lambda m: m(x)[1], lambda m: m.kl_loss()):
        ref.zero_grad()
        ours.zero_grad()
        kl_of(ref).backward()
        kl_of(ours).backward()
        grads = dict(ours.named_parameters())
        for key, p in ref.named_parameters():
            native = {v: k for k, v in ours._reference_keys().items()}[key]
            torch.testing.assert_close(grads[native].grad, p.grad, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", ["LinearFlipout", "Conv2dReparameterization", "ConvTranspose1dFlipout"])
def test_return_conventions(ref_layers, name):
    _, ours, x = _pair(ref_layers, name)
    out, kl = ours(x)
    assert isinstance(out, torch.Tensor) and kl.dim() == 0
    assert isinstance(ours(x, return_kl=False), torch.Tensor)
    assert ours.dnn_to_bnn_flag is False
    ours.dnn_to_bnn_flag = True  # what the reference's dnn_to_bnn sets
    assert isinstance(ours(x), torch.Tensor)
    assert isinstance(ours(x, return_kl=True), torch.Tensor)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_both_ways(ref_layers, name):
    ref, ours, _ = _pair(ref_layers, name)
    fresh_ref = getattr(ref_layers, name)(*CONFIGS[name][0])
    # ours -> reference, strict: same keys, same shapes, nothing extra (priors excluded,
    # as the reference does not save them)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh_ref.load_state_dict(ours.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(fresh_ref.state_dict()[key], value), key
        assert torch.equal(ours.state_dict()[key], value), key
    # through a file, loaded safely
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    again = getattr(tl, name)(*CONFIGS[name][0])
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(again.weight_mu, ours.weight_mu) and torch.equal(again.weight_rho, ours.weight_rho)
    # native key names are accepted too
    native = {"weight_mu": ours.weight_mu.detach() + 1, "weight_rho": ours.weight_rho.detach()}
    if ours.bias_mu is not None:
        native.update(bias_mu=ours.bias_mu.detach(), bias_rho=ours.bias_rho.detach())
    again.load_state_dict(native)
    assert torch.equal(again.weight_mu, ours.weight_mu + 1)


def test_state_dict_keys_inside_a_model_and_priors_kept(ref_layers):
    ours = nn.Sequential(tl.LinearReparameterization(3, 4, prior_variance=0.2), nn.ReLU(),
                         tl.Conv1dFlipout(1, 2, 2))
    ref = nn.Sequential(ref_layers.LinearReparameterization(3, 4), nn.ReLU(), ref_layers.Conv1dFlipout(1, 2, 2))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    # The reference's checkpoint has no priors: ours keep the constructor's.
    torch.testing.assert_close(ours[0].prior_weight_sigma, torch.full((4, 3), 0.2))
    with pytest.raises(RuntimeError, match="Missing key"):
        ours.load_state_dict({k: v for k, v in ref.state_dict().items() if "rho" not in k})


def test_reference_attribute_names_alias_native_storage(ref_layers):
    layer = tl.Conv2dReparameterization(2, 3, 3)
    assert layer.mu_kernel is layer.weight_mu and layer.rho_kernel is layer.weight_rho
    assert layer.mu_bias is layer.bias_mu and layer.rho_bias is layer.bias_rho
    linear = tl.LinearFlipout(3, 2, bias=False)
    assert linear.mu_weight is linear.weight_mu and linear.mu_bias is None and linear.prior_bias_mu is None
    # The reference's MOPED utility writes priors like this; the KL must follow, as there.
    ref = ref_layers.Conv2dReparameterization(2, 3, 3)
    layer.load_state_dict(ref.state_dict())
    new_mu = torch.randn(3, 2, 3, 3)
    for module in (layer, ref):
        module.prior_weight_mu = new_mu.clone()
        module.prior_bias_mu.data = torch.full((3,), 0.3)
        module.prior_weight_sigma.fill_(0.7)
        module.mu_kernel.data.copy_(new_mu)
    torch.testing.assert_close(layer.kl_loss(), ref.kl_loss().detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prior_sigma"):
        layer.prior_weight_sigma = -torch.ones(3, 2, 3, 3)


def test_reference_initialisation_distribution():
    layer = tl.LinearReparameterization(100, 100, posterior_mu_init=0.5, posterior_rho_init=-4.0)
    for tensor, mean in ((layer.mu_weight, 0.5), (layer.rho_weight, -4.0)):
        # 10,000 draws of N(mean, 0.1): the sample mean's std is 0.001 and the sample
        # std's is 0.1/sqrt(2*10000) = 0.0007; 5 of each.
        assert abs(tensor.mean().item() - mean) < 0.005
        assert abs(tensor.std().item() - 0.1) < 0.0035


@pytest.mark.parametrize("kwargs, argument", [
    ({"prior_variance": 0.0}, "prior_variance"),
    ({"prior_variance": -1.0}, "prior_variance"),
    ({"prior_mean": math.nan}, "prior_mean"),
    ({"prior_variance": math.inf}, "prior_variance"),
    ({"posterior_rho_init": math.nan}, "posterior_rho_init"),
])
def test_bad_reference_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tl.Conv2dFlipout(2, 3, 3, **kwargs)


def test_bad_call_is_a_clear_type_error():
    with pytest.raises(TypeError, match="Conv3dReparameterization.*kernel_size"):
        tl.Conv3dReparameterization(2, 3)
    with pytest.raises(TypeError, match="LinearFlipout.*estimator"):
        tl.LinearFlipout(2, 3, estimator="local")


# -------------------------------------------------------------- statistics
@pytest.mark.parametrize("name, shape", [("LinearFlipout", (1, 5)), ("Conv2dFlipout", (1, 2, 4, 4))])
def test_flipout_output_distribution_matches_reference(ref_layers, name, shape):
    args = (5, 3) if name == "LinearFlipout" else (2, 3, 3, 1, 1)
    ref = getattr(ref_layers, name)(*args, posterior_rho_init=-1.0)
    ours = getattr(tl, name)(*args, posterior_rho_init=-1.0)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape)
    torch.set_num_threads(1)  # thousands of tiny forwards (conftest restores the count)
    num = 3000
    with torch.no_grad():
        ours_draws = torch.stack([ours(x, return_kl=False) for _ in range(num)]).flatten(1).double()
        ref_draws = torch.stack([ref(x, return_kl=False) for _ in range(num)]).flatten(1).double()
    # Independent draws of Gaussian outputs; the difference of two sample means has std
    # sqrt(2 var/n), of two sample variances var*sqrt(2*2/(n-1)). 5 of those.
    var = ref_draws.var(0)
    mean_z = (ours_draws.mean(0) - ref_draws.mean(0)).abs() / (2 * var / num).sqrt()
    var_z = (ours_draws.var(0) - var).abs() / (var * math.sqrt(4 / (num - 1)))
    assert mean_z.max() < 5 and var_z.max() < 5, (mean_z.max(), var_z.max())


# ---------------------------------------------------- reference-style models
def _reference_style_cnn(layers):
    """A model file written for Bayesian-Torch; only ``layers`` (the import) changes."""

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = layers.Conv2dReparameterization(
                in_channels=1, out_channels=4, kernel_size=3, padding=1,
                prior_mean=0.0, prior_variance=1.0, posterior_mu_init=0.0, posterior_rho_init=-3.0)
            self.bn1 = layers.BatchNorm2dLayer(4)
            self.relu = layers.ReLU()
            self.conv2 = layers.Conv2dFlipout(4, 4, 3, stride=2)
            self.dropout = layers.Dropout(0.5)
            self.fc = layers.LinearReparameterization(4 * 3 * 3, 10)

        def forward(self, x):
            kl_sum = 0
            x, kl = self.conv1(x)
            kl_sum += kl
            x, _ = self.bn1((x, kl))
            x, _ = self.relu((x, kl))
            x, kl = self.conv2(x)
            kl_sum += kl
            x, _ = self.dropout((x, kl))
            x = torch.flatten(x, 1)
            x, kl = self.fc(x)
            kl_sum += kl
            return x, kl_sum

    return CNN()


def test_reference_style_cnn_runs_with_changed_imports(ref_layers):
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    ref, ours = _reference_style_cnn(ref_layers), _reference_style_cnn(tl)
    x = torch.rand(2, 1, 8, 8)  # a batch of 2: the reference's BatchNorm len() test bites
    ours.train()
    out, kl = ours(x)
    assert out.shape == (2, 10) and kl.dim() == 0
    out.sum().add(kl).backward()
    assert all(p.grad is not None for p in ours.parameters())
    # The whole model's checkpoint moves across; in eval mode with sigma -> 0 they agree.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rho" in name:
                p.fill_(-30.0)
    ours.load_state_dict(ref.state_dict())
    ref.eval()
    ours.eval()
    ref_out, ref_kl = ref(x)
    out, kl = ours(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torchbayes.get_kl_loss(ours), get_kl_loss(ref).detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cls, shape", [(tl.BatchNorm1dLayer, (2, 3, 5)), (tl.BatchNorm2dLayer, (2, 3, 4, 4)),
                                        (tl.BatchNorm3dLayer, (2, 3, 2, 4, 4))])
def test_tuple_passing_batchnorm(cls, shape):
    layer = cls(3)
    twin = getattr(nn, cls.__name__.replace("Layer", ""))(3)
    x = torch.randn(shape)
    out, kl = layer((x, torch.tensor(1.5)))
    assert kl == 0  # the reference drops the incoming KL too
    torch.testing.assert_close(out, twin(x))
    # A plain tensor that is a batch of two is a tensor, not an (x, kl) pair.
    torch.testing.assert_close(layer(x), twin(x))
    assert list(layer.state_dict()) == list(twin.state_dict())
    with pytest.raises(TypeError, match="pair"):
        layer((x, 0.0, 1.0))


def test_tuple_passing_relu_and_dropout():
    x = torch.randn(4, 6)
    out, kl = tl.ReLU()((x, 0.3))
    assert kl == 0 and torch.equal(out, x.clamp_min(0))
    dropout = tl.Dropout(0.5).eval()
    assert torch.equal(dropout([x, 0.0])[0], x) and torch.equal(dropout(x), x)
    torch.manual_seed(0)
    train_out, _ = tl.Dropout(0.5)((x, 0.0))
    assert ((train_out == 0) | torch.isclose(train_out, 2 * x)).all() and (train_out == 0).any()
