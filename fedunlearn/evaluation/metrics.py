"""Pure metric functions on predicted probabilities."""

from __future__ import annotations

import numpy as np


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose arg-max class equals the label (NaN on empty input).

    >>> accuracy(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]))
    0.5
    """
    if len(y) == 0:
        return float("nan")
    return float(np.mean(proba.argmax(axis=1) == y))


def attack_success_rate(proba: np.ndarray, target_class: int) -> float:
    """Backdoor attack success: share of triggered inputs classified as ``target_class``.

    The inputs must all be of true classes other than the target (see
    :func:`fedunlearn.data.backdoor.triggered_test_set`).

    >>> attack_success_rate(np.array([[0.1, 0.9], [0.8, 0.2]]), 1)
    0.5
    """
    if len(proba) == 0:
        return float("nan")
    return float(np.mean(proba.argmax(axis=1) == target_class))


def sape(a: float, b: float) -> float:
    """Symmetric absolute percentage error ``|a - b| / (|a| + |b|) * 100`` (0 when both are 0).

    >>> sape(0.9, 0.6)
    20.0
    """
    denom = abs(a) + abs(b)
    return 0.0 if denom == 0 else abs(a - b) / denom * 100.0
