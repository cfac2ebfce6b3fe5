#!/usr/bin/env python
"""Centralized removal benchmark: SISA and the Newton step against centralized retraining.

On the data of a config (default ``simulations/federated_vs_centralized.toml``: 10 clients on
embedded digits), every repeat fits fresh instances of ``central_retrain``, ``sisa`` (by
client), ``sisa_random`` and ``newton`` on the pooled data (not timed), then times each one's
removal of the same request, side by side in one process. Single removals of a few tens of
milliseconds are noisy on a shared machine, so the figures are medians over ``--repeats``.
Usage::

    .venv/bin/python scripts/bench_removal.py [--config ...] [--set section.key=value ...]
        [--repeats 5] [--out benchmarks/removal.json]

Figures written (per method): ``wall_s`` (every repeat), ``median_s``, ``speedup`` (median
retraining time over the method's median), and for ``newton`` the Newton step alone
(``step_median_s``, ``step_speedup``, without the budget retraining), for SISA the shards
retrained and sample-epochs against retraining's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from fedunlearn.config.tree import load_config
from fedunlearn.models.seeding import seed_everything
from fedunlearn.reporting import stamp, write_json
from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning import UNLEARNERS, UnlearningContext

METHODS = ("central_retrain", "sisa", "sisa_random", "newton")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="simulations/federated_vs_centralized.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/removal.json"))
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    targets = tuple(cfg.unlearning.requests[0]) if cfg.unlearning.requests else (0,)

    def ctx(t: tuple[int, ...]) -> UnlearningContext:
        return UnlearningContext(cfg=cfg, targets=t, removed=frozenset(t), model=setup.initial,
                                 initial=setup.initial, history=None, federation=None,  # type: ignore[arg-type]
                                 data=setup.data, build_model=setup.build_model, seed=cfg.seed)

    walls: dict[str, list[float]] = {m: [] for m in METHODS}
    extra: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for name in METHODS:
            method = UNLEARNERS.get(name)(**cfg.unlearning.params.get(name, {}))
            method.fit(ctx(()))
            t0 = time.perf_counter()
            result = method.unlearn(ctx(targets))
            walls[name].append(time.perf_counter() - t0)
            extra[name].append({**result.details, "sample_epochs": result.cost.sample_epochs})

    ref = statistics.median(walls["central_retrain"])
    figures: dict[str, Any] = {}
    for name in METHODS:
        med = statistics.median(walls[name])
        figures[name] = {"wall_s": walls[name], "median_s": med, "speedup": ref / med,
                         "sample_epochs": extra[name][0]["sample_epochs"]}
        if name.startswith("sisa"):
            figures[name]["shards_retrained"] = extra[name][0]["shards_retrained"]
    steps = [e["newton_step_s"] for e in extra["newton"]]
    figures["newton"].update(step_median_s=statistics.median(steps),
                             step_speedup=ref / statistics.median(steps),
                             retrained=extra["newton"][0]["retrained"],
                             data_dependent_bound=extra["newton"][0]["data_dependent_bound"],
                             budget=extra["newton"][0]["budget"])
    write_json(args.out, {**stamp(cfg), "request": list(targets), "repeats": args.repeats,
                          "methods": figures})
    for name in METHODS:
        f = figures[name]
        print(f"{name:<16} median {f['median_s']:8.4f}s  speed-up {f['speedup']:6.1f}x"
              + (f"  (Newton step alone {f['step_median_s']:.4f}s, {f['step_speedup']:.0f}x)"
                 if name == "newton" else ""))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
