"""Ray start-up failures end the call in bounded time with one line, leaving no Ray process.

Ray's own start-up gives up after a fixed 30 s (under a file-size limit, for instance), with
tracebacks from every layer; a start still waiting after ``engine.startup_timeout_s`` is
abandoned: :func:`start_ray` raises at once and the start stops its own processes when Ray's
``ray.init`` returns (:class:`fedunlearn.engine.flower.RayStart`). Checked in a subprocess
(under the limit), which lives on after the failure, lists the processes it started and ends
as the command line does, without waiting for Ray to give up. A
start past a tiny ``engine.startup_timeout_s`` without any limit is checked in
``test_process_control.py`` (in process, with the caller's own child process alive).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import os, sys, time
    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.flower import EngineStartError, start_ray
    from fedunlearn.engine.processes import Proc
    from fedunlearn.run import interrupt
    cfg = load_config("simulations/quickstart.toml", [])
    t0 = time.monotonic()
    try:
        start_ray(cfg, timeout_s=float(sys.argv[1]))
        print("STARTED")
    except EngineStartError as exc:
        print("ERROR", exc)
    print("RETURNED_AFTER", round(time.monotonic() - t0, 1))
    # what this process started, read from /proc (not from the run's record)
    mine = [p for p in map(Proc.of, interrupt.descendants()) if p is not None]
    print("STARTED_PIDS", " ".join(f"{p.pid}:{p.start}" for p in mine), flush=True)
    os._exit(0)  # as the command line ends, without waiting for Ray to give up
''')


def _one_line_and_nothing_left(run: subprocess.CompletedProcess, reason: str,
                               limit: float) -> None:
    """start_ray raised within about ``limit`` seconds (the caller prints the line) and the
    process lived on; once it has ended, nothing its abandoned start left remains after what the
    next start does first (the sweep; tests/engine/test_process_control.py shows the sweep
    stopping what a killed driver left, which here also ends by itself)."""
    from fedunlearn.engine import processes

    out = run.stdout.strip().splitlines()
    assert run.returncode == 0 and out, run.stderr[-2000:]
    assert out[0].startswith(f"ERROR Ray could not start ({reason}"), out
    assert "ulimit -f" in out[0], out
    returned = float(out[1].split()[1])
    assert returned < limit + 10, f"start_ray took {returned} s to give up (limit {limit} s)"
    started = [tuple(map(int, item.split(":"))) for item in out[2].split()[1:]]
    assert started, "the start left no process: the test proves nothing"
    processes.sweep()  # what the next run's start does first
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (left := [pid for pid, start in started
                                                    if _alive(pid, start)]):
        time.sleep(0.1)
    assert not left, f"processes of the abandoned start survived: {left}"


def _alive(pid: int, start: int) -> bool:
    """The process ``pid`` started at ``start`` still runs (a zombie is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z" and int(stat[19]) == start


@pytest.mark.flower
def test_a_ray_failing_under_a_file_size_limit_is_one_line():
    script = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024,) * 2)\n"
    # Ray's own start gives up after a fixed 30 s here; engine.startup_timeout_s = 4 returns
    # control sooner: one line, and the next start stops what the abandoned one left
    run = subprocess.run([sys.executable, "-c", script + SCRIPT, "4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, check=False)
    _one_line_and_nothing_left(run, "", 4)
