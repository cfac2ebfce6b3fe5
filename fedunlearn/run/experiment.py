"""Running an experiment: validate the config, train the federation on Flower, keep history.

:func:`prepare` does every check that can fail before any work starts; :func:`train_federation`
runs FedAvg through the federation port with the history store and progress display listening.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedunlearn.config.extensions import (
    USER_ERRORS,
    describe_failure,
    load_extensions,
    raised_in_user_code,
)
from fedunlearn.config.registry import Registry
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.data.federated import FederatedData, build_federated_data
from fedunlearn.data.sources import SOURCES
from fedunlearn.engine.aggregation import difference
from fedunlearn.engine.port import Federation, RoundReport, RoundSummary, TrainingRun
from fedunlearn.history.lineage import LineageLog, params_hash
from fedunlearn.history.store import HistoryError, HistoryStore
from fedunlearn.models import MODELS, build_model
from fedunlearn.models.params import Params, get_params, set_params
from fedunlearn.models.seeding import sample_participants
from fedunlearn.models.training import (
    OPTIMIZERS,
    TRAIN_STEPS,
    evaluate,
    predict_proba,
)
from fedunlearn.run.checks import (
    check_local_training,
    check_step_params,
    check_strategy,
    checked_model,
)
from fedunlearn.run.console import listed
from fedunlearn.run.resume import (
    CHECKPOINT_META,
    Checkpoint,
    Checkpointer,
    ResumeError,
)


def _resolve(registry: Registry[object] | dict[str, object], key: str, name: str) -> None:
    if name not in registry:
        known = registry.names() if isinstance(registry, Registry) else sorted(registry)
        raise ConfigError(f"config key '{key}' = '{name}' is unknown; known: {', '.join(known)}")


def validate_names(cfg: Config) -> None:
    """Import extensions, then check every registered name the config uses."""
    from fedunlearn.engine.strategy import STRATEGIES

    load_extensions(cfg.experiment.extensions)
    _resolve(SOURCES, "data.source", cfg.data.source)  # type: ignore[arg-type]
    _resolve(MODELS, "model.name", cfg.model.name)  # type: ignore[arg-type]
    _resolve(TRAIN_STEPS, "training.step", cfg.training.step)  # type: ignore[arg-type]
    _resolve(OPTIMIZERS, "training.optimizer", cfg.training.optimizer)  # type: ignore[arg-type]
    _resolve(STRATEGIES, "training.strategy", cfg.training.strategy)  # type: ignore[arg-type]
    check_step_params(cfg)
    check_strategy(cfg)
    if cfg.unlearning.requests:
        from fedunlearn.run.serving import build_methods

        build_methods(cfg)


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
    model = checked_model(cfg, data)
    initial = get_params(model)
    _check_methods_against_model(cfg, copy.deepcopy(model))  # a check must not edit M_1
    _check_requests_against_sampling(cfg)
    check_local_training(cfg, data, model)
    return Setup(cfg=cfg, data=data, initial=initial)


def _check_methods_against_model(cfg: Config, model: Any) -> None:
    """Run each configured method's optional ``check_model(net)`` on the experiment's network
    (NoT's layer indices, for instance), before any training; also for the methods that have
    parameters but are not run this time, whose other parameters are checked too."""
    from fedunlearn.run.serving import build_methods, unlisted_methods

    if not cfg.unlearning.requests:
        return
    listed = [(m.name, m.method) for m in build_methods(cfg)]
    for name, method in [*listed, *unlisted_methods(cfg, {n for n, _ in listed})]:
        check = getattr(method, "check_model", None)
        if callable(check):
            try:
                check(model)
            except ValueError as exc:
                raise ConfigError(f"config key 'unlearning.params.{name}': {exc}") from None
            except USER_ERRORS as exc:  # a user's check failing otherwise
                raise ConfigError(f"unlearning method '{name}': its check_model(net) failed: "
                                  f"{describe_failure(exc)}") from None


def check_replayable(cfg: Config) -> None:
    """Refuse a strategy declared to break ``M_{t+1} = M_t + Σ_k w_k U_k`` when removal
    requests go to methods that need that identity (``needs_replayable_history``), and a
    retention interval other than 1 for methods that need every round (``needs_every_round``,
    FedRecover).

    A strategy that declares nothing passes here; the history store checks every round as it
    records it, and those methods refuse a history that broke the identity.
    """
    from fedunlearn.engine.strategy import (
        STRATEGIES,
        identity_breaker,
        keeps_history_identity,
    )
    from fedunlearn.run.serving import factory_of

    t = cfg.training
    if not cfg.unlearning.requests:
        return
    every = [n for n in cfg.unlearning.methods
             if getattr(factory_of(n), "needs_every_round", False)]
    if every and cfg.history.retention_interval != 1:
        raise ConfigError(
            f"config key 'history.retention_interval' = {cfg.history.retention_interval}, but "
            f"{', '.join(every)} needs the global model and every client's update of every "
            "round; set history.retention_interval = 1 or drop it from unlearning.methods")
    if keeps_history_identity(t.strategy, t.strategy_params) is not False:
        return
    needy = [n for n in cfg.unlearning.methods
             if getattr(factory_of(n), "needs_replayable_history", False)]
    if not needy:
        return
    why = identity_breaker(t.strategy)
    keepers = [n for n in STRATEGIES.names()
               if getattr(STRATEGIES.get(n), "keeps_history_identity", None) is True]
    given = f" with strategy_params {t.strategy_params}" if t.strategy_params else ""
    raise ConfigError(
        f"config key 'training.strategy' = '{t.strategy}'{given} breaks the history identity "
        f"M_{{t+1}} = M_t + Σ w U{f' ({why})' if why else ''}, so the history-based methods "
        f"{', '.join(needy)} cannot replay it; use {' or '.join(keepers) or 'another strategy'} "
        "or drop those methods from unlearning.methods")


def _check_requests_against_sampling(cfg: Config) -> None:
    """Participation is decided by the seeded sampler, so a request for a client that will
    never take part is refused before training starts.

    The rounds are drawn in order until every requested client has been seen: one round when
    every client takes part, about ``K/m · ln(requested)`` rounds when ``m`` of ``K`` do; all
    ``training.rounds`` (at most :data:`~fedunlearn.config.tree.MAX_ROUNDS`) only for a client the
    run truly never samples."""
    t = cfg.training
    unseen = {c for r in cfg.unlearning.requests for c in r}
    for r in range(1, t.rounds + 1):
        if not unseen:
            return
        unseen.difference_update(sample_participants(cfg.seed, r, cfg.data.num_clients,
                                                     t.sample_fraction))
    if unseen:
        raise ConfigError(f"config key 'unlearning.requests' names {listed(sorted(unseen))}, "
                          "which are never sampled for training with this seed and "
                          "sample_fraction; remove them from the requests")


class HistoryRecorder:
    """Round listener writing every aggregated round into a :class:`HistoryStore`."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self.committed = max(store.rounds(), default=0)  # > 0 when a run is resumed

    def round_aggregated(self, report: RoundReport) -> None:
        if report.server_round <= self.committed:
            # resumed past a round the store committed before the checkpoint was written:
            # the redone round must be the same round, and the store keeps its copy
            stored = self.store.participants(report.server_round)
            if tuple(stored) != tuple(report.participants):
                raise HistoryError(f"resumed round {report.server_round} had participants "
                                   f"{list(report.participants)}, the store holds {list(stored)}")
            return
        updates = {p: difference(m, report.global_model) for p, m in report.client_models.items()}
        self.store.record_round(report.server_round, global_model=report.global_model,
                                participants=report.participants,
                                num_examples=report.num_examples, weights=report.weights,
                                updates=updates)

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        pass


class LineageRecorder:
    """Round listener appending each round's participants, update hashes and model hash (and
    the clients dropped from it, ``failures``, when any were)."""

    def __init__(self, log: LineageLog) -> None:
        self.log = log
        self._pending: dict[str, Any] = {}
        self.logged = max((e["round"] for e in log.read() if e["event"] == "round"), default=0)

    def round_aggregated(self, report: RoundReport) -> None:
        self._pending = {"participants": list(report.participants),
                         "update_hashes": {str(p): params_hash(difference(m, report.global_model))
                                           for p, m in report.client_models.items()}}

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        pending = self._pending or {"participants": [], "update_hashes": {}}
        if summary.failures:  # clients dropped under engine.on_client_failure = "drop"
            pending["failures"] = summary.failures
        self._pending = {}
        if server_round > self.logged:
            self.log.append("round", round=server_round, model_hash=params_hash(model), **pending)


class Progress:
    """Round listener printing one line per round as it finishes."""

    def __init__(self, total: int, label: str = "train", stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.label = label
        self.stream = stream

    def round_aggregated(self, report: RoundReport) -> None:
        pass

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        print(f"[{self.label}] round {server_round:>3}/{self.total}  "
              f"clients {len(summary.participants):>3}  test acc {summary.test_accuracy:.4f}  "
              f"loss {summary.test_loss:.4f}  {summary.wall_s:6.2f}s", file=self.stream,
              flush=True)


class Listeners:
    """Fan one event out to several listeners."""

    def __init__(self, *listeners: object) -> None:
        self.listeners = listeners

    def round_aggregated(self, report: RoundReport) -> None:
        for listener in self.listeners:
            listener.round_aggregated(report)  # type: ignore[attr-defined]

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        for listener in self.listeners:
            listener.round_evaluated(server_round, model, summary)  # type: ignore[attr-defined]


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


def model_misfit(model: Params, like: Params) -> str | None:
    """How ``model`` fails to be a model of ``like``'s network (array names in order, shapes,
    dtypes, finite floats), or ``None``.

    >>> import numpy as np
    >>> net = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    >>> model_misfit(net, net) is None
    True
    >>> model_misfit({"w": np.zeros((2, 2), np.float32), "b": net["b"]}, net)
    "'w' has shape (2, 2), the network's (2, 3)"
    >>> model_misfit({"b": net["b"]}, net)
    "its arrays are ['b'], the network's ['w', 'b']"
    """
    if list(model) != list(like):
        return f"its arrays are {list(model)[:6]}, the network's {list(like)[:6]}"
    for key, ref in like.items():
        value = model[key]
        if getattr(value, "shape", None) != ref.shape:
            return f"'{key}' has shape {getattr(value, 'shape', None)}, the network's {ref.shape}"
        if value.dtype != ref.dtype:
            return f"'{key}' is {value.dtype}, the network's is {ref.dtype}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"'{key}' holds NaN or Inf"
    return None


def check_saved_model(model: Params, like: Params, where: Path, instead: str) -> None:
    """Refuse a model read back from a run directory (a checkpoint, a part-served request's
    state) that is not a model of the run's network, in one line: its checksum only proves it
    is what was written, not that a whole run wrote it.

    Raises
    ------
    ResumeError
        Naming ``where``, what does not fit, and ``instead``: what else the user can do.
    """
    if why := model_misfit(model, like):
        raise ResumeError(f"'{where}' holds a model that does not fit the run's network "
                          f"({why}); it was edited or damaged: rerun into a new --out, or "
                          f"{instead}")


def default_out_dir(cfg: Config) -> Path:
    """``runs/<name>-<UTC timestamp>``."""
    return Path("runs") / f"{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


CENTRALIZED_DEFAULTS = ("central_retrain", "sisa", "sisa_random", "newton")


def with_centralized(cfg: Config) -> Config:
    """The config of ``fedunlearn compare``: the configured methods plus, when none is
    centralized, the centralized ones of :data:`CENTRALIZED_DEFAULTS`, on the same data."""
    import dataclasses

    from fedunlearn.run.serving import settings_in

    load_extensions(cfg.experiment.extensions)
    if not cfg.unlearning.requests:
        raise ConfigError("compare needs removal requests: set unlearning.requests, e.g. "
                          "--set 'unlearning.requests=[[0]]'")
    methods = list(cfg.unlearning.methods)
    if "centralized" not in settings_in(cfg):
        methods += [m for m in CENTRALIZED_DEFAULTS if m not in methods]
    return dataclasses.replace(cfg, unlearning=dataclasses.replace(cfg.unlearning,
                                                                   methods=methods))
