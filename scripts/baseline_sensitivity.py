#!/usr/bin/env python
"""How PGA's and NoT's acceptance bands depend on their free choices (in process, per seed).

Trains ``simulations/baselines_digits.toml`` once per seed with the in-process port (the same
FedAvg as through Flower, ``tests/engine/test_engine.py``; the figures equal the CLI run's for the
same seed), serves request 0 with retraining and with PGA and NoT under several settings, all
under the run's own request seed, and writes per seed and variant the test accuracy and the
backdoor's success (ASR) next to retraining's, and whether issue 12's bands hold (ASR ≤
retrain + 0.10, test accuracy ≥ retrain − 0.05). It documents what the papers leave open: the
repair (fixed rounds, or until the remaining clients' accuracy is back, and that rule's
tolerance) and PGA's radius, where the authors' code takes the square root of a third of the
mean *squared* distance. The former fixed five-round defaults were replaced by the recovery
rule after this script showed them missing the bands (PGA 1 of 3 seeds, NoT 0 of 3); its
tolerance, 0.01, was chosen after per-round traces of these seeds had been seen, so this also
prints 0.005, 0.02 and 0.05 beside it.

    .venv/bin/python scripts/baseline_sensitivity.py [--seeds 0,1,2] \
        [--out benchmarks/baseline_sensitivity.json]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedunlearn.config.tree import load_config
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.seeding import derive_seed
from fedunlearn.reporting import stamp, write_json
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.unlearning import UNLEARNERS
from fedunlearn.unlearning.base import UnlearningContext

CONFIG = "simulations/baselines_digits.toml"
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("pga (default: until recovered, tolerance 0.01)", "pga", {}),
    ("pga, tolerance 0.005", "pga", {"tolerance": 0.005}),
    ("pga, tolerance 0.02", "pga", {"tolerance": 0.02}),
    ("pga, tolerance 0.05", "pga", {"tolerance": 0.05}),
    ("pga, 1 post-training round (paper)", "pga", {"rounds": 1, "until": "rounds"}),
    ("pga, 5 rounds (the former default)", "pga", {"rounds": 5, "until": "rounds"}),
    ("pga, 10 rounds (authors' code)", "pga", {"rounds": 10, "until": "rounds"}),
    ("pga, radius 1/sqrt(3) (authors' code)", "pga", {"radius_fraction": 1 / math.sqrt(3)}),
    ("not (default: until recovered, tolerance 0.01)", "not", {}),
    ("not, tolerance 0.005", "not", {"tolerance": 0.005}),
    ("not, tolerance 0.02", "not", {"tolerance": 0.02}),
    ("not, tolerance 0.05", "not", {"tolerance": 0.05}),
    ("not, 5 rounds (the former default)", "not", {"rounds": 5, "until": "rounds"}),
    ("not, 10 rounds", "not", {"rounds": 10, "until": "rounds"}),
)
ASR_BAND, ACC_BAND = 0.10, 0.05


def one_seed(seed: int) -> dict[str, Any]:
    cfg = load_config(CONFIG, [f"experiment.seeds=[{seed}]", f"experiment.seed={seed}"])
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    data, predictor = setup.data, setup.predictor()
    assert data.triggered_test is not None
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore.create(Path(tmp) / "history", retention_interval=1)
        run = train_federation(fed, setup, store, progress=False)

        def figures(model: Any) -> dict[str, float]:
            p = predictor(model)
            return {"test_accuracy": float(np.mean(
                        np.asarray(p(data.test.x)).argmax(1) == data.test.y)),
                    "backdoor_asr": float(np.mean(np.asarray(p(data.triggered_test.x)).argmax(1)
                                                  == cfg.backdoor.target_class))}

        rows: dict[str, dict[str, Any]] = {}
        for name, base, params in (("retrain", "retrain", {}), *VARIANTS):
            method = UNLEARNERS.get(base)(**{**dict(cfg.unlearning.params.get(base, {})),
                                             **params})
            result = method.unlearn(UnlearningContext(
                cfg=cfg, targets=(0,), removed=frozenset({0}), model=run.final,
                initial=setup.initial, history=store, federation=fed, data=data,
                build_model=setup.build_model, seed=derive_seed(cfg.seed, 0xA11, 0)))
            rows[name] = {"method": base, "params": params, **figures(result.model),
                          "client_epochs": result.cost.client_epochs,
                          "rounds": result.cost.rounds,
                          "messages_sent": result.cost.messages_sent,
                          "recovered": result.details.get("recovery", {}).get("recovered")}
    ref = rows["retrain"]
    for row in rows.values():
        row["asr_minus_retrain"] = row["backdoor_asr"] - ref["backdoor_asr"]
        row["accuracy_minus_retrain"] = row["test_accuracy"] - ref["test_accuracy"]
        row["meets_bands"] = (row["asr_minus_retrain"] <= ASR_BAND
                              and row["accuracy_minus_retrain"] >= -ACC_BAND)
    return {"seed": seed, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/baseline_sensitivity.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        per_seed.append(one_seed(seed))
        for name, r in per_seed[-1]["rows"].items():
            print(f"seed {seed}  {name:40s} acc {r['test_accuracy']:.3f} "
                  f"({r['accuracy_minus_retrain']:+.3f})  ASR {r['backdoor_asr']:.3f} "
                  f"({r['asr_minus_retrain']:+.3f})  client-epochs {r['client_epochs']:.0f}  "
                  f"rounds {r['rounds']}  msgs {r['messages_sent']}  "
                  f"{'meets' if r['meets_bands'] else 'misses'}", flush=True)
    cfg = load_config(CONFIG, [f"experiment.seeds={seeds}"])
    write_json(args.out, {**stamp(cfg), "seeds": seeds, "bands": {
        "asr_minus_retrain_max": ASR_BAND, "accuracy_minus_retrain_min": -ACC_BAND},
        "per_seed": per_seed})
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
