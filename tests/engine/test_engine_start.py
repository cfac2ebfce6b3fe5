"""Ray start-up failures end the call in bounded time with one line, leaving no Ray process.

Ray's own start-up gives up after a fixed 30 s (under a file-size limit, for instance), with
tracebacks from every layer; a start still waiting after ``engine.startup_timeout_s`` is
abandoned: :func:`start_ray` raises at once and the start stops its own processes when Ray's
``ray.init`` returns (:class:`fedunlearn.engine.flower.RayStart`). Checked in a subprocess
(under the limit), which lives on after the failure and prints what it finds afterwards. A
start past a tiny ``engine.startup_timeout_s`` without any limit is checked in
``test_process_control.py`` (in process, with the caller's own child process alive).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import sys, time
    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.flower import EngineStartError, start_ray, wait_for_ray_start
    from fedunlearn.run import interrupt
    cfg = load_config("simulations/quickstart.toml", [])
    t0 = time.monotonic()
    try:
        start_ray(cfg, timeout_s=float(sys.argv[1]))
        print("STARTED")
    except EngineStartError as exc:
        print("ERROR", exc)
    print("RETURNED_AFTER", round(time.monotonic() - t0, 1))
    print("START_ENDED", wait_for_ray_start(120))
    time.sleep(0.5)

    def alive(pid):  # killed children stay zombies until Ray reaps them: they are gone
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    print("LEFT", sum(alive(p) for p in interrupt.descendants()))
''')


def _one_line_and_nothing_left(run: subprocess.CompletedProcess, reason: str,
                               limit: float) -> None:
    """start_ray raised within about ``limit`` seconds (the caller prints the line), the
    process lived on, and once the abandoned start has ended no Ray process remains."""
    out = run.stdout.strip().splitlines()
    assert run.returncode == 0 and out, run.stderr[-2000:]
    assert out[0].startswith(f"ERROR Ray could not start ({reason}"), out
    assert "ulimit -f" in out[0], out
    returned = float(out[1].split()[1])
    assert returned < limit + 10, f"start_ray took {returned} s to give up (limit {limit} s)"
    assert out[-2:] == ["START_ENDED True", "LEFT 0"], out


@pytest.mark.flower
def test_a_ray_failing_under_a_file_size_limit_is_one_line():
    script = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024,) * 2)\n"
    # Ray's own start gives up after a fixed 30 s here; engine.startup_timeout_s = 4 returns
    # control sooner (either way: one line, and no process left once Ray has given up)
    run = subprocess.run([sys.executable, "-c", script + SCRIPT, "4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, check=False)
    _one_line_and_nothing_left(run, "", 4)
