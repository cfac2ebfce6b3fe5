"""The ``fedunlearn`` command's entry point, kept free of heavy imports.

Importing :mod:`fedunlearn.cli` pulls in Flower, Ray's client and torch (a second or two). A
Ctrl-C in that time, or anywhere before a run installs its own handler
(:func:`fedunlearn.interrupt.stoppable`), would otherwise end the command with a Python
traceback; here it ends with one line and exit code 130. During that import a Ctrl-C is only
recorded and acted on once the import is done (a second or two): raised inside torch's native
initialisation, the KeyboardInterrupt aborted the process (``pybind11::error_already_set``,
exit -6), as the suite saw once.

:func:`listed` writes ids into a one-line message: a count and the first few of a long list.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from typing import NoReturn

from fedunlearn.interrupt import EXIT_CODE  # standard library only


def entry() -> NoReturn:
    """The ``fedunlearn`` console script and ``python -m fedunlearn``:
    :func:`fedunlearn.cli.main`, then :func:`leave`; a Ctrl-C outside a run's rounds is one
    line."""
    pending: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    take = previous is not signal.SIG_IGN  # a background job (`cmd &`) ignores Ctrl-C: keep that
    if take:
        signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        try:
            from fedunlearn.cli import main
        finally:
            if take:
                signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt
        code = main()
    except KeyboardInterrupt:
        print("\nfedunlearn: interrupted (Ctrl-C) outside a run's rounds; run the command "
              "again, or continue a run it had started with `fedunlearn resume RUN_DIR`",
              file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)
    leave(code)


def listed(ids: Iterable[int], noun: str = "client", *, first: int = 5) -> str:
    """Ids for a one-line message: all of a short list, a count and the first few of a long
    one (a start-up timeout at 100,000 clients must not print a 600 kB line).

    >>> listed([3])
    'clients [3]'
    >>> listed(range(100_000))
    '100000 clients (0, 1, 2, 3, 4, ...)'
    >>> listed([9, 2, 7], "node")
    'nodes [9, 2, 7]'
    """
    ids = list(ids)
    if len(ids) <= first:
        return f"{noun}s {ids}"
    return f"{len(ids)} {noun}s ({', '.join(str(i) for i in ids[:first])}, ...)"


def leave(code: int) -> NoReturn:
    """End the process with ``code`` after what an ordinary exit does that matters here: other
    threads finished (the history store's deferred deletions), ``atexit`` handlers run (Ray's,
    logging's), output flushed. The interpreter's own teardown of modules and native libraries
    is skipped: with torch and Ray loaded it took about 1.8 s per command (measured), after
    every result was written. Falls back to ``sys.exit`` where CPython's hooks are missing."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what exit does first
        atexit._run_exitfuncs()
    except AttributeError:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)
