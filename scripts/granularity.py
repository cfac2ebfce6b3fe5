#!/usr/bin/env python
"""One removal request of each granularity, each served by every built-in method that serves it.

Runs ``fedunlearn run`` (Flower on Ray) three times on one config (default
``simulations/granularity_digits.toml``): a client request, a sample request and a class request
(below), each with the federated and centralized methods whose ``Capabilities.granularities``
include it, then writes every comparison and verdict table to ``OUT/granularity.md``. Usage::

    .venv/bin/python scripts/granularity.py [--config ...] [--out runs/granularity]
        [--kinds client,samples,class] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedunlearn.reporting.tables import comparison_table, verdict_table
from fedunlearn.unlearning import UNLEARNERS
from fedunlearn.unlearning.base import capabilities_of

REQUESTS = {"client": "[[0]]", "samples": '[{client = 0, samples = "backdoor"}]',
            "class": "[{label = 3}]"}


def methods_serving(granularity: str) -> list[str]:
    """The built-in methods that serve ``granularity``, in registration order (``retrain``
    first: the reference)."""
    names = [n for n in UNLEARNERS.names()
             if UNLEARNERS.get(n).__module__.startswith("fedunlearn.unlearning.")
             and granularity in capabilities_of(UNLEARNERS.get(n)).granularities]
    return ["retrain", *(n for n in names if n != "retrain")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="simulations/granularity_digits.toml")
    ap.add_argument("--out", type=Path, default=Path("runs/granularity"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--kinds", default=",".join(REQUESTS),
                    help="comma-separated granularities to run (default: all three)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if unknown := sorted(set(kinds) - set(REQUESTS)):
        ap.error(f"--kinds: unknown {', '.join(unknown)}; use {', '.join(REQUESTS)}")
    sections = [f"# Removal at every granularity\n\nconfig `{args.config}`"]
    for kind, request in REQUESTS.items():
        if kind not in kinds:
            continue
        methods = json.dumps(methods_serving(kind))
        out = args.out / kind
        cmd = [sys.executable, "-m", "fedunlearn.cli", "run", args.config,
               "--set", f"unlearning.requests={request}", "--set", f"unlearning.methods={methods}",
               *(a for s in args.overrides for a in ("--set", s)), "--out", str(out)]
        print(f"[{kind}] {' '.join(cmd[2:])}", flush=True)
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            print(f"[{kind}] failed (exit {done.returncode}); see above", file=sys.stderr)
            return done.returncode
        results = json.loads((out / "results.json").read_text())
        sections.append(f"## {kind}\n\n`{' '.join(cmd[2:])}`\n\n```\n"
                        f"{comparison_table(results['unlearning'], results.get('summary'))}\n\n"
                        f"{verdict_table(results.get('summary'))}\n```")
    (args.out / "granularity.md").write_text("\n\n".join(sections) + "\n")
    print(f"written to {args.out / 'granularity.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
