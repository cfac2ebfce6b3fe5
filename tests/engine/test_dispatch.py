"""``engine.fast_dispatch``: the engine's message sweep is replaced only while asked for."""

from __future__ import annotations

import importlib.metadata
import threading
import time

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from fedunlearn.engine import dispatch


def test_fast_dispatch_installs_and_restores_flowers_loop() -> None:
    flowers = getattr(vce_api, "_fedunlearn_original", vce_api.add_messages_to_queue)
    try:
        assert dispatch.install(0.02, enabled=True) is True
        assert vce_api.add_messages_to_queue is not flowers
        assert dispatch.install(0.02, enabled=False) is False
        assert vce_api.add_messages_to_queue is flowers
        dispatch.install(0.02, enabled=True)  # installing twice keeps Flower's as the original
        dispatch.install(0.02, enabled=True)
        dispatch.install(0.02, enabled=False)
        assert vce_api.add_messages_to_queue is flowers
    finally:
        vce_api.add_messages_to_queue = flowers


def test_fast_dispatch_is_refused_under_another_flwr_release(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under flwr 1.42.0 (as the installed version reads) the patch is not installed: install()
    returns False with a warning and Flower's own loop and queue stay; under the installed 1.41
    it is installed."""
    from queue import Queue

    real_version = importlib.metadata.version
    flowers = getattr(vce_api, "_fedunlearn_original", vce_api.add_messages_to_queue)
    try:
        dispatch.install(0.02, enabled=False)
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.42.0"
                            if name == "flwr" else real_version(name))
        monkeypatch.setattr(dispatch, "_warned", set())
        assert dispatch.flwr_version() == "1.42.0"
        with pytest.warns(UserWarning, match="not the installed 1.42.0"):
            assert dispatch.install(0.02, enabled=True) is False
        assert vce_api.add_messages_to_queue is flowers
        assert vce_api.Queue is Queue
        monkeypatch.undo()
        assert dispatch.flwr_version().startswith("1.41.")
        assert dispatch.install(0.02, enabled=True) is True
        assert vce_api.add_messages_to_queue is not flowers
    finally:
        dispatch.install(0.02, enabled=False)
        vce_api.add_messages_to_queue = flowers
        vce_api.Queue = Queue


class _PerNodeState:
    """A link state with only the public per-node call (no in-memory internals)."""

    def __init__(self, pending: dict[int, list[str]]) -> None:
        self.pending = pending

    def get_message_ins(self, *, node_id: int, limit: int | None) -> list[str]:
        out, self.pending[node_id] = self.pending.get(node_id, []), []
        return out


def test_undelivered_falls_back_to_the_public_call_per_node() -> None:
    state = _PerNodeState({1: ["a", "b"], 3: ["c"], 9: ["not ours"]})
    assert dispatch.undelivered(state, {1: 0, 2: 1, 3: 2}) == ["a", "b", "c"]
    assert dispatch.undelivered(state, {1: 0, 2: 1, 3: 2}) == []


def test_fast_dispatch_makes_the_engines_queues_prompt() -> None:
    """The engine's threads wait on ``Queue.get(timeout=1.0)`` between looks at their stop
    event; with fast dispatch the queues they get (``vce_api.Queue``) cap that wait at the
    dispatch interval, and Flower's own queue comes back when it is switched off."""
    from queue import Empty, Queue

    waits: list[float | None] = []
    original_get = Queue.get

    def spy_get(self, block=True, timeout=None):  # type: ignore[no-untyped-def]
        waits.append(timeout)
        return original_get(self, block, timeout)

    flowers = getattr(vce_api, "_fedunlearn_original", vce_api.add_messages_to_queue)
    try:
        dispatch.install(0.03, enabled=True)
        assert vce_api.Queue is dispatch.PromptQueue
        q = vce_api.Queue()
        Queue.get = spy_get  # type: ignore[method-assign]
        try:
            try:
                q.get(timeout=1.0)
            except Empty:
                pass
            q.put("m")
            assert q.get(timeout=1.0) == "m"
            q.put("n")
            assert q.get() == "n"  # an untimed get stays untimed
        finally:
            Queue.get = original_get  # type: ignore[method-assign]
        assert waits == [0.03, 0.03, None], waits
        dispatch.install(0.03, enabled=False)
        assert vce_api.Queue is Queue
    finally:
        vce_api.add_messages_to_queue = flowers
        vce_api.Queue = Queue


def test_a_push_wakes_the_fast_sweep_at_once() -> None:
    """With a 60 s dispatch interval, a message pushed after the first sweep is only handed to
    the actors because the push wakes the sweep (the test waits at most 10 s for it)."""
    from queue import Queue

    flowers = getattr(vce_api, "_fedunlearn_original", vce_api.add_messages_to_queue)
    state = _PerNodeState({})
    queue: Queue[str] = Queue()
    stop = threading.Event()
    try:
        dispatch.install(60.0, enabled=True)
        sweep = threading.Thread(target=vce_api.add_messages_to_queue,
                                 args=(state, queue, {1: 0}, stop), daemon=True)
        sweep.start()
        time.sleep(0.2)  # the first sweep has found nothing; the next is 60 s away
        state.pending[1] = ["m"]
        dispatch.PUSHED.set()
        assert queue.get(timeout=10.0) == "m"
    finally:
        stop.set()
        dispatch.PUSHED.set()
        sweep.join(timeout=10.0)
        dispatch.install(0.02, enabled=False)
        vce_api.add_messages_to_queue = flowers
    assert not sweep.is_alive()


class _Grid:
    """A grid whose reply arrives (stored by the engine's thread) 0.2 s after the push."""

    def __init__(self, state: object) -> None:
        self.state = state
        self.ready: list[object] = []

    def push_messages(self, messages: list[object]) -> list[str]:
        def reply() -> None:
            time.sleep(0.2)
            self.state.store_message_res("reply")  # type: ignore[attr-defined]
        threading.Thread(target=reply, daemon=True).start()
        return ["id-1"]

    def pull_messages(self, ids: set[str]) -> list[object]:
        return list(self.ready)


def test_a_stored_reply_wakes_the_servers_poll_at_once() -> None:
    """The engine's store of a reply (wrapped by the fast sweep) wakes ``PacedGrid``, which
    otherwise polls every ``pull_interval`` (60 s here; the test waits at most 10 s)."""
    from types import SimpleNamespace

    from fedunlearn.engine.flower import PacedGrid

    grid: _Grid

    def store(message: object) -> None:
        grid.ready.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="id-1")))

    state = SimpleNamespace(store_message_res=store)
    assert dispatch.notify_replies(state) is True
    assert dispatch.notify_replies(state) is True  # wrapped once, not twice
    grid = _Grid(state)
    out: list[object] = []
    poll = threading.Thread(target=lambda: out.extend(
        PacedGrid(grid, pull_interval=60.0).send_and_receive(["m"], timeout=120.0)),
        daemon=True)
    poll.start()
    poll.join(timeout=10.0)
    assert not poll.is_alive() and len(out) == 1


def test_the_fast_sweep_notices_the_engines_stop_whatever_its_interval() -> None:
    """A 60 s interval must not hold the engine's stop (Ctrl-C) for 60 s: the sweep looks at
    the stop event every ``STOP_CHECK_S`` (the test waits at most 5 s)."""
    from queue import Queue

    flowers = getattr(vce_api, "_fedunlearn_original", vce_api.add_messages_to_queue)
    stop = threading.Event()
    try:
        dispatch.install(60.0, enabled=True)
        assert dispatch.PromptQueue.max_wait == dispatch.STOP_CHECK_S
        sweep = threading.Thread(target=vce_api.add_messages_to_queue,
                                 args=(_PerNodeState({}), Queue(), {1: 0}, stop), daemon=True)
        sweep.start()
        time.sleep(0.2)
        dispatch.PUSHED.clear()
        stop.set()  # no push: only the stop event can end the pause
        sweep.join(timeout=5.0)
        assert not sweep.is_alive()
    finally:
        stop.set()
        dispatch.install(0.02, enabled=False)
        vce_api.add_messages_to_queue = flowers


class _SilentGrid:
    """A grid whose clients never reply."""

    def push_messages(self, messages: list[object]) -> list[str]:
        return ["id-1"]

    def pull_messages(self, ids: set[str]) -> list[object]:
        return []


def test_a_long_pull_interval_never_overruns_the_exchanges_timeout() -> None:
    """``client_timeout_s`` holds even when ``pull_interval`` is far longer: the wait after a
    poll ends at the exchange's deadline (0.3 s here; the test waits at most 10 s)."""
    from fedunlearn.engine.flower import PacedGrid

    out: list[list[object]] = []
    poll = threading.Thread(target=lambda: out.append(
        PacedGrid(_SilentGrid(), pull_interval=60.0).send_and_receive(["m"], timeout=0.3)),
        daemon=True)
    poll.start()
    poll.join(timeout=10.0)
    assert not poll.is_alive() and out == [[]]
