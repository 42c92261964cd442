"""Shared fixtures: real data sets and the reference library (when installed)."""

from __future__ import annotations

import os

import pytest
import torch

from torchbayes.datasets import DatasetSplits, load_dataset


# Under pytest-xdist (CI runs `-n 2` on 2 cores) each worker gets one core: two workers
# with two OpenMP threads each oversubscribe the cores, and small ops then stall for tens
# of milliseconds waiting for a descheduled thread. Run alone, tests use 2 threads.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    # Every test starts from the same global random state and thread count.
    torch.manual_seed(0)
    torch.set_num_threads(_THREADS)


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
