"""The ``fedunlearn run`` job: train on Flower, keep history, write results."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from fedunlearn.config import Config
from fedunlearn.experiment import prepare, train_federation
from fedunlearn.federation.flower import FlowerFederation, run_on_flower
from fedunlearn.federation.local import warm_up
from fedunlearn.history import HistoryStore
from fedunlearn.lineage import LineageLog
from fedunlearn.params import Params
from fedunlearn.reporting import (
    comparison_table,
    stamp,
    training_block,
    training_summary,
    write_json,
    write_report,
)
from fedunlearn.seeding import seed_everything
from fedunlearn.unlearning.service import Served, serve_requests, settings_in

ENGINE = "flower-ray"


def run_experiment(cfg: Config, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` through Flower + Ray into ``out``; return the results dict."""
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    warm_up(cfg, setup.data)  # torch's one-off start-up, paid here as in every client process
    store = HistoryStore.create(out / "history", retention_interval=cfg.history.retention_interval,
                                update_dtype=cfg.history.dtype)

    lineage = LineageLog(out)

    shadow_cache: dict[int, Any] = {}  # the second pass reuses the first pass's shadow models

    def serve(final: Params, federation: FlowerFederation | None, setting: str) -> Served:
        return serve_requests(cfg, data=setup.data, trained=final, initial=setup.initial,
                              store=store, federation=federation, lineage=lineage,
                              build_model=setup.build_model, predictor=setup.predictor(),
                              settings=(setting,), shadow_cache=shadow_cache,
                              stream=None if quiet else sys.stderr)

    def job(fed: FlowerFederation) -> tuple[Params, dict[str, Any]]:
        run = train_federation(fed, setup, store, progress=not quiet, lineage=lineage)
        body: dict[str, Any] = {
            "training": training_block(run, engine=ENGINE, history_bytes=store.bytes_used())}
        if cfg.unlearning.requests:  # federated removal needs the live federation
            served = serve(run.final, fed, "federated")
            body["unlearning"] = [dataclasses.asdict(r) for r in served.rows]
            body["purges"] = served.purges
            body["history_bytes_after_purge"] = store.bytes_used()
        return run.final, body

    final, body = run_on_flower(cfg, job, setup.evaluator())
    if cfg.unlearning.requests and "centralized" in settings_in(cfg):
        # centralized removal runs at one site, after the federation engine has shut down
        body["unlearning"] += [dataclasses.asdict(r)
                               for r in serve(final, None, "centralized").rows]
    results = {**stamp(cfg), **body}
    write_json(out / "results.json", results)
    written = write_report(out, results)
    if not quiet:
        print(training_summary(results, out))
        if "unlearning" in results:
            print(comparison_table(results["unlearning"]))
        print(f"report         {written['report']}")
    return results
