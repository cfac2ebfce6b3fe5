#!/usr/bin/env python
"""Distillation's step budget against retraining, on one config, in process.

Trains the config's federation with the in-process port (the same FedAvg as through Flower,
proven identical in ``tests/engine/test_engine.py``), then serves its first request with ``retrain``
(and its noise floor) and ``distillation`` at several ``max_steps`` budgets, every model
verified by the same verifier (bounded samples, shadow models as configured). Writes, per
method: test / forgotten accuracy, ASR, KL on the forgotten data, the clean-split membership
AUCs, the paired ASR test against retraining, wall time, speed-up over retraining and the steps
taken, plus the run's verification cost. Usage::

    .venv/bin/python scripts/bench_distillation_budget.py --config simulations/scale_1000.toml \
        [--budgets 0,100,250,500,1000,1000000000] [--set section.key=value ...] \
        [--out benchmarks/distillation_budget_scale_1000.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedunlearn.config.tree import load_config
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.seeding import seed_everything
from fedunlearn.reporting import stamp, write_json
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.run.serving import serve_requests

KEYS = ("test_accuracy", "forget_accuracy", "backdoor_asr", "backdoor_asr_vs_retrain_p",
        "kl_forget", "mia_loss_auc_clean", "mia_lira_auc_clean", "mia_lira_plain_auc_clean")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="simulations/scale_1000.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--budgets", default="0,100,250,500,1000,1000000000",
                    help="max_steps values; 0 = subtraction only (epochs 0)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    names = [f"distillation:b{b}" for b in budgets]
    params = [f"unlearning.params.\"{n}\"={{epochs = 0}}" if b == 0 else
              f"unlearning.params.\"{n}\"={{max_steps = {b}}}" for n, b in zip(names, budgets)]
    methods = ", ".join(f'"{m}"' for m in ["retrain", *names])
    cfg = load_config(args.config, [*args.overrides, f"unlearning.methods=[{methods}]",
                                    *params])
    cfg = cfg.with_seed(cfg.seeds[0])
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore.create(Path(tmp) / "history",
                                    retention_interval=cfg.history.retention_interval,
                                    update_dtype=cfg.history.dtype)
        t0 = time.perf_counter()
        run = train_federation(fed, setup, store, progress=False)
        train_s = time.perf_counter() - t0
        served = serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                                store=store, federation=fed, lineage=LineageLog(Path(tmp)),
                                build_model=setup.build_model, predictor=setup.predictor(),
                                settings=("federated",), stream=sys.stderr)
    rows: dict[str, Any] = {}
    for r in served.rows:
        if r.request != list(cfg.unlearning.requests[0]):
            continue
        rows[r.method] = {"wall_s": r.wall_s, "speedup_vs_retrain": r.speedup_vs_retrain,
                          "server_epochs": r.server_epochs,
                          "steps": r.details.get("steps"),
                          **{k: r.metrics.get(k) for k in KEYS}}
    out = args.out or Path(f"benchmarks/distillation_budget_{cfg.experiment.name}.json")
    write_json(out, {**stamp(cfg), "train_s": train_s,
                     "final_test_accuracy": run.rounds[-1].test_accuracy,
                     "request": cfg.unlearning.requests[0], "budgets": budgets,
                     "methods": rows, "verification": served.verification})
    head = f"{'method':<24}{'steps':>7}{'wall s':>9}{'speedup':>9}" + "".join(
        f"{k[:14]:>16}" for k in KEYS)
    print(head)
    for name, r in rows.items():
        cells = "".join(f"{'-' if r[k] is None else format(r[k], '.4g'):>16}" for k in KEYS)
        print(f"{name:<24}{r['steps'] if r['steps'] is not None else '-':>7}"
              f"{r['wall_s']:>9.2f}{(r['speedup_vs_retrain'] or 0):>9.1f}{cells}")
    for v in served.verification:
        print(f"verification request {v['request']}: {v['wall_s']:.2f} s (shadows "
              f"{v['shadow_s']:.2f} s), sizes {v['sizes']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
