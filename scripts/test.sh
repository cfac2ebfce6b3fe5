#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite (CPU only, a few minutes).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k history
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
