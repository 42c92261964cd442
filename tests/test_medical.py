"""Referral curves (metric and plot) and the ``torchbayes medical`` command on breast cancer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from torchbayes import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- the metric
def test_referral_curve_by_hand():
    # Sorted by uncertainty: 0.1 right, 0.3 right, 0.5 wrong, 0.9 wrong.
    uncertainty = torch.tensor([0.1, 0.5, 0.3, 0.9])
    correct = torch.tensor([True, False, True, False])
    # Referring 0, 1, 2, 3 of the 4 cases keeps 4, 3, 2, 1: accuracies 2/4, 2/3, 2/2, 1/1.
    accuracy = metrics.referral_curve(uncertainty, correct, [0.0, 0.25, 0.5, 0.75])
    torch.testing.assert_close(accuracy, torch.tensor([0.5, 2 / 3, 1.0, 1.0], dtype=torch.float64))
    # 10% of 4 cases rounds to 0 referred; 40% rounds to 2.
    torch.testing.assert_close(metrics.referral_curve(uncertainty, correct, [0.1, 0.4]),
                               torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_referral_curve_ties_are_averaged():
    # Three cases tie at 0.2 (one of them right). Referring 1 of 5 drops the 0.9 case
    # (wrong): 2 right of 4. Referring 2 also drops one of the tie, at random: the 0.0
    # case plus 2 of the tie, whose expected number right is 2/3: (1 + 2/3) / 3.
    uncertainty = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.9])
    correct = torch.tensor([True, True, False, False, False])
    accuracy = metrics.referral_curve(uncertainty, correct, [0.0, 0.2, 0.4])
    torch.testing.assert_close(accuracy, torch.tensor([2 / 5, 2 / 4, (1 + 2 / 3) / 3], dtype=torch.float64))


def test_random_referral_keeps_the_accuracy_on_average():
    generator = torch.Generator().manual_seed(0)
    n, repeats = 40, 2000
    correct = torch.rand(n, generator=generator) < 0.7
    p = float(correct.double().mean())
    fractions = [0.0, 0.1, 0.3, 0.5]
    # A constant score is one big tie: exactly the expectation over random orders.
    torch.testing.assert_close(metrics.referral_curve(torch.zeros(n), correct, fractions),
                               torch.full((4,), p, dtype=torch.float64))
    # Random scores: the mean over many draws converges to the same accuracy.
    curves = torch.stack([metrics.referral_curve(torch.rand(n, generator=generator), correct, fractions)
                          for _ in range(repeats)])
    for j, f in enumerate(fractions):
        kept = n - round(f * n)
        # Kept cases are a random subset of size k: hypergeometric variance
        # p (1 - p) / k * (n - k) / (n - 1); the mean of `repeats` draws is within 5 SE.
        se = math.sqrt(p * (1 - p) / kept * (n - kept) / (n - 1) / repeats)
        assert abs(float(curves[:, j].mean()) - p) <= 5 * se + 1e-12


def test_referral_curve_bad_input():
    unc, correct = torch.rand(5), torch.ones(5, dtype=torch.bool)
    for fractions in ([], [1.0], [-0.1]):
        with pytest.raises(ValueError, match="fractions"):
            metrics.referral_curve(unc, correct, fractions)
    with pytest.raises(ValueError, match="correct"):
        metrics.referral_curve(unc, torch.ones(5), [0.1])


def test_referral_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from torchbayes import plots

    generator = torch.Generator().manual_seed(1)
    correct = torch.rand(100, generator=generator) < 0.8
    informative = (~correct).double() + 0.1 * torch.rand(100, generator=generator, dtype=torch.float64)
    path = tmp_path / "referral.png"
    fig = plots.referral_plot({"Bayesian, entropy": (informative, correct),
                               "Bayesian, mutual information": (torch.rand(100, generator=generator), correct)},
                              path=path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    (ax,) = fig.axes
    lines = ax.get_lines()
    # Two curves plus ONE random-referral line: both curves score the same predictions.
    assert len(lines) == 3
    # The informative score ranks every wrong case (~20 of 100) above every right one, so
    # referring 50% removes them all.
    assert lines[0].get_ydata()[-1] == pytest.approx(1.0)
    assert lines[1].get_ydata()[0] == pytest.approx(float(correct.double().mean()))
    with pytest.raises(ValueError, match="curves"):
        plots.referral_plot({})


# ---------------------------------------------------------------------- the command
def test_breast_cancer_splits_are_stratified_and_standardised():
    pytest.importorskip("sklearn")
    from torchbayes.cli.medical import load_breast_cancer_splits

    data = load_breast_cancer_splits(test_fraction=0.3, seed=0)
    assert data.train_x.shape[1] == 30 and len(data.train_x) + len(data.test_x) == 569
    # Training features standardised by their own statistics (float32 rounding only).
    torch.testing.assert_close(data.train_x.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train_x.std(0, unbiased=False), torch.ones(30), atol=1e-4, rtol=0)
    # Stratified: 212 of 569 are malignant (label 0); each split keeps that share within one case.
    for y in (data.train_y, data.test_y):
        assert abs(int((y == 0).sum()) - 212 / 569 * len(y)) <= 1


def test_medical_command_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchmetrics")
    from torchbayes.cli import EXIT_OK, main

    out = tmp_path / "medical"
    assert main(["medical", "--quick", "--quiet", "--out", str(out)]) == EXIT_OK
    results = json.loads((out / "results.json").read_text())
    referral = results["referral"]
    fractions = referral["fractions"]
    assert fractions[0] == 0.0 and fractions[-1] == 0.5
    curves = referral["accuracy"]
    assert set(curves) == {"deterministic MLP, 1 - confidence", "Bayesian MLP, predictive entropy",
                           "Bayesian MLP, mutual information"}
    for name, entry in results["models"].items():
        accuracy = entry["metrics"]["accuracy"]
        # Breast cancer is nearly linearly separable: published MLPs reach ~97%; 0.9 is a wide margin.
        assert accuracy > 0.9, name
        # Random referral keeps the accuracy; 0% referred is the accuracy itself.
        assert referral["random"][name] == pytest.approx(accuracy)
        for label, values in curves.items():
            if label.startswith(name):
                assert values[0] == pytest.approx(accuracy)
    bayes = curves["Bayesian MLP, predictive entropy"]
    assert bayes[fractions.index(0.3)] >= bayes[0]
    # Referring by uncertainty beats random referral at 30% (it sheds the likely errors).
    assert bayes[fractions.index(0.3)] > referral["random"]["Bayesian MLP"]
    assert "images/referral.png" in results["images"]
    for image in results["images"]:
        assert (out / image).read_bytes().startswith(PNG_MAGIC)
    page = (out / "report.html").read_text()
    assert "<h2>Referral</h2>" in page and page.count("<img ") == len(results["images"])


def test_medical_command_rejects_bad_input(capsys):
    from torchbayes.cli import EXIT_USAGE, main

    assert main(["medical", "--seed", "x"]) == EXIT_USAGE
    assert "--seed" in capsys.readouterr().err
