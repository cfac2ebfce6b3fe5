"""Kill a run at a chosen file operation, resume it, and check it against an uninterrupted run.

Used by ``tests/run/test_crash_resume.py`` (a few kill points) and ``scripts/fault_sweep.py`` (every
kill point). A child process runs a small experiment through ``runner.run_experiment`` on the
in-process twin of the Flower engine (Flower is not the subject here; the run directory is),
with :func:`fedunlearn.history.store.set_file_op_hook` counting every file operation that changes the
run directory (history commits and purges, checkpoints, resume state) and SIGKILLing itself
right before operation ``N``. The parent then resumes the run (``resume=True``, in a second
child), and checks:

* the resume succeeded and its ``results.json`` rows (model hashes and metrics of every
  method) equal the uninterrupted run's;
* the store opens (sizes, checksums, consistency) and lists the target as purged;
* no byte sequence of the target's stored updates, running sum, or of the global models a
  strict purge deletes, appears in any file of the run directory (the oracle: a run of the
  same config without purging, whose store keeps them).

Usage as a script: ``python tests/crash_harness.py drive OUT KILL_AT [--resume] [--set ...]``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("data.num_clients=4", "training.rounds=3", "training.local_epochs=1",
            "training.learning_rate=0.1", 'data.partition="iid"', "backdoor.clients=[0]",
            "unlearning.requests=[[0]]",
            'unlearning.methods=["retrain","federaser","distillation"]',
            "verification.mia_shadows=0", "verification.noise_floor=false",
            'history.purge="strict"', "history.retention_interval=1")
"""A federation of four clients, three rounds, one strict removal: a run of a few seconds."""

KILLED = -signal.SIGKILL


def in_process_engine(cfg: Any, job: Any, on_stuck: Any = None) -> Any:
    """``runner.run_engine`` served by the in-process twin of the Flower port."""
    from fedunlearn.engine.inprocess import InProcessFederation

    return job(lambda cfg_s, evaluate, data=None: InProcessFederation(cfg_s, evaluate))


def drive(out: Path, kill_at: int, *, resume: bool, settings: Sequence[str],
          log: Path | None = None) -> None:
    """The child: run (or resume) into ``out``; SIGKILL before file operation ``kill_at``
    (1-based; 0 never); with ``log``, write every operation as JSON lines."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.history import store as history
    from fedunlearn.run import pipeline as runner

    runner.run_engine = in_process_engine  # type: ignore[assignment]
    count = 0
    sink = open(log, "w") if log is not None else None  # noqa: SIM115 - closed by the exit

    def hook(op: str, path: Path) -> None:
        nonlocal count
        count += 1
        if sink is not None:
            rel = os.path.relpath(path, out)
            sink.write(json.dumps({"n": count, "op": op, "path": rel}) + "\n")
            sink.flush()
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    history.set_file_op_hook(hook)
    cfg = load_config(None, list(settings))
    runner.run_experiment(cfg, out, quiet=True, resume=resume)
    if sink is not None:
        sink.close()


def child(out: Path, kill_at: int = 0, *, resume: bool = False,
          settings: Sequence[str] = SETTINGS, log: Path | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "drive", str(out), str(kill_at)]
    if resume:
        cmd.append("--resume")
    if log is not None:
        cmd += ["--log", str(log)]
    for item in settings:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def operations(log: Path) -> list[dict[str, Any]]:
    """The logged file operations of an uninterrupted run, each labelled with its phase:
    ``purge`` (from the journal's creation to its removal), ``checkpoint``, ``commit``
    (the history store otherwise) or ``state`` (run.json, resume state, results)."""
    ops = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    in_purge = False
    for op in ops:
        path = op["path"]
        if path.endswith("purge-journal.json") and op["op"] == "create":
            in_purge = True
        if in_purge:
            op["phase"] = "purge"
        elif "checkpoint." in path:
            op["phase"] = "checkpoint"
        elif path.startswith("history") or "/history" in path:
            op["phase"] = "commit"
        else:
            op["phase"] = "state"
        if path.endswith("purge-journal.json") and op["op"] == "unlink":
            in_purge = False
    return ops


def answers(out: Path) -> list[tuple[Any, ...]]:
    """Every row's method, request, model hash and metrics (wall times excluded)."""
    results = json.loads((out / "results.json").read_text())
    return sorted((r["method"], tuple(r["request"]), r["model_hash"],
                   json.dumps(r["metrics"], sort_keys=True)) for r in results["unlearning"])


def forbidden_bytes(kept: Path, client: int, *, window: int = 48) -> list[bytes]:
    """Byte windows of what a purge of ``client`` must leave nowhere: its stored updates and
    running sum, and (strict) the final model and the global models from its first round on,
    read from a store of the same run that was never purged (``kept``)."""
    from fedunlearn.history.store import HistoryStore

    store = HistoryStore.open(kept)
    arrays: list[np.ndarray] = []
    first = None
    for t in store.rounds():
        if client in store.participants(t):
            first = t if first is None else first
            if store.retains_updates(t):
                arrays += [v for v in store.update(t, client).values()]
    arrays += list(store.running_sum(client).values())
    if first is not None:
        for t in store.rounds():
            if t >= first:
                arrays += [v for v in store.global_model(t).values() if v.dtype.kind == "f"]
        arrays += [v for v in store.final_model().values() if v.dtype.kind == "f"]
    out = []
    for a in arrays:
        raw = np.ascontiguousarray(a, dtype=a.dtype).tobytes()
        if len(raw) >= window and np.count_nonzero(a) > window // a.itemsize:
            middle = len(raw) // 2 - (len(raw) // 2) % a.itemsize
            out.append(raw[middle:middle + window])
    return out


def leaks(out: Path, patterns: Sequence[bytes]) -> list[str]:
    """Files of ``out`` holding any of ``patterns``."""
    found = []
    for f in sorted(out.rglob("*")):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            if any(p in data for p in patterns):
                found.append(str(f.relative_to(out)))
    return found


def check_resumed(out: Path, reference: Path, patterns: Sequence[bytes],
                  client: int = 0) -> list[str]:
    """What is wrong with a killed-then-resumed run ``out`` (empty: nothing)."""
    from fedunlearn.history.store import HistoryStore

    problems = []
    if not (out / "results.json").exists():
        return ["no results.json after resume"]
    if answers(out) != answers(reference):
        problems.append("rows differ from the uninterrupted run's")
    try:
        store = HistoryStore.open(out / "history")
        if client not in store.purged():
            problems.append(f"client {client} is not purged")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        problems.append(f"store does not open: {exc}")
    events = [json.loads(line)["event"] for line in
              (out / "lineage.jsonl").read_text().splitlines() if line.strip()]
    if events.count("purge") != 1:
        problems.append(f"lineage has {events.count('purge')} purge events")
    if found := leaks(out, patterns):
        problems.append(f"purged bytes left in {found}")
    return problems


def main(argv: Sequence[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("drive")
    d.add_argument("out", type=Path)
    d.add_argument("kill_at", type=int)
    d.add_argument("--resume", action="store_true")
    d.add_argument("--log", type=Path)
    d.add_argument("--set", dest="settings", action="append", default=[])
    args = p.parse_args(argv)
    drive(args.out, args.kill_at, resume=args.resume, settings=args.settings, log=args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
