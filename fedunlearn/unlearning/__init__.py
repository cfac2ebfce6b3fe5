"""Removal methods: one protocol (:mod:`.base`), one file per method, one registry.

Importing this package imports every module of :mod:`.centralized` and :mod:`.federated`, and
each method file registers its methods in :data:`UNLEARNERS` with ``@UNLEARNERS.register``: a
new built-in method is one new file, no list to edit. Built in: ``retrain`` (the reference),
``federaser``, ``fedaccum``, ``fedrecover``, ``distillation``, ``pga`` and ``not``
(federated); ``central_retrain`` (the reference), ``sisa``, ``sisa_random`` and ``newton``
(centralized).
"""

import importlib
import pkgutil

from fedunlearn.unlearning import centralized, federated
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    Cost,
    Unlearner,
    UnlearningContext,
    UnlearningResult,
)


def _import_method_files() -> None:
    """Import each module of the two subpackages, in name order (registration order)."""
    for package in (centralized, federated):
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if not module.name.rpartition(".")[2].startswith("_"):
                importlib.import_module(module.name)


_import_method_files()

__all__ = ["UNLEARNERS", "Capabilities", "Cost", "Unlearner", "UnlearningContext",
           "UnlearningResult"]
