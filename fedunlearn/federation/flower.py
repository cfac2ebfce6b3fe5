"""Flower implements the federation port: a ServerApp driving ClientApps on Ray.

:func:`run_on_flower` starts Flower's Simulation Engine (``flwr.simulation.run_simulation``,
Ray backend) with one virtual SuperNode per client and runs ``job(federation)`` inside the
ServerApp, where ``federation`` is a :class:`FlowerFederation` bound to the live ``Grid``.
Every federated run of fedunlearn (training, retraining, calibration) goes through here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedunlearn.config import Config
from fedunlearn.federation import dispatch
from fedunlearn.federation.client_app import app as client_app
from fedunlearn.federation.messages import (
    ARRAYS,
    CONFIG,
    JOB,
    METRICS,
    NUM_EXAMPLES,
    array_bytes,
    from_record,
    job_json,
    to_record,
)
from fedunlearn.federation.port import ClientResult, RoundListener, TrainingRun
from fedunlearn.federation.strategy import (
    STRATEGIES,
    RecordingStrategy,
    check_replies,
    partition_of,
)
from fedunlearn.federation.tracking import Evaluator, FedAvgTracker
from fedunlearn.params import Params
from fedunlearn.seeding import run_seed, sample_participants, variant_tag

T = TypeVar("T")
TIMEOUT_S = 3600.0


class FlowerFederation:
    """The port, implemented with Flower messages over a live ``Grid``.

    Parameters
    ----------
    grid : Grid
        The grid handed to the ServerApp.
    cfg : Config
    evaluate : callable
        Server-side evaluation of a global model.
    """

    def __init__(self, grid: Grid, cfg: Config, evaluate: Evaluator) -> None:
        self.grid = grid
        self.cfg = cfg
        self.evaluate = evaluate
        self.job = job_json(cfg)
        self.num_clients = cfg.data.num_clients
        self.messages_sent = 0
        self.bytes_exchanged = 0
        if hasattr(grid, "pull_interval"):  # InMemoryGrid polls every 0.1 s by default
            grid.pull_interval = cfg.engine.pull_interval
        self.node_of: dict[int, int] = {}
        self.num_examples: dict[int, int] = {}
        self._discover()

    def _config(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({JOB: self.job, **extra})

    def _exchange(self, messages: list[Message]) -> list[Message]:
        self.messages_sent += len(messages)
        replies = check_replies(self.grid.send_and_receive(messages, timeout=TIMEOUT_S))
        self.bytes_exchanged += sum(array_bytes(m.content) for m in [*messages, *replies])
        return replies

    def _discover(self) -> None:
        """Ask every node for its partition id (node ids are random in the engine)."""
        deadline = time.monotonic() + 120
        while len(nodes := list(self.grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.num_clients} Flower nodes came up")
            time.sleep(0.05)
        content = RecordDict({CONFIG: self._config()})
        replies = self._exchange([Message(content, dst_node_id=n, message_type=MessageType.QUERY)
                                  for n in nodes])
        for msg in replies:
            pid = partition_of(msg)
            self.node_of[pid] = msg.metadata.src_node_id
            self.num_examples[pid] = int(msg.content[METRICS][NUM_EXAMPLES])
        missing = sorted(set(range(self.num_clients)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"Flower nodes for partitions {missing} did not answer")

    def fedavg(self, initial: Params, *, exclude: frozenset[int] = frozenset(),
               listener: RoundListener | None = None, variant: int = 0) -> TrainingRun:
        """Run the configured strategy for ``training.rounds`` rounds via ``Strategy.start``."""
        t = self.cfg.training
        tracker = FedAvgTracker(self.evaluate, listener, t.local_epochs)
        inner = STRATEGIES.get(t.strategy)(evaluate_fraction=t.evaluate_fraction,
                                            **t.strategy_params)

        seed = run_seed(self.cfg.seed, variant)

        def sampler(server_round: int) -> list[int]:
            return sample_participants(seed, server_round, self.num_clients,
                                       t.sample_fraction, set(exclude))

        strategy = RecordingStrategy(inner, sampler=sampler, node_of=self.node_of,
                                     on_round=tracker.aggregated)

        def evaluate_fn(server_round: int, arrays: Any) -> Any:
            tracker.evaluated(server_round, from_record(arrays))
            return None

        result = strategy.start(grid=self.grid, initial_arrays=to_record(initial),
                                num_rounds=t.rounds, timeout=TIMEOUT_S,
                                train_config=self._config(tag=variant_tag(variant)),
                                evaluate_config=self._config(),
                                evaluate_fn=evaluate_fn)
        self.messages_sent += strategy.messages_sent
        self.bytes_exchanged += strategy.bytes_exchanged
        final = from_record(result.arrays) if len(result.arrays) else dict(initial)
        run = tracker.finish(final, strategy.messages_sent)
        run.client_seconds = strategy.client_seconds
        run.bytes_exchanged = strategy.bytes_exchanged
        return run

    def train_clients(self, model: Params, clients: Sequence[int], *, epochs: float,
                      server_round: int, tag: int) -> dict[int, ClientResult]:
        """Send a train message to each client and collect their models."""
        content = RecordDict({ARRAYS: to_record(model),
                              CONFIG: self._config(epochs=float(epochs), tag=int(tag),
                                                   **{"server-round": int(server_round)})})
        msgs = [Message(content, dst_node_id=self.node_of[c], message_type=MessageType.TRAIN)
                for c in clients]
        out = {}
        for msg in self._exchange(msgs):
            out[partition_of(msg)] = ClientResult(model=from_record(msg.content[ARRAYS]),
                                                  num_examples=int(msg.content[METRICS]
                                                                   [NUM_EXAMPLES]))
        return out


def backend_config(cfg: Config) -> dict[str, Any]:
    """Flower's Ray backend settings from ``[engine]``."""
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": cfg.engine.verbose}
    if cfg.engine.address:
        init_args["address"] = cfg.engine.address
    else:
        init_args["logging_level"] = logging.INFO if cfg.engine.verbose else logging.ERROR
    return {"client_resources": {"num_cpus": cfg.engine.num_cpus,
                                 "num_gpus": cfg.engine.num_gpus},
            "init_args": init_args}


def run_on_flower(cfg: Config, job: Callable[[FlowerFederation], T], evaluate: Evaluator) -> T:
    """Run ``job`` inside a Flower ServerApp on the Simulation Engine; return its result."""
    return run_engine(cfg, lambda connect: job(connect(cfg, evaluate)))


Connect = Callable[[Config, Evaluator], FlowerFederation]
"""``connect(cfg, evaluate)`` binds a :class:`FlowerFederation` for ``cfg`` to the live grid."""


def run_engine(cfg: Config, job: Callable[[Connect], T]) -> T:
    """Start Flower's Simulation Engine once and run ``job(connect)`` inside its ServerApp.

    ``connect(cfg_s, evaluate_s)`` may be called several times, e.g. once per seed of a
    multi-seed run: every config travels with its messages (the clients cache the data of each
    job), so the engine and its Ray actors start once for all of them. The configs must agree
    on ``data.num_clients`` and ``[engine]`` (the engine's shape is ``cfg``'s).
    """
    from flwr.simulation import run_simulation

    holder: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        def connect(cfg_s: Config, evaluate: Evaluator) -> FlowerFederation:
            if cfg_s.data.num_clients != cfg.data.num_clients or cfg_s.engine != cfg.engine:
                raise ValueError("a federation on this engine needs the engine's "
                                 "data.num_clients and [engine] settings")
            return FlowerFederation(grid, cfg_s, evaluate)

        try:
            holder["result"] = job(connect)
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            holder["error"] = exc

    _quiet(cfg.engine.verbose)
    dispatch.install(cfg.engine.dispatch_interval)
    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=cfg.data.num_clients, backend_config=backend_config(cfg),
                   verbose_logging=cfg.engine.verbose)
    holder["engine_wall_s"] = time.perf_counter() - t0
    if "error" in holder:
        raise holder["error"]
    if "result" not in holder:
        raise RuntimeError("the Flower simulation ended without a result; rerun with "
                           "--set engine.verbose=true to see Flower's log")
    return holder["result"]


def _quiet(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0" if verbose else "1")
    if not verbose:
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
