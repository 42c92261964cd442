"""Uncertainty decomposition: reference equality, closed forms, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchbayes import expected_entropy, mutual_information, predictive_entropy, variance_decomposition


def _random_probs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    logits = rng.normal(scale=2.0, size=shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_equal_to_reference_on_numpy_arrays(reference) -> None:
    from bayesian_torch.utils import util

    probs = _random_probs(np.random.default_rng(0), (16, 50, 7))
    pe, mi = predictive_entropy(probs), mutual_information(probs)
    assert isinstance(pe, np.ndarray) and isinstance(mi, np.ndarray)
    assert pe.shape == mi.shape == (50,)
    # The reference adds 1e-15 inside the log, which moves each term by at most ~1e-15.
    np.testing.assert_allclose(pe, util.predictive_entropy(probs), rtol=0, atol=1e-12)
    np.testing.assert_allclose(mi, util.mutual_information(probs), rtol=0, atol=1e-12)


def test_torch_in_torch_out_matches_numpy() -> None:
    probs = _random_probs(np.random.default_rng(1), (8, 5, 3))
    t = torch.from_numpy(probs)
    for fn in (predictive_entropy, expected_entropy, mutual_information):
        out = fn(t)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
        np.testing.assert_allclose(out.numpy(), fn(probs), rtol=0, atol=1e-15)


def test_closed_forms_and_decomposition() -> None:
    probs = _random_probs(np.random.default_rng(2), (10, 20, 4))
    pe, ee, mi = predictive_entropy(probs), expected_entropy(probs), mutual_information(probs)
    np.testing.assert_allclose(pe, ee + mi, atol=1e-12)
    assert (mi >= 0).all() and (pe >= 0).all() and (ee >= 0).all()
    assert (pe <= math.log(4) + 1e-12).all()
    # Two samples, each certain but of a different class: total = log 2, aleatoric 0, epistemic log 2.
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(predictive_entropy(disagree), [math.log(2)], atol=1e-15)
    np.testing.assert_allclose(expected_entropy(disagree), [0.0], atol=1e-15)
    np.testing.assert_allclose(mutual_information(disagree), [math.log(2)], atol=1e-15)


def test_mutual_information_zero_when_samples_agree() -> None:
    one = _random_probs(np.random.default_rng(3), (1, 30, 5))
    agree = np.repeat(one, 12, axis=0)
    mi = mutual_information(agree)
    np.testing.assert_allclose(mi, 0.0, atol=1e-12)
    # ...while uniform total uncertainty is all aleatoric.
    uniform = np.full((6, 3, 5), 0.2)
    np.testing.assert_allclose(expected_entropy(uniform), math.log(5), atol=1e-12)
    np.testing.assert_allclose(mutual_information(uniform), 0.0, atol=1e-12)


def test_safe_at_zero_and_one() -> None:
    one_hot = torch.eye(3).unsqueeze(1).repeat(1, 2, 1)  # (3 samples, 2 inputs, 3 classes)
    for fn in (predictive_entropy, expected_entropy, mutual_information):
        out = fn(one_hot)
        assert torch.isfinite(out).all()
    torch.testing.assert_close(expected_entropy(one_hot), torch.zeros(2))
    torch.testing.assert_close(mutual_information(one_hot), torch.full((2,), math.log(3)))


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="mc_probs"):
        predictive_entropy([[0.5, 0.5]])
    with pytest.raises(ValueError, match="mc_probs"):
        mutual_information(np.array([0.5, 0.5]))
    with pytest.raises(TypeError, match="floating"):
        expected_entropy(torch.ones(2, 3, dtype=torch.long))


def test_variance_decomposition_law_of_total_variance() -> None:
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(64, 10, 2, generator=gen, dtype=torch.float64)
    variances = torch.rand(64, 10, 2, generator=gen, dtype=torch.float64)
    total, aleatoric, epistemic = variance_decomposition(means, variances)
    torch.testing.assert_close(aleatoric, variances.mean(0))
    torch.testing.assert_close(epistemic, ((means - means.mean(0)) ** 2).mean(0))
    # The equally weighted mixture of N(m_s, v_s): E[y^2] - E[y]^2.
    second_moment = (variances + means**2).mean(0)
    torch.testing.assert_close(total, second_moment - means.mean(0) ** 2)
    zero = variance_decomposition(means).aleatoric
    assert torch.equal(zero, torch.zeros_like(zero))
    with pytest.raises(ValueError, match="mc_variances"):
        variance_decomposition(means, variances[:3])
