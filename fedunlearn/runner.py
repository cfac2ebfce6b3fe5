"""The ``fedunlearn run`` job: train on Flower, keep history, serve removals, write results.

A run has one or more seeds (``experiment.seeds``). Every seed is prepared (config checks, data,
initial model) before the engine starts; Flower and Ray then start **once** and every seed
trains and serves its federated removal requests on that engine, one after another. The
centralized methods run after the engine has shut down, as a single site would. With one
seed the run directory holds ``history/`` and ``lineage.jsonl``; with several, each seed has
its own ``seed-S/`` directory. One ``results.json`` holds every seed's rows (each with its
``seed``) and the summary over seeds (:mod:`fedunlearn.evaluation.summary`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedunlearn.config import Config
from fedunlearn.evaluation.summary import summarize
from fedunlearn.experiment import Setup, prepare, train_federation
from fedunlearn.federation.flower import Connect, FlowerFederation, run_engine
from fedunlearn.federation.local import warm_up
from fedunlearn.history import HistoryStore
from fedunlearn.lineage import LineageLog
from fedunlearn.params import Params
from fedunlearn.reporting import (
    comparison_table,
    stamp,
    training_block,
    training_summary,
    verdict_table,
    write_json,
    write_report,
)
from fedunlearn.seeding import seed_everything
from fedunlearn.unlearning.service import serve_requests, settings_in

ENGINE = "flower-ray"


@dataclass
class SeedRun:
    """One seed of a run: its config, directory, data, history store and results."""

    cfg: Config
    out: Path
    setup: Setup
    store: HistoryStore | None = None
    lineage: LineageLog | None = None
    final: Params | None = None
    training: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    purges: list[dict[str, Any]] = field(default_factory=list)
    history_bytes_after_purge: int | None = None
    shadow_cache: dict[int, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def open(self) -> None:
        """Create the seed's history store and lineage log (nothing is written before)."""
        self.store = HistoryStore.create(
            self.out / "history", retention_interval=self.cfg.history.retention_interval,
            update_dtype=self.cfg.history.dtype)
        self.lineage = LineageLog(self.out)

    def train(self, fed: FlowerFederation, *, quiet: bool) -> None:
        assert self.store is not None
        run = train_federation(fed, self.setup, self.store, progress=not quiet,
                               lineage=self.lineage)
        self.final = run.final
        self.training = training_block(run, engine=ENGINE, history_bytes=self.store.bytes_used())

    def serve(self, federation: FlowerFederation | None, setting: str, *, quiet: bool) -> None:
        assert self.store is not None and self.lineage is not None and self.final is not None
        served = serve_requests(self.cfg, data=self.setup.data, trained=self.final,
                                initial=self.setup.initial, store=self.store,
                                federation=federation, lineage=self.lineage,
                                build_model=self.setup.build_model,
                                predictor=self.setup.predictor(), settings=(setting,),
                                shadow_cache=self.shadow_cache,
                                stream=None if quiet else sys.stderr)
        self.rows += [{"seed": self.seed, **dataclasses.asdict(r)} for r in served.rows]
        if setting == "federated":
            self.purges = served.purges
            self.history_bytes_after_purge = self.store.bytes_used()


def seed_dir(out: Path, seed: int, multi: bool) -> Path:
    """Where one seed's history and lineage go: ``out`` itself, or ``out/seed-S``."""
    return out / f"seed-{seed}" if multi else out


def run_experiment(cfg: Config, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (every seed) through Flower + Ray into ``out``; return the results dict."""
    seeds = cfg.seeds
    runs = [SeedRun(cfg.with_seed(s), seed_dir(out, s, len(seeds) > 1),
                    prepare(cfg.with_seed(s))) for s in seeds]
    requests = bool(cfg.unlearning.requests)
    seed_everything(seeds[0])
    warm_up(runs[0].cfg, runs[0].setup.data)  # torch's one-off start-up, as in every client

    def job(connect: Connect) -> None:
        for run in runs:
            if len(runs) > 1 and not quiet:
                print(f"[seed] {run.seed} ({runs.index(run) + 1} of {len(runs)})",
                      file=sys.stderr, flush=True)
            seed_everything(run.seed)
            run.open()
            fed = connect(run.cfg, run.setup.evaluator())
            run.train(fed, quiet=quiet)
            if requests:  # federated removal needs the live federation
                run.serve(fed, "federated", quiet=quiet)

    run_engine(runs[0].cfg, job)
    if requests and "centralized" in settings_in(cfg):
        # centralized removal runs at one site, after the federation engine has shut down
        for run in runs:
            seed_everything(run.seed)
            run.serve(None, "centralized", quiet=quiet)
    results = _results(cfg, runs, out)
    write_json(out / "results.json", results)
    written = write_report(out, results)
    if not quiet:
        print(training_summary(results, out))
        if "unlearning" in results:
            print(comparison_table(results["unlearning"], results.get("summary")))
            print(verdict_table(results["summary"]))
        print(f"report         {written['report']}")
    return results


def _results(cfg: Config, runs: list[SeedRun], out: Path) -> dict[str, Any]:
    first = runs[0]
    results: dict[str, Any] = {**stamp(first.cfg), "config": cfg.to_dict(),
                               "seeds": [r.seed for r in runs], "training": first.training}
    results["per_seed"] = [
        {"seed": r.seed, "dir": str(r.out.relative_to(out)) if r.out != out else ".",
         "training": r.training, "purges": r.purges,
         "history_bytes_after_purge": r.history_bytes_after_purge} for r in runs]
    if cfg.unlearning.requests:
        rows = [row for r in runs for row in r.rows]
        results["unlearning"] = rows
        results["purges"] = first.purges
        results["history_bytes_after_purge"] = first.history_bytes_after_purge
        results["summary"] = summarize(rows, alpha=cfg.verification.alpha)
    return results
