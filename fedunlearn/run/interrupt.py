"""Clean interruption: Ctrl-C (SIGINT) or SIGTERM ends a run within a bounded time.

The first signal sets :data:`STOP`. The run checks it at every round boundary (after the
round is committed to the history store) and raises :class:`Interrupted`, which unwinds
through Flower's ServerApp so the engine shuts Ray down as after a normal run. If the run has
not ended ``grace_s`` seconds after the signal (a client mid-way through a long local epoch),
or on a second signal, the watchdog stops every process the run started (Ray's head, raylet
and workers are descendants of this process), prints where the partial run is and exits with
code 130. The history store stays consistent either way: every file it holds is written
atomically, and a round is listed in its manifest only once all its files are on disk.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STOP = threading.Event()
EXIT_CODE = 130  # the shell's code for a run ended by SIGINT


class Interrupted(Exception):
    """The run was asked to stop (SIGINT or SIGTERM)."""


def check() -> None:
    """Raise :class:`Interrupted` once a stop was requested (call at round boundaries)."""
    if STOP.is_set():
        raise Interrupted(_signal_name[0] or "stop requested")


_signal_name: list[str | None] = [None]


def descendants(*pids: int) -> list[int]:
    """Every process below ``pids`` (default: this one), read from ``/proc`` once (Linux)."""
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


def kill_pids(pids: list[int]) -> int:
    """SIGKILL each of ``pids`` (gone ones are skipped); returns how many were signalled."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


def kill_descendants() -> int:
    """SIGKILL every descendant process (Ray's); returns how many were signalled."""
    return kill_pids(descendants())


@contextmanager
def stoppable(farewell: Callable[[], str], *, grace_s: float = 8.0) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM request a clean stop (see the module docstring).

    ``farewell()`` gives the last line printed when the watchdog has to end the process: where
    the partial run is and how to resume it. Outside the main thread this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()

    def force() -> None:
        kill_descendants()
        print(f"\n{farewell()}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def watchdog() -> None:
        if not done.wait(grace_s):
            force()

    def handler(signum: int, frame: object) -> None:
        if STOP.is_set():  # a second signal: stop at once
            force()
        _signal_name[0] = signal.Signals(signum).name
        STOP.set()
        print(f"\n[stop] {_signal_name[0]}: ending after the current round (at most "
              f"{grace_s:g} s; press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        threading.Thread(target=watchdog, daemon=True).start()

    # a signal ignored on entry (SIGINT in a background job, `cmd &`) stays ignored
    ignored = [s for s in (signal.SIGINT, signal.SIGTERM)
               if signal.getsignal(s) is signal.SIG_IGN]
    watched = [s for s in (signal.SIGINT, signal.SIGTERM) if s not in ignored]
    previous = {s: signal.signal(s, handler) for s in watched}
    _active[0] = handler
    _watched[:], _ignored[:] = watched, ignored
    try:
        yield
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
    _signal_name[0] = None


def wait_gone(pids: list[int], timeout_s: float = 5.0) -> bool:
    """True once none of ``pids`` exists (used by tests and the bounded shutdown)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.05)
    return False
