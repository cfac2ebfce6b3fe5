"""Process control limited to what a run started: its own local Ray.

A process is named by its pid **and** its start time (field 22 of ``/proc/<pid>/stat``, clock
ticks after boot): :class:`Proc`. A signal is only ever sent to a :class:`Proc` whose start time
still matches (through a pidfd where the kernel has them, so a pid reused between the check and
the signal cannot be hit), so a recycled pid is never signalled.

:class:`LocalRay` follows the processes one local ``ray.init`` creates: the children of this
process that appear while Ray starts and run Ray's own code (its GCS, raylet, autoscaler
monitor, dashboard head and log monitor: the *heads*) and every process below them (the raylet's
agents and workers). It keeps a small record of them (driver pid and start time, each process's
pid and start time) in a fedunlearn-owned registry directory, refreshed while Ray runs, and can
stop them (SIGTERM, a bounded wait, then SIGKILL): all of them, or only those below the heads.
A user's own child processes are never among them.

After a ``kill -9`` of a driver its record stays behind; :func:`sweep` (called before every
local Ray start) stops the recorded processes of every record whose driver is gone and removes
the record. A live driver's record is never acted on, nor any process missing from a record.

Linux only (``/proc``); elsewhere nothing is recorded and nothing is stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REGISTRY_ENV = "FEDUNLEARN_RAY_REGISTRY"
"""Overrides the registry directory (default ``<system temp>/fedunlearn-ray-<uid>``)."""
RECORD_FORMAT = 1
TERM_WAIT_S = 1.0
"""How long a stop waits after SIGTERM before SIGKILL (Ray's agents ignore SIGTERM)."""
KILL_WAIT_S = 2.0
"""How long a stop waits for SIGKILLed processes to be gone."""
_POLL_S = 0.05


def _stat(pid: int) -> tuple[int, str, int] | None:
    """``(ppid, state, start)`` of ``pid``, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), fields[0].decode(), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (arguments joined by spaces; empty if gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass(frozen=True, order=True)
class Proc:
    """A process: pid and start time (a pid alone may since name another process)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        st = _stat(pid)
        return None if st is None else cls(pid, st[2])

    def alive(self) -> bool:
        """Still this process and not a zombie (a killed child not yet reaped is gone)."""
        st = _stat(self.pid)
        return st is not None and st[2] == self.start and st[1] not in ("Z", "X")

    def send(self, sig: int) -> bool:
        """Send ``sig`` if this is still the same process; True if it was sent."""
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # gone, or no pidfds (old kernel)
            fd = None
            if not self.alive():
                return False
        try:
            if fd is not None and not self.alive():  # the fd pins the process checked here
                return False
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(self.pid, sig)
            return True
        except OSError:
            return False
        finally:
            if fd is not None:
                os.close(fd)

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}


def table() -> dict[int, tuple[int, str, int]]:
    """``pid -> (ppid, state, start)`` for every process, read from ``/proc`` once."""
    out: dict[int, tuple[int, str, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def children(pid: int, tab: dict[int, tuple[int, str, int]] | None = None) -> set[Proc]:
    """The live children of ``pid``."""
    tab = table() if tab is None else tab
    return {Proc(p, st[2]) for p, st in tab.items() if st[0] == pid and st[1] not in "ZX"}


def descendants(roots: Iterable[Proc], tab: dict[int, tuple[int, str, int]] | None = None
                ) -> set[Proc]:
    """The live processes below ``roots`` (roots whose start time no longer matches have no
    descendants here)."""
    tab = table() if tab is None else tab
    kids: dict[int, list[int]] = {}
    for p, st in tab.items():
        kids.setdefault(st[0], []).append(p)
    out: set[Proc] = set()
    todo = [r.pid for r in roots if r.pid in tab and tab[r.pid][2] == r.start]
    while todo:
        for child in kids.get(todo.pop(), []):
            _, state, start = tab[child]
            if state not in "ZX":
                out.add(Proc(child, start))
            todo.append(child)
    return out


def wait_gone(procs: Iterable[Proc], timeout_s: float) -> list[Proc]:
    """Wait up to ``timeout_s`` for ``procs`` to be gone; return those still alive."""
    left = [p for p in procs if p.alive()]
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        left = [p for p in left if p.alive()]
    return left


def stop(procs: Iterable[Proc], *, term_wait_s: float = TERM_WAIT_S,
         kill_wait_s: float = KILL_WAIT_S) -> list[Proc]:
    """SIGTERM ``procs``, wait up to ``term_wait_s`` for them to end, SIGKILL the rest and wait
    up to ``kill_wait_s``; return those still alive (bounded: never waits longer)."""
    left = [p for p in set(procs) if p.send(signal.SIGTERM)]
    left = wait_gone(left, term_wait_s)
    left = [p for p in left if p.send(signal.SIGKILL)]
    return wait_gone(left, kill_wait_s)


def registry() -> Path | None:
    """The directory holding the records (created, private to this user), or None when it
    cannot be used."""
    where = os.environ.get(REGISTRY_ENV) or os.path.join(
        tempfile.gettempdir(), f"fedunlearn-ray-{os.getuid()}")
    path = Path(where)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.getuid():
            log.warning("fedunlearn: the Ray process registry %s belongs to another user; "
                        "not used", path)
            return None
    except OSError as exc:
        log.warning("fedunlearn: cannot use the Ray process registry %s (%s)", path, exc)
        return None
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _procs(value: Any) -> list[Proc]:
    if not isinstance(value, list):
        raise TypeError("'processes' is not a list")
    return [_proc(v) for v in value]


def _proc(value: Any) -> Proc:
    if not (isinstance(value, dict) and isinstance(value.get("pid"), int)
            and isinstance(value.get("start"), int) and value["pid"] > 0
            and value["start"] >= 0):
        raise TypeError(f"not a process: {value!r}")
    return Proc(value["pid"], value["start"])


def read_record(path: Path) -> tuple[Proc, list[Proc]]:
    """``(driver, processes)`` of a record; raises OSError, ValueError (not JSON) or TypeError
    (not a record) when unreadable."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise TypeError("not a fedunlearn Ray record")
    return _proc(data.get("driver")), _procs(data.get("processes"))


def sweep(where: Path | None = None) -> list[Proc]:
    """Stop the recorded processes of every record whose driver is gone (a driver killed with
    ``kill -9``) and remove those records; return the processes that were still running.

    A record whose driver still runs is left alone; a malformed one is skipped with a warning;
    a process that no longer matches its recorded start time is not touched."""
    where = registry() if where is None else where
    if where is None:
        return []
    stopped: list[Proc] = []
    for path in sorted(where.glob("*.json")):
        try:
            driver, procs = read_record(path)
        except FileNotFoundError:  # removed meanwhile by its own driver
            continue
        except (OSError, ValueError, TypeError) as exc:
            log.warning("fedunlearn: skipping the malformed Ray process record %s (%s)",
                        path, exc)
            continue
        if driver.alive():
            continue
        running = [p for p in procs if p.alive() and p != driver]
        left = stop(running)
        stopped += running
        if left:
            log.warning("fedunlearn: %d processes of a previous run (record %s) could not be "
                        "stopped: %s", len(left), path, ", ".join(str(p.pid) for p in left))
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("fedunlearn: cannot remove the Ray process record %s (%s)", path, exc)
    if stopped:
        log.warning("fedunlearn: stopped %d Ray processes left behind by a run whose driver had "
                    "been killed", len(stopped))
    return stopped


class LocalRay:
    """The processes of this driver's own local Ray start, recorded and stoppable.

    Create it just before ``ray.init``; :meth:`refresh` (called while Ray starts and then
    periodically) adopts the new children of this process whose command line mentions
    ``marker`` (Ray's package directory) as heads, and follows everything below them.
    Processes that were children of this process before are never adopted.
    """

    def __init__(self, marker: str, where: Path | None = None) -> None:
        self.marker = marker
        self.driver = Proc.of(os.getpid()) or Proc(os.getpid(), 0)
        self._before = children(self.driver.pid)
        self._heads: set[Proc] = set()
        self._members: set[Proc] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._written: frozenset[Proc] | None = None
        self._warned = False
        where = registry() if where is None else where
        self.record = (None if where is None else
                       where / f"{self.driver.pid}-{self.driver.start}-{uuid.uuid4().hex[:8]}"
                               ".json")
        self._write()

    @property
    def heads(self) -> set[Proc]:
        with self._lock:
            return set(self._heads)

    def members(self) -> set[Proc]:
        """Every process of this Ray seen so far that still runs."""
        with self._lock:
            return {p for p in self._members if p.alive()}

    def refresh(self) -> set[Proc]:
        """Adopt new heads and their descendants; update the record if the set changed."""
        tab = table()
        with self._lock:
            if self._closed:
                return set()
            for p in children(self.driver.pid, tab) - self._before - self._heads:
                if self.marker in cmdline(p.pid):
                    self._heads.add(p)
            self._members |= self._heads | descendants(self._heads | self._members, tab)
            self._members = {p for p in self._members
                             if p.pid in tab and tab[p.pid][2] == p.start
                             and tab[p.pid][1] not in "ZX"}
            self._write()
            return set(self._members)

    def _write(self) -> None:
        """Write the record (caller holds the lock, or during __init__)."""
        if self.record is None or self._written == frozenset(self._members):
            return
        try:
            _write_json(self.record, {"format": RECORD_FORMAT, "driver": self.driver.to_json(),
                                      "processes": [p.to_json() for p in sorted(self._members)],
                                      "written": time.time()})
            self._written = frozenset(self._members)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("fedunlearn: cannot write the Ray process record %s (%s); a run "
                            "killed with kill -9 may leave Ray processes behind", self.record,
                            exc)

    def stop_workers(self) -> list[Proc]:
        """Stop the processes below the heads (the raylet's workers and agents): every call
        the driver is blocked in on a Ray actor then fails, while the GCS stays up for the
        driver's own shutdown. Returns those that could not be stopped."""
        members = self.refresh()
        return stop(members - self.heads)

    def stop(self) -> list[Proc]:
        """Stop every process of this Ray still running and, once none is left, remove the
        record and stop following. Returns those that could not be stopped."""
        members = self.refresh()
        left = stop(members)
        with self._lock:
            self._members = set(left)
            if left:
                self._write()
                return left
            self._closed = True
            if self.record is not None:
                try:
                    self.record.unlink()
                except OSError:
                    pass
        return []
