#!/usr/bin/env bash
# Every federated removal method (retrain, FedEraser, FedAccum, FedRecover, distillation, PGA,
# NoT) on the backdoored digits federation, three seeds, one table with verdicts against
# retraining (simulations/baselines_digits.toml; Δt = 1, which FedRecover needs).
# Extra arguments go to `fedunlearn run` (e.g. --out runs/baselines --seeds 0).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fedunlearn run simulations/baselines_digits.toml "$@"
