"""AvUC loss and AvU metrics: equal to the reference's numbers and gradients, vectorized."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchbayes import AUAvULoss, AvULoss, accuracy_vs_uncertainty, eval_avu
from torchbayes.avuc import avu_uncertainty, uncertainty_threshold

# Our sums run in a different order than the reference's Python loop (float32): a few
# ulps of the float32 sums, far below this relative tolerance.
RTOL = 1e-5


def _quiet(fn, *args, **kwargs):
    # The reference prints on some calls; keep the test output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _random_batch(n: int, c: int = 10, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randint(0, c, (n,), generator=g)


@pytest.fixture(scope="module")
def digits_logits(digits):
    """Logits of a multinomial logistic regression fitted on real data (digits)."""
    from sklearn.linear_model import LogisticRegression

    x_train = digits.train_x.flatten(1).numpy()
    clf = LogisticRegression(max_iter=300).fit(x_train, digits.train_y.numpy())
    logits = torch.from_numpy(clf.decision_function(digits.test_x.flatten(1).numpy())).float()
    return logits, digits.test_y


def _reference_avuc(reference):
    from bayesian_torch.utils import avuc_loss

    return avuc_loss


@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_avu_loss_equals_reference_on_random_inputs(reference, n, beta):
    ref = _reference_avuc(reference)
    logits, labels = _random_batch(n, seed=n)
    unc = avu_uncertainty(logits)
    # Thresholds below, inside and above the uncertainties, and one exactly equal to an
    # example's uncertainty (a tie, decided by the same float comparison as the reference).
    for threshold in (0.0, float(unc.median()), float(unc[0]), 0.8, 5.0):
        expected = _quiet(ref.AvULoss(beta), logits, labels, threshold)
        got = AvULoss(beta)(logits, labels, threshold)
        assert got.shape == ()
        torch.testing.assert_close(got, expected.reshape(()), rtol=RTOL, atol=1e-7)


def test_avu_loss_equals_reference_on_real_logits(reference, digits_logits):
    ref = _reference_avuc(reference)
    logits, labels = digits_logits
    unc = avu_uncertainty(logits)
    for threshold in (uncertainty_threshold(unc), uncertainty_threshold(unc, logits.argmax(1) == labels)):
        expected = _quiet(ref.AvULoss(3.0), logits, labels, threshold)
        torch.testing.assert_close(AvULoss(3.0)(logits, labels, threshold), expected.reshape(()), rtol=RTOL, atol=1e-7)


def test_avu_loss_gradient_equals_reference(reference):
    ref = _reference_avuc(reference)
    logits, labels = _random_batch(120, seed=3)
    threshold = float(avu_uncertainty(logits).mean())
    ours = logits.clone().requires_grad_(True)
    theirs = logits.clone().requires_grad_(True)
    AvULoss(3.0)(ours, labels, threshold).backward()
    _quiet(ref.AvULoss(3.0), theirs, labels, threshold).sum().backward()
    assert ours.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-7)


def test_area_under_avu_equals_reference(reference, digits_logits):
    ref = _reference_avuc(reference)
    for logits, labels in (_random_batch(200, seed=5), digits_logits):
        # The reference's AUAvULoss.forward raises in 0.5.0 (it takes log of a NumPy
        # float); its auc_avu method computes the same area and works on detached inputs.
        entropy = ref.AvULoss().entropy(F.softmax(logits, 1))
        expected = ref.AUAvULoss().auc_avu(logits, labels, entropy)
        loss, area = AUAvULoss(beta=2.0)(logits, labels)
        torch.testing.assert_close(area, torch.tensor(float(expected)), rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(loss, -2.0 * torch.log(area + 1e-10))


def test_area_under_avu_is_differentiable():
    logits, labels = _random_batch(64, seed=6)
    logits.requires_grad_(True)
    loss, _ = AUAvULoss()(logits, labels)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("as_numpy", [True, False])
def test_eval_avu_and_metric_equal_reference(reference, digits_logits, as_numpy):
    ref = _reference_avuc(reference)
    logits, labels = digits_logits
    pred = logits.argmax(1)
    unc = avu_uncertainty(logits)
    args = (pred.numpy(), labels.numpy(), unc.numpy())
    ref_avu, ref_th = ref.eval_avu(*args)
    ours_args = args if as_numpy else (pred, labels, unc)
    avu, th = eval_avu(*ours_args)
    assert avu.shape == th.shape == (21,)
    np.testing.assert_allclose(avu.numpy(), ref_avu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(th.numpy(), ref_th, rtol=1e-12)
    for threshold in (0.1, float(unc[3]), float(np.float64(unc.numpy().mean())), np.float64(unc[5])):
        expected = ref.accuracy_vs_uncertainty(*args, threshold)
        assert float(accuracy_vs_uncertainty(*ours_args, threshold)) == pytest.approx(expected, abs=1e-12)


def test_hard_avu_closed_form():
    # correct, certain | correct, uncertain | wrong, certain | wrong, uncertain at u_th = 0.5:
    # one of each, so AvU = (n_AC + n_IU) / N = 2 / 4.
    pred = torch.tensor([0, 1, 2, 0])
    true = torch.tensor([0, 1, 0, 1])
    unc = torch.tensor([0.1, 0.9, 0.2, 0.8])
    assert float(accuracy_vs_uncertainty(pred, true, unc, 0.5)) == 0.5
    # Above every uncertainty: all certain, AvU = accuracy.
    assert float(accuracy_vs_uncertainty(pred, true, unc, 1.0)) == 0.5
    # Right exactly where certain: AvU = 1.
    assert float(accuracy_vs_uncertainty(pred, true, torch.tensor([0.1, 0.2, 0.9, 0.8]), 0.5)) == 1.0


def test_soft_avu_closed_form():
    # Two classes, logits (a, 0): confidence c = sigmoid(a), uncertainty u = binary entropy.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])  # first right, second wrong
    c = torch.sigmoid(torch.tensor([2.0, 1.0]))
    u = -(c * c.log() + (1 - c) * (1 - c).log())
    t = torch.tanh(u)
    # threshold between the two uncertainties: the first (more confident) is certain.
    threshold = float(u.mean())
    assert u[0] < threshold < u[1]
    n_ac, n_iu = c[0] * (1 - t[0]), (1 - c[1]) * t[1]
    expected = -torch.log((n_ac + n_iu) / (n_ac + n_iu + 1e-10) + 1e-10)
    torch.testing.assert_close(AvULoss()(logits, labels, threshold), expected)
    # Above both: the wrong one is "inaccurate and certain" and lowers AvU.
    n_ic = (1 - c[1]) * (1 - t[1])
    expected = -torch.log(n_ac / (n_ac + n_ic + 1e-10) + 1e-10)
    torch.testing.assert_close(AvULoss()(logits, labels, 10.0), expected)


def test_monte_carlo_logits_average_in_probability_space():
    g = torch.Generator().manual_seed(7)
    mc_logits = torch.randn(6, 40, 5, generator=g) * 2
    labels = torch.randint(0, 5, (40,), generator=g)
    log_mean_probs = F.softmax(mc_logits, -1).mean(0).log()
    # softmax(log mean p) = mean p, so both inputs describe the same predictive.
    torch.testing.assert_close(AvULoss()(mc_logits, labels, 0.9), AvULoss()(log_mean_probs, labels, 0.9))
    torch.testing.assert_close(avu_uncertainty(mc_logits), avu_uncertainty(log_mean_probs))


def test_model_uncertainty_is_mutual_information():
    g = torch.Generator().manual_seed(8)
    mc_logits = torch.randn(4, 30, 3, generator=g) * 3
    probs = F.softmax(mc_logits, -1)

    def entropy(p):
        return -(p * p.log()).sum(-1)

    expected = entropy(probs.mean(0)) - entropy(probs).mean(0)
    torch.testing.assert_close(avu_uncertainty(mc_logits, type=1), expected)
    # Identical samples: no disagreement, so zero model uncertainty.
    same = mc_logits[:1].expand(5, -1, -1)
    torch.testing.assert_close(avu_uncertainty(same, type=1), torch.zeros(30), atol=1e-6, rtol=0)
    labels = torch.randint(0, 3, (30,), generator=g)
    loss = AvULoss()(mc_logits.requires_grad_(True), labels, float(expected.mean()), type=1)
    loss.backward()
    assert torch.isfinite(mc_logits.grad).all()


def test_saturated_softmax_gives_finite_loss_and_gradient():
    # float32 softmax underflows to exactly 0 here; the entropy must stay finite.
    logits = torch.tensor([[200.0, 0.0, -200.0], [0.0, 150.0, 0.0]], requires_grad=True)
    loss = AvULoss()(logits, torch.tensor([0, 2]), 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_prints_nothing(capsys):
    logits, labels = _random_batch(50)
    AvULoss()(logits, labels, 0.5)
    AUAvULoss()(logits, labels)
    eval_avu(logits.argmax(1), labels, avu_uncertainty(logits))
    accuracy_vs_uncertainty(logits.argmax(1), labels, avu_uncertainty(logits), 0.5)
    assert capsys.readouterr() == ("", "")


def test_uncertainty_threshold():
    u = torch.tensor([0.1, 0.2, 0.6, 1.1])
    assert uncertainty_threshold(u) == pytest.approx(0.5)
    correct = torch.tensor([True, True, False, False])
    assert uncertainty_threshold(u, correct) == pytest.approx(((0.1 + 0.2) / 2 + (0.6 + 1.1) / 2) / 2)
    assert uncertainty_threshold(u, torch.ones(4, dtype=torch.bool)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="correct"):
        uncertainty_threshold(u, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="uncertainty"):
        uncertainty_threshold(torch.tensor([]))


def test_bad_inputs_name_the_argument():
    logits, labels = _random_batch(8, c=4)
    loss = AvULoss()
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(logits, labels[:5], 0.5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        loss(logits, labels + 4, 0.5)
    with pytest.raises(TypeError, match="labels must be an integer"):
        loss(logits, labels.float(), 0.5)
    with pytest.raises(ValueError, match="empty batch"):
        loss(logits[:0], labels[:0], 0.5)
    with pytest.raises(ValueError, match="logits must have shape"):
        loss(logits[0], labels, 0.5)
    with pytest.raises(ValueError, match="type=1"):
        loss(logits, labels, 0.5, type=1)
    with pytest.raises(ValueError, match="type must be"):
        loss(logits, labels, 0.5, type=2)
    with pytest.raises(ValueError, match="optimal_uncertainty_threshold"):
        loss(logits, labels, float("nan"))
    with pytest.raises(ValueError, match="beta"):
        AvULoss(beta=-1.0)
    with pytest.raises(ValueError, match="labels must have shape"):
        AUAvULoss()(logits, labels[:3])
    with pytest.raises(ValueError, match="same shape"):
        eval_avu(labels, labels[:3], torch.rand(8))
    with pytest.raises(ValueError, match="non-empty"):
        accuracy_vs_uncertainty(labels[:0], labels[:0], torch.rand(0), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_like_on_cpu():
    logits, labels = _random_batch(100)
    cpu = AvULoss()(logits, labels, 0.7)
    gpu = AvULoss()(logits.cuda(), labels.cuda(), 0.7)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=RTOL, atol=1e-7)
    avu, th = eval_avu(logits.argmax(1).cuda(), labels.cuda(), avu_uncertainty(logits).cuda())
    ref_avu, ref_th = eval_avu(logits.argmax(1), labels, avu_uncertainty(logits))
    torch.testing.assert_close(avu.cpu(), ref_avu)


def test_minimising_the_loss_raises_avu():
    # Gradient descent on free logits: the soft AvU of the batch must go up, and the hard
    # AvU metric at the same threshold with it (predictions become right-and-sure or
    # wrong-and-unsure).
    torch.set_num_threads(1)  # 50 tiny steps: a second thread only adds wake-up stalls
    logits, labels = _random_batch(200, c=5, scale=1.0, seed=9)
    threshold = float(avu_uncertainty(logits).mean())
    params = logits.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([params], lr=1.0)
    loss_fn = AvULoss(beta=1.0)
    first = float(loss_fn(params, labels, threshold).detach())
    for _ in range(50):
        optimizer.zero_grad()
        loss_fn(params, labels, threshold).backward()
        optimizer.step()
    last = float(loss_fn(params, labels, threshold).detach())
    assert last < first - 0.1

    def hard_avu(x):
        return float(accuracy_vs_uncertainty(x.argmax(1), labels, avu_uncertainty(x), threshold))

    assert hard_avu(params.detach()) > hard_avu(logits)


def test_gradients_reach_the_posterior_of_a_bayesian_model():
    from torchbayes import elbo_loss
    from torchbayes.nn import BayesLinear

    model = torch.nn.Sequential(BayesLinear(6, 16), torch.nn.ReLU(), BayesLinear(16, 3))
    x, labels = torch.randn(32, 6), torch.randint(0, 3, (32,))
    logits = model(x)
    loss = elbo_loss(F.cross_entropy(logits, labels), model, num_data=1000) + AvULoss(3.0)(logits, labels, 1.0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model[0].weight_rho.grad.abs().sum() > 0


def test_threshold_ties_break_like_the_reference(reference):
    # float32(0.1) > 0.1 in float64: NumPy compares a float32 uncertainty with a Python
    # float at float32 (equal, so certain) but with a NumPy float64 at float64 (uncertain).
    ref = _reference_avuc(reference)
    pred, true = np.array([0, 1, 1]), np.array([0, 1, 0])
    for unc in (np.array([0.1, 0.2, 0.3], dtype=np.float32), np.array([0.1, 0.2, 0.3])):
        for threshold in (0.1, np.float64(0.1), np.float32(0.1), 0.2):
            expected = ref.accuracy_vs_uncertainty(pred, true, unc, threshold)
            assert float(accuracy_vs_uncertainty(pred, true, unc, threshold)) == expected
    assert ref.accuracy_vs_uncertainty(pred, true, np.float32([0.1, 0.2, 0.3]), 0.1) != \
        ref.accuracy_vs_uncertainty(pred, true, np.float32([0.1, 0.2, 0.3]), np.float64(0.1))
