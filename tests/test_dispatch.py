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
