"""Removal methods: one protocol (:mod:`.base`), one file per method, one registry.

Importing this package registers the built-in methods: ``retrain`` (the reference),
``federaser``, ``fedaccum``, ``fedrecover``, ``distillation``, ``pga`` and ``not`` (federated);
``central_retrain`` (the centralized reference), ``sisa``, ``sisa_random`` and ``newton``
(centralized).
"""

from fedunlearn.unlearning import (  # noqa: F401  (registration)
    central_retrain,
    distillation,
    federaser,
    fedrecover,
    negation,
    newton,
    pga,
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
