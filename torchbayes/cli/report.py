"""The report folder: a self-contained HTML page, its figures as PNG files, and the numbers as JSON.

The HTML page embeds every figure as a base64 ``data:`` URI, so the single file can be
moved, mailed or attached on its own; the PNG files beside it are the same images, for
slides and documents.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from torchbayes import metrics, plots
from torchbayes.cli.evaluation import METRIC_LABELS, ModelEvaluation

__all__ = ["Report", "Figure", "comparison_table", "referral_results", "write_report"]

#: Fractions of cases referred whose accuracies go into the JSON (the plot uses 1% steps).
REFERRAL_FRACTIONS: tuple[float, ...] = tuple(i / 20 for i in range(11))

REPORT_HTML = "report.html"
REPORT_JSON = "results.json"
IMAGES_DIR = "images"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f4f7; } td.best { font-weight: bold; background: #eaf6ea; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #e3e3e3; padding: 0.5em; background: #fff; }
figure img { display: block; max-width: 520px; height: auto; }
figcaption { font-size: 0.9em; color: #555; max-width: 520px; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.95em; }
"""

#: For each metric, whether a larger value is better (used to mark the best model).
_HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "ece": False, "brier": False, "aurc": False,
                     "ood_auroc_entropy": True, "ood_auroc_mutual_information": True,
                     "predict_ms_per_image": False}


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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key == "accuracy":
        return f"{100 * value:.2f}%"
    if key == "predict_ms_per_image":
        return f"{value:.3f}"
    return f"{value:.4f}"


def comparison_table(evaluations: Sequence[ModelEvaluation]) -> str:
    """The models' metrics side by side, as aligned plain text for the console."""
    names = [e.name for e in evaluations]
    rows = [[METRIC_LABELS[k]] + [_format(k, e.metrics.get(k)) for e in evaluations] for k in METRIC_LABELS]
    header = ["metric"] + names
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _make_figures(evaluations: Sequence[ModelEvaluation], images: Path) -> list[Figure]:
    figures: list[Figure] = []
    for e in evaluations:
        slug = _slug(e.name)
        path = images / f"reliability-{slug}.png"
        plots.reliability_diagram(e.test.probs, e.test_labels, 15, title=e.name, path=path)
        figures.append(Figure("Reliability diagrams", f"{e.name}: reliability",
                              "Accuracy against confidence on the test split; a calibrated model follows "
                              "the diagonal. Red boxes are the gaps to confidence.", path))
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
            figures.append(Figure("Uncertainty on in- and out-of-distribution inputs", f"{e.name}: {label}",
                                  f"{label.capitalize()} of the test inputs (classes seen in training) and of "
                                  "the held-out classes; the less the histograms overlap, the better the "
                                  "model flags what it does not know.", path))
    for e in evaluations:
        path = images / f"risk-coverage-{_slug(e.name)}.png"
        plots.risk_coverage_plot(e.test.entropy, e.correct, path=path)
        figures.append(Figure("Risk-coverage curves", f"{e.name}: risk-coverage",
                              "Error rate on the test inputs the model answers when it abstains on the most "
                              "uncertain ones (by predictive entropy): lower curves are better.", path))
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


def referral_results(evaluations: Sequence[ModelEvaluation],
                     fractions: Sequence[float] = REFERRAL_FRACTIONS) -> dict[str, Any]:
    """The referral curves' numbers, as plain values for the JSON.

    Returns:
        ``{"fractions": [...], "accuracy": {curve label: [...]}, "random": {model name:
        accuracy}}``: accuracy on the kept test cases when each fraction of the most
        uncertain ones is referred (:func:`torchbayes.metrics.referral_curve`), and the
        expected accuracy of random referral (the accuracy without referral), per model.
    """
    curves = {label: metrics.referral_curve(u, c, fractions).tolist()
              for label, (u, c) in _referral_scores(evaluations).items()}
    random = {e.name: float(e.correct.double().mean()) for e in evaluations}
    return {"fractions": [float(f) for f in fractions], "accuracy": curves, "random": random}


def _referral_figure(evaluations: Sequence[ModelEvaluation], images: Path) -> Figure:
    path = images / "referral.png"
    plots.referral_plot(_referral_scores(evaluations), title="Referral curve (test split)", path=path)
    return Figure("Referral curves", "referral",
                  "Accuracy on the test cases each model keeps when it refers the most uncertain ones "
                  "(e.g. to a doctor), for 0-50% referred. Dashed lines: random referral of the same "
                  "predictions. A curve that climbs faster tells better which cases need a second opinion.",
                  path)


def _referral_table(referral: Mapping[str, Any]) -> str:
    esc = html.escape
    labels = list(referral["accuracy"])
    head = "".join(f"<th>{esc(label)}</th>" for label in labels)
    rows = "".join(
        f"<tr><td>{100 * f:.0f}%</td>"
        + "".join(f"<td>{100 * referral['accuracy'][label][i]:.2f}%</td>" for label in labels) + "</tr>"
        for i, f in enumerate(referral["fractions"]))
    random = ", ".join(f"{esc(name)} {100 * acc:.2f}%" for name, acc in referral["random"].items())
    return (f"<h2>Referral</h2><table><thead><tr><th>referred</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
            f"<p class=\"note\">Accuracy on the kept test cases. Random referral keeps, on average, the "
            f"accuracy without referral: {random}.</p>")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _best(evaluations: Sequence[ModelEvaluation], key: str) -> float | None:
    values = [e.metrics.get(key) for e in evaluations if e.metrics.get(key) is not None]
    if len(values) < 2:
        return None
    return max(values) if _HIGHER_IS_BETTER[key] else min(values)


def _metrics_table(evaluations: Sequence[ModelEvaluation]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(e.name)}</th>" for e in evaluations)
    rows = []
    for key, label in METRIC_LABELS.items():
        best = _best(evaluations, key)
        cells = []
        for e in evaluations:
            value = e.metrics.get(key)
            mark = ' class="best"' if best is not None and value == best else ""
            cells.append(f"<td{mark}>{esc(_format(key, value))}</td>")
        rows.append(f"<tr><td>{esc(label)}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _training_table(name: str, history: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{h['epoch']}</td><td>{h['loss']:.4f}</td><td>{h['nll']:.4f}</td>"
        f"<td>{h['kl_per_example']:.4f}</td><td>{100 * h['train_accuracy']:.1f}%</td>"
        f"<td>{100 * h['test_accuracy']:.1f}%</td><td>{h['seconds']:.1f}</td></tr>" for h in history)
    return (f"<h3>{esc(name)}</h3><table><thead><tr><th>epoch</th><th>loss</th><th>NLL</th><th>KL / N</th>"
            f"<th>train accuracy</th><th>test accuracy</th><th>seconds</th></tr></thead><tbody>{rows}</tbody></table>")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a reader sees "not available"
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(out_dir: str | Path, evaluations: Sequence[ModelEvaluation], *, title: str,
                 summary: str = "", settings: Mapping[str, Any] | None = None,
                 histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 referral: bool = False) -> Report:
    """Write ``report.html``, ``results.json`` and ``images/*.png`` into ``out_dir``.

    Args:
        out_dir: the report folder (created; files of an earlier report are replaced).
        evaluations: the models to compare (from :func:`evaluate_classifier`).
        title: the page's title.
        summary: a paragraph (plain text) under the title.
        settings: data and training settings, shown on the page and stored in the JSON.
        histories: per model name, its training epochs (``EpochSummary`` as dicts).
        referral: add the referral curves (a figure, and :func:`referral_results` under
            the JSON's ``"referral"`` key).

    Returns:
        A :class:`Report` with the written paths.

    Example:
        >>> write_report("report", [det_eval, bayes_eval], title="MNIST: deterministic vs Bayesian")
    """
    if not evaluations:
        raise ValueError("write_report needs at least one evaluation")
    directory = Path(out_dir)
    images = directory / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    figures = _make_figures(evaluations, images)
    if referral:
        figures.append(_referral_figure(evaluations, images))
    settings = dict(settings or {})
    histories = dict(histories or {})
    from torchbayes import __version__

    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    results = {
        "title": title,
        "created": created,
        "torchbayes_version": __version__,
        "settings": settings,
        "models": {e.name: {"bayesian": e.bayesian, "num_samples": e.num_samples, "metrics": e.metrics,
                            "training": list(histories.get(e.name, []))} for e in evaluations},
        "metric_labels": METRIC_LABELS,
        "images": [str(f.path.relative_to(directory)) for f in figures],
    }
    if referral:
        results["referral"] = referral_results(evaluations)
    json_path = directory / REPORT_JSON
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")

    esc = html.escape
    sections: dict[str, list[Figure]] = {}
    for f in figures:
        sections.setdefault(f.section, []).append(f)
    parts = [f"<h1>{esc(title)}</h1>", f"<p class=\"note\">torchbayes {esc(__version__)} &middot; {esc(created)}</p>"]
    if summary:
        parts.append(f"<p>{esc(summary)}</p>")
    parts += ["<h2>Results</h2>", _metrics_table(evaluations),
              "<p class=\"note\">Best value per row in bold. NLL: mean negative log-likelihood of the true "
              "class. ECE: expected calibration error. AURC: area under the risk-coverage curve. OOD AUROC: "
              "how well the uncertainty separates inputs of held-out classes from test inputs (0.5 = chance, "
              "1 = perfect). Mutual information is the epistemic part of the uncertainty, which only a "
              "Bayesian model has.</p>"]
    if referral:
        parts.append(_referral_table(results["referral"]))
    for section, items in sections.items():
        parts.append(f"<h2>{esc(section)}</h2><div class=\"figures\">")
        for f in items:
            parts.append(f"<figure><img src=\"{_data_uri(f.path)}\" alt=\"{esc(f.title)}\" "
                         f"width=\"520\"><figcaption><b>{esc(f.title)}.</b> {esc(f.caption)} "
                         f"(<a href=\"{esc(str(f.path.relative_to(directory)))}\">PNG</a>)</figcaption></figure>")
        parts.append("</div>")
    if histories:
        parts.append("<h2>Training</h2>")
        parts += [_training_table(name, h) for name, h in histories.items() if h]
    parts.append(f"<h2>Settings</h2><pre>{esc(json.dumps(_json_safe(settings), indent=2))}</pre>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{esc(title)}</title>\n"
            f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")
    html_path = directory / REPORT_HTML
    html_path.write_text(page, encoding="utf-8")
    return Report(directory, html_path, json_path, figures)
