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
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedunlearn.config.tree import Config, from_run_dict
from fedunlearn.data.removal import resolve
from fedunlearn.engine.port import RoundReport, RoundSummary
from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import (
    JOURNAL,
    MANIFEST,
    HistoryStore,
    atomic_write,
    confined,
    remove_file,
)
from fedunlearn.models.params import Params
from fedunlearn.run import interrupt
from fedunlearn.run.checks import Method, build_methods, check_saved_model, settings_in
from fedunlearn.run.events import Purged, RequestAnswered, ServingListener
from fedunlearn.unlearning.base import can_resume, saved_state

if TYPE_CHECKING:
    from fedunlearn.run.pipeline import SeedRun

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


STATE_PREFIX = "#state:"  # serving.npz: a method's carried state, beside the methods' models


@dataclass
class Resumption:
    """Where an interrupted federated pass goes on: at request ``next_request``, each method
    from the model it left (``current``, by method name); ``pending_purge``: the purge of
    request ``next_request - 1`` may not have happened (it is done again, a no-op if it had)."""

    next_request: int
    current: dict[str, Params]
    pending_purge: bool = False
    before_purge: dict[str, int] | None = None
    """``files`` and ``bytes`` of the store before the pending purge (see :func:`_purge`)."""
    states: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    """Method name -> what it carries into the next request (:func:`carried_state`)."""


def resumable(method: object) -> bool:
    """Whether a run with ``method`` can be resumed between requests: it carries nothing
    into the next request, or it can save and restore what it carries
    (its capabilities, :func:`fedunlearn.unlearning.base.can_resume`)."""
    return can_resume(method)


def carried_state(methods: list[Method]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """What each method that carries state into the next request would carry now."""
    return {m.name: tuple(s) for m in methods  # type: ignore[misc]
            if (s := saved_state(m.method)) is not None}


def store_files(store: HistoryStore) -> int:
    """Files under the store's directory (what a purge's ``files_removed`` counts)."""
    return sum(1 for p in store.path.rglob("*") if p.is_file())


class ResumeJournal(ServingListener):
    """Saves a seed's federated pass after each request (``serving.json``), so that an
    interrupted pass goes on from the next request (:func:`restore`); a listener of the serving
    loop."""

    def __init__(self, run: SeedRun) -> None:
        self.run = run
        resumed = run.resumption
        self.models: dict[str, Params] = dict(resumed.current if resumed else {})
        self.states = dict(resumed.states if resumed else {})
        self.next_request = resumed.next_request if resumed else 0
        self.arrays: dict[str, Any] | None = None  # the arrays this journal last wrote

    def request_answered(self, event: RequestAnswered) -> None:
        rows, verification = self.run.tagged(
            event.rows, [event.verification] if event.verification is not None else [])
        self.run.rows += rows
        self.run.verification += verification
        self.models.update(event.current)
        self.states = dict(event.states)
        self.next_request = event.request + 1
        self.arrays = None  # new models to write
        self._save(pending=event.purge_pending)

    def purged(self, event: Purged) -> None:
        self.run.purges.append(event.purge)
        self._save(pending=False)  # the arrays of the answer it follows are kept

    def _save(self, *, pending: bool) -> None:
        run = self.run
        assert run.store is not None
        # what the store held before a pending purge: a purge done before an interruption
        # that came ahead of the next save is recorded from it on resume
        before = ({"files": store_files(run.store), "bytes": run.store.bytes_used()}
                  if pending else None)
        models = None if self.arrays is not None else {
            **self.models, **{STATE_PREFIX + name: a for name, (_, a) in self.states.items()}}
        self.arrays = write_serving(
            run.out, {"next_request": self.next_request, "pending_purge": pending,
                      "before_purge": before, "rows": run.rows, "verification": run.verification,
                      "purges": run.purges,
                      "states": {name: m for name, (m, _) in self.states.items()}},
            models, arrays=self.arrays)


def check_resumable(run: SeedRun, root: Path) -> None:
    """Refuse, reading files only (nothing is written, deleted or completed), a seed that
    cannot be resumed: every refusal happens before any seed's store is opened, since
    opening finishes an interrupted purge.

    Raises
    ------
    ResumeError, UnsafePathError
        A seed whose directory or history passes through a symbolic link; a seed
        interrupted with requests left after a strict purge (done or journaled), whose
        trained model those requests are measured against is gone; a seed whose methods
        carry in-memory state into requests still to serve.
    """
    rel = run.out.relative_to(root).as_posix() if run.out != root else ""
    history = confined(root, f"{rel}/history" if rel else "history", "the run directory")
    if (stop := _final_reason(run.cfg, run.out, history)) is not None:
        raise _final_stop(run, *stop)


def _final_reason(cfg: Config, seed_out: Path, history: Path) -> tuple[int, str] | None:
    """``(k, why)`` when a seed stopped after answering ``k`` requests, with requests left, can
    never go on (read only); ``None`` when it can, or has nothing left to serve."""
    if not history.exists() or (seed_out / SERVED_FILE).exists() \
            or not (seed_out / TRAINING_FILE).exists():
        return None
    k = _saved_next_request(seed_out)
    if k >= len(cfg.unlearning.requests):
        return None  # only bookkeeping is left (a last purge, results)
    if k > 0 and (why := _stateful_reason(cfg)):
        return k, why
    if _strict_purge_on_disk(history):
        return k, _STRICT_REASON
    return None


def restore(run: SeedRun) -> None:
    """Reopen a seed of an interrupted run at its most advanced saved state
    (:meth:`check_resumable` first)."""
    path = run.out / "history"
    run.lineage = LineageLog(run.out)
    if run.out.is_dir():  # writes a kill cut short (they may hold a purged model)
        remove_temp_files(run.out)
    if not path.exists():  # interrupted before its first round: start it afresh
        return
    run.store = HistoryStore.open(path)
    if (run.out / SERVED_FILE).exists():
        saved = read_json(run.out / SERVED_FILE)
        run.training, run.rows = saved["training"], saved["rows"]
        run.purges = saved["purges"]
        run.history_bytes_after_purge = saved["history_bytes_after_purge"]
        run.verification = saved.get("verification", [])
        run.served = True
        if "centralized" in settings_in(run.cfg):  # that pass is done again
            run.resume_event = {"request": 0, "setting": "centralized"}
        return
    if (run.out / TRAINING_FILE).exists():
        run.training = read_json(run.out / TRAINING_FILE)
        _restore_serving(run)
        return
    run.start = load_checkpoint(run.out)
    if run.start is not None:
        check_saved_model(run.start.model, run.setup.initial,
                          run.out / CHECKPOINT_META,
                          f"delete {CHECKPOINT_META} to train this seed from round 1")
    if run.start is None and run.store.rounds():
        # killed before the first checkpoint, or the checkpoint was removed: training is
        # redone from round 1 and every stored round is checked against its redone twin
        print(f"[resume] seed {run.seed}: no checkpoint ({CHECKPOINT_META}); training "
              f"restarts from round 1 and the {len(run.store.rounds())} stored rounds are "
              "checked against the redone ones", file=sys.stderr, flush=True)
        run.resume_event = {"round": 0}


def _restore_serving(run: SeedRun) -> None:
    """Trained, interrupted while serving: go on after the last answered request (its
    state saved by :class:`ResumeJournal`), or from the first if none was answered.

    Raises
    ------
    ResumeError
        If the store was purged beyond the saved state, or a strict purge deleted the
        trained model the remaining requests are compared against."""
    assert run.store is not None and run.lineage is not None
    saved = load_serving(run.out)
    state, models = saved if saved is not None else ({"next_request": 0}, {})
    k = state["next_request"]
    if saved is not None:
        _check_saved(run, state)
        for name, model in models.items():
            if not name.startswith(STATE_PREFIX):
                check_saved_model(model, run.setup.initial, run.out / SERVING_FILE,
                                  "delete serving.json and serving.npz to serve every request again, "
                                  "when no request was purged yet")
    answered = {c for step in resolve(run.cfg, run.setup.data)[:k] for c in step.targets}
    if stray := sorted(set(run.store.purged()) - answered):
        raise ResumeError(f"seed {run.seed} was interrupted while serving its requests, "
                          f"after clients {stray} were purged without a saved answer; "
                          "this seed cannot be resumed - rerun it into a new --out")
    left = len(run.cfg.unlearning.requests) - k
    if run.store.globals_deleted_from() is not None and left:  # (check_resumable's)
        raise _final_stop(run, k, _STRICT_REASON)
    if saved is not None:
        run.rows, run.verification = state["rows"], state["verification"]
        run.purges = state["purges"]
        states = {name: (meta, models.pop(STATE_PREFIX + name, {}))
                  for name, meta in state.get("states", {}).items()}
        run.resumption = Resumption(k, models, state["pending_purge"],
                                     state.get("before_purge"), states)
    # after the last request's strict purge no request is left to measure against the
    # trained model, which that purge deleted: the seed only finishes its bookkeeping
    run.final = run.store.final_model() if left else None
    run.trained = True
    run.resume_event = {"request": k, "setting": "federated"}


def _final_stop(run: SeedRun, k: int, why: str) -> ResumeError:
    return ResumeError(f"seed {run.seed} was interrupted after answering {k} of its "
                       f"{len(run.cfg.unlearning.requests)} requests, but {why}, so it "
                       "cannot be resumed - rerun it into a new --out")


def _check_saved(run: SeedRun, state: dict[str, Any]) -> None:
    """``serving.json`` must describe requests ``0..k-1`` of this config: their rows and,
    when purging, their purges (the last one possibly pending)."""
    requests = [list(step.targets) for step in resolve(run.cfg, run.setup.data)]
    k = state["next_request"]
    done = requests[:k] if 0 <= k <= len(requests) else None
    rows = {tuple(sorted(r.get("request", []))) for r in state["rows"]
            if isinstance(r, dict) and r.get("setting") == "federated"}
    purged = [sorted(p.get("clients", [])) for p in state["purges"] if isinstance(p, dict)]
    expected = [] if not run.cfg.unlearning.purge or done is None else (
        done[:-1] if state["pending_purge"] else done)
    if done is None or rows != {tuple(r) for r in done} or purged != expected:
        raise ResumeError(f"'{run.out / SERVING_FILE}' does not describe requests 0..{k - 1} "
                          f"of this run ({len(requests)} requests); it was edited or "
                          "damaged - rerun it into a new --out")


@contextmanager
def _farewell_on_stop(out: Path) -> Iterator[None]:
    try:
        yield
    except interrupt.Interrupted:
        print(farewell(out), file=sys.stderr, flush=True)
        raise


def farewell(out: Path) -> str:
    """The last line of an interrupted run: how to resume it, or why it cannot be (see
    :func:`_restore_serving`)."""
    why = _not_resumable(out)
    if why is not None:
        return (f"interrupted: the partial run is in {out}, but {why}, so it cannot be "
                "resumed; rerun it into a new --out")
    return (f"interrupted: the partial run is in {out} (history store consistent); continue it "
            f"with: fedunlearn resume {out}")


_STRICT_REASON = ("a strict purge deleted the trained model its remaining requests are "
                  "measured against (history.purge = \"updates\" keeps such runs resumable)")


def _stateful_reason(cfg: Config) -> str | None:
    """Why a run of ``cfg`` stopped between requests cannot go on: its methods that carry
    state into the next request and cannot save it (:func:`resumable`); ``None`` if none."""
    if stateful := [m.name for m in build_methods(cfg) if not resumable(m.method)]:
        return (f"{', '.join(stateful)} carries what it recovered for one request into the "
                "next in memory only")
    return None


def _saved_next_request(seed_out: Path) -> int:
    """The next request a part-served seed's ``serving.json`` names (0 without one)."""
    if not (seed_out / SERVING_FILE).exists() and not (seed_out / SERVING_FILE).is_symlink():
        return 0
    state = read_json(seed_out / SERVING_FILE)
    k = state.get("next_request") if isinstance(state, dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ResumeError(f"'{seed_out / SERVING_FILE}' is damaged ('next_request' is not a "
                          "request number); rerun into a new --out")
    return k


def _strict_purge_on_disk(history: Path) -> bool:
    """Whether a strict purge deleted the store's global models, or is journaled to (read
    only: the store is not opened, so an interrupted purge is not finished here)."""
    manifest = read_json(history / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("globals_deleted_from") is not None:
        return True
    journal = history / JOURNAL
    if journal.exists() or journal.is_symlink():
        entry = read_json(journal)
        return isinstance(entry, dict) and entry.get("level") == "strict"
    return False


def _not_resumable(out: Path) -> str | None:
    """Why a part-served seed of ``out`` cannot be resumed, read from its files (``None`` if
    nothing stands in the way; never raises, the farewell must always be printed)."""
    try:
        cfg = from_run_dict(read_json(out / "run.json")["config"])
        for seed_out in (out, *sorted(out.glob("seed-*"))):
            if (stop := _final_reason(cfg, seed_out, seed_out / "history")) is not None:
                return stop[1]
    except Exception:  # noqa: BLE001 - a farewell never fails; resume will say what is wrong
        return None
    return None
