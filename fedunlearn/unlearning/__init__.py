"""Removal methods: one protocol (:mod:`.base`), one file per method, one registry.

Importing this package registers the built-in methods: ``retrain`` (the reference),
``federaser``, ``fedaccum``, ``fedrecover``, ``distillation``, ``pga`` and ``not`` (federated);
``central_retrain`` (the centralized reference), ``sisa``, ``sisa_random`` and ``newton``
(centralized).
"""

from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Cost,
    Unlearner,
    UnlearningContext,
    UnlearningResult,
)
from fedunlearn.unlearning.centralized import (  # noqa: F401  (registration)
    central_retrain,
    newton,
    sisa,
)
from fedunlearn.unlearning.federated import (  # noqa: F401  (registration)
    distillation,
    federaser,
    fedrecover,
    negation,
    pga,
    retrain,
)

__all__ = ["UNLEARNERS", "Cost", "Unlearner", "UnlearningContext", "UnlearningResult"]
