"""``engine.fast_dispatch``: a faster message sweep for Flower's Simulation Engine (flwr 1.41).

The engine hands messages from its link state to the Ray actors in a loop
(``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the link state for the next
message of **each node in turn**. Each of those asks scans every message in flight
(``InMemoryLinkState.get_message_ins``), so a sweep costs nodes × messages in flight, under the
state's lock and the driver's GIL:

- with client work of a few milliseconds, the 0.1 s sleep, not the training, sets the pace of
  every round (10 clients);
- at 1,000 nodes, node discovery puts 1,000 messages in flight: one sweep is a million checks,
  seconds of driver CPU while the actors wait, and each training round of 100 messages pays
  100,000 per sweep.

:func:`install` (``engine.fast_dispatch = true``, the default) replaces that loop with one that
sweeps every ``engine.dispatch_interval`` seconds and collects the undelivered messages of all
nodes in **one pass** over the messages in flight, applying the same checks (expiry,
federation: ``_check_stored_messages``) and marking them delivered exactly as
``get_message_ins`` does. It also makes the engine's queues (:class:`PromptQueue`) wait at most
``dispatch_interval`` per ``get``: the engine's worker threads wait 1 s on them between checks
of its stop event, so every run ended up to a second after its ServerApp had finished.
Nothing else changes. Measured effects are in ``docs/benchmarks.md`` (*Engine benchmark*),
``benchmarks/scale.json`` (``scripts/bench_scale.py --parts dispatch``) and
``docs/engine.md``.

The patch is written against flwr 1.41 and relies on its internals (the loop's signature, the
in-memory link state's ``lock``, ``message_ins_store`` and ``_check_stored_messages``):

- under another flwr release (:data:`SUPPORTED_FLWR`) it is not installed: Flower's own loop
  stays, with one warning;
- on an engine whose loop has another signature, likewise;
- on a link state without those internals it falls back to the per-node public call.

``fast_dispatch = false`` restores Flower's loop, untouched. Only ``vce_api`` module attributes
are replaced (``add_messages_to_queue``, ``Queue``), and only while the option is on.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import threading
import time
import warnings
from queue import Queue
from typing import Any, ClassVar

SUPPORTED_FLWR = "1.41."
"""The flwr release series the patch is written against (a version prefix)."""
_EXPECTED = ["state", "queue", "nodes_mapping", "f_stop"]


def flwr_version() -> str:
    """The installed flwr version ("" if unknown)."""
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return ""


def supported(version: str | None = None) -> bool:
    """True if the patch is written for ``version`` (default: the installed flwr)."""
    return (flwr_version() if version is None else version).startswith(SUPPORTED_FLWR)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
_INTERNALS = ("lock", "message_ins_store", "_check_stored_messages")


def undelivered(state: Any, nodes: dict[int, int]) -> list[Any]:
    """Every message in flight to one of ``nodes`` not yet handed out, in the order pushed,
    marked delivered (``get_message_ins`` of every node at once, with ``limit=None``)."""
    from flwr.supercore.date import now

    if not all(hasattr(state, a) for a in _INTERNALS):
        return [m for n in nodes for m in state.get_message_ins(node_id=n, limit=None)]
    with state.lock:
        ids = [mid for mid, m in state.message_ins_store.items()
               if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes]
        if not ids:
            return []
        state._check_stored_messages(set(ids))  # drops expired ones, as get_message_ins does
        found = [m for mid in ids if (m := state.message_ins_store.get(mid)) is not None]
        stamp = now().isoformat()
        for m in found:
            m.metadata.delivered_at = stamp
    return found


PUSHED = threading.Event()
"""Set by the server right after it pushes messages (:class:`~fedunlearn.engine.flower.
PacedGrid`): the fast sweep then runs at once instead of at its next interval (on average half
an interval, 10 ms at the default, was lost at the start of every exchange)."""
STORED = threading.Event()
"""Set when the engine stores a reply in the link state (:func:`notify_replies`, installed by
the fast sweep): the server's next poll for replies runs at once instead of after
``pull_interval``."""


STOP_CHECK_S = 0.1
"""The engine's threads look at its stop event at least this often, whatever
``dispatch_interval`` is (a Ctrl-C then ends the engine within a fraction of a second)."""


def pause(interval: float, f_stop: threading.Event) -> None:
    """Wait ``interval`` seconds, or less: until a push (:data:`PUSHED`) or the engine's stop
    (``f_stop``, looked at every :data:`STOP_CHECK_S`)."""
    end = time.monotonic() + interval
    while not f_stop.is_set():
        left = end - time.monotonic()
        if left <= 0 or PUSHED.wait(min(left, STOP_CHECK_S)):
            return


def notify_replies(state: Any) -> bool:
    """Make ``state.store_message_res`` set :data:`STORED` after storing (once per state);
    False if the state has no such method or does not take the wrapper."""
    store = getattr(state, "store_message_res", None)
    if store is None or getattr(state, "_fedunlearn_notifies", False):
        return store is not None

    def store_message_res(*args: Any, **kwargs: Any) -> Any:
        try:
            return store(*args, **kwargs)
        finally:
            STORED.set()

    try:
        state.store_message_res = store_message_res
        state._fedunlearn_notifies = True
    except AttributeError:  # a state with __slots__: polling alone finds the replies
        return False
    return True


class PromptQueue(Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` whose timed ``get`` waits at most :attr:`max_wait` seconds (Flower's
    engine loops ``while not f_stop.is_set(): queue.get(timeout=1.0)``; an early ``Empty`` only
    makes the loop look at its stop event sooner)."""

    max_wait: ClassVar[float] = 0.02

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block and timeout is not None:
            timeout = min(timeout, self.max_wait)
        return super().get(block, timeout)


def install(interval: float, *, enabled: bool = True) -> bool:
    """Sweep for new messages every ``interval`` seconds in one pass over the messages in
    flight (``enabled``), or restore Flower's own loop (``enabled=False``); True if the fast
    loop is in place."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "_fedunlearn_original", vce_api.add_messages_to_queue)
    if not enabled:
        vce_api.add_messages_to_queue = original
        vce_api.Queue = Queue
        return False
    if not supported():
        vce_api.add_messages_to_queue = original
        vce_api.Queue = Queue
        _warn_once(f"engine.fast_dispatch is written for flwr {SUPPORTED_FLWR}x, not the "
                   f"installed {flwr_version() or 'unknown version'}; keeping Flower's own "
                   "dispatch loop (the option has no effect)")
        return False
    if list(inspect.signature(original).parameters) != _EXPECTED:
        _warn_once("unexpected Flower engine internals; keeping its 0.1 s dispatch loop "
                   "(engine.fast_dispatch has no effect)")
        return False

    def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int],
                              f_stop: threading.Event) -> None:
        notify_replies(state)
        while not f_stop.is_set():
            for msg in undelivered(state, nodes_mapping):
                queue.put(msg)
            pause(interval, f_stop)  # a push ends the pause: the next sweep runs at once
            PUSHED.clear()  # cleared before that sweep, so no push is missed

    vce_api._fedunlearn_original = original  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
    PromptQueue.max_wait = min(interval, STOP_CHECK_S)
    vce_api.Queue = PromptQueue  # the queues run_api creates for its threads
    return True
