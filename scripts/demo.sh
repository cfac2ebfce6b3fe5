#!/usr/bin/env bash
# Set up (if needed) and run the default experiment: simulations/quickstart.toml.
# Extra arguments go to `fedunlearn run`, e.g. ./scripts/demo.sh --set training.rounds=5
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fedunlearn run simulations/quickstart.toml "$@"
