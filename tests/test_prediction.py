"""torchbayes.predict: exactness of the vectorized sampling, results, real-data OOD, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes import predict
from torchbayes.nn import (
    ESTIMATORS,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesianModule,
    BayesLinear,
)

# Exactness checks compare two independent sets of S draws per output. Under exactness each
# z below is ~N(0, 1) (CLT, S >= 1000); a test compares at most a few hundred statistics, so
# P(any |z| > 5) < 300 * 5.7e-7 < 2e-4, while a wrong distribution (e.g. a shared draw, a
# dropped correlation) shifts means or variances by many standard errors at this S.
Z_BOUND = 5.0
NUM_DRAWS = 1000


def assert_same_distribution(vectorized: torch.Tensor, loop: torch.Tensor) -> None:
    """Per-output means and variances of two sample sets (S, ...) agree within Z_BOUND SEs."""
    a, b = vectorized.double().flatten(1), loop.double().flatten(1)
    ma, mb, va, vb = a.mean(0), b.mean(0), a.var(0), b.var(0)
    z_mean = (ma - mb) / (va / len(a) + vb / len(b) + 1e-30).sqrt()
    # Standard error of a sample variance: sqrt((m4 - var^2) / S), m4 the 4th central moment.
    m4a, m4b = ((a - ma) ** 4).mean(0), ((b - mb) ** 4).mean(0)
    z_var = (va - vb) / ((m4a - va**2) / len(a) + (m4b - vb**2) / len(b) + 1e-30).sqrt()
    assert z_mean.abs().max() < Z_BOUND, f"means differ: max |z| = {z_mean.abs().max():.2f}"
    assert z_var.abs().max() < Z_BOUND, f"variances differ: max |z| = {z_var.abs().max():.2f}"
    assert (va > 0).any(), "degenerate comparison: no output varies"


def plain_loop(model: nn.Module, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The reference's way: S ordinary forward passes, each a fresh draw."""
    model.eval()
    with torch.no_grad():
        outs = [model(x) for _ in range(num_samples)]
    return torch.stack([o[0] if isinstance(o, tuple) else o for o in outs])


def _conv_model(kind: str, estimator: str) -> tuple[nn.Module, torch.Tensor]:
    """A first layer of ``kind`` (shared-input path), a grouped second one, a linear head."""
    opts = {"estimator": estimator, "posterior_rho_init": -1.5}
    dims = {"1d": 1, "2d": 2, "3d": 3}[kind[-2:]]
    size = {1: 7, 2: 5, 3: 3}[dims]
    if kind.startswith("convtranspose"):
        cls = {1: BayesConvTranspose1d, 2: BayesConvTranspose2d, 3: BayesConvTranspose3d}[dims]
        first, second = cls(2, 4, 2, stride=2, **opts), cls(4, 2, 3, groups=2, **opts)
        out_size = 2 * size + 2
    else:
        cls = {1: BayesConv1d, 2: BayesConv2d, 3: BayesConv3d}[dims]
        first, second = cls(2, 4, 3, padding=1, **opts), cls(4, 2, 3, groups=2, padding="same", **opts)
        out_size = size
    model = nn.Sequential(first, nn.Tanh(), second, nn.Flatten(), BayesLinear(2 * out_size**dims, 3, **opts))
    # Batch 6 for 2-D takes the group-by-group path of later convolutions, 3 the grouped one.
    return model, torch.randn(6 if dims == 2 else 3, 2, *([size] * dims))


def _mlp(estimator: str, width: int = 16) -> nn.Module:
    opts = {"estimator": estimator, "posterior_rho_init": -1.5}
    return nn.Sequential(nn.Flatten(), BayesLinear(width, width, **opts), nn.ReLU(),
                         BayesLinear(width, width, **opts), nn.ReLU(), BayesLinear(width, 4, **opts))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("batch", [4, 48])  # 4: local-reparameterization paths; 48: weight-sample (bmm) paths
def test_linear_vectorized_matches_loop(estimator: str, batch: int) -> None:
    model = _mlp(estimator)
    x = torch.randn(batch, 16)
    result = predict(model, x, NUM_DRAWS, seed=1)
    assert result.samples.shape == (NUM_DRAWS, batch, 4)
    # Local reparameterization and flipout give each example an exact posterior draw too.
    assert_same_distribution(result.samples, plain_loop(model, x, NUM_DRAWS))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d", "convtranspose1d", "convtranspose2d",
                                  "convtranspose3d"])
def test_conv_vectorized_matches_loop(kind: str, estimator: str) -> None:
    model, x = _conv_model(kind, estimator)
    result = predict(model, x, NUM_DRAWS, seed=2, task="regression")
    # predict samples whole kernels for every estimator. The plain loop with local
    # reparameterization is only an approximation for convolutions (see BayesConv2d), so
    # that case is compared with the exact reparameterization loop of the same posterior.
    for m in model.modules():
        if isinstance(m, BayesianModule) and estimator == "local":
            m.estimator = "reparameterization"
    assert_same_distribution(result.samples, plain_loop(model, x, NUM_DRAWS))


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_chunking_and_shared_first_layer_give_independent_draws(chunk_size: int | None) -> None:
    model = _mlp("reparameterization")
    x = torch.randn(5, 16)
    samples = predict(model, x, NUM_DRAWS, chunk_size=chunk_size, seed=3, task="regression").samples
    assert_same_distribution(samples, plain_loop(model, x, NUM_DRAWS))
    # A single Bayesian layer sees only the shared input: its cached moments must still get
    # fresh noise in every pass and group (no repeated draws).
    single = BayesLinear(16, 3, posterior_rho_init=-1.0)
    draws = predict(single, x, 40, chunk_size=chunk_size, seed=3, task="regression").samples
    assert torch.unique(draws[:, 0], dim=0).shape[0] == 40


def test_compat_model_returning_out_and_kl() -> None:
    layers = pytest.importorskip("torchbayes.layers")

    class ReferenceStyleNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = layers.Conv2dFlipout(1, 3, 3, posterior_rho_init=-1.5)
            self.fc = layers.LinearReparameterization(3 * 4 * 4, 4, posterior_rho_init=-1.5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h, kl_conv = self.conv(x)
            out, kl_fc = self.fc(torch.relu(h).flatten(1))
            return out, kl_conv + kl_fc

    model, x = ReferenceStyleNet(), torch.rand(3, 1, 6, 6)
    result = predict(model, x, NUM_DRAWS, seed=4)
    assert_same_distribution(result.samples, plain_loop(model, x, NUM_DRAWS))


def test_converted_resnet18_matches_loop() -> None:
    torchvision = pytest.importorskip("torchvision")
    if not hasattr(torchbayes, "dnn_to_bnn"):
        pytest.skip("torchbayes.dnn_to_bnn (model conversion) is not available")
    net = torchvision.models.resnet18(num_classes=5)
    net.eval()  # BatchNorm uses its running statistics, so examples are independent
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torchbayes.dnn_to_bnn(net, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
                                "posterior_rho_init": -4.0, "type": "Flipout", "moped_enable": False,
                                "moped_delta": 0.5},
                          # The stem (shared-input path), a residual stage and the head: every
                          # kind of block, without drawing all 11M weights 2000 times.
                          include=["conv1", "layer1", "fc"])
    x = torch.randn(2, 3, 8, 8)  # small images keep the 2 x 1000 passes cheap
    draws = NUM_DRAWS
    result = predict(net, x, draws, seed=5, task="regression")
    assert net.training is False
    assert_same_distribution(result.samples, plain_loop(net, x, draws))


def _correlation(s: torch.Tensor, a: tuple, b: tuple) -> torch.Tensor:
    """Sample correlation, over dim 0 of ``s``, of the entries at indices ``a`` and ``b``."""
    c = s - s.mean(0)
    return (c[(slice(None), *a)] * c[(slice(None), *b)]).mean(0) / (c[(slice(None), *a)].std(0)
                                                                    * c[(slice(None), *b)].std(0))


def test_shared_weights_gives_joint_samples() -> None:
    model, _ = _conv_model("conv2d", "flipout")
    x = torch.randn(1, 2, 5, 5).expand(6, -1, -1, -1)  # six copies of one input
    joint = predict(model, x, 8, shared_weights=True, seed=6, task="regression").samples
    torch.testing.assert_close(joint, joint[:, :1].expand_as(joint))  # one network per sample
    # Joint samples: the correlation between two DIFFERENT inputs' outputs is the one a single
    # network draw gives (the plain loop). Its standard error is <= 1/sqrt(S) = 0.016 at
    # S = 4000; 5 standard errors of a difference of two estimates: 5 * sqrt(2) * 0.016 = 0.11.
    mlp = _mlp("reparameterization")  # its plain loop draws one network per forward
    for batch in (2, 40):  # small and large batches take different paths
        xs = torch.randn(batch, 16)
        joint = predict(mlp, xs, 4000, shared_weights=True, seed=6, task="regression").samples.double()
        loop = plain_loop(mlp, xs, 4000).double()
        assert_same_distribution(joint, loop)
        for a, b in (((0, 0), (1, 0)), ((0, 1), (1, 2))):
            assert abs(_correlation(joint, a, b) - _correlation(loop, a, b)) < 0.11


def test_sigma_to_zero_equals_torch_twin() -> None:
    det = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    bayes = nn.Sequential(BayesConv2d.from_torch(det[0], posterior_rho_init=-30.0), nn.ReLU(), nn.Flatten(),
                          BayesLinear.from_torch(det[3], posterior_rho_init=-30.0))
    x = torch.rand(5, 1, 6, 6)
    result = predict(bayes, x, 6, seed=0)
    with torch.no_grad():
        expected = F.softmax(det(x), dim=-1)
    torch.testing.assert_close(result.mean, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.mutual_information, torch.zeros(5), atol=1e-6, rtol=0)


def test_classification_result_fields_are_consistent() -> None:
    model = _mlp("flipout")
    x = torch.randn(7, 16)
    r = predict(model, x, 64, seed=7)
    probs = F.softmax(r.samples, dim=-1)
    torch.testing.assert_close(r.probabilities, probs)
    torch.testing.assert_close(r.mean, probs.mean(0))
    torch.testing.assert_close(r.predictive_entropy, r.expected_entropy + r.mutual_information)
    torch.testing.assert_close(r.predicted_class, probs.mean(0).argmax(-1))
    torch.testing.assert_close(r.confidence, probs.mean(0).max(-1).values)
    assert (r.mutual_information > 0).all()
    again = predict(model, x, 64, seed=7)
    assert torch.equal(again.samples, r.samples)  # reproducible from the seed
    assert not torch.equal(predict(model, x, 64, seed=8).samples, r.samples)
    from_probs = predict(nn.Sequential(model, nn.Softmax(-1)), x, 64, seed=7, outputs="probabilities")
    torch.testing.assert_close(from_probs.mean, r.mean)


def test_heteroscedastic_regression_decomposition() -> None:
    model = nn.Sequential(BayesLinear(3, 16, posterior_rho_init=-2.0), nn.Tanh(),
                          BayesLinear(16, 4, posterior_rho_init=-2.0))  # 2 means, 2 log-variances
    x = torch.randn(9, 3)
    r = predict(model, x, 200, task="regression", output_variance="log_variance", seed=9)
    means, log_vars = r.samples[..., :2], r.samples[..., 2:]
    torch.testing.assert_close(r.mean, means.mean(0))
    torch.testing.assert_close(r.aleatoric_variance, log_vars.exp().mean(0))
    torch.testing.assert_close(r.epistemic_variance, means.var(0, correction=0))
    torch.testing.assert_close(r.variance, r.aleatoric_variance + r.epistemic_variance)
    as_variance = predict(nn.Sequential(model, _ExpSecondHalf()), x, 200, task="regression",
                          output_variance="variance", seed=9)
    torch.testing.assert_close(as_variance.variance, r.variance)
    homoscedastic = predict(model, x, 200, task="regression", seed=9)
    assert torch.equal(homoscedastic.aleatoric_variance, torch.zeros(9, 4))
    with pytest.raises(ValueError, match="even"):
        predict(BayesLinear(3, 3), x, 4, task="regression", output_variance="variance")


class _ExpSecondHalf(nn.Module):
    def forward(self, out: torch.Tensor) -> torch.Tensor:
        mean, log_var = out.chunk(2, dim=-1)
        return torch.cat([mean, log_var.exp()], dim=-1)


def test_modes_restored_and_no_gradients() -> None:
    model = _mlp("reparameterization")
    model.train()
    model[2].eval()
    r = predict(model, torch.randn(2, 16), 4)
    assert model.training and model[1].training and not model[2].training
    assert not r.samples.requires_grad


class _LoopOnlyLayer(BayesianModule):
    """A Bayesian module without the sample-groups hook (like a layer written elsewhere)."""

    def __init__(self) -> None:
        super().__init__(posterior_rho_init=-1.0)
        self.register_variational("scale", (4,))
        torch.nn.init.ones_(self.scale_mu)
        self.reset_variational_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torchbayes.nn.functional.sample_gaussian(self.scale_mu, self.scale_rho)


def test_module_without_hook_falls_back_to_one_sample_per_pass() -> None:
    model = nn.Sequential(BayesLinear(3, 4, posterior_rho_init=-2.0), _LoopOnlyLayer())
    x = torch.randn(6, 3)
    result = predict(model, x, NUM_DRAWS, seed=10, task="regression")
    assert_same_distribution(result.samples, plain_loop(model, x, NUM_DRAWS))


def test_mutual_information_detects_out_of_distribution_digits(digits_ood) -> None:
    from sklearn.metrics import roc_auc_score

    data = digits_ood
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), BayesLinear(64, 64, posterior_rho_init=-4.0), nn.ReLU(),
                          BayesLinear(64, len(data.classes), posterior_rho_init=-4.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    n = len(data.train_x)
    for _epoch in range(40):
        for idx in torch.randperm(n).split(128):
            loss = torchbayes.elbo_loss(F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]), model, n)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = predict(model, data.test_x, 64, seed=0)
    ood = predict(model, data.ood_x, 64, seed=0)
    accuracy = (test.predicted_class == data.test_y).float().mean().item()
    assert accuracy > 0.9, f"the model did not learn the in-distribution classes ({accuracy:.3f})"
    scores = torch.cat([test.mutual_information, ood.mutual_information]).numpy()
    labels = [0] * len(data.test_x) + [1] * len(data.ood_x)
    auroc = roc_auc_score(labels, scores)
    # Chance gives 0.5 with standard error sqrt((n0 + n1 + 1) / (12 n0 n1)) ~= 0.022 for these
    # ~360 + ~350 inputs, so 0.75 is > 11 SEs above chance: the epistemic term must separate.
    assert auroc > 0.75, f"AUROC of mutual information, test vs held-out classes: {auroc:.3f}"


def test_bad_input() -> None:
    model = _mlp("reparameterization")
    x = torch.randn(2, 16)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            predict(model, x, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        predict(model, x, 4, chunk_size=0)
    with pytest.raises(ValueError, match="no torchbayes Bayesian layers"):
        predict(nn.Linear(16, 2), x)
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        predict(model, x.double())
    with pytest.raises(ValueError, match="x is on meta"):
        predict(model, x.to("meta"))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        predict(model, x.tolist())
    with pytest.raises(ValueError, match="x must be a batch"):
        predict(model, torch.randn(0, 16))
    with pytest.raises(ValueError, match="task"):
        predict(model, x, task="segmentation")
    with pytest.raises(ValueError, match="outputs"):
        predict(model, x, outputs="log_probs")


def test_linear_on_sequences_keeps_the_weight_shared_across_positions() -> None:
    # A linear layer applied to (B, T, F) uses one weight for all T positions of an example,
    # so an example's outputs at two positions are correlated (covariance
    # sum_i x_ti x_si sigma_i^2); independent noise per position would make them uncorrelated.
    layer = BayesLinear(6, 2, posterior_rho_init=0.0, bias=False)  # sigma = softplus(0) ~ 0.69
    x = torch.randn(3, 4, 6)
    x[:, 1] = x[:, 0]  # positions 0 and 1 equal: outputs perfectly correlated under one weight
    samples = predict(layer, x, NUM_DRAWS, seed=9, task="regression").samples
    assert_same_distribution(samples, plain_loop(layer, x, NUM_DRAWS))
    torch.testing.assert_close(samples[:, :, 0], samples[:, :, 1])


def test_local_noise_shared_by_a_group_keeps_each_example_exact() -> None:
    # predict draws local-reparameterization noise once per group and output unit; each
    # example's own outputs must still be exact draws, including the correlation between two
    # outputs of one example that comes from the shared hidden layer.
    model = _mlp("local")
    x = torch.randn(4, 16)
    samples = predict(model, x, 4000, seed=10, task="regression").samples.double()
    loop = plain_loop(model, x, 4000).double()
    assert_same_distribution(samples, loop)
    # Correlation of outputs 0 and 1 of each example: its standard error is at most
    # (1 - r^2) / sqrt(S) <= 0.016 at S = 4000; 5 standard errors of the difference of two
    # independent estimates is 5 * sqrt(2) * 0.016 = 0.11.
    for b in range(4):
        assert abs(_correlation(samples, (b, 0), (b, 1)) - _correlation(loop, (b, 0), (b, 1))) < 0.11
