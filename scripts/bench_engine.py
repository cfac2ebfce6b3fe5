#!/usr/bin/env python
"""Engine benchmark: the same FedAvg through Flower + Ray and through a plain in-process loop.

Both paths run identical client work (same data, seeds, local training code and FedAvg
arithmetic) and must end with the same model; the script checks that and writes both wall times
and their ratio to a JSON file. Usage::

    .venv/bin/python scripts/bench_engine.py [--config simulations/quickstart.toml]
        [--set section.key=value ...] [--out benchmarks/engine.json]

Figures written:
  fedavg_wall_s         training rounds only (first message to final model), per engine
  ratio                 flower / in-process on fedavg_wall_s  (target: <= 2)
  startup_s             Flower: Ray start, actors, node discovery; in-process: data + warm-up
  end_to_end_ratio      whole call including start-up and shutdown
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fedunlearn.config.tree import load_config
from fedunlearn.engine.flower import FlowerFederation, run_on_flower
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.engine.port import TrainingRun
from fedunlearn.models.seeding import seed_everything
from fedunlearn.reporting import stamp, write_json
from fedunlearn.run.pipeline import prepare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="simulations/quickstart.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/engine.json"))
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    seed_everything(cfg.seed)
    setup = prepare(cfg)

    t0 = time.perf_counter()
    plain = InProcessFederation(cfg, setup.evaluator())
    plain_startup = time.perf_counter() - t0
    plain_run = plain.fedavg(setup.initial)
    plain_total = time.perf_counter() - t0

    marks: dict[str, float] = {}

    def job(fed: FlowerFederation) -> TrainingRun:
        marks["job_start"] = time.perf_counter()
        return fed.fedavg(setup.initial)

    t1 = time.perf_counter()
    flower_run = run_on_flower(cfg, job, setup.evaluator(), setup.data)
    flower_total = time.perf_counter() - t1

    diff = max(float(np.max(np.abs(flower_run.final[k] - plain_run.final[k])))
               for k in plain_run.final)
    flower_rounds = [r.wall_s for r in flower_run.rounds]
    plain_rounds = [r.wall_s for r in plain_run.rounds]
    figures = {
        "workload": {"clients": cfg.data.num_clients, "rounds": cfg.training.rounds,
                     "local_epochs": cfg.training.local_epochs, "model": cfg.model.name,
                     "messages": flower_run.messages_sent},
        "flower_ray": {"fedavg_wall_s": flower_run.wall_s,
                       "startup_s": marks["job_start"] - t1,
                       "total_s": flower_total,
                       "round_wall_s_median": float(np.median(flower_rounds)),
                       "client_seconds_per_message_mean": float(np.mean(flower_run.client_seconds)),
                       "final_test_accuracy": flower_run.rounds[-1].test_accuracy},
        "in_process": {"fedavg_wall_s": plain_run.wall_s, "startup_s": plain_startup,
                       "total_s": plain_total,
                       "round_wall_s_median": float(np.median(plain_rounds)),
                       "final_test_accuracy": plain_run.rounds[-1].test_accuracy},
        "ratio": flower_run.wall_s / plain_run.wall_s,
        "end_to_end_ratio": flower_total / plain_total,
        "max_abs_model_difference": diff,
    }
    write_json(args.out, {**stamp(cfg), "benchmark": "engine", "figures": figures})
    print(f"fedavg wall: flower-ray {flower_run.wall_s:.2f}s  in-process {plain_run.wall_s:.2f}s"
          f"  ratio {figures['ratio']:.2f}  (end-to-end {figures['end_to_end_ratio']:.2f}, "
          f"flower start-up {figures['flower_ray']['startup_s']:.1f}s)")
    print(f"same model on both engines: max |diff| = {diff:.2e}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
