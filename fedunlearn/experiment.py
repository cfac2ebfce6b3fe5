"""Running an experiment: validate the config, train the federation on Flower, keep history.

:func:`prepare` does every check that can fail before any work starts; :func:`train_federation`
runs FedAvg through the federation port with the history store and progress display listening.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from fedunlearn.aggregation import difference
from fedunlearn.checkpoint import Checkpoint, Checkpointer
from fedunlearn.config import Config, ConfigError
from fedunlearn.data.federated import FederatedData, build_federated_data
from fedunlearn.data.sources import SOURCES
from fedunlearn.extensions import describe_failure, load_extensions
from fedunlearn.federation.port import Federation, RoundReport, RoundSummary, TrainingRun
from fedunlearn.history import HistoryError, HistoryStore
from fedunlearn.lineage import LineageLog, params_hash
from fedunlearn.models import MODELS, build_model
from fedunlearn.params import Params, get_params, set_params
from fedunlearn.registry import Registry
from fedunlearn.seeding import sample_participants
from fedunlearn.training import (
    OPTIMIZERS,
    TRAIN_STEPS,
    batch_bounds,
    device_for,
    evaluate,
    has_batchnorm,
    local_training,
    predict_proba,
    train,
)


def _resolve(registry: Registry[object] | dict[str, object], key: str, name: str) -> None:
    if name not in registry:
        known = registry.names() if isinstance(registry, Registry) else sorted(registry)
        raise ConfigError(f"config key '{key}' = '{name}' is unknown; known: {', '.join(known)}")


def validate_names(cfg: Config) -> None:
    """Import extensions, then check every registered name the config uses."""
    from fedunlearn.federation.strategy import STRATEGIES

    load_extensions(cfg.experiment.extensions)
    _resolve(SOURCES, "data.source", cfg.data.source)  # type: ignore[arg-type]
    _resolve(MODELS, "model.name", cfg.model.name)  # type: ignore[arg-type]
    _resolve(TRAIN_STEPS, "training.step", cfg.training.step)  # type: ignore[arg-type]
    _resolve(OPTIMIZERS, "training.optimizer", cfg.training.optimizer)  # type: ignore[arg-type]
    _resolve(STRATEGIES, "training.strategy", cfg.training.strategy)  # type: ignore[arg-type]
    _check_step_params(cfg)
    _check_strategy(cfg)
    if cfg.unlearning.requests:
        from fedunlearn.unlearning.service import build_methods

        build_methods(cfg)


def _check_step_params(cfg: Config) -> None:
    """``training.step_params`` must be keywords the train step takes (its first four
    positional parameters are ``model, x, y, ctx``)."""
    step, name = TRAIN_STEPS.get(cfg.training.step), cfg.training.step
    try:
        signature = inspect.signature(step)
    except ValueError:  # no signature to read (a builtin): the warm-up batch will tell
        return
    try:
        signature.bind_partial(None, None, None, None)  # (the params may be required ones)
    except TypeError as exc:
        raise ConfigError(f"train step '{name}' is called as step(model, x, y, ctx, "
                          f"**training.step_params) and does not take that ({exc}); fix its "
                          "signature") from None
    try:
        signature.bind(None, None, None, None, **cfg.training.step_params)
    except TypeError as exc:
        raise ConfigError(f"config key 'training.step_params' = {dict(cfg.training.step_params)} "
                          f"does not fit train step '{name}' ({exc})") from None


def _strategy_misfit(name: str, params: Mapping[str, Any], exc: Exception) -> str:
    """What a strategy factory's ``TypeError``/``ValueError`` says: its signature does not take
    the call, the parameters do not fit it, or it refused them itself."""
    from fedunlearn.federation.strategy import STRATEGIES

    try:
        signature = inspect.signature(STRATEGIES.get(name))
    except ValueError:  # no signature to read
        return f"config key 'training.strategy_params': {exc}"
    try:
        signature.bind_partial(evaluate_fraction=0.0)
    except TypeError:
        return (f"strategy '{name}': its factory is called as factory(evaluate_fraction=..., "
                "**training.strategy_params) and does not take that; define it as "
                "def factory(evaluate_fraction=0.0, **params)")
    try:
        signature.bind(evaluate_fraction=0.0, **params)
    except TypeError as bad:
        return f"config key 'training.strategy_params' = {dict(params)}: {bad}"
    return f"config key 'training.strategy_params' = {dict(params)}: {describe_failure(exc)}"


def _check_strategy(cfg: Config) -> None:
    """Build the strategy once, so a bad factory or bad strategy_params stop before any work;
    it must be a Flower ``Strategy`` that trains every node it is offered (fedunlearn samples
    each round's participants itself)."""
    from flwr.serverapp.strategy import Strategy

    from fedunlearn.federation.strategy import STRATEGIES

    name = cfg.training.strategy
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's construction warnings belong to the run
    try:
        strategy = STRATEGIES.get(name)(evaluate_fraction=cfg.training.evaluate_fraction,
                                        **cfg.training.strategy_params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_strategy_misfit(name, cfg.training.strategy_params, exc)) from None
    except Exception as exc:  # noqa: BLE001 - a user's factory: its error, in one line
        raise ConfigError(f"strategy '{name}' could not be built: {describe_failure(exc)}; "
                          "fix its factory") from None
    finally:
        flwr_log.setLevel(level)
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy '{name}': its factory returned {type(strategy).__name__}, "
                          "not a flwr.serverapp.strategy.Strategy; return one (e.g. FedAvg)")
    fraction = getattr(strategy, "fraction_train", 1.0)
    if fraction != 1.0:
        raise ConfigError(f"strategy '{name}' has fraction_train = {fraction}: fedunlearn "
                          "samples each round's participants itself (training.sample_fraction), "
                          "so the strategy must train every node offered; set "
                          "fraction_train=1.0 in its factory")


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
    except ValueError as exc:
        raise ConfigError(f"config [data]: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a source failing (a user's, a download)
        raise ConfigError(f"config [data]: source '{cfg.data.source}' failed: "
                          f"{describe_failure(exc)}") from None
    empty = [k for k, d in enumerate(data.clients) if len(d) == 0]
    if empty:
        raise ConfigError(f"clients {empty} received no data; lower data.num_clients or raise "
                          "data.alpha")
    model = _checked_model(cfg, data)
    initial = get_params(model)
    _check_methods_against_model(cfg, copy.deepcopy(model))  # a check must not edit M_1
    _check_requests_against_sampling(cfg)
    _check_local_training(cfg, data)
    return Setup(cfg=cfg, data=data, initial=initial)


def _checked_model(cfg: Config, data: FederatedData) -> torch.nn.Module:
    """The experiment's initial network, checked against the data: a ``torch.nn.Module`` with
    trainable parameters that maps a batch to one score per class."""
    try:
        model = build_model(cfg.model.name, data.input_shape, data.num_classes, seed=cfg.seed,
                            **cfg.model.params)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"its builder returned {type(model).__name__}, not a "
                            "torch.nn.Module")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("it has no trainable parameters")
        sample = next(d.x[:2] for d in data.clients if len(d))
        with torch.no_grad():  # the model must take the data (shapes, channel counts)
            out = model.eval()(torch.from_numpy(np.asarray(sample, np.float32)))
        shape = tuple(getattr(out, "shape", ()))
        if shape != (len(sample), data.num_classes):
            raise ValueError(f"it maps {len(sample)} samples to "
                             f"{shape or type(out).__name__}, not to "
                             f"({len(sample)}, {data.num_classes}): one score per class of the "
                             f"data's {data.num_classes}")
    except Exception as exc:  # noqa: BLE001 - a builder or forward failing, in one line
        raise ConfigError(f"config [model] ({cfg.model.name}, params {dict(cfg.model.params)}) "
                          f"does not fit the data: {describe_failure(exc)}") from None
    return model


def _reached(bounds: list[tuple[int, int]], epochs: float) -> list[tuple[int, int]]:
    """The batches of an epoch that ``epochs`` epochs of local training reach (0.5 epochs of
    three batches take the first two of a shuffle, never the partial third)."""
    return bounds[:max(1, min(len(bounds), round(epochs * len(bounds))))]


def _check_local_training(cfg: Config, data: FederatedData) -> None:
    """One training step on one batch, as every client takes them (train step, optimizer,
    model), before any work; it also pays torch's one-off start-up in this process."""
    from fedunlearn.federation.local import warm_up

    t = cfg.training
    try:
        warm_up(cfg, data)
    except Exception as exc:  # noqa: BLE001 - a user's step or optimizer, in one line
        raise ConfigError(f"config [training] (step '{t.step}', optimizer '{t.optimizer}', "
                          f"model '{cfg.model.name}') fails on one batch before any round: "
                          f"{describe_failure(exc)}") from None
    # the smallest batch a client will take (a client's last, partial one), if smaller (the
    # warm-up's samples, cut to that size): a model may fail on it (BatchNorm on a client of one
    # sample; a last batch of one joins the one before, training.batch_bounds)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, seed=0,
                        **cfg.model.params)
    size, k = min((b - a, k) for k, d in enumerate(data.clients)
                  for a, b in _reached(batch_bounds(len(d), t.batch_size,
                                                    fold_single=has_batchnorm(model)),
                                       t.local_epochs))
    local = next(d for d in data.clients if len(d))
    if size < min(t.batch_size, len(local)):
        try:
            train(model, local.x[:size], local.y[:size], local_training(cfg, 1.0), seed=0,
                  device=device_for(cfg))
        except Exception as exc:  # noqa: BLE001 - in one line, with the batch that fails
            raise ConfigError(
                f"config [training] (step '{t.step}', model '{cfg.model.name}') fails on a "
                f"batch of {size} sample{'s' if size > 1 else ''} (client {k} holds "
                f"{len(data.clients[k])}, training.batch_size is {t.batch_size}): "
                f"{describe_failure(exc)}; change training.batch_size or "
                "data.num_clients") from None


def _check_methods_against_model(cfg: Config, model: Any) -> None:
    """Run each configured method's optional ``check_model(net)`` on the experiment's network
    (NoT's layer indices, for instance), before any training; also for the methods that have
    parameters but are not run this time, whose other parameters are checked too."""
    from fedunlearn.unlearning.service import build_methods, unlisted_methods

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
            except Exception as exc:  # noqa: BLE001 - a user's check failing otherwise
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
    from fedunlearn.federation.strategy import (
        STRATEGIES,
        identity_breaker,
        keeps_history_identity,
    )
    from fedunlearn.unlearning.service import factory_of

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
    never take part is refused before training starts."""
    t = cfg.training
    asked = {c for r in cfg.unlearning.requests for c in r}
    if not asked:
        return
    sampled = {c for r in range(1, t.rounds + 1)
               for c in sample_participants(cfg.seed, r, cfg.data.num_clients, t.sample_fraction)}
    never = sorted(asked - sampled)
    if never:
        raise ConfigError(f"config key 'unlearning.requests' names clients {never}, which are "
                          "never sampled for training with this seed and sample_fraction; "
                          "remove them from the requests")


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
    (:mod:`fedunlearn.checkpoint`); ``start`` continues from such a checkpoint.
    """
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


def default_out_dir(cfg: Config) -> Path:
    """``runs/<name>-<UTC timestamp>``."""
    return Path("runs") / f"{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


CENTRALIZED_DEFAULTS = ("central_retrain", "sisa", "sisa_random", "newton")


def with_centralized(cfg: Config) -> Config:
    """The config of ``fedunlearn compare``: the configured methods plus, when none is
    centralized, the centralized ones of :data:`CENTRALIZED_DEFAULTS`, on the same data."""
    import dataclasses

    from fedunlearn.unlearning.service import settings_in

    load_extensions(cfg.experiment.extensions)
    if not cfg.unlearning.requests:
        raise ConfigError("compare needs removal requests: set unlearning.requests, e.g. "
                          "--set 'unlearning.requests=[[0]]'")
    methods = list(cfg.unlearning.methods)
    if "centralized" not in settings_in(cfg):
        methods += [m for m in CENTRALIZED_DEFAULTS if m not in methods]
    return dataclasses.replace(cfg, unlearning=dataclasses.replace(cfg.unlearning,
                                                                   methods=methods))
