"""``python -m fedunlearn`` is the ``fedunlearn`` command."""

from fedunlearn.cli import entry

entry()
