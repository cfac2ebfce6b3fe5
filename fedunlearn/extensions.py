"""Importing user modules that register models, train steps, strategies or unlearning methods.

List them in ``[experiment] extensions = ["my_pkg.my_module"]``; they are imported in the driver
and in every Flower client process before any name is resolved.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from pathlib import Path

from fedunlearn.config import ConfigError


def load_extensions(modules: Iterable[str]) -> None:
    """Import each module once; a missing module is a one-line :class:`ConfigError`."""
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    for name in modules:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"extension module '{name}' could not be imported ({exc}); "
                              "check experiment.extensions and PYTHONPATH") from None
