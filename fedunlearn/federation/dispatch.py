"""Tuning of Flower's Simulation Engine (flwr 1.41) for small, fast client workloads.

The engine moves messages from the link state to the Ray actors in a loop that sleeps a fixed
0.1 s between sweeps (``vce_api.add_messages_to_queue``). With client work of a few
milliseconds, that sleep, not the training, sets the pace of every round. :func:`install`
replaces the loop with the same loop sleeping ``interval`` seconds instead, and touches
nothing else. The replacement is installed only when the engine module has the expected
function; otherwise Flower's own loop stays (and a warning says so).
"""

from __future__ import annotations

import inspect
import threading
import warnings
from queue import Queue
from typing import Any

_EXPECTED = ["state", "queue", "nodes_mapping", "f_stop"]


def install(interval: float) -> bool:
    """Make the engine sweep for new messages every ``interval`` seconds; True if installed."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "_fedunlearn_original", vce_api.add_messages_to_queue)
    if list(inspect.signature(original).parameters) != _EXPECTED:
        warnings.warn("unexpected Flower engine internals; keeping its 0.1 s dispatch loop",
                      stacklevel=2)
        return False

    def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int],
                              f_stop: threading.Event) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    vce_api._fedunlearn_original = original  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
