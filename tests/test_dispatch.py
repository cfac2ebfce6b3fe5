"""``engine.fast_dispatch``: the engine's message sweep is replaced only while asked for."""

from __future__ import annotations

from flwr.server.superlink.fleet.vce import vce_api

from fedunlearn.federation import dispatch


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
