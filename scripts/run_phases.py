#!/usr/bin/env python
"""Phase breakdown of a finished run directory, from its own files.

start (``run.json`` written) → engine start-up and round 1 (first ``round`` event of
``lineage.jsonl``) → training (``results.json`` ``training.wall_s``) → each removal method
(rows' ``wall_s``) → verification (between the last method's ``model`` event and the ``purge``
event, and ``results.json`` ``verification.total_s`` when present) → results written
(``results.json`` mtime). Usage::

    .venv/bin/python scripts/run_phases.py RUN_DIR [--out phases.json]

Run it on the directory as the run left it (it reads file modification times).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path


def _t(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    d = args.run_dir
    results = json.loads((d / "results.json").read_text())
    events = [json.loads(line) for line in (d / "lineage.jsonl").read_text().splitlines()]
    start = (d / "run.json").stat().st_mtime
    end = (d / "results.json").stat().st_mtime
    rounds = [e for e in events if e["event"] == "round"]
    models = [e for e in events if e["event"] == "model" and e.get("kind") == "unlearned"]
    purge = next((e for e in events if e["event"] == "purge"), None)
    training = results["training"]
    first_round = training["rounds"][0]["wall_s"] if training["rounds"] else 0.0
    phases = {
        "startup_s": _t(rounds[0]["time"]) - start - first_round if rounds else None,
        "training_s": training["wall_s"],
        "methods_s": {r["method"]: r["wall_s"] for r in results.get("unlearning", [])
                      if r["role"] != "original"},
        "verification_s_lineage": (_t(purge["time"]) - _t(models[-1]["time"])
                                   if purge and models else None),
        "verification_s_reported": (results.get("verification") or {}).get("total_s"),
        "total_to_results_s": end - start,
    }
    text = json.dumps(phases, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
