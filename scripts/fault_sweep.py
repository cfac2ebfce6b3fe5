#!/usr/bin/env python
"""Kill a run at every file operation of a history commit, a checkpoint and a strict purge,
resume it, and check it against an uninterrupted run (``tests/crash_harness.py``).

Writes ``benchmarks/fault_sweep.json``: every kill point (operation, path, phase) with the
killed run's exit code, the resume's, and what the checks found (empty when it passed), plus
the run's config, versions, CPU and git commit. Usage::

    .venv/bin/python scripts/fault_sweep.py            # round 2's commit + checkpoint, the purge
    .venv/bin/python scripts/fault_sweep.py --all      # every file operation of the run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import crash_harness as harness


def chosen(ops: list[dict], every: bool) -> list[dict]:
    """Round 2's commit and checkpoint, every operation from the answer's saved state to the
    end (the strict purge and the bookkeeping around it); or every operation."""
    if every:
        return ops
    r2 = next(o["n"] for o in ops if "rounds/00002" in o["path"])
    r3 = next(o["n"] for o in ops if "rounds/00003" in o["path"])
    serving = next(o["n"] for o in ops if o["path"].startswith("serving"))
    return [o for o in ops if r2 <= o["n"] < r3 or o["n"] >= serving]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every file operation of the run")
    ap.add_argument("--phases", default=None,
                    help="only these phases, comma-separated (commit, checkpoint, purge, state)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fault_sweep.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fault-sweep-"))
    t0 = time.perf_counter()
    ref, kept, log = work / "reference", work / "kept", work / "ops.jsonl"
    for out, extra, logged in ((ref, [], log), (kept, ["unlearning.purge=false"], None)):
        done = harness.child(out, settings=[*harness.SETTINGS, *extra], log=logged)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
    ops = harness.operations(log)
    patterns = harness.forbidden_bytes(kept / "history", 0)
    points = []
    phases = set(args.phases.split(",")) if args.phases else None
    for op in [o for o in chosen(ops, args.all) if phases is None or o["phase"] in phases]:
        out = work / f"kill-{op['n']:04d}"
        killed = harness.child(out, op["n"])
        resumed = harness.child(out, resume=True)
        problems = ([] if killed.returncode != harness.KILLED else
                    harness.check_resumed(out, ref, patterns))
        if killed.returncode != harness.KILLED:
            problems.append(f"the run was not killed (exit {killed.returncode})")
        if resumed.returncode:
            problems.append("resume failed: " + (resumed.stderr.strip().splitlines() or
                                                 ["?"])[-1][:300])
        points.append({**op, "killed_exit": killed.returncode,
                       "resume_exit": resumed.returncode, "problems": problems})
        print(f"[sweep] op {op['n']:4d} {op['phase']:10s} {op['op']:9s} {op['path']:45s} "
              f"{'ok' if not problems else '; '.join(problems)}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    passed = sum(1 for p in points if not p["problems"])
    results = json.loads((ref / "results.json").read_text())
    payload = {**stamp_of(results), "settings": list(harness.SETTINGS),
               "operations_in_run": len(ops), "kill_points": len(points), "passed": passed,
               "by_phase": {ph: [sum(1 for p in points if p["phase"] == ph),
                                 sum(1 for p in points if p["phase"] == ph and not p["problems"])]
                            for ph in ("commit", "checkpoint", "purge", "state")},
               "wall_s": round(time.perf_counter() - t0, 1), "points": points}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"[sweep] {passed} of {len(points)} kill points passed; wrote {args.out}")
    return 0 if passed == len(points) else 1


def stamp_of(results: dict) -> dict:
    keys = ("versions", "git_commit", "created", "machine", "config")
    return {k: results[k] for k in keys if k in results}


if __name__ == "__main__":
    sys.exit(main())
