"""Tables in the command-line tool: the flags that choose one, its defaults, reading it, and
the report of a model trained on one (shared by ``train --data``, ``evaluate`` and ``predict``).

A checkpoint of a table model stores the table's schema (columns, classes, the
standardisation fitted on the training split, `torchbayes.datasets.TableSchema`) but the
file is never read from the path stored in it: ``evaluate`` and ``predict`` take the file
with ``--data``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from torchbayes.cli.arguments import BadInput, Console, input_checks, probability, shown
from torchbayes.cli.training import NOISE_MODELS, TrainConfig, model_label
from torchbayes.datasets import (
    TABULAR_TASKS,
    DatasetSplits,
    Standardization,
    Table,
    TableSchema,
    TabularSplits,
    read_table,
    split_table,
)

__all__ = [
    "TABLE_DEFAULTS",
    "add_table_arguments",
    "hidden_widths",
    "load_table_splits",
    "classification_splits",
    "evaluation_rows",
    "report_table_model",
    "resolve",
]

#: Training defaults for tables where they differ from the image recipe's (TrainConfig):
#: a small table needs many more, smaller steps than 60,000 images; 100 Monte Carlo
#: samples make the mixture's test log-likelihood stable. benchmarks/sweep_table_defaults.py
#: scores them on validation rows (docs/cli.md shows its table).
TABLE_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "pretrain_epochs": 100,
    "batch_size": 32,
    "lr": 1e-3,
    "pretrain_lr": 1e-3,
    "dropout": 0.05,
    "num_samples": 100,
    "test_fraction": 0.2,
    "val_fraction": 0.1,
}


def hidden_widths(text: str) -> tuple[int, ...]:
    """An argparse ``type=``: hidden widths separated by commas, e.g. ``50`` or ``100,100``."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected widths separated by commas (e.g. 50 or 100,100), got {text!r}"
        ) from None
    if not widths or any(not 1 <= w <= 65_536 for w in widths) or len(widths) > 100:
        raise argparse.ArgumentTypeError(f"expected 1 to 100 widths from 1 to 65536, got {text!r}")
    return widths


def _columns(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_table_arguments(parser: argparse.ArgumentParser, *, training: bool) -> None:
    """Add ``--data`` (and, for ``train``, ``--target``, ``--task``, ``--ignore``, ``--noise``,
    ``--hidden``, ``--test-fraction``, ``--val-fraction``)."""
    parser.add_argument(
        "--data",
        metavar="FILE",
        default=None,
        help="a table instead of images: CSV with a header row (.csv, .tsv), or NumPy .npy / .npz"
        + ("" if training else " (the training file: its test rows are evaluated; another file: all its rows)"),
    )
    if not training:
        return
    parser.add_argument("--target", metavar="COLUMN", default=None, help="--data: the target column (name or index)")
    parser.add_argument(
        "--task", choices=TABULAR_TASKS, default="regression", help="--data: what the target is (default regression)"
    )
    parser.add_argument(
        "--ignore",
        metavar="COLUMNS",
        type=_columns,
        default=(),
        help="--data: columns left out of the inputs, separated by commas (names or indices), e.g. an ID "
        "or a text column",
    )
    parser.add_argument(
        "--noise",
        choices=NOISE_MODELS,
        default=None,
        help="--data regression: the Gaussian head; homoscedastic learns one noise variance, heteroscedastic "
        "predicts one per row (default: heteroscedastic for bayesian and ensemble, homoscedastic for "
        "deterministic and dropout)",
    )
    parser.add_argument(
        "--objective",
        choices=("mc", "moments"),
        default="mc",
        help="--data regression, --method bayesian: the ELBO's expected log-likelihood, by one weight "
        "sample per step (mc, default) or in closed form from propagated moments (moments, sampling-free)",
    )
    parser.add_argument(
        "--hidden",
        type=hidden_widths,
        default=None,
        help="--data: hidden widths of the MLP, separated by commas (default 50: the UCI protocol's network)",
    )
    parser.add_argument(
        "--test-fraction",
        type=probability,
        default=TABLE_DEFAULTS["test_fraction"],
        help=f"--data: share of the rows held out for testing (default {TABLE_DEFAULTS['test_fraction']})",
    )
    parser.add_argument(
        "--val-fraction",
        type=lambda t: 0.0 if t.strip() in ("0", "0.0") else probability(t),
        default=TABLE_DEFAULTS["val_fraction"],
        help=f"--data: share of the rows for validation, reported each epoch (default "
        f"{TABLE_DEFAULTS['val_fraction']}; 0: none)",
    )


def load_table_splits(
    path: str,
    *,
    target: str | int,
    task: str,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    ignore: Sequence[str | int] = (),
    features: Sequence[str] | None = None,
) -> TabularSplits:
    """Read and split the table ``path``; what is wrong with it is bad input of ``--data``."""
    with input_checks("--data"):
        table = read_table(path, target=target, task=task, ignore=ignore, features=features)
        return split_table(table, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)


def classification_splits(splits: TabularSplits) -> DatasetSplits:
    """A classification table as the classifiers' `torchbayes.datasets.DatasetSplits` (no OOD rows)."""
    width = splits.input_shape[0]
    return DatasetSplits(
        name=splits.name,
        train_x=splits.train_x,
        train_y=splits.train_y,
        test_x=splits.test_x,
        test_y=splits.test_y,
        ood_x=torch.empty(0, width),
        classes=tuple(range(splits.num_classes)),
        ood_classes=(),
        class_names=splits.table.classes,
    )


def _same(a: Standardization | None, b: Standardization | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a.mean) == len(b.mean) and all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a.mean + a.std, b.mean + b.std)
    )


def evaluation_rows(
    path: str | None, checkpoint: str, schema: TableSchema, config: TrainConfig, console: Console
) -> tuple[TabularSplits | None, Table]:
    """The rows ``evaluate`` scores: the test split when ``path`` is the training file (its
    training split standardises exactly as the checkpoint's), else every row of ``path``.

    Returns:
        ``(splits, table)``: the re-made splits of the training file (``None`` for another
        file) and the table read.
    """
    if path is None:
        raise BadInput(
            f"checkpoint {checkpoint!r} was trained on the table {shown(config.dataset)}; paths stored in a "
            "checkpoint are never read: give the file with --data FILE"
        )
    with input_checks("--data"):
        table = read_table(path, target=schema.target_name, task=schema.task, features=schema.feature_names)
        if schema.task == "classification" and not set(table.classes) <= set(schema.classes):
            unknown = sorted(set(table.classes) - set(schema.classes))
            raise ValueError(f"class {unknown[0][:40]!r} is not one the model knows ({', '.join(schema.classes[:8])})")
    try:
        splits = split_table(
            table, test_fraction=config.test_fraction, val_fraction=config.val_fraction, seed=config.seed
        )
    except ValueError:
        splits = None
    if (
        splits is not None
        and _same(splits.feature_scaling, schema.feature_scaling)
        and _same(splits.target_scaling, schema.target_scaling)
        and splits.table.classes == schema.classes
    ):
        return splits, table
    console(
        f"note: {shown(path)} is not the training file (its training split is not standardised as the "
        f"checkpoint's): evaluating all its {len(table.x)} rows"
    )
    return None, table


def _relabelled(table: Table, schema: TableSchema) -> np.ndarray:
    """Class indices of ``table`` in the checkpoint's class order."""
    position = {c: i for i, c in enumerate(schema.classes)}
    return np.array([position[table.classes[i]] for i in table.y], dtype=np.int64)


def report_table_model(
    model: nn.Module,
    config: TrainConfig,
    schema: TableSchema,
    splits: TabularSplits | None,
    table: Table,
    *,
    history: Sequence[Mapping[str, Any]],
    out_dir: str,
    num_samples: int,
    batch_size: int,
    baselines: bool,
    args: argparse.Namespace,
    console: Console,
) -> None:
    """Evaluate a table model on the test rows (or every row of another file) and write its
    report; a regressor gets the baselines trained on the same training split beside it."""
    from torchbayes.cli.commands.evaluate import evaluate_and_report

    rows_x = splits.test_x if splits is not None else schema.feature_scaling.transform(table.x)
    if schema.task == "classification":
        labels = splits.test_y if splits is not None else torch.from_numpy(_relabelled(table, schema))
        data = DatasetSplits(
            name=table.name,
            train_x=splits.train_x if splits is not None else rows_x[:0],
            train_y=splits.train_y if splits is not None else labels[:0],
            test_x=rows_x,
            test_y=labels,
            ood_x=torch.empty(0, rows_x.shape[1]),
            classes=tuple(range(len(schema.classes))),
            ood_classes=(),
            class_names=schema.classes,
        )
        evaluate_and_report(
            model,
            config,
            data,
            history=history,
            out_dir=out_dir,
            num_samples=num_samples,
            batch_size=batch_size,
            args=args,
            console=console,
        )
        return
    from torchbayes.cli.regression import DEFAULT_NOISE, train_regressor
    from torchbayes.cli.regression_report import evaluate_regressor, regression_table, write_regression_report

    assert schema.target_scaling is not None
    target = torch.from_numpy(table.y[splits.test_index] if splits is not None else table.y)
    common = {
        "num_samples": num_samples,
        "batch_size": batch_size,
        "device": args.device,
        "seed": args.seed,
        "show_progress": not args.quiet,
    }
    name = _label(config)
    evaluations = [
        evaluate_regressor(model, rows_x, target, schema.target_scaling, name=name, method=config.method, **common)
    ]
    histories: dict[str, Sequence[Mapping[str, Any]]] = {name: list(history)}
    if baselines and splits is None:
        console("note: no baselines: they are trained on the training split of the training file")
    elif baselines:
        assert splits is not None
        epochs = config.epochs + (config.pretrain_epochs if config.bayesian else 0)
        for method in ("deterministic", "dropout", "ensemble"):
            if method == config.method:
                continue
            baseline = replace(
                config,
                method=method,
                noise=DEFAULT_NOISE[method],
                epochs=epochs,
                moped=False,
                avuc=False,
                dropout=config.dropout if config.method == "dropout" else TABLE_DEFAULTS["dropout"],
            )
            label = _label(baseline)
            console(f"baseline: training a {label} ({epochs} epochs)")
            trained, baseline_history = train_regressor(
                baseline,
                splits,
                device=args.device,
                show_progress=not args.quiet,
                on_epoch=_last_epoch_printer(console, epochs),
            )
            evaluation = evaluate_regressor(
                trained, rows_x, target, schema.target_scaling, name=label, method=method, **common
            )
            evaluations.append(evaluation)
            histories[label] = baseline_history
    for evaluation in evaluations:
        evaluation.metrics["train_seconds"] = (
            float(sum(h.get("seconds", 0.0) for h in histories[evaluation.name]))
            if histories[evaluation.name]
            else None
        )
    console(regression_table(evaluations))
    rows = "test rows" if splits is not None else "all rows"
    settings = {
        "data": {
            "file": table.name,
            "rows": len(table.x),
            "evaluated": f"{len(target)} {rows}",
            "target": schema.target_name,
            "features": list(schema.feature_names),
        },
        "model": config.to_dict(),
        "num_samples": num_samples,
    }
    report = write_regression_report(
        out_dir,
        evaluations,
        title=f"torchbayes: {name} on {table.name}, target {schema.target_name!r}",
        target_name=schema.target_name,
        settings=settings,
        histories=histories,
    )
    console(f"report: {report.html}")
    if args.quiet:
        print(report.html)


def _label(config: TrainConfig) -> str:
    """A regressor's name in tables and reports: its method and its noise model."""
    return f"{model_label(config)} ({config.noise})"


def _last_epoch_printer(console: Console, epochs: int) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch`` that prints only the last epoch (a baseline's training stays short on the console)."""
    from torchbayes.cli.regression import epoch_line

    def show(summary: dict[str, Any]) -> None:
        if summary["epoch"] == epochs:
            console(epoch_line(summary, epochs))

    return show


def resolve(value: Any, key: str, table: bool) -> Any:
    """A flag's value: as given, else the table default (tables) or TrainConfig's."""
    if value is not None:
        return value
    if table and key in TABLE_DEFAULTS:
        return TABLE_DEFAULTS[key]
    return getattr(TrainConfig, key)
