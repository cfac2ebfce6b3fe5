"""Removal methods: one protocol (:mod:`.base`), one file per method, one registry.

Importing this package registers the built-in methods: ``retrain`` (the reference),
``federaser``, ``fedaccum`` and ``distillation``.
"""

from fedunlearn.unlearning import distillation, federaser, retrain  # noqa: F401  (registration)
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Cost,
    Unlearner,
    UnlearningContext,
    UnlearningResult,
)

__all__ = ["UNLEARNERS", "Cost", "Unlearner", "UnlearningContext", "UnlearningResult"]
