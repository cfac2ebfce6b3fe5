"""Killed at a file operation, resumed, identical to an uninterrupted run (crash_harness.py).

A representative subset of kill points: one inside a history commit, one inside a checkpoint,
and three inside the strict purge of the last request (the journal written, the manifest
committed before the deletions, the last deletion), where a resume used to be refused forever.
``scripts/fault_sweep.py`` runs every point (docs/history.md, "Crash safety").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import crash_harness as harness
import pytest

from fedunlearn.config.tree import load_config
from fedunlearn.run import pipeline as runner


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("crash")
    ref, kept, log = work / "reference", work / "kept", work / "ops.jsonl"
    assert harness.child(ref, log=log).returncode == 0
    done = harness.child(kept, settings=[*harness.SETTINGS, "unlearning.purge=false"])
    assert done.returncode == 0, done.stderr
    patterns = harness.forbidden_bytes(kept / "history", 0)
    assert patterns and harness.leaks(kept, patterns)  # the oracle sees what a purge removes
    return {"ref": ref, "ops": harness.operations(log), "patterns": patterns}


def _pick(ops: list[dict[str, Any]], phase: str, op: str, path: str, last: bool = False) -> int:
    hits = [o["n"] for o in ops if o["phase"] == phase and o["op"] == op and path in o["path"]]
    assert hits, (phase, op, path)
    return hits[-1] if last else hits[0]


@pytest.mark.parametrize(("phase", "op", "path", "last"), [
    ("commit", "replace", "history/manifest.json", True),   # the last round's commit
    ("checkpoint", "replace", "checkpoint.json", False),    # the first checkpoint's state
    ("purge", "create", "rounds/00001/meta.p1.json", False),  # only the journal is written
    ("purge", "unlink", "rounds/00001/meta.json", False),   # manifest committed, no deletion
])
def test_a_run_killed_at_a_file_operation_resumes_to_the_same_results(
        uninterrupted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        phase: str, op: str, path: str, last: bool) -> None:
    kill_at = _pick(uninterrupted["ops"], phase, op, path, last)
    out = tmp_path / "run"
    assert harness.child(out, kill_at).returncode == harness.KILLED
    monkeypatch.setattr(runner, "run_engine", harness.in_process_engine)
    runner.run_experiment(load_config(None, list(harness.SETTINGS)), out, quiet=True,
                          resume=True)
    assert harness.check_resumed(out, uninterrupted["ref"], uninterrupted["patterns"]) == []
