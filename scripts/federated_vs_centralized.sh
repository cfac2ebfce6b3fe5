#!/usr/bin/env bash
# Federated vs centralized removal of the same client, on the same data, in one table.
# Extra arguments go to `fedunlearn compare` (e.g. --out runs/fvc --set experiment.seed=1).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fedunlearn compare simulations/federated_vs_centralized.toml "$@"
