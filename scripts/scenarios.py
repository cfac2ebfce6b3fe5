#!/usr/bin/env python
"""Scenario matrix: do the removal verdicts hold beyond one dataset, one partition, one seed?

Runs ``fedunlearn run`` (Flower + Ray, one engine per scenario, every seed on it) for every
scenario config x partition, with ``--seeds`` (default 0,1,2), serving one removal request with
retraining, FedEraser at r = 0.5 and at r = 1 (``federaser`` and ``federaser:r1``) and
distillation. Each scenario's run directory keeps its full results and report
(``runs/scenarios/NAME-PARTITION``). The summaries (mean, 95 % interval, verdicts against
retraining) of every method go to ``benchmarks/scenarios.json`` with each run's resolved config,
seeds, versions and git commit, and a markdown table to ``benchmarks/scenarios.md``
(``--reuse`` re-summarises existing run directories with the current verdict rule instead of
rerunning them). Usage::

    .venv/bin/python scripts/scenarios.py                      # the whole matrix
    .venv/bin/python scripts/scenarios.py --only digits --seeds 0,1 --set training.rounds=5

Scenario configs: ``simulations/scenario_digits_mlp.toml`` and
``simulations/scenario_mnist5k_cnn.toml``; partitions: ``iid`` and ``dirichlet``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"digits-mlp": "simulations/scenario_digits_mlp.toml",
             "mnist5k-cnn": "simulations/scenario_mnist5k_cnn.toml",
             "federaser-paper": "simulations/scenario_mnist5k_federaser_paper.toml",
             "federaser-collapse": "simulations/scenario_mnist5k_federaser_collapse.toml"}
PARTITIONS = ("iid", "dirichlet")
ONLY_IID = {"federaser-paper", "federaser-collapse"}
"""FedEraser's two regimes are run as the paper's federation is split (IID)."""
METHODS = ("retrain", "federaser", "federaser:r1", "distillation")
SHOWN = (("test_accuracy", "test acc", "test"), ("forget_accuracy", "forgotten acc", "forget"),
         ("backdoor_asr", "ASR", "asr"), ("mia_lira_auc_clean", "MIA AUC clean", "mia"),
         ("kl_forget", "KL forget", "kl"))


def run_scenario(name: str, config: str, partition: str, seeds: str, extra: list[str],
                 runs: Path, reuse: bool = False) -> dict[str, Any]:
    out = runs / f"{name}-{partition}"
    if reuse and (out / "results.json").exists():
        print(f"[scenarios] {name} / {partition}: reusing {out}", flush=True)
        return _scenario(name, partition, out, None)
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "fedunlearn.cli", "run", str(ROOT / config), "--seeds", seeds,
           "--set", f'data.partition="{partition}"', "--out", str(out)]
    for item in extra:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    print(f"[scenarios] {name} / {partition}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    return _scenario(name, partition, out, time.perf_counter() - t0)


def _scenario(name: str, partition: str, out: Path, wall: float | None) -> dict[str, Any]:
    """A run's figures; the summary is recomputed from its rows with the current rule."""
    from fedunlearn.evaluation.summary import summarize

    results = json.loads((out / "results.json").read_text())
    verification = results["config"]["verification"]
    summary = summarize(results["unlearning"], alpha=verification.get("verdict_alpha", 0.05))
    return {"scenario": name, "partition": partition, "wall_s": wall,
            "run_dir": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
            "config": results["config"], "seeds": results["seeds"],
            "versions": results["versions"], "git_commit": results["git_commit"],
            "created": results["created"],
            "final_test_accuracy": [p["training"]["final_test_accuracy"]
                                    for p in results["per_seed"]],
            "summary": summary}


def _cell(entry: dict[str, Any], key: str) -> str:
    d = (entry.get("metrics") or {}).get(key)
    if not d or d.get("mean") is None:
        return "–"
    text = f"{d['mean']:.3f}" if key != "kl_forget" else f"{d['mean']:.3g}"
    if d.get("ci"):
        half = (d["ci"][1] - d["ci"][0]) / 2
        text += f" ± {half:.3f}" if key != "kl_forget" else f" ± {half:.2g}"
    return text


def _verdict(entry: dict[str, Any], criterion: str) -> str:
    v = (entry.get("verdicts") or {}).get(criterion)
    if not v or v.get("verdict") in (None, "–"):
        return ""
    text = f" **{v['verdict']}**"
    if v["verdict"] == "inconclusive" and "seeds_needed" in v:
        needed = v["seeds_needed"]
        text += " →∞" if needed is None else f" →{int(needed)}"
    return text


def markdown(scenarios: list[dict[str, Any]]) -> str:
    """One table: a line per scenario, partition and model (original, retraining, methods)."""
    head = ["scenario", "partition", "method", *(h for _, h, _ in SHOWN), "speed-up", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for sc in scenarios:
        for e in sc["summary"]:
            if e["setting"] != "federated" or e["role"] == "noise_floor":
                continue
            speed = (e.get("costs") or {}).get("speedup_vs_retrain") or {}
            cells = [sc["scenario"], sc["partition"], e["method"],
                     *(_cell(e, k) + _verdict(e, c) for k, _, c in SHOWN),
                     f"{speed['mean']:.1f}×" if speed.get("mean") and e["role"] == "method"
                     else "–", "; ".join(e.get("notes") or [])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", action="append", default=[],
                    help="run only scenarios whose name contains this (repeatable)")
    ap.add_argument("--partition", action="append", default=[], choices=PARTITIONS)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "scenarios")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse run directories that already hold results.json (re-summarised)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scenarios.json")
    args = ap.parse_args()
    chosen = {k: v for k, v in SCENARIOS.items() if not args.only or any(o in k for o in args.only)}
    results = [run_scenario(name, cfg, part, args.seeds, args.overrides, args.runs, args.reuse)
               for name, cfg in chosen.items() for part in (args.partition or PARTITIONS)
               if part == "iid" or name not in ONLY_IID]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"matrix": {"scenarios": list(chosen), "partitions": args.partition or
                          list(PARTITIONS), "seeds": args.seeds, "methods": list(METHODS),
                          "overrides": args.overrides},
               "scenarios": results}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(
        "Mean ± 95 % half-interval over seeds; **verdict** against retraining of the same seed "
        "(docs/algorithms.md, 'Verdicts against retraining'); res = the smallest margin the "
        "seeds decide, →n = seeds that would decide at δ.\n\n" + table)
    print(table)
    print(f"[scenarios] wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
