"""Interruption and resume, through the real CLI in a subprocess (Flower + Ray).

One run is stopped with SIGINT during training, resumed, stopped with SIGTERM, resumed, killed
with SIGKILL (the whole
process group, as ``kill -9`` of a job would), and resumed again. Its final model must be
bit-identical to an uninterrupted run of the same seed; SIGINT must end the run within 10 s
with every process it started gone and a last line that says how to resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedunlearn.config.tree import load_config
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.lineage import LineageLog, params_hash
from fedunlearn.history.store import HistoryStore
from fedunlearn.run.interrupt import descendants, wait_gone
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.run.resume import CHECKPOINT_META

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "simulations/quickstart.toml"
ROUNDS = 16  # stopped after round 3 or later, 3 more, 3 more: at least 4 left for the last resume
SETTINGS = ["experiment.seeds=[0]", "data.num_clients=4", f"training.rounds={ROUNDS}", "training.local_epochs=1",
            "training.learning_rate=0.1", 'data.partition="iid"', "unlearning.requests=[]",
            "verification.mia_shadows=0", "engine.ray_num_cpus=1"]


def _start(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedunlearn.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_round(out: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    meta = out / CHECKPOINT_META
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()[1][-2000:]}")
        try:
            r = json.loads(meta.read_text())["round"]
            if r >= at_least:
                return r
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    pytest.fail("training did not reach the round in time")


def _overrides() -> list[str]:
    return [a for s in SETTINGS for a in ("--set", s)]


def _reference_hash(where: Path) -> str:
    """The uninterrupted run's final model, from the in-process twin (identical work; the
    Flower/in-process equality is tested in test_seeds.py)."""
    cfg = load_config(ROOT / CONFIG, SETTINGS)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(where / "reference-history", retention_interval=cfg.history.retention_interval,
                                update_dtype=cfg.history.dtype)
    return params_hash(train_federation(fed, setup, store, progress=False).final)


@pytest.mark.flower
def test_sigint_then_kill9_then_resume_gives_the_uninterrupted_model(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "run", CONFIG, *_overrides(), "--out", str(out))
    stopped_at = _wait_round(out, 3, proc)
    ray = descendants(proc.pid)
    assert ray, "the run should have started Ray processes"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    took = time.monotonic() - t0
    assert took <= 10, f"SIGINT took {took:.1f} s"
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].endswith(f"fedunlearn resume {out}"), err[-500:]
    assert "Traceback" not in err
    assert wait_gone(ray, 5), "Ray processes of the run survived SIGINT"
    store = HistoryStore.open(out / "history")  # consistent after the stop
    assert max(store.rounds()) >= stopped_at

    # SIGTERM (a job scheduler's stop) ends it the same way; Ray's own native SIGTERM handler,
    # installed by ray.init, used to abort the driver with a stack dump (exit 134)
    proc = _start(out, "resume", str(out))
    stopped_at = _wait_round(out, stopped_at + 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].endswith(f"fedunlearn resume {out}"), err[-500:]

    proc = _start(out, "resume", str(out))
    _wait_round(out, stopped_at + 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the whole job
    proc.communicate(timeout=15)

    done = subprocess.run([sys.executable, "-m", "fedunlearn.cli", "resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    final = HistoryStore.open(out / "history").final_model()
    assert params_hash(final) == _reference_hash(tmp_path)
    assert not (out / CHECKPOINT_META).exists()
    events = [e["event"] for e in LineageLog(out).read()]
    assert events.count("resume") == 3
    rounds = [e["round"] for e in LineageLog(out).read() if e["event"] == "round"]
    assert sorted(set(rounds)) == list(range(1, ROUNDS + 1))
    again = subprocess.run([sys.executable, "-m", "fedunlearn.cli", "resume", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_a_ctrl_c_while_the_command_is_still_importing_is_one_line(tmp_path: Path) -> None:
    """SIGINT once torch's library is mapped lands while ``fedunlearn.cli`` imports Flower and
    torch, before any run handler exists: one line, exit code 130, no traceback, no Ray.

    The signal waits for the import to be under way (``/proc/PID/maps``): a fixed delay landed,
    on a loaded machine, before Python had imported its own ``site`` module."""
    proc = _start(tmp_path / "run", "run", CONFIG, "--out", str(tmp_path / "run"))
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, "torch was never imported"
        time.sleep(0.01)
    assert proc.poll() is None, "the command ended before the signal: the test proves nothing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == [
        ("fedunlearn: interrupted (Ctrl-C) outside a run's rounds; run the command again, or "
         "continue a run it had started with `fedunlearn resume RUN_DIR`")], err


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path: Path) -> None:
    """A background job (``cmd &`` in a script) starts with SIGINT ignored, so that a Ctrl-C
    at the terminal leaves it running. Catches the command installing its own handler anyway:
    the SIGINT half-way through the import then ended it (exit 130)."""
    # `trap "" INT` ignores SIGINT, and an ignored signal stays ignored across exec
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$0" -m fedunlearn.cli --help', sys.executable], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(0.5)
    assert proc.poll() is None, "the command ended before the signal: the test proves nothing"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "usage" in out.lower(), err


def test_a_run_keeps_an_ignored_ctrl_c_ignored_and_still_stops_on_sigterm() -> None:
    """Catches :func:`stoppable` taking over a SIGINT its process was told to ignore."""
    from fedunlearn.run.interrupt import reclaim, stoppable

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stoppable(lambda: "bye"):
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # as ray.init replaces handlers
            reclaim()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert callable(signal.getsignal(signal.SIGTERM))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
