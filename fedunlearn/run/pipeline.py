"""The run's story, top to bottom: ``fedunlearn run`` and ``fedunlearn compare``.

:func:`run_experiment` reads in order: every seed is checked and built before any work
(:func:`prepare`, :mod:`fedunlearn.run.checks`); ``run.json`` records the resolved config (or a
resumed run reopens each seed's saved state, :mod:`fedunlearn.run.resume`); Flower and Ray
start once and every seed trains with its history recorded (:func:`train_federation`) and serves
its federated removal requests (:mod:`fedunlearn.run.serving`, verified as they are answered,
:mod:`fedunlearn.run.verification`); the centralized methods run after the engine has shut
down, as a single site would; ``results.json``, the report and the tables are written.

A run has one or more seeds (``experiment.seeds``). With one seed the run directory holds
``history/`` and ``lineage.jsonl``; with several, each seed has its own ``seed-S/``. One
``results.json`` holds every seed's rows and the summary over seeds
(:mod:`fedunlearn.evaluation.summary`).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedunlearn.config.extensions import (
    USER_ERRORS,
    describe_failure,
    load_extensions,
    raised_in_user_code,
)
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.data.federated import FederatedData, build_federated_data
from fedunlearn.data.removal import resolve
from fedunlearn.engine.flower import Connect, FlowerFederation, run_engine
from fedunlearn.engine.port import Federation, TrainingRun
from fedunlearn.evaluation.schema import Row
from fedunlearn.evaluation.summary import summarize
from fedunlearn.evaluation.verdicts import INCONCLUSIVE
from fedunlearn.history.lineage import LineageLog, params_hash
from fedunlearn.history.store import HistoryStore
from fedunlearn.models import build_model
from fedunlearn.models.params import Params, get_params, set_params
from fedunlearn.models.seeding import seed_everything
from fedunlearn.models.training import (
    evaluate,
    predict_proba,
)
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
from fedunlearn.run import interrupt, resume
from fedunlearn.run.checks import (
    _check_methods_against_model,
    _check_requests_against_sampling,
    check_local_training,
    check_purged_before,
    check_replayable,
    check_saved_model,
    checked_model,
    settings_in,
    validate_names,
)
from fedunlearn.run.console import listed
from fedunlearn.run.listeners import HistoryRecorder, LineageRecorder, Listeners, Progress
from fedunlearn.run.resume import (
    CHECKPOINT_META,
    SERVED_FILE,
    TRAINING_FILE,
    Checkpoint,
    Checkpointer,
    Resumption,
    _farewell_on_stop,
    clear_serving,
    farewell,
    note_added_seed,
    note_resumption,
    read_run_file,
    write_run_file,
    write_state,
)
from fedunlearn.run.serving import serve_requests
from fedunlearn.run.verification import verification_block

ENGINE = "flower-ray"


@dataclass
class Setup:
    """A validated experiment, ready to run."""

    cfg: Config
    data: FederatedData
    initial: Params

    def build_model(self) -> Any:
        """A fresh model of the experiment's architecture (initial weights)."""
        return build_model(self.cfg.model.name, self.data.input_shape, self.data.num_classes,
                           seed=self.cfg.seed, **self.cfg.model.params)

    def predictor(self) -> Callable[[Params], Callable[[Any], Any]]:
        """``predictor(params)(x)`` gives class probabilities of a model with ``params``."""
        model = self.build_model()

        def bind(params: Params) -> Callable[[Any], Any]:
            def predict(x: Any) -> Any:
                set_params(model, params)
                return predict_proba(model, x)
            return predict

        return bind

    def evaluator(self) -> Callable[[Params], dict[str, float]]:
        """Server-side evaluation of a global model on the test split."""
        model = build_model(self.cfg.model.name, self.data.input_shape, self.data.num_classes,
                            seed=self.cfg.seed, **self.cfg.model.params)

        def evaluate_params(params: Params) -> dict[str, float]:
            set_params(model, params)
            return evaluate(model, self.data.test.x, self.data.test.y)

        return evaluate_params


def prepare(cfg: Config) -> Setup:
    """Resolve names, build the data and the initial model; raise ``ConfigError`` on misfit."""
    validate_names(cfg)
    check_replayable(cfg)
    try:
        data = build_federated_data(cfg)
    except ConfigError:
        raise
    except USER_ERRORS as exc:  # a source failing (a user's, a download)
        if isinstance(exc, ValueError) and not raised_in_user_code(exc):
            raise ConfigError(f"config [data]: {exc}") from None  # our checks on the config
        raise ConfigError(f"config [data]: source '{cfg.data.source}' failed: "
                          f"{describe_failure(exc)}") from None
    empty = [k for k, d in enumerate(data.clients) if len(d) == 0]
    if empty:
        raise ConfigError(f"{listed(empty)} received no data; lower data.num_clients or raise "
                          "data.alpha")
    steps = resolve(cfg, data)  # every request fits the data (RemovalError, a ConfigError)
    if cfg.unlearning.purge:
        check_purged_before(steps)
    model = checked_model(cfg, data)
    initial = get_params(model)
    _check_methods_against_model(cfg, copy.deepcopy(model))  # a check must not edit M_1
    _check_requests_against_sampling(cfg)
    check_local_training(cfg, data, model)
    return Setup(cfg=cfg, data=data, initial=initial)


def train_federation(fed: Federation, setup: Setup, store: HistoryStore,
                     *, progress: bool = True, lineage: LineageLog | None = None,
                     checkpoints: Path | None = None, start: Checkpoint | None = None
                     ) -> TrainingRun:
    """Train the federation once, recording every round into ``store`` (and ``lineage``).

    With ``checkpoints`` (a seed directory) the exact global model is kept after every round
    (:mod:`fedunlearn.run.resume`); ``start`` continues from such a checkpoint, whose model
    must fit the network (:func:`check_saved_model`).
    """
    if start is not None:
        check_saved_model(start.model, setup.initial,
                          (checkpoints or Path(".")) / CHECKPOINT_META,
                          f"delete {CHECKPOINT_META} and the checkpoint arrays to resume "
                          "training from round 1")
    listeners: list[object] = [HistoryRecorder(store)]
    if lineage is not None:
        listeners.append(LineageRecorder(lineage))
        if start is not None:
            lineage.append("resume", round=start.round)
    if progress:
        listeners.append(Progress(setup.cfg.training.rounds))
    checkpointer = Checkpointer(checkpoints, start) if checkpoints is not None else None
    if checkpointer is not None:
        listeners.append(checkpointer)
    t0 = time.perf_counter()
    run = fed.fedavg(setup.initial, listener=Listeners(*listeners), start=start)
    store.record_final(run.final)
    if checkpointer is not None:
        checkpointer.finish()
    run.wall_s = time.perf_counter() - t0
    if lineage is not None:
        lineage.append("model", kind="trained", method="fedavg", model_hash=params_hash(run.final),
                       trained_with=sorted({p for r in run.rounds for p in r.participants}),
                       exact=True)
    return run


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
        """Refuse, reading files only, a seed that cannot be resumed (:func:`resume.check_resumable`)."""
        resume.check_resumable(self, root)

    def restore(self) -> None:
        """Reopen the seed at its most advanced saved state (:func:`resume.restore`)."""
        resume.restore(self)

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
        journal = resume.ResumeJournal(self) if federated else None
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
            rows, verification = self.tagged(served.rows, served.verification)
            self.rows += rows
            self.verification += verification
            return
        self.history_bytes_after_purge = self.store.bytes_used()
        write_state(self.out / SERVED_FILE, {
            "training": self.training, "rows": self.rows, "purges": self.purges,
            "history_bytes_after_purge": self.history_bytes_after_purge,
            "verification": self.verification})
        clear_serving(self.out)

    def tagged(self, rows: list[Row], verification: list[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Rows and verification entries as stored, each with the seed."""
        return ([{"seed": self.seed, **dataclasses.asdict(r)} for r in rows],
                [{"seed": self.seed, **v} for v in verification])


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
    for run in runs:  # the deletions a purge deferred are done before the run returns
        if run.store is not None:
            run.store.flush_deletions()
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
    requests = bool(cfg.unlearning.requests)
    # a resumed seed that is trained and has no request left needs no engine
    todo = [run for run in runs if not run.served and (requests or not run.trained)]
    if not todo and not (cap and len(runs) < cap and undecided(runs, cfg)):
        return

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


def default_out_dir(cfg: Config) -> Path:
    """``runs/<name>-<UTC timestamp>``."""
    return Path("runs") / f"{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


CENTRALIZED_DEFAULTS = ("central_retrain", "sisa", "sisa_random", "newton")
"""The centralized methods `fedunlearn compare` adds when the config names none."""


def with_centralized(cfg: Config) -> Config:
    """The config of ``fedunlearn compare``: the configured methods plus, when none is
    centralized, the centralized ones of :data:`CENTRALIZED_DEFAULTS`, on the same data."""
    import dataclasses

    from fedunlearn.run.checks import settings_in

    load_extensions(cfg.experiment.extensions)
    if not cfg.unlearning.requests:
        raise ConfigError("compare needs removal requests: set unlearning.requests, e.g. "
                          "--set 'unlearning.requests=[[0]]'")
    methods = list(cfg.unlearning.methods)
    if "centralized" not in settings_in(cfg):
        methods += [m for m in CENTRALIZED_DEFAULTS if m not in methods]
    return dataclasses.replace(cfg, unlearning=dataclasses.replace(cfg.unlearning,
                                                                   methods=methods))
