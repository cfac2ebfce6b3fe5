#!/usr/bin/env python
"""Do shadow models pay to train in parallel? Sequential vs torch threads vs a process pool.

Trains ``--shadows`` shadow models of the config's model on a bounded sample
(``verification.shadow_samples``) of the config's pooled data, for ``verification.shadow_epochs``
epochs: (a) one after another with 1 torch thread, (b) the same with ``--workers`` torch
threads, (c) in a fork-started process pool of ``--workers`` processes, 1 thread each. Prints
the wall times and writes them to ``--out``. Usage::

    .venv/bin/python scripts/bench_shadow_parallel.py --config simulations/scale_1000.toml
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fedunlearn.config.tree import load_config
from fedunlearn.evaluation.shadow import shadow_sample
from fedunlearn.models import reinitialise
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import local_training, train
from fedunlearn.reporting import stamp, write_json
from fedunlearn.run.pipeline import prepare

_STATE: dict = {}


def _one(s: int) -> int:
    torch.set_num_threads(1)
    st = _STATE
    idx = shadow_sample(len(st["x"]), s, seed=0, max_samples=st["cap"])
    model = reinitialise(st["build"](), derive_seed(0, s, 1))
    train(model, st["x"][idx], st["y"][idx], st["spec"], seed=derive_seed(0, s, 2))
    return len(idx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="simulations/scale_1000.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--shadows", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/shadow_parallel.json"))
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    setup = prepare(cfg)
    pool = setup.data.pooled()
    _STATE.update(x=pool.x, y=pool.y, build=setup.build_model, cap=cfg.verification.shadow_samples,
                  spec=local_training(cfg, cfg.verification.shadow_epochs))
    walls = {}
    for threads in (1, args.workers):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        for s in range(args.shadows):
            train(reinitialise(setup.build_model(), s), pool.x[:cfg.verification.shadow_samples],
                  pool.y[:cfg.verification.shadow_samples], _STATE["spec"], seed=s)
        walls[f"sequential_{threads}_threads"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("fork")) as ex:
        sizes = list(ex.map(_one, range(args.shadows)))
    walls[f"process_pool_{args.workers}"] = time.perf_counter() - t0
    for k, v in walls.items():
        print(f"{k:<24} {v:7.2f} s")
    write_json(args.out, {**stamp(cfg), "shadows": args.shadows, "workers": args.workers,
                          "samples": int(np.mean(sizes)), "wall_s": walls,
                          "cpu_count": mp.cpu_count()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
