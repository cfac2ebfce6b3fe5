"""``python -m fedunlearn`` is the ``fedunlearn`` command."""

from fedunlearn.console import entry

entry()
