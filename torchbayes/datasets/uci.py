"""The UCI regression benchmark with its standard train/test splits, read from disk.

The Bayesian deep learning literature (PBP, Hernández-Lobato & Adams 2015; MC dropout,
Gal & Ghahramani 2016; deep ensembles, Lakshminarayanan et al. 2017; DVI, Wu et al.
2019) compares methods on fixed splits distributed with the data, one folder per set:

- ``data.txt``: one example per row, whitespace-separated numbers;
- ``index_features.txt``, ``index_target.txt``: 0-based column indices;
- ``index_train_<i>.txt``, ``index_test_<i>.txt``: 0-based row indices of split ``i``;
- ``n_splits.txt``: how many splits there are (20 for the small sets).

Nothing is downloaded: pass the folder that holds the data sets as ``root``. Every file
is checked (missing files, unparsable or non-finite numbers, indices out of range or
repeated, a split out of range) and a problem raises one line naming the file or the
argument.

The protocol of the published tables: inputs and target are standardised with the
training split's mean and standard deviation (population std; a constant input column
keeps std 1), and test RMSE and log-likelihood are reported in the target's ORIGINAL
units: multiply predicted means and standard deviations by ``y_std`` (and add
``y_mean``), or, equivalently for the log-likelihood, subtract ``log(y_std)`` from a
log density computed in standardised units (`UCISplit.original_log_likelihood`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["UCI_DATASETS", "UCISplit", "load_uci", "uci_num_splits"]

#: The five sets of the standard benchmark used in torchbayes' tables (any folder with the layout loads).
UCI_DATASETS: tuple[str, ...] = ("bostonHousing", "concrete", "energy", "wine-quality-red", "yacht")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class UCISplit:
    """One standardised train/test (or train/validation) split of a UCI data set.

    Attributes:
        name: the data set's folder name.
        split: the split's index.
        num_splits: how many standard splits the data set has.
        part: ``"test"``, or ``"validation"`` when ``x_test``/``y_test`` were carved from
            the training split (``load_uci(..., validation_fraction=...)``).
        x_train: standardised training inputs ``(N, F)``.
        y_train: standardised training targets ``(N, 1)``.
        x_test: standardised test (or validation) inputs ``(M, F)``.
        y_test: standardised test (or validation) targets ``(M, 1)``.
        x_mean: ``(F,)`` training mean of the inputs.
        x_std: ``(F,)`` training standard deviation of the inputs (1 for constant columns).
        y_mean: training mean of the target, original units.
        y_std: training standard deviation of the target, original units.
    """

    name: str
    split: int
    num_splits: int
    part: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_mean: Tensor
    x_std: Tensor
    y_mean: float
    y_std: float

    def to_original(self, y: Tensor) -> Tensor:
        """Standardised targets (or predicted means) back in the original units: ``y * y_std + y_mean``."""
        return y * self.y_std + self.y_mean

    def original_log_likelihood(self, log_likelihood: Tensor | float) -> Tensor | float:
        """A log density of standardised targets converted to the original units: ``- log(y_std)``."""
        return log_likelihood - math.log(self.y_std)


def _folder(name: str, root: str | Path) -> Path:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name must be a data set folder name such as 'bostonHousing', got {name!r}")
    if not isinstance(root, (str, Path)) or str(root) == "":
        raise TypeError(f"root must be a path to the folder of UCI data sets, got {root!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"UCI root {str(root)!r} is not a directory")
    folder = root / name
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no data set {name!r} under {str(root)!r} (found: {', '.join(found) or 'none'})")
    return folder


def _read_numbers(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"missing file {str(path)!r}")
    try:
        with path.open(encoding="utf-8") as handle:
            rows = [line.split() for line in handle if line.strip()]
        if len({len(row) for row in rows}) > 1:
            raise ValueError(f"{str(path)!r} has rows of different lengths")
        array = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not a text file ({error})") from None
    except ValueError as error:
        if "rows of different lengths" in str(error):
            raise
        raise ValueError(f"{str(path)!r} holds something that is not a number ({error})") from None
    if array.size == 0:
        raise ValueError(f"{str(path)!r} is empty")
    return array


def _read_indices(path: Path, upper: int, what: str) -> np.ndarray:
    values = _read_numbers(path).ravel()
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise ValueError(f"{str(path)!r} must hold integer {what} indices")
    indices = values.astype(np.int64)
    bad = indices[(indices < 0) | (indices >= upper)]
    if bad.size:
        raise ValueError(f"{str(path)!r}: {what} index {int(bad[0])} is outside [0, {upper})")
    if np.unique(indices).size != indices.size:
        raise ValueError(f"{str(path)!r} repeats {what} indices")
    return indices


def uci_num_splits(name: str, root: str | Path) -> int:
    """The number of standard splits of data set ``name`` under ``root`` (its ``n_splits.txt``).

    Example:
        >>> uci_num_splits("bostonHousing", "../shared/data/uci")
        20
    """
    path = _folder(name, root) / "n_splits.txt"
    values = _read_numbers(path).ravel()
    if values.size != 1 or not float(values[0]).is_integer() or values[0] < 1:
        raise ValueError(f"{str(path)!r} must hold one positive integer, got {values.tolist()[:3]}")
    return int(values[0])


def load_uci(
    name: str,
    root: str | Path,
    split: int,
    *,
    validation_fraction: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> UCISplit:
    """Load standard split ``split`` of UCI data set ``name``, standardised on its training part.

    Args:
        name: the data set's folder, e.g. ``"bostonHousing"`` (see `UCI_DATASETS`).
        root: the folder holding the data set folders (never downloaded).
        split: ``0 <= split < n_splits``.
        validation_fraction: if given (in ``(0, 1)``), the test rows are not used: this
            fraction of the TRAINING rows, drawn at random (``seed``), becomes the
            evaluation part (``part="validation"``) and the rest the training part; the
            standardisation is fitted on that rest. This is the inner split on which the
            2018 protocol chooses hyperparameters.
        seed: seeds the validation draw.
        dtype: the floating dtype of the returned tensors.

    Returns:
        `UCISplit`; targets have shape ``(N, 1)`` (a single-output regression).

    Raises:
        FileNotFoundError: ``root``, the data set or one of its files is missing.
        ValueError: a file is malformed (non-numbers, NaN/inf, bad or repeated indices,
            overlapping train and test rows) or an argument is out of range.

    Example:
        >>> data = load_uci("bostonHousing", "../shared/data/uci", split=0)
        >>> data.x_train.shape, data.y_test.shape
        (torch.Size([455, 13]), torch.Size([51, 1]))
    """
    folder = _folder(name, root)
    num_splits = uci_num_splits(name, root)
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < num_splits:
        raise ValueError(f"split must be an int in [0, {num_splits}) for {name!r}, got {split!r}")
    if validation_fraction is not None and (
        isinstance(validation_fraction, bool)
        or not isinstance(validation_fraction, (int, float))
        or not 0 < validation_fraction < 1
    ):
        raise ValueError(f"validation_fraction must be None or a float in (0, 1), got {validation_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    data = _read_numbers(folder / "data.txt")
    if not np.all(np.isfinite(data)):
        row, column = np.argwhere(~np.isfinite(data))[0]
        raise ValueError(f"{str(folder / 'data.txt')!r}: non-finite value at row {row}, column {column}")
    rows, columns = data.shape
    features = _read_indices(folder / "index_features.txt", columns, "column")
    target = _read_indices(folder / "index_target.txt", columns, "column")
    if target.size != 1:
        raise ValueError(f"{str(folder / 'index_target.txt')!r} must name one target column, got {target.size}")
    if int(target[0]) in set(features.tolist()):
        raise ValueError(f"{str(folder / 'index_features.txt')!r} lists the target column {int(target[0])}")
    train = _read_indices(folder / f"index_train_{split}.txt", rows, "row")
    test = _read_indices(folder / f"index_test_{split}.txt", rows, "row")
    if np.intersect1d(train, test).size:
        raise ValueError(f"split {split} of {name!r}: train and test rows overlap")
    part = "test"
    if validation_fraction is not None:
        order = np.random.default_rng(seed).permutation(train.size)
        held = round(validation_fraction * train.size)
        if held < 1 or held >= train.size - 1:
            raise ValueError(
                f"validation_fraction={validation_fraction} of {train.size} training rows leaves an empty part"
            )
        train, test, part = train[order[held:]], train[order[:held]], "validation"
    if train.size < 2:
        raise ValueError(f"split {split} of {name!r} has {train.size} training row(s); standardising needs 2")

    x, y = data[:, features], data[:, target]
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    x_std[x_std == 0] = 1.0  # a constant column stays as it is (centred), as in the published code
    y_mean, y_std = float(y[train].mean()), float(y[train].std())
    if y_std == 0:
        raise ValueError(f"split {split} of {name!r}: the target is constant on the training rows")

    def tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return UCISplit(
        name=name,
        split=split,
        num_splits=num_splits,
        part=part,
        x_train=tensor((x[train] - x_mean) / x_std),
        y_train=tensor((y[train] - y_mean) / y_std),
        x_test=tensor((x[test] - x_mean) / x_std),
        y_test=tensor((y[test] - y_mean) / y_std),
        x_mean=tensor(x_mean),
        x_std=tensor(x_std),
        y_mean=y_mean,
        y_std=y_std,
    )
