"""Result files: the provenance stamp, ``results.json`` and the atomic text writer."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fedunlearn.config.tree import Config
from fedunlearn.engine.port import TrainingRun
from fedunlearn.reporting.provenance import git_commit, versions


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
            "bytes_exchanged": run.bytes_exchanged,
            "client_epochs": run.client_epochs, "history_bytes": history_bytes,
            "client_failures": run.client_failures}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    _write_text(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def read_results(run_dir: Path) -> dict[str, Any]:
    """Load ``RUN_DIR/results.json``; a missing or unreadable file is a one-line ConfigError."""
    from fedunlearn.config.tree import ConfigError

    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no results.json in '{run_dir}'; pass a run directory written by "
                          "`fedunlearn run` or `fedunlearn compare`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{path}' is not readable JSON ({exc}); the run's results are "
                          "damaged - rerun the experiment") from None
    if not isinstance(results, dict) or "training" not in results:
        raise ConfigError(f"'{path}' has no 'training' section; it was not written by "
                          "fedunlearn")
    return results


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def training_summary(results: dict[str, Any], out: Path) -> str:
    """A few lines telling what the run did and where its files are."""
    per_seed = results.get("per_seed") or [{"seed": results["seed"], "dir": ".",
                                            "training": results["training"]}]
    name = results["config"]["experiment"]["name"]
    seeds = [p["seed"] for p in per_seed]
    lines = [(f"experiment     {name} (seed{'s' if len(seeds) > 1 else ''} "
              f"{', '.join(str(s) for s in seeds)})")]
    for p in per_seed:
        tr = p["training"]
        label = f"seed {p['seed']:<8} " if len(per_seed) > 1 else ""
        where = out / p.get("dir", ".") / "history"
        lines += [
            (f"{label or 'engine         '}{tr['engine']}  ({len(tr['rounds'])} rounds, "
             f"{tr['messages_sent']} messages, {tr['wall_s']:.1f}s)  test accuracy "
             f"{tr['final_test_accuracy']:.4f}  history {tr['history_bytes'] / 1e6:.2f} MB in "
             f"{where}")]
    lines.append(f"results        {out / 'results.json'}")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    """Write text atomically (temp file, then rename), with ``\\n`` line endings."""
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically (temp file, then rename; the rename replaces a symbolic link at
    ``path`` itself, never its target); a folder of ``path`` that is a symbolic link is
    refused, so nothing lands outside the run directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.is_symlink():
        raise OSError(f"{path.parent} is a symbolic link; fedunlearn writes results only into "
                      "plain folders of the run directory")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; result files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
