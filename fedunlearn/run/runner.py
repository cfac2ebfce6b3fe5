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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedunlearn.config.tree import Config, from_run_dict
from fedunlearn.engine.flower import Connect, FlowerFederation, run_engine
from fedunlearn.evaluation.schema import Role, Row
from fedunlearn.evaluation.summary import summarize
from fedunlearn.evaluation.verdicts import INCONCLUSIVE
from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import JOURNAL, MANIFEST, HistoryStore, confined
from fedunlearn.models.params import Params
from fedunlearn.models.seeding import seed_everything
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
from fedunlearn.run import interrupt
from fedunlearn.run.experiment import Setup, check_saved_model, prepare, train_federation
from fedunlearn.run.resume import (
    CHECKPOINT_META,
    SERVED_FILE,
    SERVING_FILE,
    TRAINING_FILE,
    Checkpoint,
    ResumeError,
    clear_serving,
    load_checkpoint,
    load_serving,
    note_added_seed,
    note_resumption,
    read_json,
    read_run_file,
    remove_temp_files,
    write_run_file,
    write_serving,
    write_state,
)
from fedunlearn.run.serving import (
    Resumption,
    Served,
    build_methods,
    resumable,
    serve_requests,
    settings_in,
    store_files,
)

ENGINE = "flower-ray"
STATE_PREFIX = "#state:"  # serving.npz: a method's carried state, beside the methods' models


@dataclass
class SeedRun:
    """One seed of a run: its config, directory, data, history store and results."""

    cfg: Config
    out: Path
    setup: Setup
    store: HistoryStore | None = None
    lineage: LineageLog | None = None
    final: Params | None = None  # the trained model (None once a strict purge deleted it)
    trained: bool = False  # training has finished (training.json)
    training: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    purges: list[dict[str, Any]] = field(default_factory=list)
    verification: list[dict[str, Any]] = field(default_factory=list)
    history_bytes_after_purge: int | None = None
    shadow_cache: dict[int, Any] = field(default_factory=dict)
    start: Checkpoint | None = None  # resume training from this round
    served: bool = False  # every federated request of the seed was answered (resume)
    resumption: Resumption | None = None  # resume the federated requests from this one
    resume_event: dict[str, Any] | None = None  # for the lineage, once every seed restored

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def open(self) -> None:
        """Create the seed's history store and lineage log (nothing is written before)."""
        self.store = HistoryStore.create(
            self.out / "history", retention_interval=self.cfg.history.retention_interval,
            update_dtype=self.cfg.history.dtype)
        self.lineage = LineageLog(self.out)

    def check_resumable(self, root: Path) -> None:
        """Refuse, reading files only (nothing is written, deleted or completed), a seed that
        cannot be resumed: every refusal happens before any seed's store is opened, since
        opening finishes an interrupted purge.

        Raises
        ------
        ResumeError, UnsafePathError
            A seed whose directory or history passes through a symbolic link; a seed
            interrupted with requests left after a strict purge (done or journaled), whose
            trained model those requests are measured against is gone; a seed whose methods
            carry in-memory state into requests still to serve.
        """
        rel = self.out.relative_to(root).as_posix() if self.out != root else ""
        history = confined(root, f"{rel}/history" if rel else "history", "the run directory")
        if not history.exists() or (self.out / SERVED_FILE).exists() \
                or not (self.out / TRAINING_FILE).exists():
            return
        k = _saved_next_request(self.out)
        left = len(self.cfg.unlearning.requests) - k
        if left > 0 and k > 0 and (why := _stateful_reason(self.cfg)):
            raise self._final_stop(k, why)
        if left > 0 and _strict_purge_on_disk(history):
            raise self._final_stop(k, _STRICT_REASON)

    def restore(self) -> None:
        """Reopen a seed of an interrupted run at its most advanced saved state
        (:meth:`check_resumable` first)."""
        path = self.out / "history"
        self.lineage = LineageLog(self.out)
        if self.out.is_dir():  # writes a kill cut short (they may hold a purged model)
            remove_temp_files(self.out)
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
                self.resume_event = {"request": 0, "setting": "centralized"}
            return
        if (self.out / TRAINING_FILE).exists():
            self.training = read_json(self.out / TRAINING_FILE)
            self._restore_serving()
            return
        self.start = load_checkpoint(self.out)
        if self.start is not None:
            check_saved_model(self.start.model, self.setup.initial,
                              self.out / CHECKPOINT_META,
                              f"delete {CHECKPOINT_META} to train this seed from round 1")
        if self.start is None and self.store.rounds():
            # killed before the first checkpoint, or the checkpoint was removed: training is
            # redone from round 1 and every stored round is checked against its redone twin
            print(f"[resume] seed {self.seed}: no checkpoint ({CHECKPOINT_META}); training "
                  f"restarts from round 1 and the {len(self.store.rounds())} stored rounds are "
                  "checked against the redone ones", file=sys.stderr, flush=True)
            self.resume_event = {"round": 0}

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
        k = state["next_request"]
        if saved is not None:
            self._check_saved(state)
            for name, model in models.items():
                if not name.startswith(STATE_PREFIX):
                    check_saved_model(model, self.setup.initial, self.out / SERVING_FILE,
                                      "delete serving.json and serving.npz to serve every request again, "
                                      "when no request was purged yet")
        answered = {c for r in self.cfg.unlearning.requests[:k] for c in r}
        if stray := sorted(set(self.store.purged()) - answered):
            raise ResumeError(f"seed {self.seed} was interrupted while serving its requests, "
                              f"after clients {stray} were purged without a saved answer; "
                              "this seed cannot be resumed - rerun it into a new --out")
        left = len(self.cfg.unlearning.requests) - k
        if self.store.globals_deleted_from() is not None and left:  # (check_resumable's)
            raise self._final_stop(k, _STRICT_REASON)
        if saved is not None:
            self.rows, self.verification = state["rows"], state["verification"]
            self.purges = state["purges"]
            states = {name: (meta, models.pop(STATE_PREFIX + name, {}))
                      for name, meta in state.get("states", {}).items()}
            self.resumption = Resumption(k, models, state["pending_purge"],
                                         state.get("before_purge"), states)
        # after the last request's strict purge no request is left to measure against the
        # trained model, which that purge deleted: the seed only finishes its bookkeeping
        self.final = self.store.final_model() if left else None
        self.trained = True
        self.resume_event = {"request": k, "setting": "federated"}

    def _final_stop(self, k: int, why: str) -> ResumeError:
        return ResumeError(f"seed {self.seed} was interrupted after answering {k} of its "
                           f"{len(self.cfg.unlearning.requests)} requests, but {why}, so it "
                           "cannot be resumed - rerun it into a new --out")

    def _check_saved(self, state: dict[str, Any]) -> None:
        """``serving.json`` must describe requests ``0..k-1`` of this config: their rows and,
        when purging, their purges (the last one possibly pending)."""
        requests = [sorted(r) for r in self.cfg.unlearning.requests]
        k = state["next_request"]
        done = requests[:k] if 0 <= k <= len(requests) else None
        rows = {tuple(sorted(r.get("request", []))) for r in state["rows"]
                if isinstance(r, dict) and r.get("setting") == "federated"}
        purged = [sorted(p.get("clients", [])) for p in state["purges"] if isinstance(p, dict)]
        expected = [] if not self.cfg.unlearning.purge or done is None else (
            done[:-1] if state["pending_purge"] else done)
        if done is None or rows != {tuple(r) for r in done} or purged != expected:
            raise ResumeError(f"'{self.out / SERVING_FILE}' does not describe requests 0..{k - 1} "
                              f"of this run ({len(requests)} requests); it was edited or "
                              "damaged - rerun it into a new --out")

    def train(self, fed: FlowerFederation, *, quiet: bool) -> None:
        if self.store is None:
            self.open()
        assert self.store is not None
        run = train_federation(fed, self.setup, self.store, progress=not quiet,
                               lineage=self.lineage, checkpoints=self.out, start=self.start)
        self.final = run.final
        self.trained = True
        self.training = training_block(run, engine=ENGINE, history_bytes=self.store.bytes_used())
        if self.start is not None:
            self.training["resumed_from_round"] = self.start.round
        write_state(self.out / TRAINING_FILE, self.training)

    def serve(self, federation: FlowerFederation | None, setting: str, *, quiet: bool) -> None:
        assert self.store is not None and self.lineage is not None
        # the centralized setting fits its own original; a resumed, served seed whose final
        # model was purged has no federated one left to offer
        trained = self.final if self.final is not None else self.setup.initial
        assert setting == "centralized" or self.final is not None or (
            self.resumption is not None
            and self.resumption.next_request == len(self.cfg.unlearning.requests))
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
        resumed = run.resumption
        self.models: dict[str, Params] = dict(resumed.current if resumed else {})
        self.states = dict(resumed.states if resumed else {})
        self.next_request = resumed.next_request if resumed else 0
        self.arrays: dict[str, Any] | None = None  # the arrays this journal last wrote

    def served(self, request: int, served: Served, current: dict[str, Params], *,
               purge_pending: bool,
               states: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        rows, verification = self.run._tagged(served.rows, served.verification)
        self.run.rows += rows
        self.run.verification += verification
        self.models.update(current)
        self.states = dict(states)
        self.next_request = request + 1
        self.arrays = None  # new models to write
        self._save(pending=purge_pending)

    def purged(self, request: int, purge: dict[str, Any]) -> None:
        self.run.purges.append(purge)
        self._save(pending=False)  # the arrays of the answer it follows are kept

    def _save(self, *, pending: bool) -> None:
        run = self.run
        assert run.store is not None
        # what the store held before a pending purge: a purge done before an interruption
        # that came ahead of the next save is recorded from it on resume
        before = ({"files": store_files(run.store), "bytes": run.store.bytes_used()}
                  if pending else None)
        models = None if self.arrays is not None else {
            **self.models, **{STATE_PREFIX + name: a for name, (_, a) in self.states.items()}}
        self.arrays = write_serving(
            run.out, {"next_request": self.next_request, "pending_purge": pending,
                      "before_purge": before, "rows": run.rows, "verification": run.verification,
                      "purges": run.purges,
                      "states": {name: m for name, (m, _) in self.states.items()}},
            models, arrays=self.arrays)


@contextmanager
def _farewell_on_stop(out: Path) -> Iterator[None]:
    try:
        yield
    except interrupt.Interrupted:
        print(farewell(out), file=sys.stderr, flush=True)
        raise


def farewell(out: Path) -> str:
    """The last line of an interrupted run: how to resume it, or why it cannot be (see
    :meth:`SeedRun._restore_serving`)."""
    why = _not_resumable(out)
    if why is not None:
        return (f"interrupted: the partial run is in {out}, but {why}, so it cannot be "
                "resumed; rerun it into a new --out")
    return (f"interrupted: the partial run is in {out} (history store consistent); continue it "
            f"with: fedunlearn resume {out}")


_STRICT_REASON = ("a strict purge deleted the trained model its remaining requests are "
                  "measured against (history.purge = \"updates\" keeps such runs resumable)")


def _stateful_reason(cfg: Config) -> str | None:
    """Why a run of ``cfg`` stopped between requests cannot go on: its methods that carry
    state into the next request and cannot save it (:func:`resumable`); ``None`` if none."""
    if stateful := [m.name for m in build_methods(cfg) if not resumable(m.method)]:
        return (f"{', '.join(stateful)} carries what it recovered for one request into the "
                "next in memory only")
    return None


def _saved_next_request(seed_out: Path) -> int:
    """The next request a part-served seed's ``serving.json`` names (0 without one)."""
    if not (seed_out / SERVING_FILE).exists() and not (seed_out / SERVING_FILE).is_symlink():
        return 0
    state = read_json(seed_out / SERVING_FILE)
    k = state.get("next_request") if isinstance(state, dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ResumeError(f"'{seed_out / SERVING_FILE}' is damaged ('next_request' is not a "
                          "request number); rerun into a new --out")
    return k


def _strict_purge_on_disk(history: Path) -> bool:
    """Whether a strict purge deleted the store's global models, or is journaled to (read
    only: the store is not opened, so an interrupted purge is not finished here)."""
    manifest = read_json(history / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("globals_deleted_from") is not None:
        return True
    journal = history / JOURNAL
    if journal.exists() or journal.is_symlink():
        entry = read_json(journal)
        return isinstance(entry, dict) and entry.get("level") == "strict"
    return False


def _not_resumable(out: Path) -> str | None:
    """Why a part-served seed of ``out`` cannot be resumed, read from its files (``None`` if
    nothing stands in the way; never raises, the farewell must always be printed)."""
    try:
        cfg = from_run_dict(read_json(out / "run.json")["config"])
        for seed_out in (out, *sorted(out.glob("seed-*"))):
            if (seed_out / SERVED_FILE).exists() or not (seed_out / "history").exists():
                continue
            k = _saved_next_request(seed_out)
            if k >= len(cfg.unlearning.requests):
                continue  # only bookkeeping is left (a last purge, results)
            if _strict_purge_on_disk(seed_out / "history"):
                return _STRICT_REASON
            if k > 0 and (why := _stateful_reason(cfg)):
                return why
    except Exception:  # noqa: BLE001 - a farewell never fails; resume will say what is wrong
        return None
    return None


def seed_dir(out: Path, seed: int, multi: bool) -> Path:
    """Where one seed's history and lineage go: ``out`` itself, or ``out/seed-S``."""
    return out / f"seed-{seed}" if multi else out


def run_experiment(cfg: Config, out: Path, *, quiet: bool = False, command: str = "run",
                   resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (every seed) through Flower + Ray into ``out``; return the results dict.

    The run's story, in order; each step is a place a resume can start from
    (:mod:`fedunlearn.run.resume`):

    1. every seed is checked and built (config, methods, strategy, data, initial model);
    2. ``run.json`` records the resolved config, or, with ``resume``, each seed reopens its
       most advanced saved state;
    3. Flower and Ray start once; every seed trains (a checkpoint after each round) and
       serves its federated requests (``served.json`` once done);
    4. the centralized methods run after the engine has shut down, as one site would;
    5. ``results.json``, the report and the tables.

    SIGINT or SIGTERM during 3 or 4 stop the run at the next round boundary
    (:mod:`fedunlearn.run.interrupt`) with :class:`~fedunlearn.run.interrupt.Interrupted`.

    ``out`` is locked for the whole run (:mod:`fedunlearn.run.lock`): another live writer
    raises :class:`~fedunlearn.run.lock.RunDirLocked` before anything is written.
    """
    from fedunlearn.run.lock import run_dir_lock

    with run_dir_lock(out, command="resume" if resume else command, create=not resume):
        return _run_experiment(cfg, out, quiet=quiet, command=command, resume=resume)


def _run_experiment(cfg: Config, out: Path, *, quiet: bool, command: str,
                    resume: bool) -> dict[str, Any]:
    """:func:`run_experiment` once ``out`` is locked."""
    multi = len(cfg.seeds) > 1 or cfg.experiment.seeds_until_decided > 0
    seeds = list(cfg.seeds)
    if resume:  # a sequential run's added seeds are part of it
        seeds += [s for s in read_run_file(out).get("added_seeds", []) if s not in seeds]
    runs = [SeedRun(cfg.with_seed(s), seed_dir(out, s, multi), prepare(cfg.with_seed(s)))
            for s in seeds]
    if resume:
        for run in runs:  # every refusal before any store is opened (opening finishes purges)
            run.check_resumable(out)
        for run in runs:
            run.restore()
        # every seed passed its checks: only now is the resumption recorded
        note_resumption(out, read_run_file(out))
        for run in runs:
            if run.resume_event is not None and run.lineage is not None:
                run.lineage.append("resume", **run.resume_event)
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


def planned_looks(cfg: Config) -> int:
    """How many times a run looks at its verdicts: 1 for a fixed set of seeds; for a
    sequential run (``experiment.seeds_until_decided = N``), once after every seed from the
    second (or from the listed ones) to the N-th."""
    cap = cfg.experiment.seeds_until_decided
    return 1 if not cap else cap - max(2, len(cfg.seeds)) + 1


def undecided(runs: list[SeedRun], cfg: Config) -> list[str]:
    """The federated verdicts a sequential run is still waiting for, as ``method: criterion``
    (empty once every one is decided or cannot be, e.g. an ASR where no backdoor took)."""
    rows = [row for r in runs for row in r.rows if row.get("setting") == "federated"]
    if len({r.seed for r in runs if r.rows}) < 2:
        return ["(fewer than two seeds)"]
    out = []
    for entry in summarize(rows, alpha=cfg.verification.verdict_alpha,
                           looks=planned_looks(cfg)):
        for name, v in (entry.get("verdicts") or {}).items():
            if v.get("verdict") == INCONCLUSIVE:
                out.append(f"{entry['method']}: {name}")
    return out


def _next_seed(runs: list[SeedRun]) -> int:
    taken = {r.seed for r in runs}
    return next(s for s in range(max(taken) + 1, max(taken) + 2 + len(taken)) if s not in taken)


def _federated(runs: list[SeedRun], cfg: Config, out: Path, *, quiet: bool) -> None:
    """Step 3: one engine for every seed not yet served; a sequential run adds seeds on it
    until its verdicts are decided (:func:`undecided`) or its cap is reached."""
    cap = cfg.experiment.seeds_until_decided
    todo = [run for run in runs if not run.served]
    if not todo and not (cap and len(runs) < cap and undecided(runs, cfg)):
        return
    requests = bool(cfg.unlearning.requests)

    def one(run: SeedRun, connect: Connect) -> None:
        if len(runs) > 1 and not quiet:
            print(f"[seed] {run.seed} ({runs.index(run) + 1} of "
                  f"{cap or len(runs)}{' at most' if cap else ''})", file=sys.stderr, flush=True)
        seed_everything(run.seed)
        fed = connect(run.cfg, run.setup.evaluator(), run.setup.data)
        if not run.trained:
            run.train(fed, quiet=quiet)
        interrupt.check()
        if requests:  # federated removal needs the live federation
            run.serve(fed, "federated", quiet=quiet)
        interrupt.check()

    def job(connect: Connect) -> None:
        for run in todo:
            one(run, connect)
        while cap and len(runs) < cap and (waiting := undecided(runs, cfg)):
            seed = _next_seed(runs)
            if not quiet:
                print(f"[sequential] {len(waiting)} verdicts undecided ({', '.join(waiting[:4])}"
                      f"{', ...' if len(waiting) > 4 else ''}): adding seed {seed}",
                      file=sys.stderr, flush=True)
            run = SeedRun(cfg.with_seed(seed), seed_dir(out, seed, True),
                          prepare(cfg.with_seed(seed)))
            note_added_seed(out, seed)  # resume finds the seed before it has any file
            runs.append(run)
            one(run, connect)

    seed_everything((todo or runs)[0].seed)  # (torch's one-off start-up was paid by prepare)
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
    :attr:`fedunlearn.run.serving.Served.verification`), ``total_s`` (their sum) and
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
        results["summary"] = summarize(rows, alpha=cfg.verification.verdict_alpha,
                                       looks=planned_looks(cfg))
        if cfg.experiment.seeds_until_decided:
            waiting = undecided(runs, cfg)
            results["sequential"] = {
                "cap": cfg.experiment.seeds_until_decided, "looks": planned_looks(cfg),
                "seeds_run": len(runs), "alpha": cfg.verification.verdict_alpha,
                "stopped_by": "cap" if waiting else "decided", "undecided": waiting}
        results["verification"] = verification_block(
            [v for r in runs for v in r.verification], rows)
    return results
