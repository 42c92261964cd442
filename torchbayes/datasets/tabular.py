"""Tables of numbers for regression and classification: CSV and NumPy files, split and standardised.

A table is read whole into memory as float64 (at most ``max_values`` cells, 10^8 by
default: 800 MB), checked cell by cell, split into train / validation / test parts with a
seed, and standardised with the training part's mean and standard deviation (the
targets too, for regression). Every problem is a ``ValueError`` of one line naming the
file, the line (CSV) or row (NumPy) and the column.

Formats:

- **CSV** (``.csv``; ``.tsv`` is tab-separated): a header row of unique column names, then
  one row per example, every field a number. Text is an error (categorical columns must
  be encoded first, or left out with ``ignore``), except in the target column of a
  classification task, whose values are the class labels.
- **NumPy** ``.npy``: a 2-D numeric array, columns named ``"0"``, ``"1"``, ...
- **NumPy** ``.npz``: one 2-D numeric array (as ``.npy``), or 1-D numeric arrays of equal
  length, one per column, named by their keys (``np.savez(path, age=..., price=...)``).
  Files are read with ``allow_pickle=False``: object arrays are refused, never unpickled.

Example:
    >>> table = read_table("houses.csv", target="price", task="regression")
    >>> data = split_table(table, seed=0)
    >>> data.train_x.shape, data.target_scaling.std
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TABULAR_TASKS",
    "TABULAR_SUFFIXES",
    "MAX_VALUES",
    "Standardization",
    "Table",
    "TableSchema",
    "TabularSplits",
    "read_table",
    "read_features",
    "split_table",
]

#: What a table's target is predicted as.
TABULAR_TASKS: tuple[str, ...] = ("regression", "classification")
#: File name endings :func:`read_table` reads.
TABULAR_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".txt", ".npy", ".npz")
#: Default bound on the cells of a table read into memory (float64: 800 MB).
MAX_VALUES = 100_000_000
#: Most columns and classes a table may have (a header of a million names is not a table).
MAX_COLUMNS = 100_000
MAX_CLASSES = 10_000


@dataclass(frozen=True)
class Standardization:
    """``(x - mean) / std`` per column, fitted on a training split.

    Attributes:
        mean, std: per column, ``std > 0`` (a column constant on the training split keeps
            ``std = 1``: it is only centred).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std must be non-empty and of one length, got {len(self.mean)}, {len(self.std)}")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("standardisation needs finite means and positive finite standard deviations")

    @classmethod
    def fit(cls, values: np.ndarray) -> Standardization:
        """Fit on ``values`` ``(N, D)`` (``N >= 1``)."""
        mean = values.mean(0)
        std = values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
        std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def transform(self, values: np.ndarray) -> Tensor:
        """``(values - mean) / std`` as float32, ``(N, D)``."""
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        return torch.from_numpy(((values - mean) / std).astype(np.float32))

    def inverse(self, values: Tensor) -> Tensor:
        """Back to the original units: ``values * std + mean``."""
        return values * values.new_tensor(self.std) + values.new_tensor(self.mean)


@dataclass(frozen=True)
class Table:
    """A table read by :func:`read_table`: numeric features and the target.

    Attributes:
        name: the file it was read from.
        task: ``"regression"`` or ``"classification"``.
        feature_names: the input columns, in order.
        target_name: the target column.
        x: ``(N, D)`` float64 features.
        y: ``(N,)`` float64 targets (regression) or int64 class indices (classification).
        classes: the class labels in index order (classification; empty for regression).
    """

    name: str
    task: str
    feature_names: tuple[str, ...]
    target_name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...] = ()


@dataclass
class TabularSplits:
    """Train / validation / test parts of a table, standardised on the training part.

    Attributes:
        train_x, val_x, test_x: standardised float32 features, ``(N, D)``.
        train_y, val_y, test_y: regression: standardised float32 targets ``(N, 1)``;
            classification: int64 class indices ``(N,)``.
        feature_scaling: the features' standardisation; ``target_scaling`` the target's
            (regression; ``None`` for classification).
        test_index: rows of the table in the test part (0-based), for reports.
    """

    table: Table
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    feature_scaling: Standardization
    target_scaling: Standardization | None
    test_index: np.ndarray

    @property
    def name(self) -> str:
        """The file the table was read from."""
        return self.table.name

    @property
    def task(self) -> str:
        """``"regression"`` or ``"classification"``."""
        return self.table.task

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(D,)``: one example's features."""
        return (len(self.table.feature_names),)

    @property
    def num_classes(self) -> int:
        """Classes of a classification table (0 for regression)."""
        return len(self.table.classes)

    @property
    def schema(self) -> TableSchema:
        """Columns, classes and standardisation: what a model needs to read new rows."""
        return TableSchema(
            self.table.task,
            self.table.feature_names,
            self.table.target_name,
            self.table.classes,
            self.feature_scaling,
            self.target_scaling,
        )


@dataclass(frozen=True)
class TableSchema:
    """What a model trained on a table needs to read new rows: columns, classes and scaling.

    Stored in checkpoints as :meth:`to_dict` and read back with :meth:`from_dict`, which
    validates every value (a checkpoint may come from anyone).

    Attributes:
        task: ``"regression"`` or ``"classification"``.
        feature_names: the input columns, in order; ``target_name`` the target.
        classes: class labels in index order (classification).
        feature_scaling: the inputs' standardisation; ``target_scaling`` the target's
            (regression), so that predictions are reported in the target's own units.
    """

    task: str
    feature_names: tuple[str, ...]
    target_name: str
    classes: tuple[str, ...]
    feature_scaling: Standardization
    target_scaling: Standardization | None

    def __post_init__(self) -> None:
        if self.task not in TABULAR_TASKS:
            raise ValueError(f"task must be one of {TABULAR_TASKS}, got {str(self.task)[:40]!r}")
        texts = [*self.feature_names, self.target_name, *self.classes]
        if not all(isinstance(t, str) and 0 < len(t) <= 4096 and "\0" not in t for t in texts):
            raise ValueError("column names and class labels must be non-empty texts of at most 4096 characters")
        if not 0 < len(self.feature_names) <= MAX_COLUMNS or len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"feature_names must be 1 to {MAX_COLUMNS} distinct names")
        if len(self.feature_scaling.mean) != len(self.feature_names):
            raise ValueError("feature_scaling must have one mean and std per feature")
        if self.task == "regression":
            if self.target_scaling is None or len(self.target_scaling.mean) != 1 or self.classes:
                raise ValueError("a regression schema has one target scaling and no classes")
        elif self.target_scaling is not None or not 2 <= len(self.classes) <= MAX_CLASSES:
            raise ValueError(f"a classification schema has 2 to {MAX_CLASSES} classes and no target scaling")

    def to_dict(self) -> dict[str, object]:
        """Plain values (lists, floats, texts) for checkpoints and JSON."""
        target = self.target_scaling
        return {
            "task": self.task,
            "feature_names": list(self.feature_names),
            "target_name": self.target_name,
            "classes": list(self.classes),
            "feature_mean": list(self.feature_scaling.mean),
            "feature_std": list(self.feature_scaling.std),
            "target_mean": None if target is None else target.mean[0],
            "target_std": None if target is None else target.std[0],
        }

    @classmethod
    def from_dict(cls, data: object) -> TableSchema:
        """The schema of :meth:`to_dict`; anything else (unknown keys, wrong types) is a ``ValueError``."""
        keys = {"task", "feature_names", "target_name", "classes", "feature_mean", "feature_std"}
        keys |= {"target_mean", "target_std"}
        if not isinstance(data, dict) or set(data) != keys:
            shown = sorted(str(k)[:40] for k in data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"table schema must have the keys {sorted(keys)}, got {shown}")

        def texts(name: str) -> tuple[str, ...]:
            value = data[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of texts")
            return tuple(value)

        def numbers(name: str) -> tuple[float, ...]:
            value = data[name]
            if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"{name} must be a list of numbers")
            return tuple(float(v) for v in value)

        target: Standardization | None = None
        if data["target_mean"] is not None or data["target_std"] is not None:
            mean, std = data["target_mean"], data["target_std"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std)):
                raise ValueError("target_mean and target_std must be numbers")
            target = Standardization((float(mean),), (float(std),))
        if not isinstance(data["target_name"], str) or not isinstance(data["task"], str):
            raise ValueError("task and target_name must be texts")
        return cls(
            task=data["task"],
            feature_names=texts("feature_names"),
            target_name=data["target_name"],
            classes=texts("classes"),
            feature_scaling=Standardization(numbers("feature_mean"), numbers("feature_std")),
            target_scaling=target,
        )


# ------------------------------------------------------------------ reading
class _Cells:
    """Rows of floats gathered into one flat float64 buffer (8 bytes a cell), bounded."""

    def __init__(self, width: int, max_values: int, where: str) -> None:
        self.width, self.max_values, self.where = width, max_values, where
        self.values = array("d")
        self.rows = 0

    def add(self, row: Sequence[float]) -> None:
        if len(self.values) + self.width > self.max_values:
            raise ValueError(
                f"{self.where}: more than {self.max_values:,} values ({self.rows:,} rows of {self.width} "
                "columns read); a table is read into memory: subsample it, or pass a larger max_values"
            )
        self.values.extend(row)
        self.rows += 1

    def matrix(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype=np.float64).reshape(self.rows, self.width)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _resolve_column(names: Sequence[str], spec: str | int, what: str, where: str) -> int:
    """The index of column ``spec``: a name, else an integer index (negative from the end)."""
    if isinstance(spec, str) and spec in names:
        return names.index(spec)
    try:
        index = int(spec)
    except (TypeError, ValueError):
        index = None
    if index is not None and -len(names) <= index < len(names):
        return index % len(names)
    shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
    raise ValueError(
        f"{what} {str(spec)[:80]!r} is not a column of {where} (its {len(names)} columns: {shown}; "
        f"or an index from {-len(names)} to {len(names) - 1})"
    )


def _check_header(header: list[str], where: str) -> list[str]:
    names = [h.strip() for h in header]
    if len(names) > MAX_COLUMNS:
        raise ValueError(f"{where}: {len(names):,} columns; at most {MAX_COLUMNS:,} are read")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            raise ValueError(f"{where}: line 1, column {i}: the header has no name for this column; name it")
        if name in seen:
            raise ValueError(f"{where}: line 1: columns {seen[name]} and {i} are both named {name[:80]!r}")
        seen[name] = i
    if all(_number(n) is not None for n in names):
        raise ValueError(
            f"{where}: line 1 holds numbers ({', '.join(names[:3])}...), not column names: "
            "a CSV file needs a header row naming its columns"
        )
    return names


def _columns(
    names: Sequence[str], target: str | int, ignore: Sequence[str | int], only: Sequence[str] | None, where: str
) -> tuple[int, list[int]]:
    """The target's index and the input columns' indices (all others but ``ignore``, or ``only``)."""
    target_index = _resolve_column(names, target, "--target", where)
    if only is not None:
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"{where} has no column {missing[0][:80]!r}, an input of the model")
        return target_index, [names.index(n) for n in only]
    dropped = {_resolve_column(names, c, "--ignore", where) for c in ignore}
    if target_index in dropped:
        raise ValueError(f"--ignore: column {names[target_index]!r} is the target")
    return target_index, [i for i in range(len(names)) if i != target_index and i not in dropped]


def _read_csv(
    path: Path,
    where: str,
    target: str | int,
    ignore: Sequence[str | int],
    only: Sequence[str] | None,
    task: str,
    max_values: int,
) -> Table:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except IsADirectoryError:
        raise ValueError(f"{where} is a folder, not a file") from None
    with handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = next((row for row in reader if row), None)
            if header is None:
                raise ValueError(f"{where} is empty: expected a header row naming the columns, then rows of numbers")
            names = _check_header(header, where)
            target_index, features = _columns(names, target, ignore, only, where)
            if not features:
                raise ValueError(
                    f"{where} has no input columns besides the target {names[target_index]!r}"
                    + (f" (is the delimiter {delimiter!r} right?)" if len(names) == 1 else "")
                )
            cells = _Cells(len(features), max_values, where)
            targets: list[str] = []
            target_values = array("d")
            lines = array("q")
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                line = reader.line_num
                if len(row) != len(names):
                    raise ValueError(f"{where}: line {line} has {len(row)} fields; the header has {len(names)}")
                parsed = []
                for i in features:
                    value = _number(row[i])
                    if value is None or not math.isfinite(value):
                        raise ValueError(_bad_cell(where, f"line {line}", names[i], row[i], len(lines) == 0))
                    parsed.append(value)
                cells.add(parsed)
                lines.append(line)
                if task == "classification":
                    label = row[target_index].strip()
                    if not label:
                        raise ValueError(f"{where}: line {line}, column {names[target_index]!r}: missing class label")
                    targets.append(label)
                else:
                    value = _number(row[target_index])
                    if value is None or not math.isfinite(value):
                        raise ValueError(
                            _bad_cell(where, f"line {line}", names[target_index], row[target_index], False)
                            + " (a regression target must be a number; --task classification reads labels)"
                        )
                    target_values.append(value)
        except csv.Error as e:
            raise ValueError(f"{where}: line {reader.line_num}: not a readable CSV row: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text (byte {e.start} of a chunk): is it a CSV file?") from None
    x = cells.matrix()
    feature_names = tuple(names[i] for i in features)
    if task == "classification":
        y, classes = _class_indices(targets, where, names[target_index], lambda r: f"line {lines[r]}")
    else:
        y, classes = np.frombuffer(target_values, dtype=np.float64), ()
    return _checked_table(where, task, feature_names, names[target_index], x, y, classes, lambda r: f"line {lines[r]}")


def _bad_cell(where: str, location: str, column: str, text: str, first_row: bool) -> str:
    shown = text.strip()[:40]
    if not shown:
        return f"{where}: {location}, column {column!r}: missing value"
    number = _number(text)
    if number is not None:  # nan, inf
        return f"{where}: {location}, column {column!r}: {shown!r} is not a finite number"
    hint = (
        "; categorical columns are not encoded by torchbayes: encode them as numbers (e.g. one-hot) "
        f"first, or leave the column out with --ignore {column[:40]!r}"
        if first_row
        else ""
    )
    return f"{where}: {location}, column {column!r}: {shown!r} is not a number{hint}"


def _class_indices(labels: Sequence[str], where: str, column: str, location) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices of text labels; numeric labels are ordered as numbers (and must be integers)."""
    distinct = sorted(set(labels))
    numbers = [_number(label) for label in distinct]
    if all(n is not None for n in numbers):
        for label, n in zip(distinct, numbers):
            if n is None or not math.isfinite(n) or n != round(n):
                row = list(labels).index(label)
                raise ValueError(
                    f"{where}: {location(row)}, column {column!r}: class label {label[:40]!r} is not an "
                    "integer; is the target continuous? (--task regression)"
                )
        keys = sorted({round(float(label)) for label in distinct})  # "1" and "1.0" are one class
        classes = tuple(str(k) for k in keys)
        position = {k: i for i, k in enumerate(keys)}
        y = np.array([position[round(float(label))] for label in labels], dtype=np.int64)
    else:
        classes = tuple(distinct)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[label] for label in labels], dtype=np.int64)
    if len(classes) > MAX_CLASSES:
        raise ValueError(
            f"{where}: column {column!r} holds {len(classes):,} distinct labels, more than the "
            f"{MAX_CLASSES:,} classes read; is the target continuous? (--task regression)"
        )
    return y, classes


def _checked_table(
    where: str,
    task: str,
    feature_names: tuple[str, ...],
    target_name: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: tuple[str, ...],
    location,
) -> Table:
    """Refuse what cannot be learned from: no rows, a constant column or target, one class."""
    if len(x) == 0:
        raise ValueError(f"{where} has a header but no rows of data")
    if len(x) > 1:
        constant = np.flatnonzero((x == x[0]).all(0))
        if len(constant):
            name = feature_names[constant[0]]
            raise ValueError(
                f"{where}: column {name!r} is constant ({x[0, constant[0]]:g} on every row): it carries "
                f"no information and cannot be standardised; remove it or leave it out with --ignore {name[:40]!r}"
            )
    if task == "regression" and len(y) > 1 and bool((y == y[0]).all()):
        raise ValueError(f"{where}: the target {target_name!r} is constant ({y[0]:g} on every row): nothing to learn")
    if task == "classification" and len(classes) < 2:
        raise ValueError(
            f"{where}: the target {target_name!r} has {len(classes)} class ({classes[0][:40]!r} on "
            f"every row); a classifier needs at least two"
        )
    return Table(where, task, feature_names, target_name, np.ascontiguousarray(x), y, classes)


def _load_numpy(path: Path, where: str, max_values: int) -> tuple[list[str], np.ndarray]:
    """Column names and the ``(N, D)`` float64 matrix of a ``.npy`` / ``.npz`` file."""

    def numeric(array_: np.ndarray, what: str) -> np.ndarray:
        if array_.dtype.kind not in "biuf":
            raise ValueError(f"{where}: {what} has dtype {array_.dtype}; expected numbers (bool, int or float)")
        return array_

    try:
        if path.suffix.lower() == ".npy":
            matrix = np.load(path, allow_pickle=False, mmap_mode="r")  # the header only, until read
            if matrix.ndim != 2:
                raise ValueError(f"{where}: expected a 2-D array (rows x columns), got shape {matrix.shape}")
            if matrix.size > max_values:
                raise ValueError(f"{where}: {matrix.size:,} values, more than the {max_values:,} read into memory")
            matrix = numeric(np.asarray(matrix), "the array")
            return [str(i) for i in range(matrix.shape[1])], matrix.astype(np.float64)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if not keys:
                raise ValueError(f"{where} holds no arrays")
            sizes = sum(info.file_size for info in archive.zip.infolist())
            if sizes > 8 * max_values + 1024 * len(keys):
                raise ValueError(f"{where}: {sizes:,} bytes of arrays, more than the {max_values:,} values read")
            arrays = {k: archive[k] for k in keys}
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, (IsADirectoryError, FileNotFoundError)):
            raise
        raise ValueError(f"{where} is not a readable NumPy file: {e}") from None
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where} is not a readable NumPy file: {' '.join(str(e).split())[:200]}") from None
    if len(arrays) == 1 and next(iter(arrays.values())).ndim == 2:
        matrix = numeric(next(iter(arrays.values())), f"array {keys[0]!r}")
        return [str(i) for i in range(matrix.shape[1])], matrix.astype(np.float64)
    lengths = {k: (a.shape[0] if a.ndim == 1 else -1) for k, a in arrays.items()}
    if any(n < 0 for n in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(
            f"{where}: expected one 2-D array, or 1-D arrays of one length (one per column); got "
            + ", ".join(f"{k[:20]!r} {a.shape}" for k, a in list(arrays.items())[:5])
        )
    columns = [numeric(arrays[k], f"array {k[:40]!r}").astype(np.float64) for k in keys]
    return _check_header(keys, where), np.stack(columns, 1)


def _read_numpy(
    path: Path,
    where: str,
    target: str | int,
    ignore: Sequence[str | int],
    only: Sequence[str] | None,
    task: str,
    max_values: int,
) -> Table:
    names, matrix = _load_numpy(path, where, max_values)
    target_index, features = _columns(names, target, ignore, only, where)
    if not features:
        raise ValueError(f"{where} has no input columns besides the target {names[target_index]!r}")
    x = np.ascontiguousarray(matrix[:, features])
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        row, col = bad[0]
        raise ValueError(f"{where}: row index {row}, column {names[features[col]]!r}: {x[row, col]} is not finite")
    column = matrix[:, target_index]
    bad_rows = np.flatnonzero(~np.isfinite(column))
    if len(bad_rows):
        row = bad_rows[0]
        raise ValueError(f"{where}: row index {row}, column {names[target_index]!r}: {column[row]} is not finite")
    if task == "classification":
        y, classes = _class_indices(
            [repr(float(v)) if v != round(v) else str(int(v)) for v in column],
            where,
            names[target_index],
            lambda r: f"row index {r}",
        )
    else:
        y, classes = column.copy(), ()
    return _checked_table(
        where, task, tuple(names[i] for i in features), names[target_index], x, y, classes, lambda r: f"row index {r}"
    )


def _table_file(path: str | os.PathLike[str]) -> tuple[Path, str, str]:
    """``(path, where, suffix)`` of an existing table file: ``where`` names it in messages
    (shortened to 120 characters), ``suffix`` is its lower-case extension."""
    path = Path(path)
    where = repr(str(path)) if len(str(path)) <= 120 else repr("..." + str(path)[-117:])
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if path.is_dir():
        raise ValueError(f"{where} is a folder, not a table file")
    suffix = path.suffix.lower()
    if suffix not in TABULAR_SUFFIXES:
        raise ValueError(f"{where}: expected a table file ending in {', '.join(TABULAR_SUFFIXES)}")
    return path, where, suffix


def read_table(
    path: str | os.PathLike[str],
    *,
    target: str | int,
    task: str = "regression",
    ignore: Sequence[str | int] = (),
    features: Sequence[str] | None = None,
    max_values: int = MAX_VALUES,
) -> Table:
    """Read a CSV or NumPy table, checking every cell.

    Args:
        path: a ``.csv`` / ``.tsv`` / ``.txt`` (comma-separated) file with a header row, or a
            ``.npy`` / ``.npz`` file (see the module's documentation for the layouts).
        target: the target column: its name, or its index (0-based; negative counts from the end).
        task: ``"regression"`` (a numeric target) or ``"classification"`` (labels: text, or
            integers ordered as numbers).
        ignore: columns left out of the inputs (names or indices), e.g. an ID column or a
            categorical one.
        features: the input columns by name, in this order (all others are left out); e.g.
            the columns a model was trained on. ``None``: every column but the target and ``ignore``.
        max_values: most cells read into memory (the default, 10^8, is 800 MB as float64).

    Returns:
        A :class:`Table`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file, the line (CSV) or row index (NumPy) and the
            column: a missing value, text, NaN or infinity in a numeric column; an unknown
            target column; an empty file; a header with duplicate or missing names (or
            numbers: no header); a constant column or target; a single class; too many values.

    Example:
        >>> table = read_table("auto-mpg.csv", target="mpg", ignore=["car name"])
    """
    if task not in TABULAR_TASKS:
        raise ValueError(f"task must be one of {TABULAR_TASKS}, got {task!r}")
    if isinstance(max_values, bool) or not isinstance(max_values, int) or max_values < 1:
        raise ValueError(f"max_values must be a positive integer, got {max_values!r}")
    path, where, suffix = _table_file(path)
    if suffix in (".npy", ".npz"):
        return _read_numpy(path, where, target, ignore, features, task, max_values)
    return _read_csv(path, where, target, ignore, features, task, max_values)


def read_features(
    path: str | os.PathLike[str], feature_names: Sequence[str], *, max_values: int = MAX_VALUES
) -> tuple[np.ndarray, list[str]]:
    """Read the input columns ``feature_names`` of a table to predict (other columns are ignored).

    A CSV file is matched by column name; a NumPy file by position: it has either exactly
    the model's columns, or the training file's columns, target included (named by index).

    Args:
        path: a CSV or NumPy file, as for :func:`read_table`.
        feature_names: the columns the model was trained on, in order.
        max_values: most cells read into memory.

    Returns:
        ``(x, locations)``: ``(N, D)`` float64 features, and each row's location (``"line
        5"``, ``"row index 4"``) for messages.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_table`, naming the line and column.
    """
    path, where, suffix = _table_file(path)
    if suffix in (".npy", ".npz"):
        names, matrix = _load_numpy(path, where, max_values)
        numbered = all(n.isdigit() for n in feature_names)
        if not numbered and all(n in names for n in feature_names):
            x = matrix[:, [names.index(n) for n in feature_names]]
        elif numbered and matrix.shape[1] == len(feature_names):
            x = matrix
        elif numbered and matrix.shape[1] > max(int(n) for n in feature_names):
            x = matrix[:, [int(n) for n in feature_names]]
        else:
            raise ValueError(
                f"{where}: {matrix.shape[1]} columns {names[:5]}...; the model reads the columns "
                f"{list(feature_names)[:8]}"
            )
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            row, col = bad[0]
            raise ValueError(f"{where}: row index {row}, column {feature_names[col]!r}: {x[row, col]} is not finite")
        if len(x) == 0:
            raise ValueError(f"{where} has no rows")
        return np.ascontiguousarray(x, dtype=np.float64), [f"row index {i}" for i in range(len(x))]
    delimiter = "\t" if suffix == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = next((row for row in reader if row), None)
            if header is None:
                raise ValueError(f"{where} is empty: expected a header row naming the columns")
            names = _check_header(header, where)
            missing = [n for n in feature_names if n not in names]
            if missing:
                raise ValueError(
                    f"{where} has no column {missing[0][:80]!r}, an input of the model"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            columns = [names.index(n) for n in feature_names]
            cells = _Cells(len(columns), max_values, where)
            lines: list[str] = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                line = reader.line_num
                if len(row) != len(names):
                    raise ValueError(f"{where}: line {line} has {len(row)} fields; the header has {len(names)}")
                parsed = []
                for i in columns:
                    value = _number(row[i])
                    if value is None or not math.isfinite(value):
                        raise ValueError(_bad_cell(where, f"line {line}", names[i], row[i], not lines))
                    parsed.append(value)
                cells.add(parsed)
                lines.append(f"line {line}")
        except csv.Error as e:
            raise ValueError(f"{where}: line {reader.line_num}: not a readable CSV row: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text (byte {e.start} of a chunk): is it a CSV file?") from None
    if not lines:
        raise ValueError(f"{where} has a header but no rows of data")
    return cells.matrix().copy(), lines


# ------------------------------------------------------------------ splitting
def split_table(table: Table, *, test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0) -> TabularSplits:
    """Split ``table`` at random into train / validation / test parts and standardise them.

    Classification splits are stratified (each class keeps at least one training row).
    The features' standardisation (and the target's, for regression) is fitted on the
    training part only, so nothing about the validation and test rows leaks into it.

    Args:
        table: from :func:`read_table`.
        test_fraction: share of the rows in the test part, in (0, 1).
        val_fraction: share in the validation part, in [0, 1); ``test + val < 1``.
        seed: seed of the split.

    Returns:
        A :class:`TabularSplits`.

    Raises:
        ValueError: too few rows for the split (each part needs a row; training two).
    """
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ValueError(
            f"test_fraction in (0, 1) and val_fraction in [0, 1) must sum below 1, got {test_fraction}, {val_fraction}"
        )
    n = len(table.x)
    need = 3 + (val_fraction > 0)
    if n < need:
        raise ValueError(
            f"{table.name} has {n} row{'s' if n != 1 else ''} of data; a train/"
            f"{'validation/' if val_fraction > 0 else ''}test split needs at least {need}"
        )
    rng = np.random.default_rng(seed)
    groups = (
        [np.arange(n)]
        if table.task == "regression"
        else [np.flatnonzero(table.y == c) for c in range(len(table.classes))]
    )
    parts: list[list[np.ndarray]] = [[], [], []]
    for rows in groups:
        rows = rng.permutation(rows)
        size = len(rows)
        n_test = min(size - 1, max(1 if table.task == "regression" else 0, round(size * test_fraction)))
        n_val = min(
            size - 1 - n_test,
            max(1 if table.task == "regression" and val_fraction > 0 else 0, round(size * val_fraction)),
        )
        parts[0].append(rows[n_test + n_val :])
        parts[1].append(rows[n_test : n_test + n_val])
        parts[2].append(rows[:n_test])
    train, val, test = (rng.permutation(np.concatenate(p)) for p in parts)
    if len(test) == 0 or (val_fraction > 0 and len(val) == 0) or len(train) < 2:
        raise ValueError(
            f"{table.name} has {n} rows: too few for a {len(train)}/{len(val)}/{len(test)} train/validation/test "
            "split with at least 2 training rows and 1 in each other part"
        )
    features = Standardization.fit(table.x[train])
    if table.task == "regression":
        fitted = Standardization.fit(table.y[train, None])
        target: Standardization | None = fitted

        def targets(idx: np.ndarray) -> Tensor:
            return fitted.transform(table.y[idx, None])
    else:
        target = None

        def targets(idx: np.ndarray) -> Tensor:
            return torch.from_numpy(table.y[idx].astype(np.int64))

    return TabularSplits(
        table=table,
        train_x=features.transform(table.x[train]),
        train_y=targets(train),
        val_x=features.transform(table.x[val]),
        val_y=targets(val),
        test_x=features.transform(table.x[test]),
        test_y=targets(test),
        feature_scaling=features,
        target_scaling=target,
        test_index=test,
    )
