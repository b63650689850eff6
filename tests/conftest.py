"""Shared fixtures: the embedded MNIST digits and models trained on them in seconds."""

from __future__ import annotations

import pytest

from offline.attacks import BackdoorResult, PatchTrigger, train_backdoored_model
from offline.data import Dataset, load_mnist

BADNETS_TARGET = 3


@pytest.fixture(scope="session")
def mnist_splits() -> tuple[Dataset, Dataset]:
    """(train 70 %, held-out clean 30 %) of the real MNIST 5k subset."""
    return load_mnist().split(0.3, seed=0)


@pytest.fixture(scope="session")
def badnets_model(mnist_splits: tuple[Dataset, Dataset]) -> BackdoorResult:
    """BadNets: 4x4 white patch, bottom-right, 10 % poison, target class 3."""
    train, test = mnist_splits
    return train_backdoored_model(train, test, PatchTrigger(4), BADNETS_TARGET, 0.1, seed=0)


@pytest.fixture(scope="session")
def clean_models(mnist_splits: tuple[Dataset, Dataset]) -> list[BackdoorResult]:
    """Three clean models from different seeds."""
    train, test = mnist_splits
    return [train_backdoored_model(train, test, None, seed=s) for s in (11, 12, 13)]
