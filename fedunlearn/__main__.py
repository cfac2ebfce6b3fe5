"""``python -m fedunlearn`` is the ``fedunlearn`` command."""

import sys

from fedunlearn.cli import main

sys.exit(main())
