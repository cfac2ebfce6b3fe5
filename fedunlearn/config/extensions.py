"""Importing user modules that register models, train steps, strategies or unlearning methods.

List them in ``[experiment] extensions = ["my_pkg.my_module"]``; they are imported in the driver
and in every Flower client process before any name is resolved.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from fedunlearn.config.tree import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (Exception, SystemExit)
"""What a user's code may raise that fedunlearn reports as that code's failure, in one line.
``SystemExit`` too: a ``sys.exit()`` in a source, model, step, strategy or method would end
the run silently, or with a bare message and no hint of where. ``KeyboardInterrupt`` is left
out before a run's signal handler is installed (it may be a real Ctrl-C there); while a run
serves its requests a Ctrl-C raises nothing (:mod:`fedunlearn.run.interrupt`), so a method's
wrapper (``service._users_code``) counts it as the method's own."""


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
        except ConfigError:
            raise
        except USER_ERRORS as exc:  # the user's module: its error, in one line
            sys.modules.pop(name, None)
            raise ConfigError(f"extension module '{name}' failed while being imported: "
                              f"{describe_failure(exc)}; fix it and run again") from None


def describe_failure(exc: BaseException) -> str:
    """``"TypeError: <first line> (at my_ext.py:7 in my_step)"``: an exception in one line,
    located at the innermost frame outside fedunlearn and the installed packages (the user's
    code), if the traceback passes through any; the type and message alone otherwise.

    >>> describe_failure(ValueError("bad" + chr(10) + "value"))
    'ValueError: bad'
    """
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 - an exception whose message itself fails
        text = ""
    if isinstance(exc, SyntaxError) and exc.filename:  # where the parser stopped
        where = f" (at {Path(exc.filename).name}:{exc.lineno})"
        return f"SyntaxError: {exc.msg}{where}"
    first = text.splitlines()[0] if text else ""
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _is_user_file(frame.filename):
            where = f" (at {Path(frame.filename).name}:{frame.lineno} in {frame.name})"
            break
    return f"{type(exc).__name__}: {first}{where}" if first else f"{type(exc).__name__}{where}"


def raised_in_user_code(exc: BaseException) -> bool:
    """Whether ``exc``'s traceback passes through a file of the user's (see
    :func:`describe_failure`): an error of theirs, not of fedunlearn's checks on their input."""
    return any(_is_user_file(f.filename) for f in traceback.extract_tb(exc.__traceback__))


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _is_user_file(filename: str) -> bool:
    """A file of neither fedunlearn, nor an installed package, nor the standard library.

    Code without a file typed by the user (a notebook cell ``<ipython-input-3-…>``, ``<stdin>``)
    is the user's; Python's frozen modules (``<frozen …>``) and ``<string>`` are not: the
    methods dataclasses and named tuples generate are compiled from ``<string>``, so a
    dataclass's ``__init__`` raising would otherwise be named as the place. Directories are
    compared whole: ``fedunlearn_plugins/`` is not fedunlearn's, ``notes-site-packages/`` is
    no package directory.

    >>> _is_user_file("<ipython-input-3-abc>"), _is_user_file("<frozen runpy>")
    (True, False)
    >>> _is_user_file("<string>")
    False
    >>> _is_user_file(_PACKAGE + "_plugins/src.py"), _is_user_file(_PACKAGE + "/config.py")
    (True, False)
    """
    if filename.startswith("<"):
        return not filename.startswith(("<frozen", "<string>"))
    path = Path(filename).resolve()
    if "site-packages" in path.parts or "dist-packages" in path.parts:
        return False
    return not any(path.is_relative_to(root) for root in
                   {_PACKAGE, sys.base_prefix, sys.prefix})
