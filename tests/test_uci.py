"""`torchbayes.datasets.load_uci`: the standard layout, standardisation, the inner validation
split, and one-line errors for hostile folders (missing files, bad numbers and indices)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from torchbayes.datasets import UCI_DATASETS, load_uci, uci_num_splits

SHARED = Path(os.environ.get("TORCHBAYES_UCI_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "uci"))


def _write(folder: Path, data: np.ndarray, train: list[list[int]], test: list[list[int]]) -> None:
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", data)
    (folder / "index_features.txt").write_text("\n".join(str(i) for i in range(data.shape[1] - 1)) + "\n")
    (folder / "index_target.txt").write_text(f"{data.shape[1] - 1}\n")
    (folder / "n_splits.txt").write_text(f"{len(train)}\n")
    for i, (tr, te) in enumerate(zip(train, test)):
        (folder / f"index_train_{i}.txt").write_text("\n".join(map(str, tr)) + "\n")
        (folder / f"index_test_{i}.txt").write_text("\n".join(map(str, te)) + "\n")


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 4)) * [1.0, 5.0, 0.1, 3.0] + [0.0, 10.0, -2.0, 7.0]
    data[:, 2] = 4.0  # a constant input column
    _write(tmp_path / "toy", data, [list(range(15)), list(range(5, 20))], [list(range(15, 20)), list(range(5))])
    return tmp_path


def test_toy_split_is_standardised_on_its_training_rows(toy: Path) -> None:
    data = np.loadtxt(toy / "toy" / "data.txt")
    split = load_uci("toy", toy, 1, dtype=torch.float64)
    train, test = data[5:20], data[:5]
    x_mean, x_std = train[:, :3].mean(0), train[:, :3].std(0)
    x_std[2] = 1.0  # constant column: centred, not scaled
    assert np.allclose(split.x_train.numpy(), (train[:, :3] - x_mean) / x_std)
    assert np.allclose(split.x_test.numpy(), (test[:, :3] - x_mean) / x_std)
    assert split.y_train.shape == (15, 1) and split.y_test.shape == (5, 1)
    assert math.isclose(split.y_std, train[:, 3].std()) and math.isclose(split.y_mean, train[:, 3].mean())
    assert np.allclose(split.to_original(split.y_test).numpy().ravel(), test[:, 3])
    assert split.original_log_likelihood(0.0) == pytest.approx(-math.log(split.y_std))
    assert (split.part, split.num_splits, uci_num_splits("toy", toy)) == ("test", 2, 2)


def test_validation_split_is_carved_from_the_training_rows(toy: Path) -> None:
    full = load_uci("toy", toy, 0, dtype=torch.float64)
    inner = load_uci("toy", toy, 0, validation_fraction=0.2, seed=3, dtype=torch.float64)
    again = load_uci("toy", toy, 0, validation_fraction=0.2, seed=3, dtype=torch.float64)
    assert inner.part == "validation" and len(inner.x_train) == 12 and len(inner.x_test) == 3
    assert torch.equal(inner.x_test, again.x_test)
    # every validation row is a training row of the split (back in original units, compared)
    original = inner.x_test * inner.x_std + inner.x_mean
    full_train = full.x_train * full.x_std + full.x_mean
    assert all(torch.isclose(full_train, row).all(1).any() for row in original)


def _break(folder: Path, name: str, text: str | None) -> None:
    path = folder / "toy" / name
    if text is None:
        path.unlink()
    else:
        path.write_text(text)


@pytest.mark.parametrize(
    ("file", "text", "error", "match"),
    [
        ("data.txt", None, FileNotFoundError, "data.txt"),
        ("index_train_0.txt", None, FileNotFoundError, "index_train_0.txt"),
        ("n_splits.txt", "two\n", ValueError, "n_splits.txt"),
        ("n_splits.txt", "0\n", ValueError, "n_splits.txt"),
        ("data.txt", "1 2 3 4\n1 nan 3 4\n" * 10, ValueError, "non-finite value at row 1"),
        ("data.txt", "1 2 3 4\n1 x 3 4\n", ValueError, "not a number"),
        ("data.txt", "1 2 3 4\n1 2 3\n", ValueError, "rows of different lengths"),
        ("data.txt", "", ValueError, "is empty"),
        ("index_train_0.txt", "0\n1\n25\n", ValueError, "row index 25 is outside"),
        ("index_train_0.txt", "0\n-1\n", ValueError, "row index -1 is outside"),
        ("index_train_0.txt", "0\n1.5\n", ValueError, "integer row indices"),
        ("index_train_0.txt", "0\n1\n1\n", ValueError, "repeats row indices"),
        ("index_train_0.txt", "0\n15\n16\n", ValueError, "train and test rows overlap"),
        ("index_train_0.txt", "3\n", ValueError, "1 training row"),
        ("index_features.txt", "0\n9\n", ValueError, "column index 9 is outside"),
        ("index_features.txt", "0\n3\n", ValueError, "lists the target column"),
        ("index_target.txt", "0\n1\n", ValueError, "one target column"),
    ],
)
def test_hostile_files_raise_one_line_errors_naming_the_file(toy, file, text, error, match) -> None:
    _break(toy, file, text)
    with pytest.raises(error, match=match) as info:
        load_uci("toy", toy, 0)
    assert "\n" not in str(info.value)


def test_hostile_arguments(toy: Path, tmp_path: Path) -> None:
    for split in (2, -1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="split must be an int in \\[0, 2\\)"):
            load_uci("toy", toy, split)  # type: ignore[arg-type]
    for name in ("../toy", "", "a/b", None):
        with pytest.raises(ValueError, match="name must be a data set folder name"):
            load_uci(name, toy, 0)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"no data set 'other'.*found: toy"):
        load_uci("other", toy, 0)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_uci("toy", tmp_path / "missing", 0)
    for fraction in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match="validation_fraction"):
            load_uci("toy", toy, 0, validation_fraction=fraction)
    with pytest.raises(ValueError, match="leaves an empty part"):
        load_uci("toy", toy, 0, validation_fraction=0.01)
    with pytest.raises(TypeError, match="dtype"):
        load_uci("toy", toy, 0, dtype=torch.int64)


def test_constant_target_is_an_error(tmp_path: Path) -> None:
    data = np.ones((10, 3))
    data[:, 0] = np.arange(10)
    _write(tmp_path / "flat", data, [list(range(8))], [[8, 9]])
    with pytest.raises(ValueError, match="target is constant"):
        load_uci("flat", tmp_path, 0)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the UCI data folder (../shared/data/uci) is absent")
@pytest.mark.parametrize("name", UCI_DATASETS)
def test_standard_sets_load_with_their_published_sizes(name: str) -> None:
    sizes = {
        "bostonHousing": (506, 13),
        "concrete": (1030, 8),
        "energy": (768, 8),
        "wine-quality-red": (1599, 11),
        "yacht": (308, 6),
    }
    split = load_uci(name, SHARED, 19)
    rows, features = sizes[name]
    assert split.num_splits == 20
    assert len(split.x_train) + len(split.x_test) == rows and split.x_train.shape[1] == features
    assert len(split.x_test) == round(0.1 * rows) or abs(len(split.x_test) - 0.1 * rows) < 1
    assert torch.allclose(split.y_train.mean(), torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(split.y_train.std(correction=0), torch.tensor(1.0), atol=1e-5)
