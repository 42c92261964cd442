"""Hostile input (issue 16): each numbered class of the hostile test stays fixed.

Crafted checkpoints, extreme arguments, full disks, read-only paths and signals: every
one must end in a clear one-line error with the documented exit code (or a warning),
never in silent wrong results, lost work or script in a report.
"""

from __future__ import annotations

import datetime
import errno
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")
pytest.importorskip("sklearn")

from torchbayes import checkpoint, plots, predict
from torchbayes.checkpoint import CheckpointError
from torchbayes.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from torchbayes.cli.evaluation import ModelEvaluation, Predictions
from torchbayes.cli.report import Table, check_writable_parent, write_report
from torchbayes.cli.training import (
    EpochSummary,
    TrainConfig,
    build_classifier,
    load_checkpoint,
    save_checkpoint,
    training_warnings,
)
from torchbayes.nn import BayesConv2d, BayesLinear
from torchbayes.nn.base import BayesianModule
from torchbayes.priors import ScaleMixturePrior, smallest_prior_sigma
from torchbayes.quantization import quantize

# The module (the package exports its main() under the same name).
cli_main = importlib.import_module("torchbayes.cli.main")
cli_arguments = importlib.import_module("torchbayes.cli.arguments")
cli_commands = importlib.import_module("torchbayes.cli.commands")

SCRIPT = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


class _Elements(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _evaluation(name: str, n: int = 24) -> ModelEvaluation:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(n, 3, generator=generator), -1)
    predictions = Predictions(probs, torch.rand(n, generator=generator), torch.rand(n, generator=generator), 0.1)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return ModelEvaluation(name, True, 4, predictions, labels, predictions, {"accuracy": 0.5, "nll": 1.0})


# ---------------------------------------------------------------------- 1. script in the report
def test_report_escapes_every_string(tmp_path):
    """A crafted string in every field the page shows stays text: no <img>/<script> element appears."""
    report = write_report(
        tmp_path / "report", [_evaluation(SCRIPT)], title=SCRIPT, summary=SCRIPT, referral=True,
        settings={"data": {"class_names": [SCRIPT]}, SCRIPT: SCRIPT},
        histories={SCRIPT: [{"epoch": SCRIPT, "loss": SCRIPT, "nll": 0.5, "kl_per_example": 0.1,
                             "train_accuracy": 0.5, "test_accuracy": 0.5, "seconds": 1.0}]},
        tables=[Table([SCRIPT], [[SCRIPT]], title=SCRIPT, note=SCRIPT)])
    page = report.html.read_text(encoding="utf-8")
    assert SCRIPT not in page and "<script" not in page and "<img src=x" not in page
    elements = _Elements()
    elements.feed(page)
    images = [attrs for tag, attrs in elements.tags if tag == "img"]
    # Only the figures are images, each a PNG data URI; no element carries an event handler.
    assert images and all((a.get("src") or "").startswith("data:image/png;base64,") for a in images)
    assert not any(key.startswith("on") for _, attrs in elements.tags for key in attrs)
    assert not any(tag == "script" for tag, _ in elements.tags)
    # The text is still there, escaped.
    assert page.count("&lt;img src=x onerror=") >= 8
    # Links point into the report folder (the slug of a crafted name has no path separators).
    links = [attrs["href"] for tag, attrs in elements.tags if tag == "a"]
    assert links and all(re.fullmatch(r"images/[a-z0-9-]+\.png", href) for href in links)


# ---------------------------------------------------------------------- crafted checkpoints
def _cli_checkpoint(path: Path, **config: Any) -> Path:
    """A checkpoint as ``torchbayes train --deterministic`` writes it (untrained MLP on 8x8 digits)."""
    settings = {"dataset": "digits", "model": "mlp", "ood_classes": [8, 9], "bayesian": False, "moped": False,
                "epochs": 1, **config}
    cfg = TrainConfig.from_dict(settings)
    model = build_classifier(cfg, (1, 8, 8), 8)
    history = [{"epoch": 1, "loss": 1.0, "nll": 1.0, "kl_per_example": 0.0, "train_accuracy": 0.5,
                "test_accuracy": 0.5, "seconds": 0.1, "extra": {}}]
    return save_checkpoint(path, model, cfg, (1, 8, 8), 8, history)


def _tamper(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Edit a checkpoint as an attacker would: load it safely, change it, save it with a
    digest recomputed (the digest guards against corruption, not against a forger)."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    payload["sha256"] = checkpoint._tensor_digest(payload["state_dict"])
    torch.save(payload, path)
    return path


def _settings(payload: dict[str, Any]) -> dict[str, Any]:
    return payload["extra"]["torchbayes_cli"]


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"torchbayes {command}: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    return lines[0]


def _set_nan_weight(p: dict[str, Any]) -> None:
    p["state_dict"]["1.weight"][0, 0] = math.nan


CRAFTED = [
    # 1. script or wrong types in the metadata the digest does not cover
    (lambda p: _settings(p)["history"][0].update(epoch=SCRIPT), "history[0]['epoch']"),
    (lambda p: _settings(p)["history"][0].update(loss=math.inf), "history[0]['loss']"),
    (lambda p: _settings(p)["history"][0].update(test_accuracy=7.0), "must be in [0, 1]"),
    (lambda p: _settings(p)["history"][0].update(script=SCRIPT), "history[0] must be a dict with keys among"),
    (lambda p: _settings(p).update(history=7), "history must be a list"),
    (lambda p: _settings(p)["config"].update(dataset=["a"]), "dataset must be str"),
    (lambda p: _settings(p)["config"].update(model=SCRIPT * 200), "model must be a non-empty text"),
    (lambda p: _settings(p)["config"].update(epochs=-5), "epochs must be a positive integer"),
    (lambda p: _settings(p)["config"].update(seed=2**70), "seed must be an integer in"),
    (lambda p: _settings(p)["config"].update(ood_classes=[SCRIPT]), "ood_classes must be a list of integers"),
    (lambda p: _settings(p)["config"].update(onerror=SCRIPT), "unknown settings"),
    (lambda p: _settings(p).update(class_names=[SCRIPT]), "expected the keys"),
    # 11. malformed shapes: one line, not "'int' object is not iterable"
    (lambda p: _settings(p).update(input_shape=5), "input_shape must be"),
    (lambda p: _settings(p).update(input_shape=[1, 8]), "input_shape must be"),
    (lambda p: _settings(p).update(input_shape=[1, 8, 10**9]), "input_shape must be"),
    (lambda p: _settings(p).update(num_classes=True), "num_classes must be an integer"),
    (lambda p: _settings(p).update(int8="yes"), "int8 must be true or false"),
    # 3. a diverged (NaN) model is refused by evaluate and quantize
    (_set_nan_weight, "non-finite values"),
]


@pytest.mark.parametrize("change, expected", CRAFTED)
def test_crafted_checkpoint_settings_are_one_line_exit_2(change, expected, tmp_path, capsys):
    path = _tamper(_cli_checkpoint(tmp_path / "m.pt"), change)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_checkpoint(path)
    for command in ("evaluate", "quantize"):
        assert main([command, str(path), "--out", str(tmp_path / command), "--quiet"]) == EXIT_USAGE
        line = _one_error_line(capsys.readouterr().err, command)
        assert expected in line and "<img" not in line.replace(repr(SCRIPT)[1:-1], "")  # repr, not raw
        assert not (tmp_path / command).exists()


def test_valid_checkpoint_still_loads(tmp_path):
    loaded = load_checkpoint(_cli_checkpoint(tmp_path / "m.pt"))
    assert loaded.input_shape == (1, 8, 8) and loaded.num_classes == 8 and loaded.history[0]["epoch"] == 1


# ---------------------------------------------------------------------- 2. paths from a checkpoint
@pytest.mark.parametrize("config, flag", [({"dataset": "/proc/self"}, "--dataset PATH"),
                                          ({"dataset": "cifar10", "data_root": "/proc/self"}, "--data-root")])
@pytest.mark.parametrize("command", ["evaluate", "quantize"])
def test_paths_stored_in_a_checkpoint_are_never_read(config, flag, command, tmp_path, capsys, monkeypatch):
    # quantize refuses deterministic models first: give it a Bayesian one
    path = _cli_checkpoint(tmp_path / "m.pt", bayesian=command == "quantize", **config)
    read: list[str] = []
    monkeypatch.setattr(cli_arguments, "load_image_dataset", lambda source, **kw: read.append(source))
    assert main([command, str(path), "--out", str(tmp_path / "out"), "--quiet"]) == EXIT_USAGE
    line = _one_error_line(capsys.readouterr().err, command)
    assert flag in line and "never read" in line
    assert read == []  # nothing was opened


# ---------------------------------------------------------------------- 3. divergence
def test_divergence_stops_training_without_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "m.pt"
    code = main(["train", "--dataset", "digits", "--deterministic", "--epochs", "2", "--lr", "1e30",
                 "--out", str(out), "--quiet"])
    assert code == EXIT_FAILURE
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "diverged" in line and "--lr" in line and "no checkpoint was written" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_training_at_chance_or_exploding_is_never_silent(tmp_path, capsys):
    # lr 10 makes Adam's steps ~10 per weight: the run either diverges (exit 1) or ends near
    # chance; both must be reported.
    code = main(["train", "--dataset", "digits", "--deterministic", "--epochs", "1", "--lr", "10",
                 "--out", str(tmp_path / "m.pt"), "--quiet"])
    err = capsys.readouterr().err
    if code == EXIT_OK:
        assert "warning:" in err and "chance" in err and "--lr" in err
    else:
        assert code == EXIT_FAILURE and "diverged" in err


def test_training_warnings_chance_and_explosion():
    data = SimpleNamespace(train_y=torch.arange(400) % 4, num_classes=4)
    cfg = TrainConfig.from_dict({"bayesian": False, "lr": 10.0})

    def epoch(loss: float, accuracy: float) -> EpochSummary:
        return EpochSummary(epoch=1, loss=loss, nll=loss, kl_per_example=0.0, train_accuracy=accuracy,
                            test_accuracy=accuracy, seconds=0.0)

    # Chance is 25% (balanced classes); 3 standard errors on 400 examples is 6.5 points.
    assert training_warnings([epoch(1.0, 0.9)], data, cfg) == []
    (chance,) = training_warnings([epoch(1.0, 0.30)], data, cfg)
    assert "chance" in chance and "--lr 10" in chance
    (exploded,) = training_warnings([epoch(1.0, 0.9), epoch(50.0, 0.9)], data, cfg)
    assert "exploded" in exploded


# ---------------------------------------------------------------------- 4. outputs checked first
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts loading data (the outputs must be checked before)."""
    def work(*args, **kwargs):
        raise AssertionError("the command started working before checking its output path")
    monkeypatch.setattr(cli_arguments, "load_image_dataset", work)
    for command in cli_commands.COMMANDS.values():
        if hasattr(command, "load_checkpoint"):
            monkeypatch.setattr(command, "load_checkpoint", work)


def _bad_outputs(tmp_path: Path) -> list[tuple[Path, str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "a-folder").mkdir()
    return [(tmp_path / "a-folder", "is a folder"), (blocker / "m.pt", "is a file, not a folder"),
            (tmp_path / ("n" * 300 + ".pt"), "too long")]


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, no_work):
    for out, expected in _bad_outputs(tmp_path):
        assert main(["train", "--out", str(out), "--quiet"]) == EXIT_USAGE
        line = _one_error_line(capsys.readouterr().err, "train")
        assert line.startswith("torchbayes train: error: --out:") and expected in line
        assert main(["quantize", str(tmp_path / "m.pt"), "--out", str(out), "--quiet"]) == EXIT_USAGE
        assert "--out" in _one_error_line(capsys.readouterr().err, "quantize")
    folder_cases = [(tmp_path / "a-file" / "r", "is a file"), (tmp_path / ("n" * 300), "too long")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    folder_cases.append((tmp_path / "mine", "holds files that are not a report's"))
    for out, expected in folder_cases:
        for argv in (["evaluate", str(tmp_path / "m.pt"), "--out", str(out)],
                     ["train", "--report", str(out), "--out", str(tmp_path / "m.pt")], ["demo", "--out", str(out)]):
            assert main([*argv, "--quiet"]) == EXIT_USAGE
            assert expected in _one_error_line(capsys.readouterr().err, argv[0])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_folder_is_refused_before_any_work(tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", "--out", str(locked / "m.pt"), "--quiet"]) == EXIT_USAGE
        assert "cannot write in" in _one_error_line(capsys.readouterr().err, "train")
    finally:
        locked.chmod(0o700)


def test_probe_of_a_read_only_folder(tmp_path, monkeypatch):
    """Root ignores permissions, so the write probe itself is made to fail here."""
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    with pytest.raises(ValueError, match=r"cannot write in .*Permission denied"):
        check_writable_parent(tmp_path / "m.pt")


# ---------------------------------------------------------------------- 5. atomic reports
def test_failed_report_leaves_the_old_one_intact(tmp_path, monkeypatch):
    out = tmp_path / "report"
    write_report(out, [_evaluation("first")], title="first")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "images" / "x.png"))
    monkeypatch.setattr(plots, "risk_coverage_plot", full_disk)  # after some files were written
    with pytest.raises(OSError, match="No space left on device"):
        write_report(out, [_evaluation("second")], title="second")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary sibling left
    monkeypatch.undo()
    write_report(out, [_evaluation("third")], title="third")  # replacing works once the disk has room
    assert "third" in (out / "report.html").read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_full_disk_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def full_disk(args, console):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "report" / "report.html"))
    monkeypatch.setitem(cli_main._COMMANDS, "evaluate", full_disk)
    assert main(["evaluate", "x.pt", "--quiet"]) == EXIT_FAILURE
    line = _one_error_line(capsys.readouterr().err, "evaluate")
    assert line.startswith("torchbayes evaluate: failed: No space left on device: ")


def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    """torch.save's C++ writer turns the OSError into 'unexpected pos'; the real error comes out,
    the old checkpoint stays and no temporary file is left."""
    path = tmp_path / "m.pt"
    checkpoint.save_checkpoint(BayesLinear(30, 20), path)
    old = path.read_bytes()
    real_fdopen = os.fdopen

    class FillingUp:
        """The temporary file, on a disk that is full after 4 kB."""

        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillingUp(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save_checkpoint(BayesLinear(300, 200), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# ---------------------------------------------------------------------- 6. estimator names
def test_estimator_names_are_normalised_or_refused_on_every_path(tmp_path):
    layer = BayesLinear(4, 3)
    layer.estimator = "Flipout"
    assert layer.estimator == "flipout"
    with pytest.raises(ValueError, match="estimator must be one of"):
        layer.estimator = "bogus"
    assert layer.estimator == "flipout"
    assert BayesLinear(4, 3, estimator="Reparameterization").estimator == "reparameterization"
    # A checkpoint storing the reference's spelling loads normalised; an unknown name is refused.
    path = tmp_path / "m.pt"
    checkpoint.save_checkpoint(nn.Sequential(BayesLinear(4, 3, estimator="flipout")), path)
    for stored, expected in (("Reparameterization", "reparameterization"), ("LOCAL", "local")):
        _tamper(path, lambda p, s=stored: p["layers"]["0"].update(estimator=s))
        model = nn.Sequential(BayesLinear(4, 3))
        checkpoint.load_checkpoint(path, model)
        assert model[0].estimator == expected
    _tamper(path, lambda p: p["layers"]["0"].update(estimator="bogus"))
    with pytest.raises(CheckpointError, match="estimator must be one of"):
        checkpoint.load_checkpoint(path, nn.Sequential(BayesLinear(4, 3)))


# ---------------------------------------------------------------------- 7. tiny prior sigma
def test_tiny_prior_sigma_is_refused_or_exact():
    with pytest.raises(ValueError, match=r"prior_sigma must be >= 2\.33e-10 in float32"):
        BayesLinear(4, 3, prior_sigma=1e-30)
    with pytest.raises(ValueError, match="sigma2 must be >="):
        ScaleMixturePrior(0.5, 1.0, 1e-30)
    assert smallest_prior_sigma(torch.float64) < 1e-70
    # Just above the float32 bound the KL is finite, differentiable and matches the closed
    # form computed in float64 (relative 1e-5: float32 sums of 15 terms of the same sign).
    for dtype, sigma_p in ((torch.float32, 3e-10), (torch.float64, 1e-30)):
        layer = BayesLinear(4, 3, dtype=dtype, prior_sigma=torch.tensor(sigma_p, dtype=dtype))
        kl = layer.kl_divergence()
        kl.backward()
        kl = kl.detach()
        assert torch.isfinite(kl) and all(torch.isfinite(p.grad).all() for p in layer.parameters())
        expected = 0.0
        for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)):
            m, s = mu.detach().double(), torch.nn.functional.softplus(rho.detach().double())
            expected += float((math.log(sigma_p) - s.log() + (s**2 + m**2) / (2 * sigma_p**2) - 0.5).sum())
        assert float(kl) == pytest.approx(expected, rel=1e-5)


def test_tiny_prior_sigma_from_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    checkpoint.save_checkpoint(nn.Sequential(BayesLinear(4, 3)), path)
    _tamper(path, lambda p: p["state_dict"]["0.weight_prior.sigma"].fill_(1e-30))
    with pytest.raises(CheckpointError, match=r"prior sigma.*must be >="):
        checkpoint.load_checkpoint(path, nn.Sequential(BayesLinear(4, 3)))
    mixture = nn.Sequential(BayesLinear(4, 3, prior=ScaleMixturePrior(0.5, 1.0, 0.01)))
    checkpoint.save_checkpoint(mixture, path)
    for change, expected in ((lambda h: h.update(sigma2=1e-30), "sigma2 must be >="),
                             (lambda h: h.update(pi=7.0), "pi must be in"),
                             (lambda h: h.update(forward="x"), "unknown setting"),
                             (lambda h: h.update(num_samples="many"), "must be a int")):
        checkpoint.save_checkpoint(mixture, path)
        _tamper(path, lambda p, c=change: c(p["layers"]["0"]["priors"]["weight"]["hyperparameters"]))
        with pytest.raises(CheckpointError, match=expected):
            checkpoint.load_checkpoint(path, nn.Sequential(BayesLinear(4, 3, prior=ScaleMixturePrior())))


# ---------------------------------------------------------------------- 8. quantization calibration
def test_quantize_refuses_empty_calibration_and_warns_on_zero_width():
    model = nn.Sequential(BayesLinear(4, 8), nn.ReLU(), BayesLinear(8, 2)).eval()
    for empty in ([], iter(()), [torch.zeros(0, 4)]):
        with pytest.raises(ValueError, match="calibration_data holds no inputs"):
            quantize(model, empty)
    with pytest.warns(UserWarning, match="zero-width input range"):
        quantize(model, torch.zeros(32, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(model, torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------- 9. huge num_samples
def test_predict_refuses_a_result_that_cannot_fit_before_computing():
    model = nn.Sequential(BayesLinear(4, 16), nn.ReLU(), BayesLinear(16, 10))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    # 10**9 samples x 64 inputs x 10 outputs x 4 bytes x 3 copies = 7.7 TB: no machine has it.
    with pytest.raises(ValueError, match=r"num_samples=1000000000 .* needs about 7.68e\+03 GB"):
        predict(model, torch.randn(64, 4), num_samples=10**9)
    assert calls == [1]  # one probe forward of one input, nothing else
    assert model.training  # modes restored


# ---------------------------------------------------------------------- 10. signals while saving
_SIGNAL_SCRIPT = """
import os, signal, sys
from torchbayes import checkpoint
from torchbayes.cli import main
real = checkpoint._RecordingWriter.write
def write(self, data):  # the signal arrives while torch.save is writing the file
    os.kill(os.getpid(), signal.{name})
    return real(self, data)
checkpoint._RecordingWriter.write = write
sys.exit(main(["train", "--dataset", "digits", "--deterministic", "--epochs", "1", "--batch-size", "512",
               "--out", sys.argv[1], "--quiet"]))
"""


@pytest.mark.parametrize("name, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_signal_while_saving_cleans_up(name, code, word, tmp_path):
    out = tmp_path / "m.pt"
    run = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT.format(name=name), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == code, run.stderr
    assert run.stderr.strip() == f"torchbayes train: {word}"
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor a hidden .tmp-*.pt


# ---------------------------------------------------------------------- 11. CLI messages
@pytest.mark.parametrize("seed", ["-1", "1e23", str(2**32), "x"])
def test_seed_is_validated(seed, capsys, no_work):
    assert main(["train", "--seed", seed]) == EXIT_USAGE
    assert "--seed" in capsys.readouterr().err.strip().splitlines()[-1]


def _image_folder(root: Path, images_per_class: dict[str, int]) -> Path:
    from PIL import Image

    for name, count in images_per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (6, 6), (40 * i, 0, 0)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("classes, expected", [({"a": 1, "b": 1}, "needs at least 2 (one to train on"),
                                               ({"a": 5, "b": 1}, "class 'b'"),
                                               ({"only": 4}, "a classifier needs at least two")])
def test_tiny_image_folders_are_one_line(classes, expected, tmp_path, capsys):
    pytest.importorskip("torchvision")
    folder = _image_folder(tmp_path / "imgs", classes)
    assert main(["train", "--dataset", str(folder), "--out", str(tmp_path / "m.pt"), "--quiet"]) == EXIT_USAGE
    assert expected in _one_error_line(capsys.readouterr().err, "train")


def test_random_bytes_and_unsafe_pickles_are_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"x": datetime.date(2020, 1, 1)}, unsafe)
    for path, expected in ((junk, "not a readable checkpoint"), (unsafe, "GLOBAL datetime.date")):
        assert main(["evaluate", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == EXIT_USAGE
        assert expected in _one_error_line(capsys.readouterr().err, "evaluate")


# ---------------------------------------------------------------------- 12. meta device, to_empty
def test_meta_device_repr_and_to_empty():
    with torch.device("meta"):
        built = nn.Sequential(BayesConv2d(1, 2, 3), nn.Flatten(), BayesLinear(8, 2))
    moved = nn.Sequential(BayesConv2d(1, 2, 3), nn.Flatten(), BayesLinear(8, 2)).to("meta")
    for model in (built, moved, BayesLinear(3, 2, device="meta")):
        assert "GaussianPrior" in repr(model)
    real = moved.to_empty(device="cpu")
    for m in real.modules():
        if isinstance(m, BayesianModule):
            m.weight_prior.sigma.zero_()  # what uninitialised memory may hold
    with pytest.raises(ValueError, match=r"weight_prior.sigma is not a positive.*reset_parameters\(\)"):
        real(torch.randn(2, 1, 4, 4))
    for m in real.modules():
        if isinstance(m, BayesianModule):
            m.reset_parameters()
            assert float(m.weight_prior.sigma) == 1.0 and float(m.weight_prior.mu) == 0.0
    out = real(torch.randn(2, 1, 4, 4))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    assert torch.isfinite(sum(m.kl_divergence() for m in real.modules() if isinstance(m, BayesianModule)))


# ====================================================================== issue 22, section 6 (library)
# Flags and seeds are checked where they enter the public API, with one message naming the
# argument: Python takes any non-empty string as true, and torch's manual_seed overflows
# with a bare "Overflow when unpacking long long" from 2**64 on.
def _dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _flag_calls() -> list[tuple[str, Callable[[Any], Any]]]:
    from torchbayes import Ensemble, dnn_to_bnn, metrics
    from torchbayes.conversion import moped
    from torchbayes.ensemble import fit_ensemble
    from torchbayes.export import deployable_model
    from torchbayes.interchange import load_reference_state_dict, reference_state_dict

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    probs = torch.softmax(torch.randn(6, 3), -1)
    return [
        ("dropout", lambda v: predict(dnn_to_bnn(_dropout_net()), x, 4, dropout=v)),
        ("shared_weights", lambda v: predict(dnn_to_bnn(_dropout_net()), x, 4, shared_weights=v)),
        ("vectorize", lambda v: fit_ensemble(Ensemble([_dropout_net(), _dropout_net()]), x, y, epochs=1,
                                             vectorize=v)),
        ("adaptive", lambda v: metrics.expected_calibration_error(probs, y, 5, adaptive=v)),
        ("stochastic", lambda v: deployable_model(dnn_to_bnn(_dropout_net()), stochastic=v)),
        ("load_deterministic", lambda v: moped(dnn_to_bnn(_dropout_net()), _dropout_net(), load_deterministic=v)),
        ("strict", lambda v: load_reference_state_dict(dnn_to_bnn(_dropout_net()), {}, strict=v)),
        ("include_priors", lambda v: reference_state_dict(dnn_to_bnn(_dropout_net()), include_priors=v)),
    ]


@pytest.mark.parametrize("value", ["False", "no", "", 0, 1, 1.0, np.bool_(False)])
def test_library_flags_refuse_anything_but_a_bool(value):
    for name, call in _flag_calls():
        with pytest.raises(TypeError, match=rf"^{name} must be True or False(, or None)?|^{name} must be True, False"):
            call(value)


def test_library_flags_still_take_bools():
    for name, call in _flag_calls():
        if name == "strict":
            call(False)  # an empty state_dict loads only when not strict
            continue
        call(False)
        call(True)


def _seed_calls() -> list[Callable[[Any], Any]]:
    from torchbayes import Ensemble, dnn_to_bnn, noise_generator
    from torchbayes.distributed import seed_per_rank
    from torchbayes.ensemble import fit_ensemble

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def in_noise_generator(seed: Any) -> None:
        with noise_generator(seed):
            pass

    return [
        lambda s: predict(dnn_to_bnn(_dropout_net()), x, 4, seed=s),
        lambda s: predict(_dropout_net(), x, 4, seed=s, dropout=True),
        lambda s: predict(dnn_to_bnn(_dropout_net()), x, 4, seed=s, method="moments"),
        lambda s: predict(Ensemble([dnn_to_bnn(_dropout_net()) for _ in range(2)]), x, 2, seed=s),
        lambda s: fit_ensemble(Ensemble([_dropout_net(), _dropout_net()]), x, y, epochs=1, seed=s),
        in_noise_generator,
        seed_per_rank,
    ]


@pytest.mark.parametrize("seed, error, expected", [
    (2**70, ValueError, "from 0 to 2**64 - 1"), (2**64, ValueError, "from 0 to 2**64 - 1"),
    (-1, ValueError, "from 0 to 2**64 - 1"), (1.5, TypeError, "got float"), (True, TypeError, "got bool"),
    ("0", TypeError, "got str")])
def test_seeds_out_of_range_name_the_argument(seed, error, expected):
    for call in _seed_calls():
        with pytest.raises(error, match=re.escape(expected)) as caught:
            call(seed)
        assert "seed" in str(caught.value) and "Overflow" not in str(caught.value)


def test_largest_seeds_work():
    for call in _seed_calls()[:-1]:  # seed_per_rank reseeds the global generator: the last one alone
        call(0)
        call(2**64 - 1)


@pytest.mark.parametrize("selector", [42, 3.0, b"0", {"0": 1}, [1], ["0", None], object()])
@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_dnn_to_bnn_selectors_are_checked(selector, argument):
    from torchbayes import dnn_to_bnn

    model = _dropout_net()
    with pytest.raises(TypeError, match=rf"^{argument} must be a module name, a list of names"):
        dnn_to_bnn(model, **{argument: selector})
    assert not any(isinstance(m, BayesianModule) for m in model.modules())  # unchanged


# ====================================================================== issue 22, section 1 (report folders)
# A folder is replaced only when everything in it, recursively, is what a report writes;
# no path a command reads or writes may lie inside a folder it replaces; all of it is checked
# before any work (exit 2), and a symlinked folder is written through.
def _earlier_report(folder: Path) -> Path:
    write_report(folder, [_evaluation("earlier")], title="earlier", referral=True)
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _foreign_trees(tmp_path: Path) -> list[tuple[Path, str]]:
    """Earlier reports holding, somewhere inside, something a report does not write."""
    cases = []
    for name, make in [
        ("photo in images/", lambda f: (f / "images" / "holiday.jpg").write_text("photo")),
        ("subfolder in images/", lambda f: (f / "images" / "2024").mkdir()),
        ("png of the user", lambda f: (f / "images" / "holiday.png").write_text("photo")),
        ("folder named like a figure", lambda f: (f / "images" / "referral.png").unlink()
         or (f / "images" / "referral.png").mkdir()),
        ("folder named results.json", lambda f: (f / "results.json").unlink() or (f / "results.json").mkdir()
         or (f / "results.json" / "data.csv").write_text("1,2")),
        ("symlink as report.html", lambda f: (f / "report.html").unlink()
         or (f / "report.html").symlink_to(tmp_path / "precious.txt")),
        ("symlinked images/", lambda f: shutil.rmtree(f / "images") or (f / "images").symlink_to(tmp_path / "album")),
        ("hidden file", lambda f: (f / ".notes").write_text("mine")),
    ]:
        folder = _earlier_report(tmp_path / name.replace(" ", "-").replace("/", ""))
        make(folder)
        cases.append((folder, name))
    return cases


def test_report_folder_with_anything_foreign_anywhere_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "precious.txt").write_text("precious")
    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "cat.png").write_text("cat")
    for folder, name in _foreign_trees(tmp_path):
        before = _tree(folder)
        for argv in (["evaluate", str(tmp_path / "m.pt"), "--out", str(folder)],
                     ["train", "--report", str(folder), "--out", str(tmp_path / "m.pt")],
                     ["demo", "--quick", "--out", str(folder)]):
            assert main([*argv, "--quiet"]) == EXIT_USAGE, name
            assert "not a report's" in _one_error_line(capsys.readouterr().err, argv[0]), name
        with pytest.raises(ValueError, match="not a report's"):
            write_report(folder, [_evaluation("new")], title="new")
        assert _tree(folder) == before, name
    assert (tmp_path / "precious.txt").read_text() == "precious" and (tmp_path / "album" / "cat.png").exists()


def test_an_earlier_report_is_still_replaced(tmp_path):
    folder = _earlier_report(tmp_path / "r")
    report = write_report(folder, [_evaluation("second")], title="second", referral=True)
    assert "second" in report.html.read_text() and sorted(os.listdir(tmp_path)) == ["r"]  # no leftovers


def test_files_appearing_while_the_command_runs_are_never_deleted(tmp_path, monkeypatch):
    from torchbayes.cli import report as report_module

    folder = _earlier_report(tmp_path / "r")
    real_check = report_module.check_report_folder

    def check_then_user_writes(out_dir):  # the user saves a file while the model trains
        checked = real_check(out_dir)
        (folder / "images" / "notes.txt").write_text("mine")
        return checked

    monkeypatch.setattr(report_module, "check_report_folder", check_then_user_writes)
    with pytest.raises(ValueError, match="appeared while the command ran"):
        write_report(folder, [_evaluation("new")], title="new")
    assert (folder / "images" / "notes.txt").read_text() == "mine" and (folder / "report.html").exists()
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_inputs_and_outputs_never_overlap(tmp_path, capsys, no_work):
    model = tmp_path / "f10b" / "images" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_text("weights")
    (tmp_path / "f2").mkdir()
    (tmp_path / "moped.pt").write_text("weights")
    cases = [
        # train --out inside (or equal to, or holding) --report: the swap would replace the checkpoint
        (["train", "--out", str(tmp_path / "f1" / "report.html"), "--report", str(tmp_path / "f1")], "lies inside"),
        (["train", "--out", str(tmp_path / "f1" / "results.json"), "--report", str(tmp_path / "f1")], "lies inside"),
        (["train", "--out", str(tmp_path / "f1" / "deep" / "m.pt"), "--report", str(tmp_path / "f1")], "lies inside"),
        (["train", "--out", str(tmp_path / "same"), "--report", str(tmp_path / "same")], "same path"),
        (["train", "--out", str(tmp_path / "m.pt"), "--report", str(tmp_path / "m.pt" / "r")], "lies inside"),
        (["train", "--moped", str(tmp_path / "moped.pt"), "--out", str(tmp_path / "moped.pt")], "same path"),
        (["train", "--moped", str(tmp_path / "f2" / "moped.pt"), "--report", str(tmp_path / "f2")], "lies inside"),
        # evaluate: the checkpoint inside the report folder
        (["evaluate", str(model), "--out", str(tmp_path / "f10b")], "lies inside"),
        (["evaluate", str(tmp_path / "f2" / "m.pt"), "--out", str(tmp_path / "f2")], "lies inside"),
        (["quantize", str(tmp_path / "moped.pt"), "--out", str(tmp_path / "moped.pt")], "same path"),
        # an image folder read as data holding the output
        (["train", "--dataset", str(tmp_path / "f2"), "--out", str(tmp_path / "f2" / "m.pt")], "lies inside"),
    ]
    for argv, expected in cases:
        assert main([*argv, "--quiet"]) == EXIT_USAGE, argv
        assert expected in _one_error_line(capsys.readouterr().err, argv[0]), argv
    assert model.read_text() == "weights" and (tmp_path / "moped.pt").read_text() == "weights"


def test_symlinked_report_folder_is_written_through(tmp_path):
    target = _earlier_report(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    report = write_report(link, [_evaluation("through the link")], title="through the link")
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays a link
    assert "through the link" in (target / "report.html").read_text()
    assert report.html == link / "report.html" and report.html.exists()
    assert sorted(os.listdir(tmp_path)) == ["link", "target"]


def test_symlinked_checkpoint_is_written_through(tmp_path):
    target = _cli_checkpoint(tmp_path / "target.pt")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    _cli_checkpoint(link, seed=7)
    assert link.is_symlink() and load_checkpoint(target).config.seed == 7


def test_current_folder_and_its_parents_are_refused(tmp_path, capsys, no_work, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), "..", "sub/../.", str(tmp_path)):
        for argv in (["evaluate", str(tmp_path.parent.parent / "m.pt"), "--out", out], ["demo", "--out", out]):
            assert main([*argv, "--quiet"]) == EXIT_USAGE, out
            assert "current" in _one_error_line(capsys.readouterr().err, argv[0])
    assert work.exists() and os.getcwd() == str(work)


def test_name_lengths_count_the_temporary_sibling(tmp_path, capsys, no_work):
    # 250 bytes fit a file name (255), but not the report's temporary ".NAME.tmp-XXXXXXXX" (264)
    for length in (242, 250, 255):
        out = tmp_path / ("r" * length)
        for argv in (["evaluate", str(tmp_path / "m.pt"), "--out", str(out)], ["demo", "--out", str(out)],
                     ["train", "--out", str(tmp_path / "m.pt"), "--report", str(out)]):
            assert main([*argv, "--quiet"]) == EXIT_USAGE
            assert "too long" in _one_error_line(capsys.readouterr().err, argv[0])
    report = write_report(tmp_path / ("r" * 241), [_evaluation("fits")], title="fits")  # 241 + 14 = 255
    assert report.html.exists()


# ====================================================================== issue 22, section 5 (checkpoint sizes)
# The settings beside the weights (input shape, classes, members, image size, samples) are not
# covered by the digest: none of them may drive an allocation before it is checked against the
# stored tensors, and every refusal is exit 2.
SIZE_CRAFTED = [
    (lambda p: _settings(p).update(input_shape=[3, 1024, 1024]), "does not fit its settings"),  # mlp: 1.2G weights
    (lambda p: _settings(p).update(input_shape=[1, 46000, 46000]), "input_shape must be"),
    (lambda p: _settings(p).update(input_shape=[5000, 32, 32]), "input_shape must be"),
    (lambda p: _settings(p).update(input_shape=[1, 8, 0]), "input_shape must be"),
    (lambda p: _settings(p).update(num_classes=100_000), "does not fit its settings"),
    (lambda p: _settings(p)["config"].update(model="resnet18"), "does not fit its settings"),
    (lambda p: _settings(p)["config"].update(method="ensemble", num_members=1000), "num_members is 1000"),
    (lambda p: _settings(p)["config"].update(image_size=10**6), "image_size must be an integer in [1, 1024]"),
    (lambda p: _settings(p)["config"].update(num_samples=10**12), "num_samples must be an integer in [1, 10000]"),
]


@pytest.mark.parametrize("change, expected", SIZE_CRAFTED)
def test_checkpoint_settings_cannot_drive_allocations(change, expected, tmp_path, capsys, monkeypatch):
    from torchbayes.cli import training

    path = _tamper(_cli_checkpoint(tmp_path / "m.pt"), change)
    built = training.build_model

    def only_on_meta(*args, **kwargs):  # a real (CPU) model is never built from refused settings
        assert torch.empty(0).device.type == "meta", "a model was built before the settings were checked"
        return built(*args, **kwargs)

    monkeypatch.setattr(training, "build_model", only_on_meta)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_checkpoint(path)
    assert main(["evaluate", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == EXIT_USAGE
    assert expected in _one_error_line(capsys.readouterr().err, "evaluate")
    assert not (tmp_path / "r").exists()


def test_crafted_ensemble_member_count(tmp_path):
    path = _cli_checkpoint(tmp_path / "e.pt", method="ensemble", num_members=3)
    assert load_checkpoint(path).model.num_members == 3
    _tamper(path, lambda p: _settings(p)["config"].update(num_members=2))
    with pytest.raises(CheckpointError, match="num_members is 2 but the file holds the weights of 3 members"):
        load_checkpoint(path)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--num-samples", str(10**9), "--report", "r"], "--num-samples: must be a positive integer at most 10,000"),
    (["evaluate", "m.pt", "--num-samples", "10001"], "--num-samples: must be a positive integer at most 10,000"),
    (["train", "--image-size", "100000"], "--image-size: must be a positive integer at most 1024"),
    (["evaluate", "m.pt", "--image-size", "0"], "--image-size: must be a positive integer at most 1024"),
])
def test_sizes_from_the_command_line_are_bounded_up_front(argv, expected, capsys, no_work):
    assert main([*argv, "--quiet"]) == EXIT_USAGE
    assert expected in capsys.readouterr().err


# ====================================================================== issue 22, section 6 (messages)
def _epochs(*losses: float) -> list[EpochSummary]:
    return [EpochSummary(epoch=i + 1, loss=v, nll=v, kl_per_example=0.0, train_accuracy=0.9, test_accuracy=0.9,
                         seconds=0.0) for i, v in enumerate(losses)]


def test_recipe_loss_is_compared_within_each_phase():
    data = SimpleNamespace(train_y=torch.arange(400) % 4, num_classes=4)
    recipe = TrainConfig(pretrain_epochs=3)  # the defaults: pre-training (cross-entropy), then the ELBO
    # The ELBO adds the KL term: 0.05 -> 3.1 between the phases is no explosion.
    assert training_warnings(_epochs(0.4, 0.1, 0.05, 3.2, 3.1, 3.0), data, recipe) == []
    (elbo,) = training_warnings(_epochs(0.4, 0.1, 0.05, 3.0, 3.1, 80.0), data, recipe)
    assert "exploded from 3 to 80" in elbo and "pre-training" not in elbo
    (pre,) = training_warnings(_epochs(0.4, 9.0, 50.0, 3.2, 3.1, 3.0), data, recipe)
    assert "of the pre-training exploded" in pre and "--pretrain-lr" in pre
    # deterministic runs have one phase, whatever pretrain_epochs says
    (det,) = training_warnings(_epochs(0.4, 0.1, 0.05, 3.2), data, TrainConfig(method="deterministic"))
    assert "exploded from 0.05 to 3.2" in det


@pytest.mark.parametrize("settings, expected", [
    ({"kl_weight": 1e6}, "--kl-weight 1e+06 makes the KL term dominate"),
    ({"moped": True, "moped_delta": 50.0}, "--moped-delta 50"),
    ({"prior_mu": 100.0}, "--prior-mu 100"),
    ({"avuc": True, "avuc_beta": 1e4}, "--avuc-beta 10000"),
    ({"moped": False, "posterior_rho_init": 20.0}, "--posterior-rho-init 20"),
    ({"prior_sigma": 1e-5}, "--prior-sigma 1e-05"),
    ({"lr": 1.0}, "--lr 1 is too large"),
    ({"kl_weight": 5.0}, "or the defaults instead of --kl-weight 5"),
    ({}, "try a smaller --lr than 0.001"),
])
def test_divergence_blames_the_setting_that_was_changed(settings, expected):
    from torchbayes.cli.training import _likely_cause

    cause = _likely_cause(TrainConfig(**settings))
    assert expected in cause, cause
    if "--lr" not in expected:
        assert "--lr 0.001 is too large" not in cause


def test_divergence_in_the_pre_training_names_pretrain_lr(tmp_path, capsys):
    out = tmp_path / "m.pt"
    code = main(["train", "--dataset", "digits", "--pretrain-epochs", "1", "--pretrain-lr", "1e30", "--epochs", "1",
                 "--out", str(out), "--quiet"])
    assert code == EXIT_FAILURE
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "diverged" in line and "--pretrain-lr 1e+30 is too large" in line and "smaller --lr " not in line
    assert not out.exists()


def _bn_data(n: int) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 2, 2, generator=generator)
    y = torch.arange(n) % 2
    return SimpleNamespace(train_x=x, train_y=y, test_x=x, test_y=y, input_shape=(1, 2, 2), num_classes=2)


def test_batchnorm_never_sees_a_batch_of_one():
    from torchbayes.cli.training import batch_bounds, train_classifier

    bn = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert batch_bounds(129, 64, bn) == [(0, 64), (64, 129)]  # the last one merged: every example once
    assert batch_bounds(129, 64, plain) == [(0, 64), (64, 128), (128, 129)]
    assert batch_bounds(65, 64, bn) == [(0, 65)] and batch_bounds(128, 64, bn) == [(0, 64), (64, 128)]
    for n, size in ((10, 1), (1, 64)):
        with pytest.raises(ValueError, match="BatchNorm layers, which need at least 2 examples per batch"):
            batch_bounds(n, size, bn)
    history = train_classifier(bn, _bn_data(65), TrainConfig(method="deterministic", batch_size=64, epochs=2),
                               show_progress=False)
    assert len(history) == 2 and all(math.isfinite(h.loss) for h in history)


def test_bad_image_sizes_and_batch_sizes_are_exit_2_up_front(tmp_path, capsys):
    from torchbayes.cli.models import build_model

    with pytest.raises(ValueError, match="lenet needs images of at least 4x4 pixels, got 3x3"):
        build_model("lenet", (1, 3, 3), 2)
    assert build_model("lenet", (1, 4, 4), 2)(torch.rand(2, 1, 4, 4)).shape == (2, 2)
    cases = [
        (["train", "--dataset", "digits", "--image-size", "16"], "--image-size resizes the images of a folder"),
        (["train", "--dataset", "digits", "--model", "resnet18", "--deterministic", "--batch-size", "1"],
         "--batch-size: the model has BatchNorm layers"),
    ]
    for argv, expected in cases:
        assert main([*argv, "--out", str(tmp_path / "m.pt"), "--quiet"]) == EXIT_USAGE
        assert expected in _one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "m.pt").exists()


def test_ensemble_prediction_is_not_refused_over_num_samples():
    from torchbayes import Ensemble

    ensemble = Ensemble([_dropout_net(), _dropout_net()])
    # 10**9 samples of 2 inputs would need ~70 GB, but an ensemble's samples are its 2 members
    result = predict(ensemble, torch.randn(2, 4), num_samples=10**9)
    assert result.samples.shape == (2, 2, 3)


# ====================================================================== issue 22, sections 3-4 (reliab-ens)
# The issue's reproductions; each class's variants are in tests/test_baselines.py (ensembles)
# and tests/test_moments.py (moment propagation).
def _issue22_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def test_issue22_ensemble_mode_survives_a_bad_input_and_sees_changed_members():
    from torchbayes import Ensemble

    x = torch.randn(6, 4)
    ensemble = Ensemble([_issue22_net() for _ in range(4)]).eval()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        ensemble(torch.randn(6, 5))
    assert ensemble.loop_reason() is None  # the caller's error flipped nothing
    predict(ensemble, x)
    for member in ensemble.members:
        member[1] = nn.Tanh()
    hook = ensemble.members[3][3].register_forward_hook(lambda m, a, out: out + 1.0)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in ensemble.members])
    torch.testing.assert_close(predict(ensemble, x).samples, expected)
    hook.remove()
    with pytest.raises(ValueError, match=r"same module object.*\[net\] \* M"):
        Ensemble([_issue22_net()] * 4)


def test_issue22_fit_ensemble_refusals_and_fallbacks():
    from torchbayes import Ensemble, fit_ensemble
    from torchbayes.nn import BayesLinear

    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    for vectorize in (None, False):
        with pytest.raises(ValueError, match="loss must return one scalar per minibatch"):
            fit_ensemble(Ensemble([_issue22_net() for _ in range(2)]), x, y, vectorize=vectorize,
                         loss=lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none"))
    # A prior of sigma 1e-3 makes KL / N about 1e3 per example here (each weight's KL ~ 1e3),
    # against a cross-entropy near log 3: a loss without the KL term could not reach 100.
    bayesian = Ensemble([nn.Sequential(BayesLinear(4, 3, prior_sigma=1e-3)) for _ in range(2)])
    history = fit_ensemble(bayesian, x, y, epochs=1, batch_size=12)
    assert history[0] > 100


def test_issue22_moment_rules_subclasses_keywords_results_and_scales():
    from torchbayes.nn import BayesLinear
    from torchbayes.prediction.moments import UnsupportedOperationError

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(UnsupportedOperationError, match=r"Doubled overrides forward\(\)"):
        predict(nn.Sequential(BayesLinear(4, 8), Doubled(8, 3)), torch.randn(6, 4), method="moments")

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = BayesLinear(4, 3)

        def forward(self, x):
            return torch.mul(torch.sigmoid(input=self.fc(x)), other=2)

    assert predict(Keywords(), torch.randn(6, 4), method="moments").samples.isfinite().all()
    with pytest.raises(ValueError, match="overflows float32"):
        BayesLinear(4, 3, posterior_rho_init=1e20)
