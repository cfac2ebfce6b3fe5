#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite (CPU only, a few minutes).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k history
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Three pytest-xdist workers by default on 2 cores: the Flower tests spend most of their time
# waiting (engine start-up, Ray's fixed give-up, timeouts), and a third worker fills that wait
# (docs/benchmarks.md, "Test suite"). Each worker takes a whole module at a time, longest first
# (tests/conftest.py orders them by tests/durations.json): a module's fixtures are built once.
# FEDUNLEARN_TEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -n "${FEDUNLEARN_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
