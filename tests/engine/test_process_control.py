"""A run signals no process it did not start, and the next run stops what a killed one left.

Through the Python API (``fedunlearn.cli.main``, in this very process: a process exit would end
pytest), with an unrelated child process of the caller running all along: a normal run and a
run whose Ray start times out both return, the child lives on, and nothing the runs started is
left. A driver killed with SIGKILL mid-run leaves Ray's agents behind (parent 1, SIGTERM
ignored); the next run's start stops them. What is left is checked from ``/proc`` here (the
killed driver's descendants collected before the kill, and every process mentioning its Ray
session), independently of the engine's own records.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedunlearn import cli
from fedunlearn.engine import flower

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "simulations/quickstart.toml")
SMALL = ["experiment.seeds=[0]", "data.num_clients=2", "training.rounds=1",
         "training.local_epochs=1", 'data.partition="iid"', "unlearning.requests=[]",
         "verification.mia_shadows=0", "engine.ray_num_cpus=1"]


def _args(out: Path, *settings: str) -> list[str]:
    return ["run", CONFIG, "--out", str(out), *(a for s in (*SMALL, *settings)
                                                  for a in ("--set", s))]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) from /proc, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        return int(fields[1]), fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(proc: tuple[int, int]) -> bool:
    st = _stat(proc[0])
    return st is not None and st[2] == proc[1] and st[1] not in ("Z", "X")


def _tree(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live process below ``root``."""
    table = {int(p): st for p in os.listdir("/proc") if p.isdigit()
             and (st := _stat(int(p))) is not None}
    out, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, state, start) in table.items():
            if ppid == parent:
                todo.append(pid)
                if state not in ("Z", "X"):
                    out.add((pid, start))
    return out


def _still_alive(procs: set[tuple[int, int]], timeout_s: float = 5.0) -> set[tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in procs if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _mentioning(text: str) -> set[int]:
    """Live processes whose command line or environment mentions ``text``."""
    found = set()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            blob = Path(f"/proc/{p}/cmdline").read_bytes() + Path(f"/proc/{p}/environ"
                                                                   ).read_bytes()
        except OSError:
            continue
        if text.encode() in blob and (st := _stat(int(p))) and st[1] not in ("Z", "X"):
            found.add(int(p))
    return found


@pytest.fixture
def bystander(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """An unrelated child process of the caller (and a registry of Ray records of the test's
    own, so that only the test's runs are looked at)."""
    monkeypatch.setenv("FEDUNLEARN_RAY_REGISTRY", str(tmp_path / "registry"))
    child = subprocess.Popen(["sleep", "120"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


@pytest.mark.flower
def test_a_run_leaves_the_callers_child_alive_and_nothing_of_its_own(
        bystander: subprocess.Popen, tmp_path: Path) -> None:
    me = os.getpid()
    before = _tree(me)
    assert cli.main(_args(tmp_path / "run")) == 0
    assert bystander.poll() is None, "the run killed its caller's unrelated child"
    assert not _still_alive(_tree(me) - before), "processes of the run were left behind"


@pytest.mark.flower
def test_the_next_run_stops_what_a_killed_driver_left(
        bystander: subprocess.Popen, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    driver = subprocess.Popen(
        [sys.executable, "-m", "fedunlearn.cli", *_args(tmp_path / "killed",
                                                          "training.rounds=100000")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not any(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::ClientApp")
                      for p, _ in _tree(driver.pid) if Path(f"/proc/{p}").exists()):
            assert driver.poll() is None, driver.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the run's client processes never started"
            time.sleep(0.2)
        time.sleep(1.5)  # rounds under way; the engine has updated its record since
        ray_procs = _tree(driver.pid)
        session = next(m.group().decode() for p, _ in ray_procs
                       if (m := re.search(rb"session_[0-9_-]+",
                                          Path(f"/proc/{p}/cmdline").read_bytes())))
    finally:
        driver.kill()  # SIGKILL to the driver alone, as `kill -9 PID`
        driver.communicate()
    left = _still_alive(ray_procs, 1.0)
    assert left, "nothing of the killed run was left: this test would prove nothing"

    # the next run: its Ray start times out (the caller's call still returns), and before it
    # the start stops the killed run's leftovers
    code = cli.main(_args(tmp_path / "next", "engine.startup_timeout_s=0.3"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedunlearn: error: Ray could not start (no answer within "
                              "engine.startup_timeout_s = 0.3 s"), err[-5:]
    assert "ulimit -f" in err[-1], err[-1]
    assert bystander.poll() is None, "the next run killed its caller's unrelated child"
    assert not _still_alive(ray_procs), "processes of the killed run were left behind"
    assert not _mentioning(session), f"processes of the killed run's Ray ({session}) remain"
    assert flower.wait_for_ray_start(120), "the abandoned start did not end"
    assert {pid for pid, _ in _still_alive(_tree(os.getpid()))} == {bystander.pid}, \
        "processes of the failed start were left behind"
