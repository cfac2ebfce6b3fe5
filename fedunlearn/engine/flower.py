"""Flower implements the federation port: a ServerApp driving ClientApps on Ray.

:func:`run_on_flower` starts Flower's Simulation Engine (``flwr.simulation.run_simulation``,
Ray backend) with one virtual SuperNode per client and runs ``job(federation)`` inside the
ServerApp, where ``federation`` is a :class:`FlowerFederation` bound to the live ``Grid``.
Every federated run of fedunlearn (training, retraining, calibration) goes through here.

Every wait on clients is bounded by ``engine.client_timeout_s``; a client that does not answer
in time, answers with an error or sends NaN/Inf is handled by ``engine.on_client_failure``
(:mod:`fedunlearn.engine.faults`). Node discovery, whose first message also starts each
client process, is bounded by ``engine.startup_timeout_s`` instead and is not subject to the
policy: a node that does not come up or answer in time stops the run with
:class:`~fedunlearn.engine.faults.ClientFailure`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedunlearn.config.tree import Config
from fedunlearn.data import cache as data_cache
from fedunlearn.data.federated import FederatedData, build_federated_data
from fedunlearn.engine import dispatch
from fedunlearn.engine.client_app import app as client_app
from fedunlearn.engine.faults import (
    METHOD_PHASE,
    ClientFailure,
    FaultPolicy,
    error_reason,
    fedavg_phase,
    with_retries,
)
from fedunlearn.engine.messages import (
    ARRAYS,
    CONFIG,
    EVAL_ACCURACY,
    EVAL_LOSS,
    JOB,
    METRICS,
    NUM_EXAMPLES,
    TASK,
    TASK_PREFIX,
    array_bytes,
    from_record,
    job_json,
    task_stats,
    to_record,
)
from fedunlearn.engine.port import (
    ClientEvaluation,
    ClientResult,
    RoundListener,
    TrainingRun,
)
from fedunlearn.engine.strategy import (
    STRATEGIES,
    RecordingStrategy,
    Screened,
    partition_of,
    screen_replies,
)
from fedunlearn.engine.tracking import Evaluator, FedAvgTracker
from fedunlearn.models.params import Params
from fedunlearn.models.seeding import run_seed, sample_participants, variant_tag
from fedunlearn.run import interrupt
from fedunlearn.run.console import listed

if TYPE_CHECKING:
    from fedunlearn.run.resume import Checkpoint

T = TypeVar("T")


POLL_SHARE = 0.1
"""At most this share of the driver's time goes to polling for replies (see :class:`PacedGrid`)."""


class PacedGrid:
    """A view of a Flower grid whose ``send_and_receive`` polls for replies every
    ``pull_interval`` seconds, or less often when a poll itself takes long (everything else is
    delegated).

    Flower's in-memory grid checks every message still awaited on each poll, under the link
    state's lock: with 1,000 messages in flight (node discovery at 1,000 nodes) a poll costs
    milliseconds, and polling every 0.01 s holds the lock and the driver's GIL about half the
    time, slowing the threads that hand messages to the Ray actors and store their replies.
    Here the pause after a poll is at least ``(1 - POLL_SHARE) / POLL_SHARE`` times the poll's
    own duration, so polling takes at most :data:`POLL_SHARE` of the driver's time.

    With ``engine.fast_dispatch`` the waits are also woken by events
    (:mod:`~fedunlearn.engine.dispatch`): a push wakes the engine's sweep
    (:data:`~fedunlearn.engine.dispatch.PUSHED`) and a stored reply wakes the next poll
    (:data:`~fedunlearn.engine.dispatch.STORED`). On backdoor_digits' FedEraser rounds the
    first client started 16.2 → 2.6 ms after the push and the last reply was collected 7.5 →
    2.4 ms after the client finished (medians over 19 rounds), 78 → 59 ms per exchange.
    """

    def __init__(self, grid: Grid, pull_interval: float) -> None:
        self._grid = grid
        self.pull_interval = pull_interval
        self.abandoned: dict[str, int] = {}  # message id -> node: given up on, no reply yet

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def still_running(self) -> set[int]:
        """The nodes of requests given up on after their timeout whose reply has still not
        arrived (a late reply is collected and dropped): each runs on a client process, or
        waits for one behind a request that does."""
        if self.abandoned:
            for msg in self._grid.pull_messages(list(self.abandoned)):
                self.abandoned.pop(msg.metadata.reply_to_message_id, None)
        return set(self.abandoned.values())

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Push ``messages``; return the replies that arrived within ``timeout`` seconds (the
        others are remembered in :attr:`abandoned`)."""
        messages = list(messages)
        awaited = set(self._grid.push_messages(messages))
        node_of = {md.message_id: md.dst_node_id for m in messages  # (test doubles have none)
                   if (md := getattr(m, "metadata", None)) is not None}
        dispatch.PUSHED.set()
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        factor = (1.0 - POLL_SHARE) / POLL_SHARE
        while awaited:
            dispatch.STORED.clear()  # before the poll: a reply stored after it wakes the wait
            t0 = time.perf_counter()
            got = list(self._grid.pull_messages(awaited))
            spent = time.perf_counter() - t0
            replies += got
            awaited.difference_update(m.metadata.reply_to_message_id for m in got)
            if not awaited or (timeout is not None and time.monotonic() >= end):
                break
            pause = factor * spent  # keeps polling under POLL_SHARE of the driver's time
            wait = max(self.pull_interval, pause)
            if timeout is not None:  # never past the exchange's deadline
                wait = min(wait, max(0.0, end - time.monotonic()))
            time.sleep(min(pause, wait))
            if wait > pause:
                dispatch.STORED.wait(wait - pause)
        self.abandoned.update({mid: node_of[mid] for mid in awaited if mid in node_of})
        return replies


class FlowerFederation:
    """The port, implemented with Flower messages over a live ``Grid``.

    Parameters
    ----------
    grid : Grid
        The grid handed to the ServerApp.
    cfg : Config
    evaluate : callable
        Server-side evaluation of a global model.
    data : FederatedData, optional
        The data of ``cfg`` as the driver built it; published for the client processes on this
        machine (:mod:`fedunlearn.data.cache`). Built here when not given.
    """

    def __init__(self, grid: Grid, cfg: Config, evaluate: Evaluator,
                 data: FederatedData | None = None) -> None:
        self.grid = grid._grid if isinstance(grid, PacedGrid) else grid
        self.paced = PacedGrid(self.grid, cfg.engine.pull_interval)
        self.cfg = cfg
        self.evaluate = evaluate
        self.job = job_json(cfg)
        self.num_clients = cfg.data.num_clients
        self.messages_sent = 0
        self.bytes_exchanged = 0
        self.reached: Counter[int] = Counter()  # client -> training requests it received
        self.policy = FaultPolicy.of(cfg.engine, still_running=self._still_running)
        self.timeout_s = cfg.engine.client_timeout_s
        self.node_of: dict[int, int] = {}
        self.num_examples: dict[int, int] = {}
        if os.environ.get(data_cache.ENV):  # local client processes load this copy
            data_cache.publish(data if data is not None else build_federated_data(cfg),
                               self.job)
        self._discover()

    def _still_running(self) -> list[int]:
        """Clients whose request was given up on after a timeout and has not answered since
        (see :meth:`PacedGrid.still_running`)."""
        client_of = {node: pid for pid, node in self.node_of.items()}
        return sorted(client_of[n] for n in self.paced.still_running() if n in client_of)

    def _config(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({JOB: self.job, **extra})

    def _exchange(self, messages: list[Message], timeout_s: float | None = None
                  ) -> list[Message]:
        """Send ``messages``; return the replies that arrived within ``timeout_s`` (default
        ``engine.client_timeout_s``)."""
        self.messages_sent += len(messages)
        replies = self.paced.send_and_receive(messages, timeout=timeout_s or self.timeout_s)
        self.bytes_exchanged += sum(array_bytes(m.content) for m in [*messages, *replies]
                                    if m.has_content())
        return replies

    def _discover(self) -> None:
        """Ask every node for its partition id (node ids are random in the engine), within
        ``engine.startup_timeout_s`` (the first message also starts each client process)."""
        startup = self.cfg.engine.startup_timeout_s
        wait = f"within engine.startup_timeout_s = {startup:g} s; raise it"
        deadline = time.monotonic() + startup
        while len(nodes := list(self.grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise ClientFailure(f"only {len(nodes)} of {self.num_clients} Flower nodes came "
                                    f"up {wait}")
            time.sleep(0.05)
        content = RecordDict({CONFIG: self._config()})
        remaining = max(deadline - time.monotonic(), 1e-3)
        replies = self._exchange([Message(content, dst_node_id=n, message_type=MessageType.QUERY)
                                  for n in nodes], remaining)
        for msg in replies:
            if msg.has_error():
                raise ClientFailure(f"a Flower node failed to start its client "
                                    f"({error_reason(msg.error.reason)}); rerun with "
                                    "--set engine.verbose=true for its traceback")
            pid = partition_of(msg)
            self.node_of[pid] = msg.metadata.src_node_id
            self.num_examples[pid] = int(msg.content[METRICS][NUM_EXAMPLES])
        missing = sorted(set(range(self.num_clients)) - set(self.node_of))
        if missing:
            raise ClientFailure(f"the Flower nodes of {listed(missing)} did not answer {wait}")

    def fedavg(self, initial: Params, *, exclude: frozenset[int] = frozenset(),
               listener: RoundListener | None = None, variant: int = 0, stream: int = 0,
               start: Checkpoint | None = None) -> TrainingRun:
        """Run the configured strategy for ``training.rounds`` rounds via ``Strategy.start``
        (the rounds after ``start.round`` when a run is resumed)."""
        t = self.cfg.training
        tracker = FedAvgTracker(self.evaluate, listener, t.local_epochs, start)
        first = start.round if start is not None else 0
        if start is not None:
            initial = start.model
        inner = STRATEGIES.get(t.strategy)(evaluate_fraction=t.evaluate_fraction,
                                            **t.strategy_params)

        seed = run_seed(self.cfg.seed, variant)

        def sampler(server_round: int) -> list[int]:
            return sample_participants(seed, server_round, self.num_clients,
                                       t.sample_fraction, set(exclude))

        strategy = RecordingStrategy(inner, sampler=sampler, node_of=self.node_of,
                                     on_round=tracker.aggregated,
                                     policy=dataclasses.replace(
                                         self.policy, phase=fedavg_phase(exclude, variant,
                                                                         stream)),
                                     on_failures=tracker.failed)
        strategy.round_offset = first

        def evaluate_fn(server_round: int, arrays: Any) -> Any:
            tracker.evaluated(first + server_round, from_record(arrays))
            return None

        result = strategy.start(grid=self.paced,  # type: ignore[arg-type]
                                initial_arrays=to_record(initial),
                                num_rounds=t.rounds - first, timeout=self.timeout_s,
                                train_config=self._config(tag=variant_tag(variant, stream)),
                                evaluate_config=self._config(),
                                evaluate_fn=evaluate_fn)
        self.messages_sent += strategy.messages_sent
        self.bytes_exchanged += strategy.bytes_exchanged
        final = from_record(result.arrays) if len(result.arrays) else dict(initial)
        run = tracker.finish(final, strategy.messages_sent)
        run.client_seconds = strategy.client_seconds
        run.bytes_exchanged = strategy.bytes_exchanged
        self.reached.update(p for summary in run.rounds for p in summary.participants)
        return run

    def train_clients(self, model: Params, clients: Sequence[int], *, epochs: float,
                      server_round: int, tag: int, task: str = "train",
                      task_params: Mapping[str, float] | None = None
                      ) -> dict[int, ClientResult]:
        """Send a train message to each client and collect their models (failed clients are
        asked again ``client_retries`` times, then missing under ``"drop"``).

        A ``task`` other than ``"train"`` travels in the ConfigRecord as ``task`` with its
        ``task_params`` as ``task.<name>`` floats; the client's stats come back in its
        MetricRecord as ``task.<stat>``. A requested stop (Ctrl-C) is honoured before
        sending (:func:`fedunlearn.run.interrupt.check`)."""
        interrupt.check()
        self.reached.update(clients)
        extra: dict[str, Any] = {"server-round": int(server_round)}
        if task != "train":
            extra[TASK] = task
            extra.update({TASK_PREFIX + k: float(v) for k, v in (task_params or {}).items()})
        content = RecordDict({ARRAYS: to_record(model),
                              CONFIG: self._config(epochs=float(epochs), tag=int(tag), **extra)})

        def attempt(cs: list[int]) -> Screened:
            msgs = [Message(content, dst_node_id=self.node_of[c],
                            message_type=MessageType.TRAIN) for c in cs]
            return screen_replies(self._exchange(msgs), {self.node_of[c]: c for c in cs},
                                  model=True)

        ok, failed = with_retries(attempt, clients, self.policy.retries)
        policy = dataclasses.replace(self.policy, phase=METHOD_PHASE)
        policy.settle(failed, ok, server_round=server_round, stage=task)
        return {pid: ClientResult(model=from_record(msg.content[ARRAYS]),
                                  num_examples=int(msg.content[METRICS][NUM_EXAMPLES]),
                                  stats=task_stats(msg.content[METRICS]))
                for pid, msg in sorted(ok.items())}

    def evaluate_clients(self, model: Params, clients: Sequence[int], *, server_round: int
                         ) -> dict[int, ClientEvaluation]:
        """Send an evaluate message (Flower's federated evaluation) to each client; failed
        clients are asked again ``client_retries`` times, then missing under ``"drop"``."""
        interrupt.check()
        content = RecordDict({ARRAYS: to_record(model),
                              CONFIG: self._config(**{"server-round": int(server_round)})})

        def attempt(cs: list[int]) -> Screened:
            msgs = [Message(content, dst_node_id=self.node_of[c],
                            message_type=MessageType.EVALUATE) for c in cs]
            return screen_replies(self._exchange(msgs), {self.node_of[c]: c for c in cs},
                                  model=False)

        ok, failed = with_retries(attempt, clients, self.policy.retries)
        self.policy.settle(failed, ok, server_round=server_round, stage="evaluate")
        return {pid: ClientEvaluation(num_examples=int(m[NUM_EXAMPLES]),
                                      loss=float(m[EVAL_LOSS]), accuracy=float(m[EVAL_ACCURACY]))
                for pid, m in ((p, msg.content[METRICS]) for p, msg in sorted(ok.items()))}


def backend_config(cfg: Config) -> dict[str, Any]:
    """Flower's Ray backend settings from ``[engine]``."""
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": cfg.engine.verbose}
    if cfg.engine.address:
        init_args["address"] = cfg.engine.address
    else:
        init_args["logging_level"] = logging.INFO if cfg.engine.verbose else logging.ERROR
        if cfg.engine.ray_num_cpus:
            init_args["num_cpus"] = cfg.engine.ray_num_cpus
    return {"client_resources": {"num_cpus": cfg.engine.num_cpus,
                                 "num_gpus": cfg.engine.num_gpus},
            "init_args": init_args}


def run_on_flower(cfg: Config, job: Callable[[FlowerFederation], T], evaluate: Evaluator,
                  data: FederatedData | None = None) -> T:
    """Run ``job`` inside a Flower ServerApp on the Simulation Engine; return its result.

    ``data``: ``cfg``'s data as the caller built it, published for the client processes
    (otherwise the driver builds it once more; see :class:`FlowerFederation`)."""
    return run_engine(cfg, lambda connect: job(connect(cfg, evaluate, data)))


Connect = Callable[..., FlowerFederation]
"""``connect(cfg, evaluate, data=None)`` binds a :class:`FlowerFederation` for ``cfg`` to the
live grid (``data``: the driver's copy of ``cfg``'s data, see :class:`FlowerFederation`)."""


def _shutdown_watchdog(ended: threading.Event, holder: dict[str, Any],
                       on_stuck: Callable[[], str] | None, grace_s: float) -> None:
    """Flower's engine waits for every client call still running on a Ray actor before it
    returns; a client that never returns (stalled past ``client_timeout_s`` and aborted on, or
    dropped) would hold the process forever. After ``grace_s`` (``engine.shutdown_grace_s``)
    the run's Ray processes are stopped and the process exits with one line: the error, or
    where the saved work is."""
    if ended.wait(grace_s):
        return
    error = holder.get("error")
    if isinstance(error, interrupt.Interrupted):
        return  # the interrupt watchdog ends this run with its own last line
    err = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # silence Ray's tracebacks of its own end
    interrupt.kill_descendants()
    if ended.wait(2.0):
        os.dup2(err, 2)
        return
    why = (f"fedunlearn: error: {error}" if error is not None else
           "fedunlearn: error: the Flower engine did not shut down")
    where = on_stuck() if on_stuck is not None else ""
    line = (f"{why} (a client never returned, so the engine was stopped after "
            f"{grace_s:g} s){'; ' + where if where else ''}\n")
    os.write(err, line.encode())
    os._exit(2)


class EngineStartError(RuntimeError):
    """Ray could not start (or attach) within ``engine.startup_timeout_s``; one-line message."""


def start_ray(cfg: Config, *, timeout_s: float | None = None) -> float:
    """Start Ray for the run (or attach to ``engine.address``) the way Flower's backend would,
    within ``timeout_s`` (default ``engine.startup_timeout_s``); return the seconds it took.

    Flower's backend skips its own ``ray.init`` when Ray is already up, so starting it here
    changes nothing else; it bounds the wait and turns a failure into one line. Ray's own
    start-up gives up after about 30 s (under a file-size limit, for instance) with a long
    traceback from every layer; a start that hangs past ``timeout_s`` has its processes stopped.
    Raises :class:`EngineStartError`.
    """
    import ray

    init_args = dict(backend_config(cfg)["init_args"])
    # as Flower's backend does: Ray workers see the driver's import path
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    limit = cfg.engine.startup_timeout_s if timeout_s is None else timeout_s
    gave_up = threading.Event()
    done = threading.Event()

    where = f"the Ray cluster at {cfg.engine.address}" if cfg.engine.address else "Ray"
    hint = ("check the address and that the cluster runs the same Ray version"
            if cfg.engine.address else
            "check free space and `ulimit -f` (Ray writes its logs under /tmp/ray), or rerun "
            "with --set engine.verbose=true for Ray's own log")

    def watchdog() -> None:
        if done.wait(limit):
            return
        gave_up.set()
        interrupt.kill_descendants()  # a local start: Ray's processes are ours
        if not done.wait(5.0):  # ray.init ignored its processes' end: leave with one line
            os.write(2, f"fedunlearn: error: {where} could not start (no answer within "
                        f"engine.startup_timeout_s = {limit:g} s); {hint}\n".encode())
            os._exit(2)
    threading.Thread(target=watchdog, daemon=True, name="ray-start-watchdog").start()
    # A local Ray inherits this environment, PYTHONPATH included: a job-level runtime_env (what
    # Flower passes) would cost about 1 s at start and 0.7 s at the first task (measured), for
    # nothing. Workers of a cluster started elsewhere need it.
    if cfg.engine.address:
        init_args["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
    t0 = time.perf_counter()
    try:
        ray.init(**init_args)
    except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if gave_up.is_set():
            reason = (f"no answer within engine.startup_timeout_s = {limit:g} s; raise it if "
                      "the machine is slow")
        if not cfg.engine.address:  # a failed local start leaves its GCS and raylet behind
            interrupt.kill_descendants()
        raise EngineStartError(f"{where} could not start ({reason}); {hint}") from None
    finally:
        done.set()
    interrupt.reclaim()  # Ray's native SIGTERM handler would abort the run: ours stops it
    if not cfg.engine.address:
        _stop_without_grace()
    return time.perf_counter() - t0


def _stop_without_grace() -> None:
    """Make ``ray.shutdown`` (called by Flower's backend at the end of a run) stop the local Ray
    this run started at once, instead of asking each of its processes to exit and waiting for
    it (about 1 s per run, measured). The cluster is the run's own and holds nothing that
    outlives it; the driver's own disconnect is unchanged.

    Ray's processes and everything below them (workers, its agents) are killed: a raylet killed
    alone would leave its agents and actors running."""
    from ray._private import worker

    node = worker._global_node
    if not (hasattr(node, "kill_all_processes") and hasattr(node, "all_processes")):
        return
    kill = type(node).kill_all_processes

    def kill_all_processes(check_alive: bool = True, allow_graceful: bool = False,
                           wait: bool = False) -> None:
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos
                 if getattr(info, "process", None) is not None]
        interrupt.kill_pids(interrupt.descendants(*roots))
        # no wait: Ray's own wait after SIGKILL has no bound (its comment says so); a killed
        # process that is not yet reaped is a zombie, not a running one
        kill(node, check_alive=check_alive, allow_graceful=False, wait=False)

    node.kill_all_processes = kill_all_processes


def run_engine(cfg: Config, job: Callable[[Connect], T],
               on_stuck: Callable[[], str] | None = None) -> T:
    """Start Flower's Simulation Engine once and run ``job(connect)`` inside its ServerApp.

    ``connect(cfg_s, evaluate_s)`` may be called several times, e.g. once per seed of a
    multi-seed run: every config travels with its messages (the clients cache the data of each
    job), so the engine and its Ray actors start once for all of them. The configs must agree
    on ``data.num_clients`` and ``[engine]`` (the engine's shape is ``cfg``'s).
    """
    from flwr.simulation import run_simulation

    holder: dict[str, Any] = {}
    ended = threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        def connect(cfg_s: Config, evaluate: Evaluator,
                    data: FederatedData | None = None) -> FlowerFederation:
            if cfg_s.data.num_clients != cfg.data.num_clients or cfg_s.engine != cfg.engine:
                raise ValueError("a federation on this engine needs the engine's "
                                 "data.num_clients and [engine] settings")
            return FlowerFederation(grid, cfg_s, evaluate, data=data)

        try:
            holder["result"] = job(connect)
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            holder["error"] = exc
        finally:
            threading.Thread(target=_shutdown_watchdog, daemon=True,
                             args=(ended, holder, on_stuck, cfg.engine.shutdown_grace_s)).start()

    _quiet(cfg.engine.verbose)
    dispatch.install(cfg.engine.dispatch_interval, enabled=cfg.engine.fast_dispatch)
    t0 = time.perf_counter()
    # the client processes Ray starts here inherit this variable: they load the driver's copy
    # of each job's data instead of rebuilding it (fedunlearn.data.cache)
    copies = tempfile.TemporaryDirectory(prefix="fedunlearn-data-")
    previous = os.environ.get(data_cache.ENV)
    os.environ[data_cache.ENV] = copies.name
    try:
        holder["ray_start_s"] = start_ray(cfg)
    except BaseException:
        _restore_env(data_cache.ENV, previous)
        copies.cleanup()
        raise
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=cfg.data.num_clients, backend_config=backend_config(cfg),
                       verbose_logging=cfg.engine.verbose)
    finally:
        ended.set()
        _stop_ray()
        _restore_env(data_cache.ENV, previous)
        copies.cleanup()
    holder["engine_wall_s"] = time.perf_counter() - t0
    if "error" in holder:
        raise holder["error"]
    if "result" not in holder:
        raise RuntimeError("the Flower simulation ended without a result; rerun with "
                           "--set engine.verbose=true to see Flower's log")
    return holder["result"]


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _stop_ray() -> None:
    """Flower shuts Ray down when its backend ends; if the engine failed before that, do it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class _ClientErrorsReported(logging.Filter):
    """Drops the engine's log of a client's exception (a line, the exception, its traceback
    through Ray: hundreds of lines per failing message): the failure comes back as an error
    reply, which the run reports in one line that says how to see the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName in ("worker", "process_message")
                    and record.pathname.endswith(("vce_api.py", "raybackend.py")))


_CLIENT_ERRORS = _ClientErrorsReported()


def _quiet(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(level)
    if verbose:
        flwr_log.removeFilter(_CLIENT_ERRORS)
    else:
        flwr_log.addFilter(_CLIENT_ERRORS)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0" if verbose else "1")
    if not verbose:
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
