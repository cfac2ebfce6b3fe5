"""A run attached to a real Ray cluster: a head started here, on loopback, with its own handle.

The test starts ``ray start --head --block`` in a new process group with its own temp dir and
port, runs a small experiment with ``engine.address`` pointing at it, checks the result against
the in-process federation (identical work, so the identical model) and that the clients ran in
that head's workers, then stops exactly the head it started: SIGTERM to its process group,
SIGKILL after a bounded wait. Every wait is bounded (start 90 s, stop 30 + 10 s, and a watchdog
kills the head after 600 s). It never runs ``ray stop`` (which would stop every local Ray).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import max_abs_diff, small_config

from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.store import HistoryStore
from fedunlearn.run.pipeline import prepare, run_experiment, train_federation

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
HARD_LIMIT_S = 600.0
"""Past this, a watchdog SIGKILLs the head's process group, so a hung run fails instead of
waiting forever (the driver's Ray calls error out once the head is gone)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the head's process group, SIGKILL what is left after ``timeout_s``."""
    pgid = proc.pid  # start_new_session: the group id is the head's pid
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if not group_alive(pgid):
            break
        os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while group_alive(pgid) and time.monotonic() < deadline:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
    if proc.poll() is None:
        proc.wait(timeout=5)


def _kill_group(pgid: int) -> None:
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path, dict[str, float]]]:
    """A two-CPU Ray head on 127.0.0.1; yields (address, its temp dir, timings)."""
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        pytest.skip(f"no ray executable next to {sys.executable}")
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths
    log = (tmp / "head.log").open("wb")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(ray), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={tmp}", "--include-dashboard=false",
         "--disable-usage-stats", "--block"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    timings: dict[str, float] = {}
    watchdog = threading.Timer(HARD_LIMIT_S, _kill_group, args=(proc.pid,))
    watchdog.daemon = True
    watchdog.start()
    try:
        while not listening(port):
            if proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"the Ray head did not come up within {START_TIMEOUT_S:g} s: "
                            f"{(tmp / 'head.log').read_text()[-2000:]}")
            time.sleep(0.2)
        timings["head_start_s"] = time.monotonic() - t0
        yield f"127.0.0.1:{port}", tmp, timings
    finally:
        watchdog.cancel()
        t1 = time.monotonic()
        stop_group(proc)
        timings["head_stop_s"] = time.monotonic() - t1
        log.close()
        print(f"ray head timings: {timings}")
        assert not group_alive(proc.pid), "the Ray head's processes outlived SIGKILL"
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.flower
def test_experiment_runs_on_a_ray_cluster_started_here(ray_head, tmp_path):
    address, head_dir, timings = ray_head
    # ResNet-20 with BatchNorm: Flower's own FedAvg aggregates the running statistics and
    # the integer counters, so this also checks the Flower path keeps them as docs/models.md ("BatchNorm buffers") says
    cfg = small_config(f'engine.address="{address}"', "engine.ray_num_cpus=0",
                       "training.sample_fraction=0.75",
                       'model.name="resnet20"', 'model.params={norm="batch"}')
    t0 = time.monotonic()
    results = run_experiment(cfg, tmp_path / "run", quiet=True)
    timings["experiment_s"] = time.monotonic() - t0
    store = HistoryStore.open(tmp_path / "run" / "history")
    assert store.rounds() == [1, 2, 3]
    # identical work in this process gives the identical model
    setup = prepare(cfg)
    local = train_federation(InProcessFederation(cfg, setup.evaluator()), setup,
                             HistoryStore.create(tmp_path / "local"), progress=False)
    final = store.final_model()
    assert max_abs_diff(local.final, final) == 0.0
    assert store.replayable()  # M_{t+1} = M_t + sum w U held in every round
    counters = [k for k in final if k.endswith("num_batches_tracked")]
    assert len(counters) == 19 and all(final[k].dtype.kind == "i" and final[k] == 0
                                       for k in counters)
    # the clients ran in this head's workers: its session logs name Flower's client actors
    logs = list(head_dir.glob("session_*/logs/worker-*"))
    assert logs, f"no worker logs under {head_dir}"
    assert results["training"]["engine"] == "flower-ray"
    assert results["config"]["engine"]["address"] == address
