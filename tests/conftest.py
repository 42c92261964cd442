"""Shared fixtures: real data sets and the reference library (when installed)."""

from __future__ import annotations

import pytest
import torch

from torchbayes.datasets import DatasetSplits, load_dataset


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    # Every test starts from the same global random state; 2 threads like CI.
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> DatasetSplits:
    """scikit-learn digits, all ten classes."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_ood() -> DatasetSplits:
    """scikit-learn digits with classes 8 and 9 held out as out-of-distribution inputs."""
    return load_dataset("digits", ood_classes=(8, 9))


@pytest.fixture(scope="session")
def reference():
    """The reference library, bayesian-torch 0.5.0; tests using it skip when it is absent."""
    return pytest.importorskip("bayesian_torch", reason="bayesian-torch 0.5.0 (the reference) is not installed")
