"""One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.fedunlearn.lock``.

A run (``fedunlearn run``/``compare``, :func:`fedunlearn.run.pipeline.run_experiment`) and
``fedunlearn resume`` hold this lock from before they write anything until they end, however
they end. A second writer is refused at once with one line naming the holder (pid, host, since
when), before it writes anything: :class:`RunDirLocked`.

The lock is the kernel's (``fcntl.flock`` on the open file), so it is released when its holder
exits, even by SIGKILL; the file's content only tells others who holds it. A lock file whose
lock is free but which still names a process was left by a holder that did not end cleanly
(killed): it is taken over with a one-line note on stderr. A holder that ends cleanly removes
the file; one that ends by an exception puts back what the file held before (a refused
``resume`` of a killed run leaves the directory as it found it), and a directory the lock itself
created is removed again when nothing but the lock file was written into it.

Taking the lock again in the process that holds it is a no-op (the CLI takes it, then
``run_experiment`` does): ``flock`` locks belong to an open file, and a second open file of the
same process would be refused. Imports nothing of the project.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

LOCK_FILE = ".fedunlearn.lock"
"""The lock file's name inside a run directory (preflight ignores it in an empty ``--out``)."""

_HELD: dict[str, int] = {}  # resolved run directory -> nesting depth, in this process
_HELD_GUARD = threading.Lock()


class RunDirLocked(RuntimeError):
    """Another live process writes into the run directory; the message is one line."""


def holder_of(run_dir: Path) -> dict[str, Any] | None:
    """What ``run_dir``'s lock file says about its holder (``pid``, ``host``, ``since``,
    ``command``), or ``None`` if there is no lock file or it names nobody."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return _parse(text)


def _parse(text: str) -> dict[str, Any] | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None
    return info


def describe_holder(info: dict[str, Any] | None) -> str:
    """``process 1234 on host h (fedunlearn run, since 2026-12-07 10:00:03 UTC)``.

    >>> describe_holder({"pid": 7, "host": "h", "since": "2026-12-07T10:00:03Z",
    ...                  "command": "run"})
    'process 7 on host h (fedunlearn run, since 2026-12-07 10:00:03 UTC)'
    >>> describe_holder(None)
    'another process (it has not recorded its id yet)'
    """
    if info is None:
        return "another process (it has not recorded its id yet)"
    since = str(info.get("since", "?")).replace("T", " ").replace("Z", " UTC")
    command = f"fedunlearn {info['command']}, " if info.get("command") else ""
    return f"process {info['pid']} on host {info.get('host', '?')} ({command}since {since})"


def _refusal(run_dir: Path, info: dict[str, Any] | None, command: str) -> str:
    pid = info["pid"] if info is not None else None
    stop = f"stop it (kill {pid})" if pid is not None else "stop it"
    then = (f"then `fedunlearn resume {run_dir}` if it was interrupted"
            if command == "resume" else "or choose another --out")
    return (f"run directory '{run_dir}' is being written by {describe_holder(info)}; nothing "
            f"was written - wait for it to end or {stop}, {then}")


def refuse_if_live(run_dir: Path, command: str = "run") -> None:
    """Raise :class:`RunDirLocked` if a live process holds ``run_dir``'s lock; write nothing
    (for a check that refuses the directory anyway, e.g. a new run into a non-empty one). The
    probe holds the free lock for an instant: a writer starting in that instant is refused."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return  # no lock file (or not one we may read): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunDirLocked(_refusal(Path(run_dir), _holder_soon(path), command)) from None
    finally:
        os.close(fd)


def _open_locked(path: Path, *, run_dir: Path, command: str) -> tuple[int, bytes]:
    """Open ``path`` (created if missing) and take its flock without waiting; return the
    descriptor and what the file held. The file may be replaced between open and flock (a
    holder removing it as it ends): then it is opened again."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLocked(_refusal(run_dir, _holder_soon(path), command)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with os.fdopen(os.dup(fd), "rb") as fh:
                return fd, fh.read()
        os.close(fd)  # we locked a file its holder had just removed: open the new one
    raise RunDirLocked(f"the lock file '{path}' keeps being replaced; another process is "
                       "taking it - wait for it to end")


def _holder_soon(path: Path) -> dict[str, Any] | None:
    """The holder's record; a holder that has just taken the lock writes it within moments."""
    for _ in range(10):
        try:
            info = _parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            info = None
        if info is not None:
            return info
        time.sleep(0.05)
    return None


def _write(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _new_dirs(run_dir: Path) -> list[Path]:
    """The directories that creating ``run_dir`` would create, innermost first."""
    created = []
    d = run_dir
    while not d.exists() and d != d.parent:
        created.append(d)
        d = d.parent
    return created


@contextmanager
def run_dir_lock(run_dir: Path, *, command: str = "run", create: bool = True,
                 stream: TextIO | None = None) -> Iterator[None]:
    """Hold ``run_dir``'s writer lock for the ``with`` block.

    Parameters
    ----------
    run_dir : Path
    command : str
        What the holder is (``run``, ``compare``, ``resume``): recorded for others' messages,
        and ``resume`` words the refusal for a resume (default ``"run"``).
    create : bool
        Create ``run_dir`` (and its parents) when missing (default true); those directories
        are removed again on exit if nothing but the lock file was written into them.
    stream : text stream, optional
        Where the note about a taken-over lock goes (default ``sys.stderr``).

    Raises
    ------
    RunDirLocked
        If another live process holds the lock (at once, without waiting).
    """
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    with _HELD_GUARD:
        if key in _HELD:  # this process holds it already
            _HELD[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    created = _new_dirs(run_dir) if create else []
    if created:
        run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        fd, before = _open_locked(path, run_dir=run_dir, command=command)
    except BaseException:
        _remove_empty(created, path, remove_lock=False)
        raise
    stale = _parse(before.decode("utf-8", "replace")) if before else None
    if stale is not None and stale.get("pid") != os.getpid():
        since = str(stale.get("since", "?")).replace("T", " ").replace("Z", " UTC")
        print(f"fedunlearn: note: took over the lock of process {stale['pid']}, which is no "
              f"longer running (it had held '{run_dir}' on host {stale.get('host', '?')} since "
              f"{since})", file=stream or sys.stderr, flush=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command}
    with _HELD_GUARD:
        _HELD[key] = 1
    ok = False
    try:
        _write(fd, (json.dumps(me) + "\n").encode())
        yield
        ok = True
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        try:
            if ok or not before:  # ended cleanly, or there was no lock file before
                os.unlink(path)
            else:  # refused or failed: the directory as it was found
                _write(fd, before)
        except OSError:
            pass  # the directory went away or read-only: the kernel lock goes with the fd
        finally:
            os.close(fd)
        _remove_empty(created, path, remove_lock=True)


def _remove_empty(created: list[Path], lock: Path, *, remove_lock: bool) -> None:
    """Remove the directories this lock created if nothing else was written into them."""
    for d in created:  # innermost first
        try:
            if remove_lock and [p.name for p in d.iterdir()] == [LOCK_FILE]:
                lock.unlink()
            d.rmdir()
        except OSError:
            return
