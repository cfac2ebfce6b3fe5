"""The ``fedunlearn run`` job: train on Flower, keep history, write results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedunlearn.config import Config
from fedunlearn.experiment import prepare, train_federation
from fedunlearn.federation.flower import FlowerFederation, run_on_flower
from fedunlearn.history import HistoryStore
from fedunlearn.reporting import stamp, training_block, training_summary, write_json
from fedunlearn.seeding import seed_everything

ENGINE = "flower-ray"


def run_experiment(cfg: Config, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` through Flower + Ray into ``out``; return the results dict."""
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    store = HistoryStore.create(out / "history", retention_interval=cfg.history.retention_interval,
                                update_dtype=cfg.history.dtype)

    def job(fed: FlowerFederation) -> dict[str, Any]:
        run = train_federation(fed, setup, store, progress=not quiet)
        return {"training": training_block(run, engine=ENGINE, history_bytes=store.bytes_used())}

    body = run_on_flower(cfg, job, setup.evaluator())
    results = {**stamp(cfg), **body}
    write_json(out / "results.json", results)
    if not quiet:
        print(training_summary(results, out))
    return results
