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
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedunlearn import interrupt
from fedunlearn.checkpoint import (
    CHECKPOINT_META,
    SERVED_FILE,
    TRAINING_FILE,
    Checkpoint,
    ResumeError,
    clear_serving,
    load_checkpoint,
    load_serving,
    read_json,
    write_run_file,
    write_serving,
    write_state,
)
from fedunlearn.config import Config
from fedunlearn.evaluation.summary import summarize
from fedunlearn.experiment import Setup, prepare, train_federation
from fedunlearn.federation.flower import Connect, FlowerFederation, run_engine
from fedunlearn.federation.local import warm_up
from fedunlearn.history import MANIFEST, HistoryStore
from fedunlearn.lineage import LineageLog
from fedunlearn.params import Params
from fedunlearn.reporting import (
    comparison_table,
    stamp,
    training_block,
    training_summary,
    verdict_table,
    verification_summary,
    write_json,
    write_report,
)
from fedunlearn.schema import Role, Row
from fedunlearn.seeding import seed_everything
from fedunlearn.unlearning.service import Resumption, Served, serve_requests, settings_in

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
    verification: list[dict[str, Any]] = field(default_factory=list)
    history_bytes_after_purge: int | None = None
    shadow_cache: dict[int, Any] = field(default_factory=dict)
    start: Checkpoint | None = None  # resume training from this round
    served: bool = False  # every federated request of the seed was answered (resume)
    resumption: Resumption | None = None  # resume the federated requests from this one

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def open(self) -> None:
        """Create the seed's history store and lineage log (nothing is written before)."""
        self.store = HistoryStore.create(
            self.out / "history", retention_interval=self.cfg.history.retention_interval,
            update_dtype=self.cfg.history.dtype)
        self.lineage = LineageLog(self.out)

    def restore(self) -> None:
        """Reopen a seed of an interrupted run at its most advanced saved state."""
        path = self.out / "history"
        self.lineage = LineageLog(self.out)
        if not path.exists():  # interrupted before its first round: start it afresh
            return
        self.store = HistoryStore.open(path)
        if (self.out / SERVED_FILE).exists():
            saved = read_json(self.out / SERVED_FILE)
            self.training, self.rows = saved["training"], saved["rows"]
            self.purges = saved["purges"]
            self.history_bytes_after_purge = saved["history_bytes_after_purge"]
            self.verification = saved.get("verification", [])
            self.served = True
            if "centralized" in settings_in(self.cfg):  # that pass is done again
                self.lineage.append("resume", request=0, setting="centralized")
            return
        if (self.out / TRAINING_FILE).exists():
            self.training = read_json(self.out / TRAINING_FILE)
            self._restore_serving()
            return
        self.start = load_checkpoint(self.out)
        if self.start is None and self.store.rounds():
            # killed before the first checkpoint, or the checkpoint was removed: training is
            # redone from round 1 and every stored round is checked against its redone twin
            print(f"[resume] seed {self.seed}: no checkpoint ({CHECKPOINT_META}); training "
                  f"restarts from round 1 and the {len(self.store.rounds())} stored rounds are "
                  "checked against the redone ones", file=sys.stderr, flush=True)
            self.lineage.append("resume", round=0)

    def _restore_serving(self) -> None:
        """Trained, interrupted while serving: go on after the last answered request (its
        state saved by :class:`_Journal`), or from the first if none was answered.

        Raises
        ------
        ResumeError
            If the store was purged beyond the saved state, or a strict purge deleted the
            trained model the remaining requests are compared against."""
        assert self.store is not None and self.lineage is not None
        saved = load_serving(self.out)
        state, models = saved if saved is not None else ({"next_request": 0}, {})
        k = int(state["next_request"])
        answered = {c for r in self.cfg.unlearning.requests[:k] for c in r}
        if stray := sorted(set(self.store.purged()) - answered):
            raise ResumeError(f"seed {self.seed} was interrupted while serving its requests, "
                              f"after clients {stray} were purged without a saved answer; "
                              "this seed cannot be resumed - rerun it into a new --out")
        if self.store.globals_deleted_from() is not None:
            raise ResumeError(
                f"seed {self.seed} was interrupted after answering {k} of its "
                f"{len(self.cfg.unlearning.requests)} requests; their strict purge deleted the "
                "trained model the remaining requests are measured against, so it cannot be "
                "resumed - rerun it into a new --out (history.purge = \"updates\" keeps "
                "such runs resumable)")
        if saved is not None:
            self.rows, self.verification = state["rows"], state["verification"]
            self.purges = state["purges"]
            self.resumption = Resumption(k, models, bool(state["pending_purge"]))
        self.final = self.store.final_model()
        self.lineage.append("resume", request=k, setting="federated")

    def train(self, fed: FlowerFederation, *, quiet: bool) -> None:
        if self.store is None:
            self.open()
        assert self.store is not None
        run = train_federation(fed, self.setup, self.store, progress=not quiet,
                               lineage=self.lineage, checkpoints=self.out, start=self.start)
        self.final = run.final
        self.training = training_block(run, engine=ENGINE, history_bytes=self.store.bytes_used())
        if self.start is not None:
            self.training["resumed_from_round"] = self.start.round
        write_state(self.out / TRAINING_FILE, self.training)

    def serve(self, federation: FlowerFederation | None, setting: str, *, quiet: bool) -> None:
        assert self.store is not None and self.lineage is not None
        # the centralized setting fits its own original; a resumed, served seed whose final
        # model was purged has no federated one left to offer
        trained = self.final if self.final is not None else self.setup.initial
        assert setting == "centralized" or self.final is not None
        federated = setting == "federated"
        journal = _Journal(self) if federated else None
        served = serve_requests(self.cfg, data=self.setup.data, trained=trained,
                                initial=self.setup.initial, store=self.store,
                                federation=federation, lineage=self.lineage,
                                build_model=self.setup.build_model,
                                predictor=self.setup.predictor(), settings=(setting,),
                                shadow_cache=self.shadow_cache,
                                stream=None if quiet else sys.stderr,
                                resume=self.resumption if federated else None,
                                journal=journal)
        if not federated:
            rows, verification = self._tagged(served.rows, served.verification)
            self.rows += rows
            self.verification += verification
            return
        self.history_bytes_after_purge = self.store.bytes_used()
        write_state(self.out / SERVED_FILE, {
            "training": self.training, "rows": self.rows, "purges": self.purges,
            "history_bytes_after_purge": self.history_bytes_after_purge,
            "verification": self.verification})
        clear_serving(self.out)

    def _tagged(self, rows: list[Row], verification: list[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Rows and verification entries as stored, each with the seed."""
        return ([{"seed": self.seed, **dataclasses.asdict(r)} for r in rows],
                [{"seed": self.seed, **v} for v in verification])


class _Journal:
    """Saves a seed's federated pass after each request (``serving.json``), so that an
    interrupted pass goes on from the next request (:meth:`SeedRun._restore_serving`)."""

    def __init__(self, run: SeedRun) -> None:
        self.run = run
        self.models: dict[str, Params] = dict(run.resumption.current if run.resumption
                                              else {})
        self.next_request = run.resumption.next_request if run.resumption else 0

    def served(self, request: int, served: Served, current: dict[str, Params], *,
               purge_pending: bool) -> None:
        rows, verification = self.run._tagged(served.rows, served.verification)
        self.run.rows += rows
        self.run.verification += verification
        self.models.update(current)
        self.next_request = request + 1
        self._save(pending=purge_pending)

    def purged(self, request: int, purge: dict[str, Any]) -> None:
        self.run.purges.append(purge)
        self._save(pending=False)

    def _save(self, *, pending: bool) -> None:
        run = self.run
        write_serving(run.out, {"next_request": self.next_request, "pending_purge": pending,
                                "rows": run.rows, "verification": run.verification,
                                "purges": run.purges}, self.models)


@contextmanager
def _farewell_on_stop(out: Path) -> Iterator[None]:
    try:
        yield
    except interrupt.Interrupted:
        print(farewell(out), file=sys.stderr, flush=True)
        raise


def farewell(out: Path) -> str:
    """The last line of an interrupted run: how to resume it, or why it cannot be (a seed
    that had answered a request under a strict purge, see :meth:`SeedRun._restore_serving`)."""
    if _strictly_purged_midway(out):
        return (f"interrupted: the partial run is in {out}, but a strict purge has deleted the "
                "trained model its remaining requests are measured against, so it cannot be "
                "resumed; rerun it into a new --out (history.purge = \"updates\" keeps such "
                "runs resumable)")
    return (f"interrupted: the partial run is in {out} (history store consistent); continue it "
            f"with: fedunlearn resume {out}")


def _strictly_purged_midway(out: Path) -> bool:
    """Whether a seed of ``out`` is part-served and its history lost its global models (read
    from the files; never raises, the farewell must always be printed)."""
    for seed_out in (out, *sorted(out.glob("seed-*"))):
        if (seed_out / SERVED_FILE).exists():
            continue
        try:
            manifest = json.loads((seed_out / "history" / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("globals_deleted_from") is not None:
            return True
    return False


def seed_dir(out: Path, seed: int, multi: bool) -> Path:
    """Where one seed's history and lineage go: ``out`` itself, or ``out/seed-S``."""
    return out / f"seed-{seed}" if multi else out


def run_experiment(cfg: Config, out: Path, *, quiet: bool = False, command: str = "run",
                   resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (every seed) through Flower + Ray into ``out``; return the results dict.

    The run's story, in order; each step is a place a resume can start from
    (:mod:`fedunlearn.checkpoint`):

    1. every seed is checked and built (config, methods, strategy, data, initial model);
    2. ``run.json`` records the resolved config, or, with ``resume``, each seed reopens its
       most advanced saved state;
    3. Flower and Ray start once; every seed trains (a checkpoint after each round) and
       serves its federated requests (``served.json`` once done);
    4. the centralized methods run after the engine has shut down, as one site would;
    5. ``results.json``, the report and the tables.

    SIGINT or SIGTERM during 3 or 4 stop the run at the next round boundary
    (:mod:`fedunlearn.interrupt`) with :class:`~fedunlearn.interrupt.Interrupted`.
    """
    runs = [SeedRun(cfg.with_seed(s), seed_dir(out, s, len(cfg.seeds) > 1),
                    prepare(cfg.with_seed(s))) for s in cfg.seeds]
    if resume:
        for run in runs:
            run.restore()
    else:
        write_run_file(out, cfg.to_dict(), command)
    interrupt.reset()
    with interrupt.stoppable(lambda: farewell(out)), _farewell_on_stop(out):
        _federated(runs, cfg, out, quiet=quiet)
        _centralized(runs, cfg, quiet=quiet)
    results = _results(cfg, runs, out)
    write_json(out / "results.json", results)
    written = write_report(out, results)
    if not quiet:
        print(training_summary(results, out))
        if "unlearning" in results:
            print(comparison_table(results["unlearning"], results.get("summary")))
            print(verdict_table(results["summary"]))
            if (cost := verification_summary(results)) is not None:
                print(cost)
        print(f"report         {written['report']}")
    return results


def _federated(runs: list[SeedRun], cfg: Config, out: Path, *, quiet: bool) -> None:
    """Step 3: one engine for every seed not yet served."""
    todo = [run for run in runs if not run.served]
    if not todo:
        return
    requests = bool(cfg.unlearning.requests)

    def job(connect: Connect) -> None:
        for run in todo:
            if len(runs) > 1 and not quiet:
                print(f"[seed] {run.seed} ({runs.index(run) + 1} of {len(runs)})",
                      file=sys.stderr, flush=True)
            seed_everything(run.seed)
            fed = connect(run.cfg, run.setup.evaluator(), run.setup.data)
            if run.final is None:
                run.train(fed, quiet=quiet)
            interrupt.check()
            if requests:  # federated removal needs the live federation
                run.serve(fed, "federated", quiet=quiet)
            interrupt.check()

    seed_everything(todo[0].seed)
    warm_up(todo[0].cfg, todo[0].setup.data)  # torch's one-off start-up, as in every client
    run_engine(runs[0].cfg, job, on_stuck=lambda: (
        f"the work done so far is in {out}; `fedunlearn resume {out}` continues it"))


def _centralized(runs: list[SeedRun], cfg: Config, *, quiet: bool) -> None:
    """Step 4: the centralized methods on each seed's pooled data."""
    if cfg.unlearning.requests and "centralized" in settings_in(cfg):
        for run in runs:
            seed_everything(run.seed)
            run.serve(None, "centralized", quiet=quiet)
            interrupt.check()


def verification_block(requests: list[dict[str, Any]],
                       rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``results["verification"]``: the cost of verifying, apart from the methods' own.

    ``requests`` (one entry per seed, request and serving pass, see
    :attr:`fedunlearn.unlearning.service.Served.verification`), ``total_s`` (their sum) and
    ``retrain_s`` (the wall time of the retrainings being judged, reference rows summed over
    seeds and requests, for comparison).
    """
    return {"requests": requests, "total_s": sum(v["wall_s"] for v in requests),
            "retrain_s": sum(r["wall_s"] for r in rows if r.get("role") == Role.REFERENCE)}


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
        results["verification"] = verification_block(
            [v for r in runs for v in r.verification], rows)
    return results
