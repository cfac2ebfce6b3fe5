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

Process control is limited to what the run started (:mod:`fedunlearn.engine.processes`): the
processes of its own local Ray start, recorded by pid and start time. On every failure path
(a Ray start past ``engine.startup_timeout_s``, a client call that never returns at shutdown,
a stop forced after Ctrl-C) those are stopped and the call raises; nothing here ends the
process or signals a process the run did not start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
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
from fedunlearn.engine import dispatch, processes
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
    REMOVED_THROUGH,
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
log = logging.getLogger(__name__)


POLL_SHARE = 0.1
"""At most this share of the driver's time goes to polling for replies (see :class:`PacedGrid`)."""


def _unless_forced() -> None:
    """Raise :class:`~fedunlearn.run.interrupt.Interrupted` once a stop is forced (the grace
    period after Ctrl-C is over): the replies still awaited are not waited for, and a round cut
    short by the stop of the run's Ray workers is never taken for a round with failed clients."""
    if interrupt.FORCED.is_set():
        raise interrupt.Interrupted("stop forced")



def _through(removed_through: int) -> dict[str, int]:
    """The message config entry of ``removed_through`` (none when 0: messages as before)."""
    return {REMOVED_THROUGH: int(removed_through)} if removed_through else {}

class PacedGrid:
    """A view of a Flower grid whose ``send_and_receive`` polls for replies every
    ``pull_interval`` seconds, or less often when a poll itself takes long (everything else is
    delegated).

    Flower's in-memory grid checks every message still awaited on each poll, under the link
    state's lock: with 1,000 messages in flight (node discovery at 1,000 nodes) a poll is no
    longer cheap, and polling at a fixed short interval holds the lock and the driver's GIL for
    a large share of the time, slowing the threads that hand messages to the Ray actors and
    store their replies (figures: docs/benchmarks.md, *Engine benchmark*).
    Here the pause after a poll is at least ``(1 - POLL_SHARE) / POLL_SHARE`` times the poll's
    own duration, so polling takes at most :data:`POLL_SHARE` of the driver's time.

    With ``engine.fast_dispatch`` the waits are also woken by events
    (:mod:`~fedunlearn.engine.dispatch`): a push wakes the engine's sweep
    (:data:`~fedunlearn.engine.dispatch.PUSHED`) and a stored reply wakes the next poll
    (:data:`~fedunlearn.engine.dispatch.STORED`), so neither the first client's start nor the
    collection of the last reply waits for an interval to run out; the intervals only bound
    the waits. The effect on an exchange's fixed cost is measured in docs/benchmarks.md
    (*Scale benchmark*, "Where a round's fixed cost went").
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
        _unless_forced()
        awaited = set(self._grid.push_messages(messages))
        node_of = {md.message_id: md.dst_node_id for m in messages  # (test doubles have none)
                   if (md := getattr(m, "metadata", None)) is not None}
        dispatch.PUSHED.set()
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        factor = (1.0 - POLL_SHARE) / POLL_SHARE
        while awaited:
            _unless_forced()
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
            _unless_forced()
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
               start: Checkpoint | None = None, removed_through: int = 0) -> TrainingRun:
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
                                train_config=self._config(tag=variant_tag(variant, stream),
                                                          **_through(removed_through)),
                                evaluate_config=self._config(**_through(removed_through)),
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
                      task_params: Mapping[str, float] | None = None,
                      removed_through: int = 0) -> dict[int, ClientResult]:
        """Send a train message to each client and collect their models (failed clients are
        asked again ``client_retries`` times, then missing under ``"drop"``).

        A ``task`` other than ``"train"`` travels in the ConfigRecord as ``task`` with its
        ``task_params`` as ``task.<name>`` floats; the client's stats come back in its
        MetricRecord as ``task.<stat>``. A requested stop (Ctrl-C) is honoured before
        sending (:func:`fedunlearn.run.interrupt.check`)."""
        interrupt.check()
        self.reached.update(clients)
        extra: dict[str, Any] = {"server-round": int(server_round), **_through(removed_through)}
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

    def evaluate_clients(self, model: Params, clients: Sequence[int], *, server_round: int,
                         removed_through: int = 0) -> dict[int, ClientEvaluation]:
        """Send an evaluate message (Flower's federated evaluation) to each client; failed
        clients are asked again ``client_retries`` times, then missing under ``"drop"``."""
        interrupt.check()
        content = RecordDict({ARRAYS: to_record(model),
                              CONFIG: self._config(**{"server-round": int(server_round)},
                                                   **_through(removed_through))})

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


class EngineStartError(RuntimeError):
    """Ray could not start (or attach) within ``engine.startup_timeout_s``; one-line message."""


class EngineStuck(ClientFailure):
    """The engine did not shut down within ``engine.shutdown_grace_s`` after its ServerApp had
    finished (a client call that never returns): the run's own Ray processes were stopped."""


REFRESH_S = 1.0
"""How often the record of a local Ray's processes is brought up to date while it runs."""
START_POLL_S = 0.25
"""How often the driver looks at a Ray start in progress (its processes, a stop request)."""
PREVIOUS_START_WAIT_S = 90.0
"""How long a start waits for an abandoned previous start of this process to end (Ray's own
start gives up after about 30 s; a GCS client that lost its server waits 60 s)."""
STOP_WAIT_S = 5.0
"""How long the shutdown watchdog waits after each stop for the engine to end."""
_IDLE_AT_END = (("/autoscaler/", "/monitor.py"),)
"""Heads of a local Ray that hold nothing at the end of a run, by parts of their command line
(Ray's autoscaler monitor: a single-node cluster has nothing to scale); see
:meth:`RayStart.end_idle_heads`."""


class RayStart:
    """One ``ray.init`` (a local start, or attaching to ``engine.address``), run in a thread of
    its own so that the driver waits for it at most ``engine.startup_timeout_s``.

    Why a thread, and why it lives as long as Ray: a local start's processes are started with
    ``PR_SET_PDEATHSIG`` (Ray's fate sharing), which on Linux fires when the *thread* that
    started them ends; the thread therefore stays, refreshing the record of the processes
    (:class:`~fedunlearn.engine.processes.LocalRay`) every :data:`REFRESH_S`, until
    :meth:`release`. Why a start that takes too long is not stopped at once: stopping Ray's GCS
    while ``ray.init`` talks to it makes Ray's GCS client end the whole process once its 60 s
    reconnection wait runs out ("Failed to connect to GCS within 60 seconds ... The program
    will terminate"; observed, docs/engine.md), so
    an abandoned start is left to return (Ray's own start gives up after about 30 s) and its
    thread then shuts Ray down and stops every process it recorded.
    """

    def __init__(self, init_args: dict[str, Any], local: processes.LocalRay | None) -> None:
        self.local = local
        self.init_args = init_args
        self.error: BaseException | None = None
        self.initialized = threading.Event()  # ray.init returned or raised
        self.finish = threading.Event()  # released, or abandoned: the thread may end
        self.ended = threading.Event()  # the thread has ended (its clean-up done)
        self.abandoned = False
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="fedunlearn-ray-start")

    def _run(self) -> None:
        import ray

        try:
            try:
                ray.init(**self.init_args)
            except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
                self.error = exc
                self._clean_up(ray)
                return
            finally:
                self.initialized.set()
            while not self.finish.wait(REFRESH_S):  # this thread must outlive Ray (above)
                if self.local is not None:
                    try:
                        self.local.refresh()
                    except Exception:  # the record only: never end this thread
                        log.debug("cannot refresh the Ray process record", exc_info=True)
            if self.abandoned:
                self._clean_up(ray)
        finally:
            self.ended.set()

    def _clean_up(self, ray: Any) -> None:
        """After a failed or abandoned start: reset Ray's state, stop what was started."""
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001, S110 - a half-started Ray: its processes go below
            pass
        if self.local is not None:
            self.local.stop()

    def wait(self, limit: float) -> bool:
        """Wait up to ``limit`` seconds for ``ray.init``; False if it has not returned (or a
        stop was requested meanwhile). Follows the start's processes while waiting."""
        deadline = time.monotonic() + limit
        while not self.initialized.wait(min(START_POLL_S, max(deadline - time.monotonic(),
                                                              0.0))):
            if self.local is not None:
                self.local.refresh()
            if time.monotonic() >= deadline or interrupt.STOP.is_set():
                return False
        return True

    def abandon(self) -> None:
        """Give up on the start: its thread shuts Ray down and stops its processes once
        ``ray.init`` returns (see the class docstring)."""
        self.abandoned = True
        self.finish.set()

    def stop_workers(self) -> None:
        """Stop the processes below this Ray's heads (its workers and agents): a driver call
        blocked on a Ray actor then fails at once."""
        if self.local is not None:
            self.local.stop_workers()

    def end_idle_heads(self) -> None:
        """At the end of a run, SIGKILL the heads that hold nothing (:data:`_IDLE_AT_END`).

        ``ray.shutdown`` stops the GCS before the autoscaler monitor, which then spends its
        one-second grace trying to report its own end to the GCS that is gone, most of what
        ``ray.shutdown`` takes (figures: docs/benchmarks.md, *Process control*); stopped
        first, it costs nothing and Ray skips it (its process handle has exited)."""
        if self.local is None:
            return
        for head in self.local.heads:
            cmd = processes.cmdline(head.pid)
            if any(all(part in cmd for part in parts) for parts in _IDLE_AT_END):
                head.send(signal.SIGKILL)

    def release(self) -> list[processes.Proc]:
        """After ``ray.shutdown``: stop whatever of this Ray still runs (bounded), remove its
        record and let the thread end. Returns what could not be stopped."""
        left = self.local.stop() if self.local is not None else []
        self.finish.set()
        return left


_previous: list[RayStart | None] = [None]


def wait_for_ray_start(timeout_s: float = PREVIOUS_START_WAIT_S) -> bool:
    """Wait up to ``timeout_s`` for an abandoned start of this process to have shut down and
    stopped its processes; True once none is pending."""
    previous = _previous[0]
    return previous is None or previous.ended.wait(timeout_s)


def start_ray(cfg: Config, *, timeout_s: float | None = None) -> float:
    """Start Ray for the run (or attach to ``engine.address``) the way Flower's backend would,
    within ``timeout_s`` (default ``engine.startup_timeout_s``); return the seconds it took.

    Flower's backend skips its own ``ray.init`` when Ray is already up, so starting it here
    changes nothing else; it bounds the wait and turns a failure into one line. Before a local
    start, the Ray processes left behind by runs whose driver was killed are stopped
    (:func:`~fedunlearn.engine.processes.sweep`). Raises :class:`EngineStartError` (after
    stopping what the start had started, or, for a start still running, leaving it to stop
    itself once Ray returns: see :class:`RayStart`) or :class:`Interrupted` on a stop request.
    """
    import ray

    init_args = dict(backend_config(cfg)["init_args"])
    # as Flower's backend does: Ray workers see the driver's import path
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    limit = cfg.engine.startup_timeout_s if timeout_s is None else timeout_s
    where = f"the Ray cluster at {cfg.engine.address}" if cfg.engine.address else "Ray"
    hint = ("check the address and that the cluster runs the same Ray version"
            if cfg.engine.address else
            "check free space and `ulimit -f` (Ray writes its logs under /tmp/ray), or rerun "
            "with --set engine.verbose=true for Ray's own log")
    if not wait_for_ray_start():
        raise EngineStartError(f"{where} could not start (a previous start in this process "
                               f"has not ended within {PREVIOUS_START_WAIT_S:g} s)")
    # A local Ray inherits this environment, PYTHONPATH included: a job-level runtime_env (what
    # Flower passes) would slow Ray's start and make the first task wait for Ray's runtime-env
    # agent (figures: docs/benchmarks.md, Engine benchmark), for nothing. Workers of a cluster
    # started elsewhere need it.
    local = None
    if cfg.engine.address:
        init_args["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
    else:
        processes.sweep()
        local = processes.LocalRay(marker=os.path.dirname(ray.__file__))
    start = RayStart(init_args, local)
    t0 = time.perf_counter()
    start.thread.start()
    try:
        answered = start.wait(limit)
    except BaseException:  # a KeyboardInterrupt while waiting
        start.abandon()
        _previous[0] = start
        raise
    if not answered:
        start.abandon()
        _previous[0] = start
        if interrupt.STOP.is_set():
            raise interrupt.Interrupted(f"stop requested while {where} was starting")
        raise EngineStartError(
            f"{where} could not start (no answer within engine.startup_timeout_s = "
            f"{limit:g} s; raise it if the machine is slow); {hint}")
    if start.error is not None:
        start.ended.wait(processes.TERM_WAIT_S + processes.KILL_WAIT_S + 5.0)
        exc = start.error
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineStartError(f"{where} could not start ({reason}); {hint}") from None
    _current[0] = start
    interrupt.reclaim()  # Ray's native SIGTERM handler would abort the run: ours stops it
    if local is not None:
        local.refresh()
    return time.perf_counter() - t0


_current: list[RayStart | None] = [None]


def _shutdown_watchdog(ended: threading.Event, holder: dict[str, Any], grace_s: float,
                       start: RayStart | None) -> None:
    """Flower's engine waits for every client call still running on a Ray actor before it
    returns; a client that never returns (stalled past ``client_timeout_s`` and aborted on, or
    dropped) would hold the run forever. After ``grace_s`` (``engine.shutdown_grace_s``) the
    run's own Ray worker processes are stopped, so the blocked call fails and the engine ends
    (the run then raises :class:`EngineStuck`); if even that does not end it, every process of
    the run's Ray, then ``KeyboardInterrupt`` in the main thread. Nothing else is signalled."""
    if ended.wait(grace_s):
        return
    if isinstance(holder.get("error"), interrupt.Interrupted):
        return  # the interrupt watchdog forces this stop
    holder["stuck"] = True
    if start is not None:
        start.stop_workers()
        if ended.wait(STOP_WAIT_S):
            return
        if start.local is not None:
            start.local.stop()
        if ended.wait(STOP_WAIT_S):
            return
    interrupt.raise_in_main()


def run_engine(cfg: Config, job: Callable[[Connect], T],
               on_stuck: Callable[[], str] | None = None) -> T:
    """Start Flower's Simulation Engine once and run ``job(connect)`` inside its ServerApp.

    ``connect(cfg_s, evaluate_s)`` may be called several times, e.g. once per seed of a
    multi-seed run: every config travels with its messages (the clients cache the data of each
    job), so the engine and its Ray actors start once for all of them. The configs must agree
    on ``data.num_clients`` and ``[engine]`` (the engine's shape is ``cfg``'s).

    Raises what ``job`` raised; :class:`EngineStartError`; :class:`EngineStuck` (a client call
    never returned at shutdown; ``on_stuck()`` says where the saved work is);
    :class:`~fedunlearn.run.interrupt.Interrupted` after a stop request. Every process the
    run's local Ray started is stopped before it returns or raises.
    """
    from flwr.simulation import run_simulation

    holder: dict[str, Any] = {}
    ended = threading.Event()
    server_app = ServerApp()
    current: list[RayStart | None] = [None]

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
            if current[0] is not None:
                current[0].end_idle_heads()
            threading.Thread(target=_shutdown_watchdog, daemon=True,
                             name="fedunlearn-shutdown-watchdog",
                             args=(ended, holder, cfg.engine.shutdown_grace_s,
                                   current[0])).start()

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
    current[0], _current[0] = _current[0], None
    failure: BaseException | None = None
    try:
        with interrupt.on_force(current[0].stop_workers if current[0] is not None else None):
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=cfg.data.num_clients,
                           backend_config=backend_config(cfg),
                           verbose_logging=cfg.engine.verbose)
    except BaseException as exc:  # noqa: BLE001 - sorted out below, once Ray is stopped
        failure = exc
    finally:
        ended.set()
        _stop_ray()
        if current[0] is not None:
            current[0].release()
        _restore_env(data_cache.ENV, previous)
        copies.cleanup()
    holder["engine_wall_s"] = time.perf_counter() - t0
    error = holder.get("error")
    if holder.get("stuck"):
        why = str(error) if error is not None else "the Flower engine did not shut down"
        where = on_stuck() if on_stuck is not None else ""
        raise EngineStuck(f"{why} (a client never returned, so the engine was stopped after "
                          f"{cfg.engine.shutdown_grace_s:g} s){'; ' + where if where else ''}")
    if isinstance(error, interrupt.Interrupted):
        raise error
    if failure is not None:
        if interrupt.FORCED.is_set():  # the engine failed because the stop was forced
            raise interrupt.Interrupted("stop forced") from None
        raise failure
    if error is not None:
        raise error
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
