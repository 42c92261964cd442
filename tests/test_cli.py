"""The ``torchbayes`` command: demo, train/evaluate round trip, report validity, bad input."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("torchmetrics")
pytest.importorskip("sklearn")

from torchbayes import posterior_mean  # noqa: E402
from torchbayes.cli import EXIT_OK, EXIT_USAGE, main  # noqa: E402
from torchbayes.cli.models import build_model  # noqa: E402
from torchbayes.cli.progress import progress_bar  # noqa: E402
from torchbayes.cli.training import load_checkpoint  # noqa: E402
from torchbayes.datasets import load_image_dataset  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _ReportParser(HTMLParser):
    """Collects every <img src> and <a href> of a page, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.open_tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "a":
            self.links.append(attrs.get("href") or "")
        if tag not in ("img", "meta", "br", "hr", "link", "input"):
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags[-1] == tag, f"</{tag}> does not close <{self.open_tags[-1:]}>"
        self.open_tags.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check_report_html(directory: Path) -> _ReportParser:
    """Parse report.html; every image must be a decodable PNG data URI or an existing PNG file."""
    page = (directory / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    parser = _ReportParser()
    parser.feed(page)
    parser.close()
    assert parser.open_tags == [], f"unclosed tags: {parser.open_tags}"
    assert parser.images, "the report shows no image"
    for src in parser.images:
        if src.startswith("data:"):
            header, _, payload = src.partition(",")
            assert header == "data:image/png;base64"
            try:
                data = base64.b64decode(payload, validate=True)
            except binascii.Error as e:  # pragma: no cover - the assertion's message
                pytest.fail(f"invalid base64 image: {e}")
        else:
            path = directory / src
            assert path.is_file(), f"image {src} does not exist"
            data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    for href in parser.links:
        assert (directory / href).is_file(), f"link {href} points to no file"
    return parser


# ---------------------------------------------------------------------- the demo
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == EXIT_OK
    console = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert set(models) == {"deterministic mlp", "Bayesian mlp", "Bayesian mlp (moments)", "MC dropout mlp",
                           "3-member ensemble of mlp", "IVON mlp"}
    num_classes = len(results["settings"]["data"]["classes"])  # 8: digits 8 and 9 are held out
    for name, entry in models.items():
        m = entry["metrics"]
        # Chance is 1/8 = 12.5%; a trained MLP on 8x8 digits gets > 95%, so 80% is a wide margin.
        assert m["accuracy"] > 0.8 > 1 / num_classes, name
        assert 0.0 <= m["ece"] <= 1.0
        assert 0.0 <= m["brier"] <= 2.0 and m["nll"] > 0.0
        assert 0.0 <= m["aurc"] <= 1.0
        assert 0.5 < m["ood_auroc_entropy"] <= 1.0
        assert m["predict_ms_per_image"] > 0
        # The console table prints the same numbers as the JSON.
        assert f"{100 * m['accuracy']:.2f}%" in console
        assert f"{m['ece']:.4f}" in console
    # 361 test vs 354 OOD inputs: the AUROC of an uninformative score has standard error
    # sqrt((n1 + n2 + 1) / (12 n1 n2)) ~= 0.022, so 0.6 is > 4 standard errors above chance.
    assert models["Bayesian mlp"]["metrics"]["ood_auroc_mutual_information"] > 0.6
    assert models["deterministic mlp"]["metrics"]["ood_auroc_mutual_information"] is None
    assert models["Bayesian mlp"]["num_samples"] == 16 and models["deterministic mlp"]["num_samples"] == 1
    assert models["MC dropout mlp"]["num_samples"] == 16 and models["3-member ensemble of mlp"]["num_samples"] == 3
    # The Bayesian model's history is the recipe's: the deterministic pre-training, then 3 epochs.
    assert [h["epoch"] for h in models["Bayesian mlp"]["training"]] == list(range(1, 10))
    # The Bayesian model again, predicting by moment propagation (16 logit draws), flags OOD too.
    assert models["Bayesian mlp (moments)"]["num_samples"] == 16
    assert models["IVON mlp"]["num_samples"] == 16 and len(models["IVON mlp"]["training"]) == 7
    for name in ("Bayesian mlp (moments)", "MC dropout mlp", "3-member ensemble of mlp", "IVON mlp"):
        assert models[name]["metrics"]["ood_auroc_mutual_information"] > 0.6
        assert models[name]["metrics"]["train_seconds"] > 0

    parser = _check_report_html(out)
    # Reliability + risk-coverage per model, entropy histograms per model, MI for the 5 sampling ones.
    assert len(parser.images) == 25  # 23 figures + the referral curve + the conformal set sizes
    for image in results["images"]:
        assert (out / image).read_bytes().startswith(PNG_MAGIC)
    text = " ".join(parser.text)
    assert f"{100 * models['Bayesian mlp']['metrics']['accuracy']:.2f}%" in text
    # Conformal sets at alpha = 0.1, calibrated on a stratified half of the 361 test images and
    # measured on the other: one run's coverage has sd ~ sqrt(2 * 0.09 / 180) ~ 0.032 around >= 0.9.
    assert "Conformal prediction sets (alpha = 0.1: at least 90% coverage)" in text
    for name, entry in models.items():
        conformal = entry["conformal"]
        assert conformal["alpha"] == 0.1, name
        for score in ("LAC", "APS", "RAPS"):
            assert 0.77 <= conformal["scores"][score]["coverage"] <= 1.0, (name, score)
            assert 0 < conformal["scores"][score]["mean_size"] <= num_classes, (name, score)


# ---------------------------------------------------------------------- train / evaluate
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A deterministic MLP and its MOPED-initialised Bayesian twin, trained by the command."""
    folder = tmp_path_factory.mktemp("train")
    common = ["--dataset", "digits", "--model", "mlp", "--ood-classes", "8,9", "--quiet"]
    det, bnn = folder / "det.pt", folder / "bnn.pt"
    assert main(["train", *common, "--deterministic", "--epochs", "3", "--out", str(det)]) == EXIT_OK
    assert main(["train", *common, "--moped", str(det), "--estimator", "flipout", "--epochs", "2",
                 "--num-samples", "8", "--out", str(bnn)]) == EXIT_OK
    return folder, det, bnn


def test_train_checkpoint_round_trip(trained):
    _, det, bnn = trained
    data = load_image_dataset("digits", ood_classes=(8, 9))
    for path in (det, bnn):
        ckpt = load_checkpoint(path)
        # The last epoch's test accuracy was measured on the in-memory model during training;
        # the reloaded model must reproduce it exactly (posterior means, same test split).
        with torch.no_grad(), posterior_mean(ckpt.model):
            correct = int((ckpt.model(data.test_x).argmax(-1) == data.test_y).sum())
        assert correct / len(data.test_y) == pytest.approx(ckpt.history[-1]["test_accuracy"], abs=1e-12)
    det_model, bnn_ckpt = load_checkpoint(det).model, load_checkpoint(bnn)
    assert bnn_ckpt.config.bayesian and bnn_ckpt.config.moped and bnn_ckpt.config.estimator == "flipout"
    # MOPED: the prior means are the deterministic weights (training never moves priors).
    first = bnn_ckpt.model[1]
    assert torch.equal(first.weight_prior.mu, det_model[1].weight)
    assert torch.equal(first.bias_prior.mu, det_model[1].bias)
    assert first.estimator == "flipout"


def test_evaluate_writes_report(trained, capsys):
    folder, _, bnn = trained
    out = folder / "report"
    capsys.readouterr()
    assert main(["evaluate", str(bnn), "--out", str(out), "--num-samples", "8", "--quiet"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(out / "report.html")  # --quiet prints only the result
    results = json.loads((out / "results.json").read_text())
    (entry,) = results["models"].values()
    assert entry["bayesian"] and entry["num_samples"] == 8
    assert entry["metrics"]["accuracy"] > 0.8
    assert entry["metrics"]["ood_auroc_mutual_information"] > 0.6  # see test_demo_quick_end_to_end
    assert len(entry["training"]) == 2
    _check_report_html(out)


def test_evaluate_on_a_different_input_shape_is_bad_input(trained, capsys):
    _, _, bnn = trained
    code = main(["evaluate", str(bnn), "--dataset", "mnist", "--out", str(trained[0] / "x"), "--quiet"])
    assert code == EXIT_USAGE
    assert "expects inputs (1, 8, 8)" in capsys.readouterr().err


def test_moped_from_another_architecture_is_bad_input(trained, capsys):
    _, det, _ = trained
    code = main(["train", "--dataset", "digits", "--model", "lenet", "--ood-classes", "8,9", "--moped", str(det),
                 "--epochs", "1", "--out", str(trained[0] / "x.pt"), "--quiet"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'mlp'" in err and "'lenet'" in err and "Traceback" not in err
    assert not (trained[0] / "x.pt").exists()


def test_output_under_a_file_is_bad_input_before_any_work(trained, capsys):
    folder, _, bnn = trained
    blocker = folder / "a-file"
    blocker.write_text("not a folder")
    code = main(["evaluate", str(bnn), "--out", str(blocker / "report"), "--num-samples", "2", "--quiet"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("torchbayes evaluate: error: --out:") and "is a file" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, expected", [
    (["train", "--dataset", "nosuchset"], "dataset must be one of"),
    (["train", "--model", "nosuchnet"], "model must be one of"),
    (["train", "--dataset", "/no/such/folder"], "does not exist"),
    (["train", "--epochs", "0"], "--epochs: must be a positive integer"),
    (["train", "--epochs", "-3"], "--epochs: must be a positive integer"),
    (["train", "--num-samples", "0"], "--num-samples: must be a positive integer"),
    (["evaluate", "no-such-checkpoint.pt"], "not found"),
    (["evaluate", "CHECKPOINT", "--num-samples", "-1"], "--num-samples: must be a positive integer"),
    (["train", "--deterministic", "--avuc"], "avuc needs a Bayesian model"),
    (["train", "--dataset", "cifar10", "--data-root", "TMP"], "cifar10 not found"),
    (["train", "--ood-classes", "3,x"], "class ids separated by commas"),
    (["train", "--ood-classes", "12"], "not classes of 'digits'"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, expected, tmp_path, capsys):
    argv = [str(tmp_path) if a == "TMP" else a for a in argv]
    if "CHECKPOINT" in argv:  # a file that is not a checkpoint
        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(b"not a checkpoint")
        argv[argv.index("CHECKPOINT")] = str(garbage)
    assert main(argv + ["--out", str(tmp_path / "out")] if argv[0] != "nosuchcommand" else argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    # argparse prints its usage line before the error; ours is one line.
    assert err.strip().splitlines()[-1].startswith(("torchbayes", "usage: torchbayes"))
    assert not (tmp_path / "out").exists()


def test_corrupted_checkpoint_is_bad_input(tmp_path, capsys, trained):
    _, det, _ = trained
    broken = tmp_path / "broken.pt"
    broken.write_bytes(det.read_bytes()[: det.stat().st_size // 2])  # truncated
    assert main(["evaluate", str(broken), "--out", str(tmp_path / "r"), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and err.count("\n") == 1


def test_console_script_exit_codes_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    bad = subprocess.run([sys.executable, "-m", "torchbayes", "train", "--model", "nosuchnet", "--out",
                          str(tmp_path / "m.pt")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("torchbayes train: error: --model: model must be one of ('mlp', 'lenet') "
                                  "or a torchvision classification model such as resnet18, got 'nosuchnet'")
    ok = subprocess.run([sys.executable, "-m", "torchbayes", "--version"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("torchbayes ")


# ---------------------------------------------------------------------- pieces
def test_image_folder_dataset_and_training(tmp_path, capsys):
    rng = np.random.default_rng(0)
    from PIL import Image

    # Three classes told apart by brightness, RGB and greyscale files mixed.
    for c, name in enumerate(["a-dark", "b-mid", "c-light"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(40 + 90 * c, 10, size=(10, 12, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels if i % 2 else pixels[..., 0])
            image.save(tmp_path / "imgs" / name / f"{i}.png")
    data = load_image_dataset(str(tmp_path / "imgs"), image_size=8, ood_classes=(2,))
    assert data.class_names == ("a-dark", "b-mid", "c-light") and data.classes == (0, 1)
    assert data.train_x.shape[1:] == (3, 8, 8) and len(data.ood_x) == 12
    assert len(data.train_x) + len(data.test_x) == 24
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    # Brightness survives loading: class means in [0, 1] follow (40 + 90 c) / 255.
    for c in (0, 1):
        mean = float(torch.cat([data.train_x[data.train_y == c], data.test_x[data.test_y == c]]).mean())
        assert mean == pytest.approx((40 + 90 * c) / 255, abs=0.02)
    code = main(["train", "--dataset", str(tmp_path / "imgs"), "--image-size", "8", "--ood-classes", "2",
                 "--model", "lenet", "--epochs", "1", "--out", str(tmp_path / "m.pt"), "--quiet"])
    assert code == EXIT_OK
    assert load_checkpoint(tmp_path / "m.pt").input_shape == (3, 8, 8)


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("lenet", (1, 8, 8)), ("lenet", (1, 28, 28)),
                                         ("lenet", (3, 32, 32)), ("resnet18", (1, 8, 8))])
def test_build_model_shapes(name, shape):
    model = build_model(name, shape, 7).eval()
    assert model(torch.rand(3, *shape)).shape == (3, 7)


def test_build_model_rejects_unsuited_torchvision_model():
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        build_model("vit_b_16", (1, 28, 28), 10)


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    pytest.importorskip("tqdm")
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress_bar(range(5), desc="work")) == list(range(5))
    assert "work" in terminal.getvalue()
    quiet = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert list(progress_bar(range(5), desc="work", enabled=False)) == list(range(5))
    assert quiet.getvalue() == ""
    pipe = io.StringIO()  # not a terminal: no bar
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(progress_bar(range(5), desc="work")) == list(range(5))
    assert pipe.getvalue() == ""


def test_json_has_no_nan(tmp_path):
    from torchbayes.cli.report import _json_safe

    assert json.loads(json.dumps(_json_safe({"a": [math.nan, 1.0], "b": math.inf}))) == {"a": [None, 1.0], "b": None}


def test_quantize_then_evaluate_the_int8_checkpoint(trained, capsys):
    pytest.importorskip("torchbayes.quantization")
    folder, det, bnn = trained
    int8 = folder / "bnn-int8.pt"
    assert main(["quantize", str(bnn), "--out", str(int8), "--quiet"]) == EXIT_OK
    loaded = load_checkpoint(int8)
    assert loaded.int8 and any(t.dtype == torch.int8 for t in loaded.model.state_dict().values())
    assert int8.stat().st_size * 3 < bnn.stat().st_size
    # INT8 posterior means stay close to the float ones: the same class for nearly every test image.
    data = load_image_dataset("digits", ood_classes=(8, 9))
    float_model = load_checkpoint(bnn).model
    with torch.no_grad(), posterior_mean(float_model), posterior_mean(loaded.model):
        agree = (float_model(data.test_x).argmax(-1) == loaded.model(data.test_x).argmax(-1)).float().mean()
    assert agree > 0.95
    assert main(["evaluate", str(int8), "--out", str(folder / "int8-report"), "--num-samples", "4",
                 "--quiet"]) == EXIT_OK
    results = json.loads((folder / "int8-report" / "results.json").read_text())
    assert results["models"]["Bayesian mlp INT8"]["metrics"]["accuracy"] > 0.8
    assert main(["quantize", str(det), "--quiet"]) == EXIT_USAGE  # a deterministic checkpoint
    assert "deterministic model" in capsys.readouterr().err


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file (MNIST's on-disk format): magic, dims, then uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_in_torchvision_format_is_read_from_data_root(tmp_path, capsys):
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {split: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for split, n in (("train", 40), ("t10k", 20))}
    labels = {split: np.arange(len(x)) % 10 for split, x in images.items()}
    for split in images:
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    data = load_image_dataset("mnist-torchvision", data_root=tmp_path, ood_classes=(9,))
    # torchvision's own split is kept; class 9 leaves both and its TEST images are the OOD set.
    keep_train, keep_test = labels["train"] != 9, labels["t10k"] != 9
    assert torch.equal(data.train_x, torch.from_numpy(images["train"][keep_train][:, None] / np.float32(255)))
    assert torch.equal(data.test_y, torch.from_numpy(labels["t10k"][keep_test]))
    assert torch.equal(data.ood_x, torch.from_numpy(images["t10k"][~keep_test][:, None] / np.float32(255)))
    assert data.num_classes == 9
    # The command reads it too; a folder without the files is bad input.
    assert main(["train", "--dataset", "mnist-torchvision", "--data-root", str(tmp_path), "--epochs", "1",
                 "--deterministic", "--out", str(tmp_path / "m.pt"), "--quiet"]) == EXIT_OK
    assert main(["train", "--dataset", "mnist-torchvision", "--data-root", str(tmp_path / "MNIST"),
                 "--out", str(tmp_path / "n.pt"), "--quiet"]) == EXIT_USAGE
    assert "mnist-torchvision not found in torchvision's format" in capsys.readouterr().err
