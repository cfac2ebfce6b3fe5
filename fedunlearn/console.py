"""The ``fedunlearn`` command's entry point, kept free of heavy imports.

Importing :mod:`fedunlearn.cli` pulls in Flower, Ray's client and torch (a second or two). A
Ctrl-C in that time, or anywhere before a run installs its own handler
(:func:`fedunlearn.interrupt.stoppable`), would otherwise end the command with a Python
traceback; here it ends with one line and exit code 130.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

EXIT_CODE = 130  # as fedunlearn.interrupt.EXIT_CODE, without importing it


def entry() -> NoReturn:
    """Run :func:`fedunlearn.cli.entry`; a Ctrl-C outside a run's rounds is one line."""
    try:
        from fedunlearn.cli import entry as run

        run()
    except KeyboardInterrupt:
        print("\nfedunlearn: interrupted (Ctrl-C) outside a run's rounds; run the command "
              "again, or continue a run it had started with `fedunlearn resume RUN_DIR`",
              file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)
    raise SystemExit(0)  # not reached: cli.entry ends the process
