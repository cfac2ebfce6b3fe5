"""Shared fixtures: small configs that run in seconds on CPU."""

from __future__ import annotations

import numpy as np
import pytest

from fedunlearn.config import Config, load_config

SMALL = ["data.num_clients=4", "training.rounds=3", "training.local_epochs=1",
         "training.learning_rate=0.1", "data.partition=\"iid\""]


def small_config(*extra: str) -> Config:
    """Four IID clients on digits, three rounds: a federation in a second or two."""
    return load_config(None, [*SMALL, *extra])


@pytest.fixture
def small_cfg() -> Config:
    return small_config()


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest absolute difference between two parameter mappings with the same keys."""
    assert list(a) == list(b)
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)
