"""``torchbayes evaluate --conformal ALPHA``: conformal sets in results.json and the report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("torchmetrics")
pytest.importorskip("sklearn")

from torchbayes.cli import EXIT_OK, EXIT_USAGE, main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A deterministic MLP on 8x8 digits (8 and 9 held out), trained by the command (a few seconds)."""
    folder = tmp_path_factory.mktemp("conformal")
    path = folder / "det.pt"
    common = ["--dataset", "digits", "--model", "mlp", "--ood-classes", "8,9", "--quiet"]
    assert main(["train", *common, "--deterministic", "--epochs", "3", "--out", str(path)]) == EXIT_OK
    return folder, path


def test_evaluate_conformal_adds_sets_to_the_json_and_the_page(checkpoint, capsys):
    folder, path = checkpoint
    out = folder / "report"
    assert main(["evaluate", str(path), "--conformal", "0.1", "--out", str(out), "--quiet"]) == EXIT_OK
    results = json.loads((out / "results.json").read_text())
    (entry,) = results["models"].values()
    conformal = entry["conformal"]
    assert conformal["alpha"] == 0.1
    # 361 test images: a stratified half calibrates, the other half measures.
    assert conformal["calibration"] + conformal["test"] == results["settings"]["data"]["test"]
    assert abs(conformal["calibration"] - conformal["test"]) <= 8  # rounding per class (8 classes)
    for score in ("LAC", "APS", "RAPS"):
        measured = conformal["scores"][score]
        # ~180 measured and ~180 calibrating: one run's coverage has sd ~ sqrt(0.09 / 180) * sqrt(2)
        # ~ 0.032 around >= 0.9; 0.77 is 4 sd below.
        assert 0.77 <= measured["coverage"] <= 1.0, score
        assert 0 < measured["mean_size"] <= 8
        strata = measured["strata"]
        assert sum(strata["counts"]) == conformal["test"] and len(strata["size"]) == 5
    assert conformal["scores"]["APS"]["mean_size"] >= 1  # APS sets are never empty
    assert "images/conformal-size.png" in results["images"]
    page = (out / "report.html").read_text()
    assert "Conformal prediction sets (alpha = 0.1: at least 90% coverage)" in page
    assert "APS coverage" in page and "stratified half of the test split" in page


def test_evaluate_without_conformal_has_no_conformal_key(checkpoint):
    folder, path = checkpoint
    out = folder / "plain-report"
    assert main(["evaluate", str(path), "--out", str(out), "--quiet"]) == EXIT_OK
    results = json.loads((out / "results.json").read_text())
    (entry,) = results["models"].values()
    assert "conformal" not in entry and "images/conformal-size.png" not in results["images"]
    assert "Conformal prediction" not in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        ("0", "--conformal: must be a probability in (0, 1), got 0"),
        ("1.5", "--conformal: must be a probability in (0, 1), got 1.5"),
        ("ten", "--conformal: expected a probability in (0, 1), got 'ten'"),
        ("0.001", "needs at least 999 calibration examples"),
    ],
)
def test_bad_conformal_alpha_is_bad_input(checkpoint, capsys, alpha, expected):
    folder, path = checkpoint
    out = folder / f"bad-{alpha}"
    capsys.readouterr()
    assert main(["evaluate", str(path), "--conformal", alpha, "--out", str(out), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not out.exists()
