"""A client that never returns, through the real CLI in a subprocess (Flower + Ray): the run
ends in bounded time with one line that says how to resume, and the resume finishes it.
(Apart from ``test_resume.py`` so that the test-suite's workers can run the two side by side.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_resume import CONFIG, ROOT, _overrides

STALL_EXT = '''
import os, sys, time
import torch.nn.functional as F
from fedunlearn.models.training import TRAIN_STEPS
CALLS = [0]

@TRAIN_STEPS.register("stall_forever")
def stall_forever(model, x, y, ctx, marker=""):
    """The fifth step of one Ray worker never returns (the driver's warm-up is spared)."""
    CALLS[0] += 1
    if "worker" in " ".join(sys.argv) and CALLS[0] == 5:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            time.sleep(100000)
        except FileExistsError:
            pass
    return F.cross_entropy(model(x), y)
'''


@pytest.mark.flower
def test_a_client_that_never_returns_cannot_hold_the_run(tmp_path):
    """Dropped after client_timeout_s, the stalled client still blocks Flower's shutdown; the
    engine watchdog stops Ray in bounded time, says where the work is, and resume finishes."""
    (tmp_path / "stall_ext.py").write_text(STALL_EXT)
    out = tmp_path / "run"
    sets = [*_overrides(), "--set", "training.rounds=3", "--set", "data.num_clients=3",
            "--set", 'experiment.extensions=["stall_ext"]',
            "--set", 'training.step="stall_forever"',
            "--set", f'training.step_params={{marker="{tmp_path / "once"}"}}',
            "--set", "engine.client_timeout_s=4", "--set", 'engine.on_client_failure="drop"',
            "--set", "engine.shutdown_grace_s=2",
            "--set", "engine.ray_num_cpus=0"]  # two client processes: one of them stalls
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    # Without the engine watchdog the run never ends: the subprocess timeout is the bound (no
    # wall-time assertion, which a loaded machine would break without a hang).
    run = subprocess.run([sys.executable, "-m", "fedunlearn.cli", "run", str(ROOT / CONFIG), *sets,
                          "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=180, check=False)
    assert (tmp_path / "once").exists(), "the stall never happened"
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "a client never returned" in last and f"fedunlearn resume {out}" in last, last
    done = subprocess.run([sys.executable, "-m", "fedunlearn.cli", "resume", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    failures = results["training"]["client_failures"]
    assert failures and failures[0]["reason"] == "timeout", failures
