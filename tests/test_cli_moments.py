"""``torchbayes evaluate --prediction moments``: the report, agreement with Monte Carlo, bad input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from torchbayes.cli import EXIT_OK, EXIT_USAGE, main  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A deterministic MLP and its MOPED Bayesian twin on 8x8 digits (8 and 9 held out)."""
    folder = tmp_path_factory.mktemp("moments")
    common = ["--dataset", "digits", "--model", "mlp", "--ood-classes", "8,9", "--quiet"]
    det, bnn = folder / "det.pt", folder / "bnn.pt"
    assert main(["train", *common, "--method", "deterministic", "--epochs", "3", "--out", str(det)]) == EXIT_OK
    assert main(["train", *common, "--moped", str(det), "--estimator", "flipout", "--epochs", "2",
                 "--num-samples", "16", "--out", str(bnn)]) == EXIT_OK
    return folder, det, bnn


def _metrics(folder) -> tuple[str, dict]:
    (name, entry), = json.loads((folder / "results.json").read_text())["models"].items()
    return name, entry["metrics"]


def test_evaluate_with_moments_agrees_with_monte_carlo(checkpoints, capsys):
    folder, _, bnn = checkpoints
    assert main(["evaluate", str(bnn), "--prediction", "moments", "--out", str(folder / "moments"),
                 "--quiet"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(folder / "moments" / "report.html")
    assert main(["evaluate", str(bnn), "--num-samples", "64", "--out", str(folder / "mc"), "--quiet"]) == EXIT_OK
    name, moments = _metrics(folder / "moments")
    _, mc = _metrics(folder / "mc")
    assert name.endswith("(moments)")
    # 270 test digits: a flipped near-tie moves accuracy by 0.4 points; MC-64's own noise
    # flips a few; 3 points is far outside that but catches a broken propagation.
    assert abs(moments["accuracy"] - mc["accuracy"]) < 0.03
    assert moments["nll"] == pytest.approx(mc["nll"], rel=0.15)
    assert moments["ood_auroc_mutual_information"] > 0.6  # the held-out digits stand out, as with MC


def test_moments_of_a_deterministic_checkpoint_is_bad_input(checkpoints, capsys):
    folder, det, _ = checkpoints
    code = main(["evaluate", str(det), "--prediction", "moments", "--out", str(folder / "x"), "--quiet"])
    assert code == EXIT_USAGE
    assert "--prediction moments" in capsys.readouterr().err
    assert main(["evaluate", str(det), "--prediction", "moment", "--quiet"]) == EXIT_USAGE
