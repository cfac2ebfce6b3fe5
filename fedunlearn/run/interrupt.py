"""Clean interruption: Ctrl-C (SIGINT) or SIGTERM ends a run within a bounded time.

The first signal sets :data:`STOP`. The run checks it at every round boundary (after the
round is committed to the history store) and raises :class:`Interrupted`, which unwinds
through Flower's ServerApp so the engine shuts Ray down as after a normal run. If the run has
not ended ``grace_s`` seconds after the signal (a client mid-way through a long local epoch),
the watchdog forces the stop: it sets :data:`FORCED` (the driver's waits for clients then raise
:class:`Interrupted` at once) and calls what the run registered with :func:`on_force` (the
engine stops its own Ray's worker processes, so a call blocked on one of them fails). The run
then raises :class:`Interrupted` as after a clean stop; the process is never ended here. If
even that has not ended the run :data:`ESCALATE_S` seconds later, or on a second signal,
``KeyboardInterrupt`` is raised in the main thread, which :func:`stoppable` turns into
:class:`Interrupted` after printing ``farewell()`` (where the partial run is). The history
store stays consistent either way: every file it holds is written atomically, and a round is
listed in its manifest only once all its files are on disk.

No process other than the run's own Ray processes is ever signalled.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STOP = threading.Event()
FORCED = threading.Event()
"""Set when a stop is forced (grace period over, or a second signal): waits on clients raise
:class:`Interrupted` at once instead of waiting for the round to end."""
EXIT_CODE = 130  # the shell's code for a run ended by SIGINT
ESCALATE_S = 10.0
"""Seconds after a forced stop before ``KeyboardInterrupt`` is raised in the main thread."""


class Interrupted(Exception):
    """The run was asked to stop (SIGINT or SIGTERM)."""


def check() -> None:
    """Raise :class:`Interrupted` once a stop was requested (call at round boundaries)."""
    if STOP.is_set():
        raise Interrupted(_signal_name[0] or "stop requested")


def forced() -> bool:
    """True once a stop is being forced (see :data:`FORCED`)."""
    return FORCED.is_set()


_signal_name: list[str | None] = [None]
_forcers: list[Callable[[], object]] = []
_forcers_lock = threading.Lock()


@contextmanager
def on_force(stop: Callable[[], object] | None) -> Iterator[None]:
    """Within the block, a forced stop also calls ``stop()`` (bounded; its errors are ignored):
    the engine registers the stop of its own Ray's worker processes here."""
    if stop is None:
        yield
        return
    with _forcers_lock:
        _forcers.append(stop)
    try:
        if FORCED.is_set():  # forced before the block began: act at once
            _call(stop)
        yield
    finally:
        with _forcers_lock:
            if stop in _forcers:
                _forcers.remove(stop)


def _call(stop: Callable[[], object]) -> None:
    try:
        stop()
    except Exception as exc:  # noqa: BLE001 - a failed stop must not hide the interruption
        print(f"[stop] could not stop the run's processes: {exc}", file=sys.stderr, flush=True)


def force() -> None:
    """Force the stop: set :data:`FORCED` and call what :func:`on_force` registered."""
    FORCED.set()
    with _forcers_lock:
        stops = list(_forcers)
    for stop in stops:
        _call(stop)


def descendants(*pids: int) -> list[int]:
    """Every process below ``pids`` (default: this one), read from ``/proc`` once (Linux).
    For observation (tests, benchmarks): nothing here signals them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = list(pids) or [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


_raise_now = threading.Event()


def raise_in_main() -> None:
    """Raise ``KeyboardInterrupt`` in the main thread at its next Python instruction (a wait
    there is interrupted), through the Python handler of the run's signal (SIGINT outside a
    run): a no-op when that signal is ignored or left to the system's default action, so the
    process is never ended here."""
    _raise_now.set()
    _thread.interrupt_main(_watched[0] if _active[0] is not None and _watched
                           else signal.SIGINT)


@contextmanager
def stoppable(farewell: Callable[[], str], *, grace_s: float = 8.0) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM request a clean stop (see the module docstring).

    ``farewell()`` gives the last line printed when the stop had to be forced all the way to a
    ``KeyboardInterrupt``: where the partial run is and how to resume it (after a clean or a
    forced stop the run says so itself). Outside the main thread this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()

    def watchdog() -> None:
        if done.wait(grace_s):
            return
        force()
        if not done.wait(ESCALATE_S):
            raise_in_main()

    def handler(signum: int, frame: object) -> None:
        if _raise_now.is_set():  # raise_in_main: a wait that nothing else ended
            _raise_now.clear()
            raise KeyboardInterrupt
        if STOP.is_set():  # a second signal: stop at once
            force()
            raise KeyboardInterrupt
        _signal_name[0] = signal.Signals(signum).name
        STOP.set()
        print(f"\n[stop] {_signal_name[0]}: ending after the current round (at most "
              f"{grace_s:g} s; press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        threading.Thread(target=watchdog, daemon=True, name="fedunlearn-stop-watchdog").start()

    # a signal ignored on entry (SIGINT in a background job, `cmd &`) stays ignored
    ignored = [s for s in (signal.SIGINT, signal.SIGTERM)
               if signal.getsignal(s) is signal.SIG_IGN]
    watched = [s for s in (signal.SIGINT, signal.SIGTERM) if s not in ignored]
    _raise_now.clear()
    previous = {s: signal.signal(s, handler) for s in watched}
    _active[0] = handler
    _watched[:], _ignored[:] = watched, ignored
    try:
        yield
    except KeyboardInterrupt:
        if not (STOP.is_set() or FORCED.is_set()):
            raise
        print(f"\n{farewell()}", file=sys.stderr, flush=True)
        raise Interrupted(_signal_name[0] or "stop forced") from None
    finally:
        done.set()
        _active[0] = None
        for s, h in previous.items():
            signal.signal(s, h)


_active: list[Callable[[int, object], None] | None] = [None]
_watched: list[signal.Signals] = []
_ignored: list[signal.Signals] = []


def reclaim() -> None:
    """Install the active run's handler again for SIGINT and SIGTERM (those it watches; a
    signal ignored when the run began is ignored again).

    ``ray.init`` installs Ray's own (native) SIGTERM handler in the driver, which aborts the
    process with a stack dump instead of stopping the run cleanly; call this after it.
    """
    handler = _active[0]
    if handler is not None and threading.current_thread() is threading.main_thread():
        for s in _watched:
            signal.signal(s, handler)
        for s in _ignored:
            signal.signal(s, signal.SIG_IGN)


def reset() -> None:
    """Clear a stop request (a new run in the same process)."""
    STOP.clear()
    FORCED.clear()
    _raise_now.clear()
    _signal_name[0] = None


def wait_gone(pids: list[int], timeout_s: float = 5.0) -> bool:
    """True once none of ``pids`` runs (a zombie, killed but not yet reaped, is gone); used by
    tests."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not any(_running(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False
