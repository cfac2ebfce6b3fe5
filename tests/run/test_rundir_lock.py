"""One writer per run directory (:mod:`fedunlearn.run.lock`), tried as two users would.

A holder process takes the lock of a run directory and sleeps; a second ``run``, ``compare``
or ``resume`` into it (and ``run_experiment`` through the Python API) is refused at once with
one line naming the holder, and not a byte of the directory changes. Killed with SIGKILL, the
holder leaves its lock file behind: the next writer takes it over with a note.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import small_config

from fedunlearn.cli import main
from fedunlearn.run.lock import LOCK_FILE, RunDirLocked, holder_of, run_dir_lock

ROOT = Path(__file__).resolve().parents[2]
QS = "simulations/quickstart.toml"
HOLDER = """
import sys, time
from pathlib import Path
from fedunlearn.run.lock import run_dir_lock
with run_dir_lock(Path(sys.argv[1]), command="run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    """A process holding ``run_dir``'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.strip() == "locked", proc.communicate(timeout=30)[1][-2000:]
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def live_run(tmp_path):
    """A run directory (a resumable ``run.json``, a lineage line) held by a live process."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = small_config("unlearning.requests=[]", "verification.mia_shadows=0")
    (out / "run.json").write_text(json.dumps({"config": cfg.to_dict(), "command": "run",
                                              "resumed": [], "created": "2026-12-07T10:00:00Z"}))
    (out / "lineage.jsonl").write_text('{"event": "round", "round": 1}\n')
    proc = _holder(out)
    yield out, proc
    if proc.poll() is None:
        _kill(proc)


@pytest.mark.parametrize("command", ["run", "compare", "resume"])
def test_a_second_writer_is_refused_at_once_and_changes_nothing(command, live_run, capsys,
                                                                 tripwire):
    out, proc = live_run
    before = _snapshot(out)
    args = [command, str(out)] if command == "resume" else [
        command, QS, "--set", "unlearning.requests=[[1]]", "--out", str(out)]
    t0 = time.monotonic()
    code = main(args)
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"is being written by process {proc.pid} on host {socket.gethostname()}" in err[0]
    assert "since " in err[0] and f"kill {proc.pid}" in err[0], err[0]
    assert took < 10, took  # loose: refused without waiting for the holder
    assert _snapshot(out) == before  # run.json, the lineage and the lock file untouched


def test_the_python_api_is_refused_too(live_run, tripwire):
    from fedunlearn.run.pipeline import run_experiment

    out, proc = live_run
    before = _snapshot(out)
    with pytest.raises(RunDirLocked, match=f"process {proc.pid} "):
        run_experiment(small_config(), out, quiet=True)
    with pytest.raises(RunDirLocked, match=f"process {proc.pid} "):
        run_experiment(small_config(), out, quiet=True, resume=True)
    assert _snapshot(out) == before


def test_the_lock_of_a_killed_holder_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _holder(out)
    pid = proc.pid
    _kill(proc)  # SIGKILL: its lock file stays, naming it; the kernel released the lock
    assert holder_of(out)["pid"] == pid
    with run_dir_lock(out, command="resume"):
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"took over the lock of process {pid}, which is no longer running" in err[0]
        assert holder_of(out)["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT,
                               capture_output=True, text=True, timeout=60, check=False)
        assert other.returncode != 0 and "locked" not in other.stdout  # held against others
        assert f"is being written by process {os.getpid()} " in other.stderr
    assert not (out / LOCK_FILE).exists()  # a clean end removes it: no note next time
    with run_dir_lock(out):
        assert capsys.readouterr().err == ""


def test_a_run_into_a_killed_runs_directory_is_refused_as_not_empty_in_one_line(
        tmp_path, capsys, tripwire):
    out = tmp_path / "run"
    proc = _holder(out)
    (out / "run.json").write_text("{}")
    _kill(proc)
    before = _snapshot(out)
    assert main(["run", QS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0], err  # no note: nothing taken over
    assert _snapshot(out) == before


def test_a_refused_resume_of_a_killed_run_leaves_its_lock_file_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _holder(out)
    _kill(proc)
    before = _snapshot(out)
    with pytest.raises(ValueError, match="refused"), run_dir_lock(out, command="resume"):
        raise ValueError("refused")  # e.g. a ResumeError after reading the run's files
    assert _snapshot(out) == before


def test_a_new_run_directory_is_created_locked_and_removed_if_nothing_was_written(tmp_path):
    out = tmp_path / "deep" / "run"
    with run_dir_lock(out):
        assert holder_of(out)["pid"] == os.getpid()
        with run_dir_lock(out):  # the same process again (the CLI, then run_experiment)
            pass
        assert holder_of(out)["pid"] == os.getpid()  # still held after the nested exit
    assert not (tmp_path / "deep").exists()
    with pytest.raises(KeyError), run_dir_lock(out):
        raise KeyError("refused before writing")
    assert not (tmp_path / "deep").exists()
    with run_dir_lock(out):
        (out / "run.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["run.json"]


def test_two_writers_starting_together_one_wins(tmp_path):
    """No waiting and no window: of processes racing for one new directory, exactly one
    takes the lock (the others are refused at once, none of them hangs)."""
    out = tmp_path / "run"
    racer = ("import sys, time\nfrom pathlib import Path\n"
             "from fedunlearn.run.lock import RunDirLocked, run_dir_lock\n"
             "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
             "try:\n"
             "    with run_dir_lock(Path(sys.argv[1])):\n"
             "        print('won', flush=True)\n"
             "        time.sleep(8)\n"
             "except RunDirLocked:\n"
             "    print('refused', flush=True)\n")
    start = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", racer, str(out), str(start)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said == ["refused", "refused", "won"], said
