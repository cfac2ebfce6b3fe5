"""Compare two runs' ``results.json``: identical results, or every difference named.

    python scripts/compare_results.py RUN_A RUN_B

Every row of ``unlearning`` is matched by (seed, request, method, setting, role) and compared on
its ``model_hash``, every metric and every deterministic cost (rounds, client epochs, messages,
bytes); the rest of the file (training curves, purges, summary and verdicts, the resolved
config) is compared value by value. Left out: what a clock measures (``*wall_s``, ``*_s`` timings,
``speedup_vs_retrain``, ``created``) and the commit that produced the file. Exits 0 when nothing
differs, 1 otherwise (each difference on its own line), 2 when a file cannot be read.

Numbers are compared exactly: a run is deterministic on one CPU kind, so a restructuring that
changes any last bit shows here. Compare runs made on the same CPU kind only (AVX2 and AVX-512
kernels differ in the last bits; see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

CLOCK = re.compile(r"(^|_)(wall|seconds|created|speedup)|_s$|^git_commit$|^shadow_threads$")
ROW_KEY = ("seed", "request", "method", "setting", "role")


def _is_clock(key: str, path: str) -> bool:
    return not path.startswith("config") and bool(CLOCK.search(key))


def _rows_by_key(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out = {}
    for row in rows:
        key = tuple(json.dumps(row.get(k), sort_keys=True) for k in ROW_KEY)
        if key in out:
            raise ValueError(f"two rows share {dict(zip(ROW_KEY, key))}")
        out[key] = row
    return out


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Every difference between two JSON values, as ``path: a != b`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if _is_clock(str(key), sub):
                continue
            if key not in a or key not in b:
                side = "B" if key not in a else "A"
                lines.append(f"{sub}: only in {side}")
                continue
            if sub == "unlearning":
                lines += _diff_rows(a[key], b[key])
            else:
                lines += diff(a[key], b[key], sub)
        return lines
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)} items"]
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in diff(x, y, f"{path}[{i}]")]
    same = (a == b and type(a) is type(b)) or (
        isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [f"{path}: {a!r} != {b!r}"]


def _diff_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    ra, rb = _rows_by_key(a), _rows_by_key(b)
    lines = []
    for key in sorted(set(ra) | set(rb)):
        name = "unlearning[" + ", ".join(f"{k}={json.loads(v)}" for k, v in zip(ROW_KEY, key)) + "]"
        if key not in ra or key not in rb:
            lines.append(f"{name}: only in {'B' if key not in ra else 'A'}")
            continue
        lines += diff(ra[key], rb[key], name)
    return lines


def compare(run_a: Path, run_b: Path) -> tuple[list[str], dict[str, int]]:
    """The differences between two run directories' results, and what was compared."""
    a = json.loads((run_a / "results.json").read_text())
    b = json.loads((run_b / "results.json").read_text())
    rows = a.get("unlearning", [])
    counted = {
        "rows": len(rows),
        "model_hashes": sum(1 for r in rows if r.get("model_hash")),
        "metrics": sum(len(r.get("metrics", {})) for r in rows),
    }
    return diff(a, b), counted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args(argv)
    try:
        lines, counted = compare(args.run_a, args.run_b)
    except (OSError, ValueError) as exc:
        print(f"compare_results: cannot read the results: {exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    what = (f"{counted['rows']} rows, {counted['model_hashes']} model hashes, "
            f"{counted['metrics']} metric values")
    if lines:
        print(f"DIFFERENT: {len(lines)} difference(s) ({what} compared)")
        return 1
    print(f"identical: {what} and every other result (clock times left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
