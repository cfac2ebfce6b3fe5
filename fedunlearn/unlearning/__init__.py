"""Removal methods: one protocol (:mod:`.base`), one file per method, one registry.

Importing this package registers the built-in methods: ``retrain`` (the reference),
``federaser``, ``fedaccum``, ``fedrecover`` and ``distillation`` (federated); ``central_retrain`` (the
centralized reference), ``sisa`` and ``sisa_random`` (centralized).
"""

from fedunlearn.unlearning import (  # noqa: F401  (registration)
    central_retrain,
    distillation,
    federaser,
    fedrecover,
    newton,
    retrain,
    sisa,
)
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Cost,
    Unlearner,
    UnlearningContext,
    UnlearningResult,
)

__all__ = ["UNLEARNERS", "Cost", "Unlearner", "UnlearningContext", "UnlearningResult"]
