#!/usr/bin/env bash
# Forget a backdoored client with every federated method and compare them on one table.
# Extra arguments go to `fedunlearn run` (e.g. --out runs/bd --set experiment.seed=1).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fedunlearn run simulations/backdoor_digits.toml "$@"
