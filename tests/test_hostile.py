"""Hostile input (issue 16): each numbered class of the hostile test stays fixed.

Crafted checkpoints, extreme arguments, full disks, read-only paths and signals: every
one must end in a clear one-line error with the documented exit code (or a warning),
never in silent wrong results, lost work or script in a report.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

from torchbayes.cli.evaluation import ModelEvaluation, Predictions  # noqa: E402
from torchbayes.cli.report import Table, write_report  # noqa: E402

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
