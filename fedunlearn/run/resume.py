"""What a run keeps on disk so that ``fedunlearn resume RUN_DIR`` can continue it.

``RUN_DIR/run.json``
    the resolved config and the command (``run`` or ``compare``), written once the config
    has passed every check and before the engine starts; each resumption appends to
    ``resumed``.
``SEED_DIR/checkpoint.<sha>.npz`` + ``checkpoint.json``
    after every committed training round: the exact global model after the round (float32
    as trained, whatever ``history.dtype`` is) and the round summaries so far. The JSON file
    is written last and names the arrays' file, whose name carries their SHA-256, so a kill
    between the two leaves the previous JSON and the arrays it names (the older arrays file is
    deleted after the JSON): a checkpoint is whole or absent. Both are deleted once training has finished: the final model then lives in the
    history store (and a strict purge must be able to delete it).
``SEED_DIR/training.json``
    the seed's ``training`` block, once training has finished.
``SEED_DIR/serving.json`` + ``serving.<sha>.npz``
    while the federated requests are being served, after each one: its rows, verification
    and purge so far, the next request, each method's model after the last answered request
    and what a method carries into the next one (FedRecover's trajectory) (the arrays; the
    JSON file is written last and names their file, as for checkpoints). Deleted once every request is
    served.
``SEED_DIR/served.json``
    the seed's answered requests (rows, purges), once all its federated requests are served.

Resuming a seed therefore starts from the most advanced of: served (nothing to redo),
part-served (serve the remaining requests), trained (serve the requests), a round checkpoint (train the remaining rounds), nothing
(train from round 1). Client randomness is derived from (seed, round, client), so the
continued rounds reproduce the uninterrupted run bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedunlearn.engine.port import RoundReport, RoundSummary
from fedunlearn.history.store import atomic_write, remove_file
from fedunlearn.models.params import Params

RUN_FILE = "run.json"
CHECKPOINT_ARRAYS = "checkpoint.npz"
"""The arrays' name in runs written before array files were named by their content."""
CHECKPOINT_META = "checkpoint.json"
TRAINING_FILE = "training.json"
SERVED_FILE = "served.json"
SERVING_FILE = "serving.json"
SERVING_ARRAYS = "serving.npz"
_ARRAYS = re.compile(r"(checkpoint|serving)(\.[0-9a-f]{16})?\.npz")
"""Array files of the resume state: ``NAME.<first 16 hex digits of their sha256>.npz`` (the
JSON file written after them names them, so a crash between the two leaves the previous JSON
and the arrays it names; older runs used ``NAME.npz``)."""


def arrays_name(kind: str, sha256: str) -> str:
    """``checkpoint.<sha16>.npz`` or ``serving.<sha16>.npz``."""
    return f"{kind}.{sha256[:16]}.npz"


def _arrays_path(seed_dir: Path, state: dict[str, Any], kind: str) -> Path:
    """The array file a resume-state JSON names (checked to be one of ours), or the name older
    runs used."""
    name = state.get("arrays", f"{kind}.npz")
    if not isinstance(name, str) or not _ARRAYS.fullmatch(name) or not name.startswith(kind):
        raise ResumeError(f"'{seed_dir}': the resume state names arrays {str(name)[:80]!r}, "
                          f"not a file of this run; it was edited: rerun into a new --out")
    return Path(seed_dir) / name


def remove_arrays(seed_dir: Path, kind: str, keep: str | None = None) -> None:
    """Delete ``kind``'s array files in ``seed_dir`` but ``keep``."""
    for path in sorted(Path(seed_dir).glob(f"{kind}*.npz")):
        if path.name != keep and _ARRAYS.fullmatch(path.name):
            remove_file(path)


def remove_temp_files(seed_dir: Path) -> list[str]:
    """Delete the temp files of atomic writes a crash cut short in ``seed_dir`` (our writer
    names them ``.<file>.<random>.tmp``): they may hold a model a strict purge deleted."""
    gone = []
    for path in sorted(Path(seed_dir).glob(".*.tmp")):
        if path.is_file() and not path.is_symlink():
            remove_file(path)
            gone.append(path.name)
    return gone


class ResumeError(ValueError):
    """A run directory that cannot be resumed; the message says why and what to do."""


def write_state(path: Path, obj: Any) -> None:
    """Write resume state as JSON, durably (the history store's atomic writer)."""
    atomic_write(path, json.dumps(obj, indent=1, default=_plain).encode())


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_bytes(path: Path) -> bytes:
    """A run directory's file, never through a symbolic link (docs/history.md, "Threat
    model"): a shared run directory must not make a resume read a file outside it."""
    if path.is_symlink():
        raise ResumeError(f"'{path}' is a symbolic link; a run directory's files are plain "
                          "files, so it was edited: rerun into a new --out")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ResumeError(f"'{path}' cannot be read ({exc.strerror or exc}); the run cannot "
                          "be resumed from it") from None


def read_json(path: Path) -> Any:
    data = read_bytes(path)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ResumeError(f"'{path}' cannot be read ({exc}); the run cannot be resumed from "
                          "it") from None


# ------------------------------------------------------------------------------ run.json

def write_run_file(out: Path, config: dict[str, Any], command: str) -> None:
    write_state(out / RUN_FILE, {"config": config, "command": command, "resumed": [],
                                "created": _now()})


def read_run_file(out: Path) -> dict[str, Any]:
    """``run.json`` of a run directory (its resolved config and command)."""
    path = out / RUN_FILE
    if not path.exists():
        raise ResumeError(f"'{out}' holds no {RUN_FILE}; pass a run directory written by "
                          "`fedunlearn run` (runs from before resume existed cannot be resumed)")
    return read_json(path)


def note_resumption(out: Path, run: dict[str, Any]) -> None:
    """Append this resumption's time to ``run.json`` (once every check has passed)."""
    write_state(out / RUN_FILE, {**run, "resumed": [*run.get("resumed", []), _now()]})


def note_added_seed(out: Path, seed: int) -> None:
    """Record in ``run.json`` a seed a sequential run added (``experiment.seeds_until_decided``),
    before any of its files exists, so that a resume runs it too."""
    run = read_run_file(out)
    write_state(out / RUN_FILE, {**run, "added_seeds": [*run.get("added_seeds", []), int(seed)]})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------ rounds

@dataclass
class Checkpoint:
    """Training state after ``round`` committed rounds."""

    round: int
    model: Params
    rounds: list[RoundSummary] = field(default_factory=list)


def _npz(params: Params) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"a{i}": v for i, v in enumerate(params.values())})
    return buffer.getvalue()


class Checkpointer:
    """Round listener writing :class:`Checkpoint` files after every committed round."""

    def __init__(self, seed_dir: Path, start: Checkpoint | None = None) -> None:
        self.dir = Path(seed_dir)
        self.rounds: list[dict[str, Any]] = [asdict(r) for r in (start.rounds if start else [])]

    def round_aggregated(self, report: RoundReport) -> None:
        pass

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        self.rounds.append(asdict(summary))
        data = _npz(model)
        sha = hashlib.sha256(data).hexdigest()
        name = arrays_name("checkpoint", sha)
        atomic_write(self.dir / name, data)
        write_state(self.dir / CHECKPOINT_META, {
            "round": server_round, "names": list(model), "arrays": name,
            "sha256": sha, "rounds": self.rounds})
        remove_arrays(self.dir, "checkpoint", keep=name)

    def finish(self) -> None:
        """Training has finished: the final model is in the history store."""
        remove_file(self.dir / CHECKPOINT_META)
        remove_arrays(self.dir, "checkpoint")


def load_checkpoint(seed_dir: Path) -> Checkpoint | None:
    """The last whole checkpoint of ``seed_dir``, or None."""
    meta_path = Path(seed_dir) / CHECKPOINT_META
    if not meta_path.exists():
        return None
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise ResumeError(f"'{meta_path}' is damaged (not a JSON object); rerun into a new --out")
    arrays_path = _arrays_path(Path(seed_dir), meta, "checkpoint")
    if not arrays_path.exists() and not arrays_path.is_symlink():
        raise ResumeError(f"'{arrays_path}' is missing although {CHECKPOINT_META} lists it; the "
                          "checkpoint is incomplete, rerun into a new --out")
    data = read_bytes(arrays_path)
    damaged = (f"'{arrays_path}' is damaged ({{}}); rerun into a new --out, or delete "
               f"{CHECKPOINT_META} and the checkpoint arrays to resume training from round 1")
    if not isinstance(meta, dict) or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ResumeError(damaged.format(f"it does not match its checksum in {CHECKPOINT_META}"))
    try:
        names, rnd = meta["names"], meta["round"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                and isinstance(rnd, int) and not isinstance(rnd, bool) and rnd >= 1):
            raise ValueError("'names' must list array names and 'round' be a round number")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            model = {name: arrays[f"a{i}"] for i, name in enumerate(names)}
        rounds = [RoundSummary(**r) for r in meta["rounds"]]
    except Exception as exc:  # noqa: BLE001 - numpy's parser raises many kinds on damage
        raise ResumeError(damaged.format(str(exc).splitlines()[0][:160] if str(exc)
                                         else type(exc).__name__)) from None
    return Checkpoint(round=rnd, model=model, rounds=rounds)


# ------------------------------------------------------------------------------ requests

def write_serving(seed_dir: Path, state: dict[str, Any],
                  models: dict[str, Params] | None, *,
                  arrays: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save a part-served federated pass: ``models`` (method name -> its model after the
    last answered request) first, then ``state`` naming their checksum. Returns what names
    the arrays written; pass it back as ``arrays`` with ``models=None`` when only ``state``
    changed (the arrays on disk are kept)."""
    if models is not None:
        names = [[method, key] for method, params in models.items() for key in params]
        data = _npz({f"{m}/{k}": models[m][k] for m, k in names})
        sha = hashlib.sha256(data).hexdigest()
        atomic_write(Path(seed_dir) / arrays_name("serving", sha), data)
        arrays = {"models": names, "sha256": sha, "arrays": arrays_name("serving", sha)}
    assert arrays is not None, "write_serving needs models, or the arrays already written"
    write_state(Path(seed_dir) / SERVING_FILE, {**state, **arrays})
    remove_arrays(Path(seed_dir), "serving", keep=arrays["arrays"])
    return arrays


def load_serving(seed_dir: Path) -> tuple[dict[str, Any], dict[str, Params]] | None:
    """The saved part-served pass of ``seed_dir`` (state, models), or None."""
    meta_path = Path(seed_dir) / SERVING_FILE
    if not meta_path.exists():
        return None
    state = read_json(meta_path)
    if why := _serving_problem(state):
        raise ResumeError(f"'{meta_path}' is damaged ({why}); rerun into a new --out")
    arrays_path = _arrays_path(Path(seed_dir), state, "serving")
    data = read_bytes(arrays_path) if arrays_path.exists() or arrays_path.is_symlink() else b""
    if hashlib.sha256(data).hexdigest() != state["sha256"]:
        raise ResumeError(f"'{arrays_path}' is missing or does not match its checksum in "
                          f"{SERVING_FILE}; rerun into a new --out")
    models: dict[str, Params] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            for i, (method, key) in enumerate(state["models"]):
                models.setdefault(method, {})[key] = arrays[f"a{i}"]
    except Exception as exc:  # noqa: BLE001 - numpy's parser raises many kinds on damage
        raise ResumeError(f"'{arrays_path}' does not hold the models {SERVING_FILE} lists "
                          f"({exc}); rerun into a new --out") from None
    return state, models


def _serving_problem(state: Any) -> str | None:
    """What is wrong with the shape of a ``serving.json`` (``None`` if nothing)."""
    if not isinstance(state, dict):
        return "not a JSON object"
    kinds = {"next_request": int, "pending_purge": bool, "rows": list, "verification": list,
             "purges": list, "models": list, "sha256": str}
    for key, kind in kinds.items():
        value = state.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"'{key}' must be {kind.__name__}, got {value!r}"[:160]
    if not all(isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)
               for m in state["models"]):
        return "'models' must list [method, array] name pairs"
    if not isinstance(state.get("states", {}), dict):
        return "'states' must be an object"
    before = state.get("before_purge")
    if before is not None and not (isinstance(before, dict) and all(
            isinstance(before.get(k), int) for k in ("files", "bytes"))):
        return "'before_purge' must hold integer 'files' and 'bytes'"
    return None


def clear_serving(seed_dir: Path) -> None:
    """Every request is served: the part-served state goes."""
    remove_file(Path(seed_dir) / SERVING_FILE)
    remove_arrays(Path(seed_dir), "serving")
