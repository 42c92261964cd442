"""``torchbayes predict``: a table model's predictions for every row of a file, as CSV.

CSV in, CSV out: the output holds the input's columns as they were, then the prediction
columns. A regressor writes, in the target's units, ``<target>_mean``, ``<target>_std``
(total predictive standard deviation), ``<target>_lower_<L>`` and ``<target>_upper_<L>``
(the central ``L``% interval of the predictive distribution, ``--level``), and the
``_aleatoric_std`` and ``_epistemic_std`` parts. A classifier writes ``<target>_predicted``,
``<target>_confidence``, one ``<target>_prob_<class>`` per class, and the predictive
entropy and mutual information (nats). A NumPy input gives a ``row`` column (its index) in
place of the input's columns.

The output is written to a temporary file in the same folder and renamed over ``--out``
only when complete; it may not be the input file.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from torchbayes.cli.arguments import (
    BadInput,
    Console,
    add_common,
    check_apart,
    check_output_file,
    input_checks,
    positive_int,
    probability,
    shown,
)
from torchbayes.cli.errors import EXIT_OK
from torchbayes.cli.training import Checkpoint, load_checkpoint
from torchbayes.datasets import TableSchema, read_features

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand and its options to ``commands``."""
    parser = commands.add_parser(
        "predict",
        help="predict every row of a table with a checkpoint; CSV out (mean, std, interval)",
        description="Predict every row of a CSV or NumPy table with a checkpoint trained on a table "
        "(torchbayes train --data) and write a CSV: the input's columns, then the predictive mean, "
        "standard deviation and central interval of a regressor (in the target's units), or the class "
        "probabilities of a classifier.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by 'torchbayes train --data'")
    parser.add_argument("--data", metavar="FILE", required=True, help="the rows to predict (CSV, .npy, .npz)")
    parser.add_argument(
        "--out", default=None, help="the CSV written (default: <data>-predictions.csv beside the input)"
    )
    parser.add_argument(
        "--level",
        type=probability,
        default=0.9,
        help="probability of the central prediction intervals (default 0.9)",
    )
    parser.add_argument(
        "--num-samples", type=positive_int, default=None, help="Monte Carlo samples (default: the checkpoint's)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=1024, help="rows per prediction call (default 1024)")
    add_common(parser)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``torchbayes predict`` with parsed ``args``; returns the exit code."""
    data = Path(args.data)
    out = check_output_file(args.out or data.with_name(f"{data.stem}-predictions.csv"), "--out")
    check_apart({"--out": out}, {"--data": data, "checkpoint": args.checkpoint})
    with input_checks("checkpoint"):
        ckpt = load_checkpoint(args.checkpoint)
    schema = ckpt.table
    if schema is None:
        raise BadInput(
            f"checkpoint {args.checkpoint!r} holds an image model; predict reads tables (train one with "
            "torchbayes train --data FILE)"
        )
    with input_checks("--data"):
        x, _ = read_features(data, schema.feature_names)
    level = f"{100 * args.level:g}".replace(".", "_")
    header, columns = _predictions(ckpt, schema, x, args, level)
    taken = set(_input_header(data)) & set(header)
    if taken:
        raise BadInput(f"--data: the input already has a column {sorted(taken)[0]!r}, a prediction column")
    bad = np.argwhere(~np.isfinite(columns))
    if len(bad):
        raise RuntimeError(f"the model predicted a non-finite value for row {bad[0][0]} of {shown(str(data))}")
    with _atomic(out) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        written = 0
        for row, values in zip(_input_rows(data, len(x)), _rows(columns, header, schema)):
            writer.writerow([*row, *values])
            written += 1
        if written != len(x) + 1:  # the file changed while it was read: write nothing
            raise RuntimeError(f"{shown(str(data))} changed while it was read; no predictions were written")
    console(f"predictions of {len(x)} rows: {out}")
    if args.quiet:
        print(out)
    return EXIT_OK


def _predictions(
    ckpt: Checkpoint, schema: TableSchema, x: np.ndarray, args: argparse.Namespace, level: str
) -> tuple[list[str], np.ndarray]:
    """The prediction columns' names and values ``(N, columns)``."""
    model = ckpt.model.to(args.device)
    inputs = schema.feature_scaling.transform(x)
    num_samples = args.num_samples or ckpt.config.num_samples
    target = schema.target_name
    if schema.task == "regression":
        from torchbayes.cli.regression_report import predict_table

        assert schema.target_scaling is not None
        parts = []
        for first in range(0, len(inputs), args.batch_size):  # one batch of rows at a time: bounded memory
            result = predict_table(
                model,
                inputs[first : first + args.batch_size],
                schema.target_scaling,
                method=ckpt.config.method,
                num_samples=num_samples,
                batch_size=args.batch_size,
                device=args.device,
                seed=args.seed + first,
            )
            lower, upper = result.interval(args.level)
            parts.append(
                torch.cat(
                    [
                        result.mean,
                        result.std,
                        lower,
                        upper,
                        result.aleatoric_variance.sqrt(),
                        result.epistemic_variance.sqrt(),
                    ],
                    -1,
                ).numpy()
            )
        names = ["mean", "std", f"lower_{level}", f"upper_{level}", "aleatoric_std", "epistemic_std"]
        return [f"{target}_{n}" for n in names], np.concatenate(parts)
    from torchbayes.cli.evaluation import predict_dataset

    predictions = predict_dataset(
        model,
        inputs,
        num_samples=num_samples,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        show_progress=False,
        dropout=ckpt.config.method == "dropout",
    )
    probs = predictions.probs.double()
    values = torch.cat(
        [
            probs.argmax(-1, keepdim=True).double(),
            probs.max(-1, keepdim=True).values,
            probs,
            predictions.entropy.double().unsqueeze(-1),
            predictions.mutual_information.double().unsqueeze(-1),
        ],
        -1,
    ).numpy()
    names = [
        f"{target}_predicted",
        f"{target}_confidence",
        *(f"{target}_prob_{c}" for c in schema.classes),
        f"{target}_entropy",
        f"{target}_mutual_information",
    ]
    return names, values


def _rows(columns: np.ndarray, header: list[str], schema: TableSchema) -> Iterator[list[str]]:
    """The prediction cells of each row, the header first (17 significant digits: exact floats)."""
    yield header
    for values in columns:
        if schema.task == "classification":
            yield [schema.classes[int(values[0])], *(repr(float(v)) for v in values[1:])]
        else:
            yield [repr(float(v)) for v in values]


def _is_numpy(path: Path) -> bool:
    return path.suffix.lower() in (".npy", ".npz")


def _input_header(path: Path) -> list[str]:
    if _is_numpy(path):
        return ["row"]
    return next(_input_rows(path, 0), None) or []


def _input_rows(path: Path, count: int) -> Iterator[list[str]]:
    """The input's header and rows as text (CSV, blank lines skipped: the rows read_features
    read), or ``row`` and each index (NumPy)."""
    if _is_numpy(path):
        yield ["row"]
        yield from ([str(i)] for i in range(count))
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for row in csv.reader(handle, delimiter=delimiter, strict=True):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            yield row


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[TextIO]:
    """A text file written to a hidden temporary sibling and renamed over ``path`` when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", newline="", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
