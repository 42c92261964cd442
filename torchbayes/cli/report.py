"""The report folder: a self-contained HTML page, its figures as PNG files, and the numbers as JSON.

The HTML page embeds every figure as a base64 ``data:`` URI, so the single file can be
moved, mailed or attached on its own; the PNG files beside it are the same images, for
slides and documents.

The page is rendered from ``templates/report.html.j2`` by Jinja2 with autoescape on:
model names, class names, settings and training histories may come from a checkpoint
(which a stranger may have crafted), and none of them reaches the page unescaped.

The folder is replaced atomically: the new report is written to a hidden sibling
folder, then swapped in, so a failure (full disk, interrupt) leaves an earlier report
intact. A folder is replaced only when everything in it, recursively, is what a report
writes (:func:`check_report_folder`); a symlinked folder is written through (the link
stays, its target is replaced); and no path the command reads may lie inside a folder it
replaces (:func:`check_separate`).

Extending the page: a new model is one more :class:`ModelEvaluation` in ``evaluations``
(a column of the metrics table, its figures, its training table); a new metric is a key
of :data:`~torchbayes.cli.evaluation.METRIC_LABELS` (a row) and of ``_HIGHER_IS_BETTER``;
a new figure is a :class:`Figure` from ``_make_figures``; any other table is a
:class:`Table` passed as ``tables=`` to :func:`write_report`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from torchbayes import metrics, plots
from torchbayes.cli.evaluation import CONFORMAL_SCORES, METRIC_LABELS, ModelEvaluation

__all__ = [
    "Cell",
    "Figure",
    "Report",
    "Table",
    "check_report_folder",
    "check_separate",
    "check_writable_parent",
    "aligned_text",
    "comparison_table",
    "referral_results",
    "write_report",
    "write_report_folder",
]

#: Fractions of cases referred whose accuracies go into the JSON (the plot uses 1% steps).
REFERRAL_FRACTIONS: tuple[float, ...] = tuple(i / 20 for i in range(11))

REPORT_HTML = "report.html"
REPORT_JSON = "results.json"
IMAGES_DIR = "images"
TEMPLATE = "report.html.j2"

#: The names of the figures reports write into ``images/`` (``_make_figures``, ``_referral_figure``
#: and the regression report's; slugs are ``[a-z0-9-]``). A folder holding anything else is not
#: a report's, and is never replaced: a new kind of figure must be named here.
_REPORT_IMAGE = re.compile(
    r"(?:reliability|risk-coverage|uncertainty-(?:entropy|mi)|predicted-vs-true|error-vs-uncertainty)"
    r"-[a-z0-9-]+\.png|(?:referral|calibration|conformal-size)\.png"
)

#: Bytes the hidden sibling's name adds to the folder's: ``.NAME.tmp-XXXXXXXX`` (and ``.old-``).
_SIBLING_EXTRA = len(".") + len(".tmp-") + 8

#: For each metric, whether a larger value is better (used to mark the best model).
_HIGHER_IS_BETTER = {
    "accuracy": True,
    "nll": False,
    "ece": False,
    "brier": False,
    "aurc": False,
    "ood_auroc_entropy": True,
    "ood_auroc_mutual_information": True,
    "predict_ms_per_image": False,
    "train_seconds": False,
}


@dataclass
class Figure:
    """One image of the report: where it is and what it shows."""

    section: str
    title: str
    caption: str
    path: Path


@dataclass
class Report:
    """Paths of a written report."""

    directory: Path
    html: Path
    json: Path
    figures: list[Figure]


@dataclass
class Cell:
    """One table cell: its text (escaped on the page) and whether it is the row's best value."""

    text: str
    best: bool = False


@dataclass
class Table:
    """A table of the page: a header row, rows of cells and an optional note under it.

    Args:
        header: the column titles.
        rows: rows of :class:`Cell` (or plain strings, made cells).
        title: a heading above the table (``<h2>``, ``<h3>`` if ``subsection``).
        note: a paragraph under the table.
    """

    header: Sequence[str]
    rows: Sequence[Sequence[Cell | str]]
    title: str = ""
    note: str = ""
    subsection: bool = False

    def __post_init__(self) -> None:
        self.rows = [[c if isinstance(c, Cell) else Cell(str(c)) for c in row] for row in self.rows]
        self.header = [str(h) for h in self.header]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key == "accuracy":
        return f"{100 * value:.2f}%"
    if key == "predict_ms_per_image":
        return f"{value:.3f}"
    if key == "train_seconds":
        return f"{value:.1f}"
    return f"{value:.4f}"


def comparison_table(evaluations: Sequence[ModelEvaluation]) -> str:
    """The models' metrics side by side, as aligned plain text for the console."""
    rows = [[METRIC_LABELS[k], *(_format(k, e.metrics.get(k)) for e in evaluations)] for k in METRIC_LABELS]
    return aligned_text(["metric", *(e.name for e in evaluations)], rows)


def aligned_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``header`` and ``rows`` as plain-text columns: the first left-aligned, the others
    right-aligned, with a rule under the header."""
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def _make_figures(evaluations: Sequence[ModelEvaluation], images: Path) -> list[Figure]:
    figures: list[Figure] = []
    for e in evaluations:
        slug = _slug(e.name)
        path = images / f"reliability-{slug}.png"
        plots.reliability_diagram(e.test.probs, e.test_labels, 15, title=e.name, path=path)
        figures.append(
            Figure(
                "Reliability diagrams",
                f"{e.name}: reliability",
                "Accuracy against confidence on the test split; a calibrated model follows "
                "the diagonal. Red boxes are the gaps to confidence.",
                path,
            )
        )
    for e in evaluations:
        if e.ood is None:
            continue
        slug = _slug(e.name)
        scores = [("predictive entropy", e.test.entropy, e.ood.entropy, "entropy")]
        if e.bayesian:
            scores.append(("mutual information", e.test.mutual_information, e.ood.mutual_information, "mi"))
        for label, inside, outside, key in scores:
            path = images / f"uncertainty-{key}-{slug}.png"
            plots.uncertainty_histogram(inside, outside, label=label, path=path)
            figures.append(
                Figure(
                    "Uncertainty on in- and out-of-distribution inputs",
                    f"{e.name}: {label}",
                    f"{label.capitalize()} of the test inputs (classes seen in training) and of "
                    "the held-out classes; the less the histograms overlap, the better the "
                    "model flags what it does not know.",
                    path,
                )
            )
    for e in evaluations:
        path = images / f"risk-coverage-{_slug(e.name)}.png"
        plots.risk_coverage_plot(e.test.entropy, e.correct, path=path)
        figures.append(
            Figure(
                "Risk-coverage curves",
                f"{e.name}: risk-coverage",
                "Error rate on the test inputs the model answers when it abstains on the most "
                "uncertain ones (by predictive entropy): lower curves are better.",
                path,
            )
        )
    return figures


def _referral_scores(evaluations: Sequence[ModelEvaluation]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per curve label, ``(uncertainty, correct)``: Bayesian models refer by predictive entropy
    and by mutual information, deterministic ones the least confident first."""
    scores: dict[str, tuple[Tensor, Tensor]] = {}
    for e in evaluations:
        if e.bayesian:
            scores[f"{e.name}, predictive entropy"] = (e.test.entropy, e.correct)
            scores[f"{e.name}, mutual information"] = (e.test.mutual_information, e.correct)
        else:
            scores[f"{e.name}, 1 - confidence"] = (1 - e.test.probs.max(-1).values, e.correct)
    return scores


def referral_results(
    evaluations: Sequence[ModelEvaluation], fractions: Sequence[float] = REFERRAL_FRACTIONS
) -> dict[str, Any]:
    """The referral curves' numbers, as plain values for the JSON.

    Returns:
        ``{"fractions": [...], "accuracy": {curve label: [...]}, "random": {model name:
        accuracy}}``: accuracy on the kept test cases when each fraction of the most
        uncertain ones is referred (:func:`torchbayes.metrics.referral_curve`), and the
        expected accuracy of random referral (the accuracy without referral), per model.
    """
    curves = {
        label: metrics.referral_curve(u, c, fractions).tolist()
        for label, (u, c) in _referral_scores(evaluations).items()
    }
    random = {e.name: float(e.correct.double().mean()) for e in evaluations}
    return {"fractions": [float(f) for f in fractions], "accuracy": curves, "random": random}


def _referral_figure(evaluations: Sequence[ModelEvaluation], images: Path) -> Figure:
    path = images / "referral.png"
    plots.referral_plot(_referral_scores(evaluations), title="Referral curve (test split)", path=path)
    return Figure(
        "Referral curves",
        "referral",
        "Accuracy on the test cases each model keeps when it refers the most uncertain ones "
        "(e.g. to a doctor), for 0-50% referred. Dashed lines: random referral of the same "
        "predictions. A curve that climbs faster tells better which cases need a second opinion.",
        path,
    )


def _referral_table(referral: Mapping[str, Any]) -> Table:
    # One row per curve, one column per fraction: the width stays fixed however many models
    # are compared (a column per curve overflowed a 1280-px page with five models).
    rows = [[label] + [_percent(acc, 1) for acc in accuracies] for label, accuracies in referral["accuracy"].items()]
    random = ", ".join(f"{name} {_percent(acc, 2)}" for name, acc in referral["random"].items())
    return Table(
        ["referred", *(f"{100 * f:.0f}%" for f in referral["fractions"])],
        rows,
        title="Referral",
        note="Accuracy on the kept test cases when each fraction of the most uncertain ones is referred "
        f"(column). Random referral keeps, on average, the accuracy without referral: {random}.",
    )


def _conformal_table(evaluations: Sequence[ModelEvaluation]) -> Table:
    """Coverage and mean set size of each model's conformal sets (``evaluate --conformal``)."""
    first = evaluations[0].conformal
    assert first is not None
    alpha = first["alpha"]
    rows = []
    for e in evaluations:
        assert e.conformal is not None
        scores = e.conformal["scores"]
        row = [Cell(e.name)]
        for name in CONFORMAL_SCORES:
            row += [Cell(_percent(scores[name]["coverage"], 1)), Cell(_number(scores[name]["mean_size"], ".2f"))]
        rows.append(row)
    header = ["model"] + [f"{name} {what}" for name in CONFORMAL_SCORES for what in ("coverage", "size")]
    return Table(
        header,
        rows,
        title=f"Conformal prediction sets (alpha = {alpha:g}: at least {100 * (1 - alpha):g}% coverage)",
        note=(
            f"Split conformal prediction over each model's predictive probabilities: {first['carve']} "
            f"({first['calibration']} calibration, {first['test']} measured). Coverage: fraction of test "
            "labels inside their set; size: mean number of classes per set (smaller is more informative). "
            "LAC: sets of the classes with probability >= 1 - q; APS: classes in order of probability "
            "while their cumulative mass is within q (adapts to hard inputs); RAPS: APS with a penalty "
            "0.01 per class beyond the first. Non-randomised, so coverage is at least 1 - alpha."
        ),
    )


def _conformal_figure(evaluations: Sequence[ModelEvaluation], images: Path) -> Figure:
    path = images / "conformal-size.png"
    curves = {}
    for e in evaluations:
        assert e.conformal is not None
        curves[f"{e.name}, APS"] = e.conformal["scores"]["APS"]["strata"]["size"]
    alpha = evaluations[0].conformal["alpha"] if evaluations[0].conformal else 0.0
    plots.set_size_plot(curves, title=f"APS set size against predictive entropy (alpha = {alpha:g})", path=path)
    return Figure(
        "Conformal prediction",
        "set size against uncertainty",
        "Mean APS set size in five equal-mass bins of each model's predictive entropy on the "
        "measured half of the test split. Sets that grow with the uncertainty show that the "
        "uncertainty tells which inputs are hard.",
        path,
    )


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _best(evaluations: Sequence[ModelEvaluation], key: str) -> float | None:
    values = [v for e in evaluations if (v := e.metrics.get(key)) is not None]
    higher = _HIGHER_IS_BETTER.get(key)
    if len(values) < 2 or higher is None:  # a metric without a direction marks no best value
        return None
    return max(values) if higher else min(values)


def _metrics_table(evaluations: Sequence[ModelEvaluation]) -> Table:
    rows = []
    for key, label in METRIC_LABELS.items():
        best = _best(evaluations, key)
        rows.append(
            [Cell(label)]
            + [
                Cell(_format(key, e.metrics.get(key)), best=best is not None and e.metrics.get(key) == best)
                for e in evaluations
            ]
        )
    return Table(
        ["metric", *(e.name for e in evaluations)],
        rows,
        note=(
            "Best value per row in bold. NLL: mean negative log-likelihood of the true class. ECE: expected "
            "calibration error. AURC: area under the risk-coverage curve. OOD AUROC: how well the uncertainty "
            "separates inputs of held-out classes from test inputs (0.5 = chance, 1 = perfect). Mutual "
            "information is the epistemic part of the uncertainty, which only a Bayesian model has."
        ),
    )


def _number(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec`` if it is a real number, else "n/a"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return format(value, spec)


def _percent(value: Any, digits: int) -> str:
    text = _number(
        100 * value if isinstance(value, (int, float)) and not isinstance(value, bool) else None, f".{digits}f"
    )
    return text if text == "n/a" else text + "%"


_TRAINING_COLUMNS = (
    ("epoch", "epoch", "g"),
    ("loss", "loss", ".4f"),
    ("NLL", "nll", ".4f"),
    ("KL / N", "kl_per_example", ".4f"),
    ("train accuracy", "train_accuracy", "%1"),
    ("test accuracy", "test_accuracy", "%1"),
    ("seconds", "seconds", ".1f"),
)


def _training_table(name: str, history: Sequence[Mapping[str, Any]]) -> Table:
    rows = [
        [_percent(h.get(key), 1) if spec == "%1" else _number(h.get(key), spec) for _, key, spec in _TRAINING_COLUMNS]
        for h in history
    ]
    return Table([label for label, _, _ in _TRAINING_COLUMNS], rows, title=name, subsection=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a reader sees "not available"
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def check_report_folder(out_dir: str | Path) -> Path:
    """Raise unless a report can be written to ``out_dir``, before any work is done.

    The folder may be new (its parent folders are created) or an earlier report: only
    ``report.html``, ``results.json`` and ``images/`` holding the report's figures, checked
    recursively (a subfolder, a symlink or any other file in it would be lost when the new
    report replaces the folder, so such a folder is refused). A symlink to a folder is
    written through: the link stays and the folder it points to is checked and replaced.
    The current folder, or a folder holding it, is refused (it cannot be swapped away).
    The names must fit the file system, including the hidden sibling
    ``.NAME.tmp-XXXXXXXX`` the report is first written to, and the nearest existing parent
    must be a folder this process can write in (checked by creating and removing a file).

    Args:
        out_dir: the report folder.

    Returns:
        The folder the report will replace: ``out_dir`` made absolute, symlinks resolved.

    Raises:
        ValueError: ``out_dir`` is a file, lies under a file, holds other files, is or
            holds the current folder, has too long a name or cannot be written (the
            message says which).
    """
    shown = str(out_dir)
    directory = _real(out_dir)
    cwd = _real(os.getcwd())
    if directory == cwd or directory in cwd.parents:
        raise ValueError(
            f"{shown!r} is {'the current folder' if directory == cwd else 'a folder holding the current one'}; "
            "a report replaces its whole folder: give a new subfolder (e.g. report/)"
        )
    if _exists(directory):
        if not directory.is_dir():
            raise ValueError(f"{shown!r} is a file, not a folder")
        others = _foreign_entries(directory)
        if others:
            raise ValueError(
                f"{shown!r} holds files that are not a report's ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); replacing it would delete them: give a new or empty folder"
            )
    check_writable_parent(directory, reserve=_SIBLING_EXTRA)
    return directory


def _real(path: str | Path) -> Path:
    """``path`` absolute, with every symlink resolved (also for parts that do not exist yet)."""
    try:
        return Path(os.path.realpath(os.path.abspath(path)))
    except (OSError, ValueError) as e:  # a symlink loop, a NUL byte...
        raise ValueError(f"{str(path)[:80]!r}: {getattr(e, 'strerror', None) or e}") from None


def _foreign_entries(directory: Path) -> list[str]:
    """What ``directory`` holds that a report does not write, as paths relative to it."""
    foreign: list[str] = []
    try:
        for entry in os.scandir(directory):
            if entry.name in (REPORT_HTML, REPORT_JSON) and entry.is_file(follow_symlinks=False):
                continue
            if entry.name == IMAGES_DIR and entry.is_dir(follow_symlinks=False):
                for image in os.scandir(entry.path):
                    if not (image.is_file(follow_symlinks=False) and _REPORT_IMAGE.fullmatch(image.name)):
                        foreign.append(f"{IMAGES_DIR}/{image.name}")
                continue
            foreign.append(entry.name)
    except OSError as e:
        raise ValueError(f"cannot read {str(directory)!r}: {e.strerror or e}") from None
    return sorted(foreign)


def check_separate(
    outputs: Mapping[str, str | Path | None],
    inputs: Mapping[str, str | Path | None],
    *,
    may_hold: Sequence[str] = (),
) -> None:
    """Raise ``ValueError`` when an output path is an input, holds one, or lies inside one.

    A command replaces its outputs (a file, a report folder) at the end: an input inside
    an output folder (the checkpoint being evaluated, ``--moped``) would be deleted, an
    output equal to an input would overwrite what the command reads, and two outputs that
    overlap (``--out`` inside ``--report``) would overwrite each other. Paths are compared
    after resolving symlinks. ``None`` entries (an option not given) are skipped.

    Args:
        outputs: option name -> path the command writes, e.g. ``{"--out": ..., "--report": ...}``.
        inputs: option name -> path the command reads (a checkpoint, a data folder).
        may_hold: inputs that may hold an output (a folder the command reads only known
            files from, such as a torchvision ``--data-root``).

    Example:
        >>> check_separate({"--out": "r"}, {"checkpoint": "r/model.pt"})
        Traceback (most recent call last):
        ValueError: checkpoint 'r/model.pt' lies inside --out 'r', which the command replaces...
    """
    given_outputs = [(flag, str(path), _real(path)) for flag, path in outputs.items() if path is not None]
    given_inputs = [(flag, str(path), _real(path)) for flag, path in inputs.items() if path is not None]
    for i, (out_flag, out_shown, out_real) in enumerate(given_outputs):
        others = [(f, s, r, "input") for f, s, r in given_inputs] + [
            (f, s, r, "output") for f, s, r in given_outputs[i + 1 :]
        ]
        for flag, shown, real, kind in others:
            if real == out_real:
                raise ValueError(
                    f"{out_flag} {out_shown!r} is the same path as {flag} {shown!r}; "
                    + ("the command reads it, so it " if kind == "input" else "")
                    + f"cannot be written over: give another {out_flag}"
                )
            if out_real in real.parents:
                raise ValueError(
                    f"{flag} {shown!r} lies inside {out_flag} {out_shown!r}, which the command replaces: "
                    f"give another {out_flag}"
                )
            if real in out_real.parents and flag not in may_hold:
                raise ValueError(f"{out_flag} {out_shown!r} lies inside {flag} {shown!r}: give another {out_flag}")


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; ``ValueError`` for a path the system refuses (e.g. a name too long)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise ValueError(f"{str(path)[:80]!r}...: {e.strerror or e}") from None
    return True


def check_writable_parent(path: str | Path, *, reserve: int = 0) -> None:
    """Raise ``ValueError`` unless ``path`` can be created: its names fit the file system and
    its nearest existing parent is a folder this process can write in.

    Args:
        path: a file or folder to be created (or replaced).
        reserve: bytes the last name must leave free (a temporary sibling's longer name).
    """
    path = Path(os.path.abspath(path))
    ancestor = path.parent
    missing = [path.name]
    while not _exists(ancestor):
        missing.append(ancestor.name)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{str(ancestor)!r} is a file, not a folder")
    name_max = os.pathconf(ancestor, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    for i, name in enumerate(missing):  # missing[0] is the last name, the one with a temporary sibling
        size = len(os.fsencode(name)) + (reserve if i == 0 else 0)
        if size > name_max:
            extra = f" with the {reserve} bytes of its temporary name" if reserve and i == 0 else ""
            raise ValueError(
                f"the name {name[:40]!r}... is too long ({size} bytes{extra}; this file system allows {name_max})"
            )
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ValueError(f"cannot write in {str(ancestor)!r}: {e.strerror or e}") from None


def _render(context: Mapping[str, Any]) -> str:
    try:
        import jinja2
    except ImportError as e:  # pragma: no cover - the 'cli' extra is missing
        raise ImportError("the report needs Jinja2: pip install 'torchbayes[cli]'") from e
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("torchbayes.cli", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template(TEMPLATE).render(**context)


@dataclass
class _FigureView:
    """What the template shows of a figure."""

    title: str
    caption: str
    href: str
    data_uri: str = field(repr=False)


def _swap_in(staging: Path, directory: Path) -> None:
    """Move the finished ``staging`` folder to ``directory``, replacing an earlier report.

    The old folder is checked again (files may have appeared in it while the command
    ran), moved aside, and removed only once the new one is in place, file by known file:
    anything that is not a report's stays (in the hidden ``.NAME.old-*`` folder) rather
    than being deleted. If the second rename fails, the old folder is put back.
    """
    if not directory.exists():
        os.rename(staging, directory)
        return
    others = _foreign_entries(directory)
    if others:
        raise ValueError(
            f"{str(directory)!r} now holds files that are not a report's ({', '.join(others[:3])}); "
            "they appeared while the command ran, so the report was not written there"
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    aside.rmdir()  # only its unique name is used
    os.rename(directory, aside)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(aside, directory)
        raise
    _remove_report(aside)


def _remove_report(directory: Path) -> None:
    """Delete a report's own files and folders in ``directory``, never anything else."""
    for name in (REPORT_HTML, REPORT_JSON):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            if not (directory / name).is_symlink() and (directory / name).is_file():
                (directory / name).unlink()
    images = directory / IMAGES_DIR
    if images.is_dir() and not images.is_symlink():
        for image in images.iterdir():
            if _REPORT_IMAGE.fullmatch(image.name) and image.is_file() and not image.is_symlink():
                image.unlink()
    for folder in (images, directory):
        with contextlib.suppress(OSError):  # not empty: something that is not a report's stays
            folder.rmdir()


def write_report(
    out_dir: str | Path,
    evaluations: Sequence[ModelEvaluation],
    *,
    title: str,
    summary: str = "",
    settings: Mapping[str, Any] | None = None,
    histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    referral: bool = False,
    tables: Sequence[Table] = (),
) -> Report:
    """Write ``report.html``, ``results.json`` and ``images/*.png`` into ``out_dir``.

    Everything is written to a hidden sibling folder first and swapped in at the end:
    on any failure an earlier report in ``out_dir`` stays as it was.

    Args:
        out_dir: the report folder (created, or an earlier report replaced; see
            :func:`check_report_folder`).
        evaluations: the models to compare (from :func:`evaluate_classifier`).
        title: the page's title.
        summary: a paragraph (plain text) under the title.
        settings: data and training settings, shown on the page and stored in the JSON.
        histories: per model name, its training epochs (``EpochSummary`` as dicts).
        referral: add the referral curves (a figure, and :func:`referral_results` under
            the JSON's ``"referral"`` key).
        tables: more tables, shown under the metrics table (plain text cells).

    Returns:
        A :class:`Report` with the written paths.

    Raises:
        ValueError: no evaluations, or ``out_dir`` cannot take a report.

    Example:
        >>> write_report("report", [det_eval, bayes_eval], title="MNIST: deterministic vs Bayesian")
    """
    if not evaluations:
        raise ValueError("write_report needs at least one evaluation")
    return write_report_folder(
        out_dir,
        lambda staging: _write_files(
            staging,
            evaluations,
            title=title,
            summary=summary,
            settings=settings,
            histories=histories,
            referral=referral,
            tables=tables,
        ),
    )


def write_report_folder(out_dir: str | Path, write_files: Callable[[Path], list[Figure]]) -> Report:
    """Write a report folder atomically: ``write_files`` fills a hidden sibling folder (and
    returns its figures), which then replaces ``out_dir``; on any failure an earlier report
    there stays as it was. Every report (classification, regression) is written through here.

    Args:
        out_dir: the report folder (see :func:`check_report_folder`).
        write_files: writes ``report.html``, ``results.json`` and ``images/`` into the folder it is given.

    Returns:
        A :class:`Report` with the written paths.
    """
    directory = check_report_folder(out_dir)  # absolute, symlinks resolved: a linked folder is written through
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        written = write_files(staging)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the report from other users
        _swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shown = Path(out_dir)  # the paths as the caller gave them (a symlink stays one)
    figures = [Figure(f.section, f.title, f.caption, shown / f.path.relative_to(staging)) for f in written]
    return Report(shown, shown / REPORT_HTML, shown / REPORT_JSON, figures)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_files(
    directory: Path,
    evaluations: Sequence[ModelEvaluation],
    *,
    title: str,
    summary: str,
    settings: Mapping[str, Any] | None,
    histories: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    referral: bool,
    tables: Sequence[Table],
) -> list[Figure]:
    """Write the report's files into the (empty) ``directory``; returns its figures."""
    images = directory / IMAGES_DIR
    images.mkdir()
    figures = _make_figures(evaluations, images)
    if referral:
        figures.append(_referral_figure(evaluations, images))
    conformal = [e for e in evaluations if e.conformal is not None]
    if conformal:
        figures.append(_conformal_figure(conformal, images))
    settings = dict(settings or {})
    histories = dict(histories or {})
    from torchbayes import __version__

    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    results: dict[str, Any] = {
        "title": title,
        "created": created,
        "torchbayes_version": __version__,
        "settings": settings,
        "models": {
            e.name: {
                "bayesian": e.bayesian,
                "num_samples": e.num_samples,
                "metrics": e.metrics,
                "training": list(histories.get(e.name, [])),
                **({"conformal": e.conformal} if e.conformal is not None else {}),
            }
            for e in evaluations
        },
        "metric_labels": METRIC_LABELS,
        "images": [str(f.path.relative_to(directory)) for f in figures],
    }
    extra_tables = list(tables)
    if referral:
        results["referral"] = referral_results(evaluations)
        extra_tables.insert(0, _referral_table(results["referral"]))
    if conformal:
        extra_tables.insert(0, _conformal_table(conformal))
    (directory / REPORT_JSON).write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")

    sections: dict[str, list[_FigureView]] = {}
    for f in figures:
        href = str(f.path.relative_to(directory))
        sections.setdefault(f.section, []).append(_FigureView(f.title, f.caption, href, _data_uri(f.path)))
    page = _render(
        {
            "title": title,
            "version": __version__,
            "created": created,
            "summary": summary,
            "metrics": _metrics_table(evaluations),
            "tables": extra_tables,
            "sections": list(sections.items()),
            "training": [_training_table(name, h) for name, h in histories.items() if h],
            "settings_json": json.dumps(_json_safe(settings), indent=2),
        }
    )
    (directory / REPORT_HTML).write_text(page, encoding="utf-8")
    return figures
