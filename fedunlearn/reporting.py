"""The only module that writes result files and prints result tables."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fedunlearn.config import Config
from fedunlearn.federation.port import TrainingRun
from fedunlearn.provenance import git_commit, versions


def stamp(cfg: Config) -> dict[str, Any]:
    """The provenance block every result file starts with."""
    return {"config": cfg.to_dict(), "seed": cfg.seed, "versions": versions(),
            "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def training_block(run: TrainingRun, *, engine: str, history_bytes: int) -> dict[str, Any]:
    """The ``training`` section of ``results.json``."""
    return {"engine": engine,
            "rounds": [dataclasses.asdict(r) for r in run.rounds],
            "final_test_accuracy": run.rounds[-1].test_accuracy if run.rounds else math.nan,
            "wall_s": run.wall_s, "messages_sent": run.messages_sent,
            "client_epochs": run.client_epochs, "history_bytes": history_bytes}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, default=_jsonable)
        fh.write("\n")
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def training_summary(results: dict[str, Any], out: Path) -> str:
    """A few lines telling what the run did and where its files are."""
    tr = results["training"]
    rounds = tr["rounds"]
    lines = [
        f"experiment     {results['config']['experiment']['name']} (seed {results['seed']})",
        (f"engine         {tr['engine']}  ({len(rounds)} rounds, {tr['messages_sent']} "
         f"messages, {tr['wall_s']:.1f}s)"),
        f"test accuracy  {tr['final_test_accuracy']:.4f}",
        f"history        {tr['history_bytes'] / 1e6:.2f} MB in {out / 'history'}",
        f"results        {out / 'results.json'}",
    ]
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The removal comparison as a fixed-width text table, one row per request and method."""
    metric_names = [m for m in ("test_accuracy", "retain_accuracy", "forget_accuracy",
                                "backdoor_asr") if any(m in r["metrics"] for r in rows)]
    short = {"test_accuracy": "test", "retain_accuracy": "retain", "forget_accuracy": "forget",
             "backdoor_asr": "ASR"}
    head = (f"{'request':<10}{'method':<14}" + "".join(f"{short[m]:>8}" for m in metric_names)
            + f"{'wall s':>9}{'speedup':>9}{'cl.epochs':>10}{'rounds':>7}{'msgs':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = f"{r['speedup_vs_retrain']:.1f}x" if r["speedup_vs_retrain"] else "-"
        lines.append(f"{r['request']!s:<10}{r['method']:<14}"
                     + "".join(f"{r['metrics'].get(m, float('nan')):>8.3f}" for m in metric_names)
                     + f"{r['wall_s']:>9.2f}{speed:>9}{r['client_epochs']:>10.1f}"
                     f"{r['rounds']:>7}{r['messages_sent']:>6}")
    return "\n".join(lines)
