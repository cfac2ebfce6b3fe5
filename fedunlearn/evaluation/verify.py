"""Evaluate a model (or any predictor) after a removal request, on one fixed set of splits."""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from fedunlearn.data.federated import FederatedData
from fedunlearn.evaluation.metrics import accuracy, attack_success_rate

Predict = Callable[[np.ndarray], np.ndarray]


def request_metrics(predict: Predict, data: FederatedData, *, targets: Collection[int],
                    removed: Collection[int], target_class: int | None) -> dict[str, float]:
    """Accuracy on test, remaining clients' and forgotten clients' data, and backdoor ASR.

    Parameters
    ----------
    predict : callable
        Maps inputs to class probabilities.
    targets : collection of int
        The clients this request forgets (their training data is the forget set).
    removed : collection of int
        Every client removed so far; the retain set is everyone else's training data.
    target_class : int or None
        The backdoor's target class, when a backdoor is configured.
    """
    forget = data.pooled(exclude=set(range(len(data.clients))) - set(targets))
    retain = data.pooled(exclude=set(removed))
    out = {"test_accuracy": accuracy(predict(data.test.x), data.test.y),
           "retain_accuracy": accuracy(predict(retain.x), retain.y),
           "forget_accuracy": accuracy(predict(forget.x), forget.y)}
    if data.triggered_test is not None and target_class is not None:
        out["backdoor_asr"] = attack_success_rate(predict(data.triggered_test.x), target_class)
    return out
