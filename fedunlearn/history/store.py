"""On-disk store of a federated run's per-round history, the input of every unlearning method.

Per round ``t`` the store keeps the global model ``M_t`` the round started from, the round's
participants with their example counts and aggregation weights, each participant's update
``U_k^t = (local model) - M_t`` (only every ``retention_interval`` rounds, cast to
``update_dtype``), and for every client the running weighted sum ``S_k = sum_t w_k^t U_k^t``
(updated every round: the stored float32 sum plus ``w_k^t U_k^t``, added in float64 and stored
as float32 again; the store goes on from what it stored, so a store reopened mid-run gives the
same sums, bit for bit, as one that was never closed).

Layout (no pickle anywhere; arrays are uncompressed ``.npz`` read with ``allow_pickle=False``)::

    manifest.json                  format, settings, rounds, and sha256 + size of every other file
    rounds/00001/meta.json         participants, num_examples, weights, purged clients
    rounds/00001/global.npz        M_1 (float arrays as float32, integer buffers as they are)
    rounds/00001/updates.npz       every participant's U_k^1 (if round 1 retains updates):
                                   "#clients" (ids, ascending) and per array a stack, one row
                                   per client; after a purge, updates.p<n>.npz without them
    sums/client_00003.r00005.npz   S_3 over rounds 1..5
    final.npz                      the global model after the last round

Replayability: methods that replay or subtract stored updates assume the training kept the
history identity ``M_{t+1} = M_t + sum_k w_k U_k^t`` (plain weighted averaging, as FedAvg and
FedProx do; server momentum breaks it). The store checks it as it records: when the next global
model arrives (the next :meth:`HistoryStore.record_round` or :meth:`~HistoryStore.record_final`)
it compares it with the previous round's ``M_t + sum_k w_k U_k`` (float arrays, from the full
precision updates) and keeps, per round, the largest absolute deviation divided by the largest
absolute value of that expected model, and whether it is at most :data:`IDENTITY_RTOL`, under
``identity`` in the manifest. :meth:`HistoryStore.replayable` is false as soon as one round
breaks it. A round whose successor was never recorded (an unfinished store, or one reopened
mid-run) stays unchecked and counts as holding.

Every file is written atomically (temp file, fsync, ``os.replace``) and never rewritten in
place: a changed sum, round meta or updates file gets a new name. ``manifest.json`` is replaced
last, so a crash leaves the previous consistent state plus, at worst, unlisted files. Each
``.npz`` holds its array names in order as ``arr_0`` and the arrays as ``arr_1``, ``arr_2``, ...

A round's updates share one file (format version 2; version 1 kept one file per client, so
a round at 1,000 clients wrote 201 files and the manifest listed every one of them; the
commit's share of a round, before and after, is in docs/benchmarks.md, "History store
commits"). Reading an update loads its round's file once (the last one read
is kept), so replaying round by round costs one read per round; the price is memory: a read
holds the whole round (participants × parameters × 4 bytes, e.g. 76 MiB for 40 clients of a
500k-parameter model) where format 1 held one update. On load, the file's ids must be the
round's unpurged participants and every array one float row per client, or the read stops with
:class:`HistoryCorruptError` (a row off by one would otherwise give a client another's update).

Purging (:meth:`HistoryStore.purge_clients`) has two levels (:data:`PURGE_LEVELS`):

* ``"strict"`` (default) deletes the targets' updates and running sums, the global models of
  every round from the first one a target took part in, and the final model: from those, with
  the other clients' updates and the weights, ``U_u^t = (M_{t+1} - M_t - sum_{k!=u} w_k U_k^t)
  / w_u`` and ``S_u = M_F - M_1 - sum_{k!=u} S_k`` could be solved back. The other clients'
  updates and sums stay (the history methods need them for later requests; they replay from
  the initial model the caller passes, never from stored global models). Asking for a deleted
  model raises :class:`HistoryPurgedError`; the store then records no further rounds.
* ``"updates"`` deletes only the targets' updates and running sums; both formulas above still
  recover them from what remains (to float32 precision).

Round metas keep participants, counts and weights (lineage) and list the purged clients.
A purge is journaled: ``purge-journal.json`` (written and synced first) names the clients, the
level and every file to delete; then the new round metas and updates files are written, the
manifest is replaced, the files are deleted and the journal removed. :meth:`HistoryStore.open`
(and the next purge) finishes an interrupted purge from its journal, so a crash at any point
leaves, after reopening, either no purge (the journal never reached the disk) or a complete one.

:meth:`HistoryStore.open` checks, besides every file's size and sha256, that the manifest is
consistent (rounds ``1..n`` each with its meta, global model and retained updates; weights
summing to 1; running sums named after each client's last round; no file of a purged client;
nothing listed that no round needs) and raises :class:`HistoryCorruptError` naming the file
otherwise. Unlisted files that a purge left are deleted; other unlisted files (an interrupted
write) are reported with a warning and ignored.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import operator
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Params = dict[str, np.ndarray]

FORMAT = "fedunlearn-history"
VERSION = 2
MANIFEST = "manifest.json"
JOURNAL = "purge-journal.json"
PURGE_LEVELS = ("strict", "updates")
"""``"strict"``: also delete the global models from the targets' first round on and the final
model; ``"updates"``: only the targets' updates and running sums (re-solvable)."""
UPDATE_DTYPES = ("float32", "float16")
_IDS = "#clients"
"""Name of the client ids in a round's updates file; no model array may have it."""
_WEIGHT_TOL = 1e-5
IDENTITY_RTOL = 1e-4
"""Largest relative deviation from ``M_{t+1} = M_t + sum_k w_k U_k`` a round may show and still
count as holding: float32 aggregation stays around 1e-7, server momentum is far above."""
_MANIFEST_KEYS = ("retention_interval", "update_dtype", "rounds", "round_meta", "schema", "sums",
                  "final", "purged", "files")


class HistoryError(Exception):
    """A history store was misused or cannot be opened."""


class HistoryCorruptError(HistoryError):
    """A file of a history store is missing, truncated, fails its checksum, or the manifest
    contradicts itself."""


class UnsafePathError(HistoryCorruptError):
    """A path read from a run directory's files that is not a plain relative path inside it
    (absolute, with ``..``, through a symbolic link, or not a name the format uses); nothing
    was read, written or deleted through it."""


class HistoryPurgedError(HistoryError):
    """A global model was asked for that a strict purge deleted."""


@dataclass(frozen=True)
class RoundRecord:
    """What one round looked like: who took part, with which weight, and what was kept."""

    round: int
    participants: tuple[int, ...]
    num_examples: tuple[int, ...]
    weights: tuple[float, ...]
    updates_retained: bool


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def identity_deviation(actual: Mapping[str, np.ndarray],
                       expected: Mapping[str, np.ndarray]) -> float:
    """``max |actual - expected| / max |expected|`` over the arrays of ``expected``.

    The denominator is at least ``1e-12``; a non-finite value gives ``inf``.

    >>> identity_deviation({"w": np.array([1.0, 2.5])}, {"w": np.array([1.0, 2.0])})
    0.25
    """
    dev = max((float(np.max(np.abs(np.asarray(actual[k], np.float64) - e), initial=0.0))
               for k, e in expected.items()), default=0.0)
    scale = max((float(np.max(np.abs(e), initial=0.0)) for e in expected.values()), default=0.0)
    out = dev / max(scale, 1e-12)
    return out if np.isfinite(out) else float("inf")


FileOpHook = Callable[[str, Path], None]
_file_op_hook: FileOpHook | None = None


def set_file_op_hook(hook: FileOpHook | None) -> FileOpHook | None:
    """Install ``hook(op, path)``, called before every file operation that changes a run
    directory through this module (``create``, ``fsync``, ``replace``, ``fsync-dir``,
    ``syncfs``, ``unlink``): the seam of the crash tests, which kill the process at each
    operation in turn (``tests/crash_harness.py``). Returns the previous hook."""
    global _file_op_hook
    previous, _file_op_hook = _file_op_hook, hook
    return previous


def _op(op: str, path: Path) -> None:
    if _file_op_hook is not None:
        _file_op_hook(op, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename.

    With ``sync`` (default) the file and the rename are made durable before returning; without
    it the caller must make them durable (:func:`_sync_paths`) before anything refers to them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _op("create", path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                _op("fsync", path)
                os.fsync(fh.fileno())
        _op("replace", path)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a file-size limit: name the file
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        _op("fsync-dir", path.parent)
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable; not every platform lets us open a directory."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(fd)`` (flush one file system), or None where libc lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs()


def _sync_paths(root: Path, paths: Iterable[Path]) -> None:
    """Make files written with ``sync=False`` under ``root``, and their renames, durable.

    A round writes a few hundred files at 1,000 clients; one fsync per file and per rename
    is slow on a disk (docs/benchmarks.md, "Figures from docstrings"). ``syncfs`` on the
    store's file system flushes them all at once (Linux); elsewhere every file and directory
    is fsynced.
    """
    paths = list(paths)
    if not paths:
        return
    _op("syncfs", root)
    if _SYNCFS is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    for d in sorted({p.parent for p in paths}):
        _fsync_dir(d)


atomic_write = _atomic_write  # public: checkpoint files use the same durable write


_STORE_FILE = re.compile(
    r"rounds/\d{5,}/(meta(\.p\d+)?\.json|global\.npz|updates(\.p\d+)?\.npz)"
    r"|sums/client_\d{5,}\.r\d{5,}\.npz|final\.npz")
"""Every name a store file can have (relative to the store, POSIX separators)."""


def confined(base: Path, rel: object, what: str, *,
             pattern: re.Pattern[str] | None = None) -> Path:
    """``base / rel`` after checking that ``rel``, read from a file of ``base``, stays inside
    it: a relative, normalised POSIX path (no ``..``, ``.``, empty part or backslash) whose
    every existing component below ``base`` is a plain directory or file, never a symbolic
    link; with ``pattern``, a name that pattern matches in full.

    Everything a run directory holds is untrusted (docs/history.md, "Threat model"): no file
    is opened, written or deleted through a path before this check.

    Raises
    ------
    UnsafePathError
        One line naming ``what`` and the path.

    >>> confined(Path("/store"), "rounds/00001/global.npz", "x")
    PosixPath('/store/rounds/00001/global.npz')
    >>> confined(Path("/store"), "../etc/passwd", "a journal entry")
    Traceback (most recent call last):
    ...
    fedunlearn.history.store.UnsafePathError: a journal entry names '../etc/passwd', which is not a relative path inside /store; the run directory was edited, do not use it
    """
    def refuse(why: str) -> UnsafePathError:
        return UnsafePathError(f"{what} names {str(rel)[:120]!r}, which {why}; the run directory "
                               "was edited, do not use it")

    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise refuse(f"is not a relative path inside {base}")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise refuse(f"is not a relative path inside {base}")
    if pattern is not None and not pattern.fullmatch(rel):
        raise refuse("is not a file of this format")
    path = base
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise refuse("passes through a symbolic link")
    return path


def read_confined(base: Path, rel: str, what: str) -> bytes:
    """The bytes of ``base / rel`` (see :func:`confined`), opened without following a
    symbolic link that appeared since the check."""
    path = confined(base, rel, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _remove(path: Path) -> None:
    """Delete ``path`` if it exists (every deletion of the store goes through here)."""
    if path.exists() or path.is_symlink():
        _op("unlink", path)
    path.unlink(missing_ok=True)


remove_file = _remove  # public: checkpoint files are deleted the same way


def _npz_bytes(params: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, np.array(list(params), dtype=np.str_), *params.values())
    return buffer.getvalue()


def _updates_file(clients: Sequence[int], rows: Mapping[str, np.ndarray]) -> bytes:
    """A round's updates file: the client ids (:data:`_IDS`), then ``rows`` (a stack per array,
    one row per client, in the ids' order)."""
    return _npz_bytes({_IDS: np.asarray(clients, np.int64), **rows})


def _copy(manifest: dict) -> dict:
    """A copy of ``manifest`` that a round or a purge can change without touching the original.

    Entries are replaced, never changed in place, so copying the containers is enough (a deep
    copy through JSON grows with the manifest: docs/benchmarks.md, "Figures from
    docstrings").
    """
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in manifest.items()}


def _as_ids(values: Iterable[int], what: str) -> list[int]:
    try:
        ids = [operator.index(v) for v in values]
    except TypeError:
        raise HistoryError(f"{what} must be integers; pass partition ids and counts") from None
    if any(i < 0 for i in ids):
        raise HistoryError(f"{what} must be non-negative integers, got {ids}")
    return ids


class HistoryStore:
    """A federated run's history on disk; build it with :meth:`create` or :meth:`open`.

    Parameters
    ----------
    path
        Directory of the store.
    manifest
        The parsed ``manifest.json``. Use the class methods instead of this constructor.
    verify
        Check size and sha256 of every listed file first, in sorted order.
    """

    def __init__(self, path: Path, manifest: dict, *, verify: bool = False) -> None:
        self.path = path
        self._m = manifest
        self._pending: list[Path] = []  # files written since the last commit
        self._seen = self._manifest_stamp()  # the manifest this object read or wrote last
        self._deleter: ThreadPoolExecutor | None = None
        self._deletions: list[Future[None]] = []
        self._check_layout()
        for rel in sorted(manifest["files"]) if verify else ():
            self._read(rel)
        self._records: dict[int, RoundRecord] = {}
        # files the last purge this object did deleted, and wrote anew without the clients
        self.last_purge: dict[str, int] | None = None
        self._purged_in: dict[int, set[int]] = {}
        self._sums: dict[int, Params] = {}  # float64 running sums loaded so far
        self._rows: tuple[str, list[int], Params] | None = None  # the last updates file read
        # (round, its M_t + sum_k w_k U_k in float64) until the next global model arrives
        self._expected: tuple[int, Params] | None = None
        for t in manifest["rounds"]:
            meta = json.loads(self._read(manifest["round_meta"][str(t)]))
            self._records[t] = RoundRecord(
                t, tuple(meta["participants"]), tuple(meta["num_examples"]),
                tuple(meta["weights"]), bool(meta["updates_retained"]))
            self._purged_in[t] = set(meta["purged"])

    @property
    def retention_interval(self) -> int:
        """Updates are kept for rounds ``1, 1 + Δt, 1 + 2Δt, ...`` where Δt is this value."""
        return int(self._m["retention_interval"])

    @property
    def update_dtype(self) -> str:
        """``"float32"`` or ``"float16"``: the dtype retained updates are stored in."""
        return str(self._m["update_dtype"])

    # ---------------------------------------------------------------- creation and opening
    @classmethod
    def create(cls, path: str | Path, *, retention_interval: int = 1,
               update_dtype: str = "float32") -> HistoryStore:
        """Start an empty store at ``path``, which must not exist or be an empty directory.

        Raises
        ------
        HistoryError
            If ``path`` holds anything, or the settings are not allowed; nothing is touched.
        """
        path = Path(path)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            what = ("already holds a history" if (path / MANIFEST).exists()
                    else "exists and is not an empty directory")
            raise HistoryError(f"{path} {what}; choose another --out or remove it first")
        if isinstance(retention_interval, bool) or not isinstance(retention_interval, int) \
                or retention_interval < 1:
            raise HistoryError(f"retention_interval must be an integer >= 1, "
                               f"got {retention_interval!r}")
        if update_dtype not in UPDATE_DTYPES:
            raise HistoryError(f"update_dtype must be one of {', '.join(UPDATE_DTYPES)}, "
                               f"got {update_dtype!r}")
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, {
            "format": FORMAT, "version": VERSION, "retention_interval": retention_interval,
            "update_dtype": update_dtype, "rounds": [], "round_meta": {}, "schema": None,
            "sums": {}, "final": None, "purged": [], "identity": {}, "files": {}})
        store._commit(store._m)
        return store

    @classmethod
    def open(cls, path: str | Path) -> HistoryStore:
        """Open an existing store, verifying size and sha256 of every file it lists.

        Raises
        ------
        HistoryError
            If ``path`` does not exist or is not a history of this format.
        HistoryCorruptError
            If the manifest or any listed file is missing, truncated or fails its checksum.
        """
        path = Path(path)
        where = ("open a run's history store: RUN_DIR/history, or RUN_DIR/seed-S/history in "
                 "a run of several seeds")
        if not path.is_dir():
            raise HistoryError(f"{path} {'is a file' if path.exists() else 'does not exist'}; "
                               f"{where}")
        try:
            manifest = json.loads(read_confined(path, MANIFEST, "the history store"))
        except FileNotFoundError:
            inside = sorted({str(p) for pattern in ("history", "*/history", "*/seed-*/history")
                             for p in path.glob(pattern) if p.is_dir()})
            if inside:  # a run directory (or a folder of runs), not a store
                raise HistoryError(f"{path} is not a history store; the stores in it: "
                                   f"{', '.join(inside[:6])}{' ...' if len(inside) > 6 else ''}"
                                   ) from None
            if not ((path / "rounds").is_dir() or (path / "sums").is_dir()):
                raise HistoryError(f"{path} is not a history store (no {MANIFEST}); "
                                   f"{where}") from None
            raise HistoryCorruptError(f"{MANIFEST} is missing in {path}; the history is "
                                      "incomplete, record the run again") from None
        except (OSError, ValueError) as err:
            raise HistoryCorruptError(f"{MANIFEST} in {path} is unreadable ({err}); "
                                      "record the run again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise HistoryCorruptError(f"{MANIFEST} in {path} is not a {FORMAT} manifest; "
                                      "pass the --out directory of a run")
        if missing := [k for k in _MANIFEST_KEYS if k not in manifest]:
            raise HistoryCorruptError(f"{MANIFEST} in {path} lacks {missing}; "
                                      "record the run again")
        if manifest.get("version") != VERSION:
            raise HistoryError(f"{path} has history format version {manifest.get('version')}, "
                               f"this fedunlearn reads {VERSION}; use a matching fedunlearn")
        store = cls(path, manifest, verify=True)
        store._recover()
        store._check_consistency()
        store._sweep_leftovers()
        if unlisted := store.unlisted_files():
            warnings.warn(f"{path}: {len(unlisted)} file(s) not listed in {MANIFEST}, e.g. "
                          f"{unlisted[0]} (left by an interrupted write); they are ignored",
                          stacklevel=2)
        return store

    # ---------------------------------------------------------------- recording
    def retains_updates(self, round: int) -> bool:
        """Whether per-client updates of ``round`` are kept: rounds ``1, 1 + Δt, ...``."""
        return round >= 1 and (round - 1) % self.retention_interval == 0

    def record_round(self, round: int, *, global_model: Mapping[str, np.ndarray],
                     participants: Sequence[int], num_examples: Sequence[int],
                     weights: Sequence[float],
                     updates: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """Record round ``round``; rounds must come in order ``1, 2, 3, ...``.

        Parameters
        ----------
        round
            The round number, one more than the last recorded round.
        global_model
            The global model ``M_t`` the round started from.
        participants, num_examples, weights
            Client ids (unique), their example counts and aggregation weights (sum to 1).
        updates
            ``{client: U_k^t}`` for exactly the participants, over the float arrays of
            ``global_model`` with matching shapes.

        Raises
        ------
        HistoryError
            On any inconsistency; nothing is recorded then.
        """
        self._check_fresh()
        ids, counts, w = self._check_round(round, participants, num_examples, weights, updates)
        model = {k: np.asarray(v) for k, v in global_model.items()}
        if _IDS in model:
            raise HistoryError(f"round {round}: the model has an array named {_IDS!r}, which "
                               "the store reserves for client ids; rename it")
        schema = self._m["schema"] or [[k, list(v.shape), _is_float(v)] for k, v in model.items()]
        self._check_schema(model, schema, f"global model of round {round}")
        fkeys = [k for k, _, is_f in schema if is_f]
        for k in ids:
            self._check_update(round, k, updates[k], model, fkeys)

        order = sorted(range(len(ids)), key=ids.__getitem__)
        expected = {key: model[key].astype(np.float64) for key in fkeys}
        for k, wk in zip(ids, w, strict=True):
            for key in fkeys:
                expected[key] += wk * np.asarray(updates[k][key], np.float64)
        record = RoundRecord(round, tuple(ids[i] for i in order),
                             tuple(counts[i] for i in order), tuple(w[i] for i in order),
                             self.retains_updates(round))
        m = _copy(self._m)  # work on a copy, commit at the end
        self._check_identity(m, model)
        rdir = f"rounds/{round:05d}"
        self._write(m, f"{rdir}/global.npz", _npz_bytes(
            {k: v.astype(np.float32) if _is_float(v) else v for k, v in model.items()}))
        if record.updates_retained:
            self._write(m, f"{rdir}/updates.npz", _updates_file(record.participants, self._stack(
                round, record.participants, updates, fkeys)))
        new_sums: dict[int, Params] = {}
        for k, wk in zip(record.participants, record.weights, strict=True):
            upd = {key: np.asarray(updates[k][key]) for key in fkeys}
            old = self._sum64(k, {key: model[key].shape for key in fkeys})
            # added in float64, kept as stored (float32): a reopened store goes on exactly
            stored = {key: (old[key] + wk * upd[key].astype(np.float64)).astype(np.float32)
                      for key in fkeys}
            new_sums[k] = {key: v.astype(np.float64) for key, v in stored.items()}
            rel = f"sums/client_{k:05d}.r{round:05d}.npz"
            self._write(m, rel, _npz_bytes(stored))
            m["sums"][str(k)] = rel
        meta = {"round": round, "participants": list(record.participants),
                "num_examples": list(record.num_examples), "weights": list(record.weights),
                "updates_retained": record.updates_retained, "purged": []}
        m["round_meta"][str(round)] = f"{rdir}/meta.json"
        self._write(m, f"{rdir}/meta.json", json.dumps(meta, indent=1).encode())
        m["rounds"].append(round)
        m["schema"] = schema
        stale = [self._m["sums"][str(k)] for k in new_sums if str(k) in self._m["sums"]]
        for rel in stale:
            del m["files"][rel]
        self._commit(m)
        self._records[round], self._purged_in[round] = record, set()
        self._sums.update(new_sums)
        self._expected = (round, expected)
        self._unlink_later(stale)

    def _check_round(self, round: int, participants: Sequence[int], num_examples: Sequence[int],
                     weights: Sequence[float], updates: Mapping[int, object]
                     ) -> tuple[list[int], list[int], list[float]]:
        """The round's ids, counts and weights, after checking they may be recorded next."""
        self._refuse_after_strict_purge(f"record round {round}")
        expected = len(self._m["rounds"]) + 1
        if self._m["final"] is not None or round != expected:
            done = "the final model is recorded" if self._m["final"] else f"next is {expected}"
            raise HistoryError(f"cannot record round {round}: {done}; record rounds in order")
        ids = _as_ids(participants, "participants")
        counts = _as_ids(num_examples, "num_examples")
        w = [float(x) for x in weights]
        if not ids or len(set(ids)) != len(ids) or len(counts) != len(ids) or len(w) != len(ids):
            raise HistoryError(f"round {round}: participants must be unique and non-empty, with "
                               "one num_examples and one weight each; fix the round's inputs")
        if not all(np.isfinite(x) and x >= 0 for x in w) or abs(sum(w) - 1.0) > _WEIGHT_TOL:
            raise HistoryError(f"round {round}: weights must be >= 0 and sum to 1, got {w}")
        if purged := sorted(set(ids) & set(self._m["purged"])):
            raise HistoryError(f"round {round}: clients {purged} were purged; drop them")
        if set(updates) != set(ids):
            raise HistoryError(f"round {round}: updates are for clients {sorted(updates)} but "
                               f"participants are {sorted(ids)}; pass one update per participant")
        return ids, counts, w

    def record_final(self, model: Mapping[str, np.ndarray]) -> None:
        """Record the global model after the last round (once, after at least one round)."""
        self._check_fresh()
        self._refuse_after_strict_purge("record the final model")
        if not self._m["rounds"] or self._m["final"] is not None:
            raise HistoryError("record_final needs at least one recorded round and may be "
                               "called once; record the rounds first")
        model = {k: np.asarray(v) for k, v in model.items()}
        self._check_schema(model, self._m["schema"], "final model")
        m = _copy(self._m)
        self._check_identity(m, model)
        self._write(m, "final.npz", _npz_bytes(
            {k: v.astype(np.float32) if _is_float(v) else v for k, v in model.items()}))
        m["final"] = "final.npz"
        self._commit(m)
        self.flush_deletions()  # training is over: leave no stale file behind
        self._expected = None

    # ---------------------------------------------------------------- queries
    def rounds(self) -> list[int]:
        """Recorded round numbers, ascending."""
        return list(self._m["rounds"])

    def round_record(self, round: int) -> RoundRecord:
        """The :class:`RoundRecord` of ``round``."""
        if round not in self._records:
            raise HistoryError(f"round {round} is not recorded; recorded rounds are "
                               f"1..{len(self._records)}")
        return self._records[round]

    def participants(self, round: int) -> tuple[int, ...]:
        """Client ids that took part in ``round``, ascending (purged ones included: lineage)."""
        return self.round_record(round).participants

    def clients(self) -> list[int]:
        """Every client that ever took part and was not purged, ascending."""
        seen = {k for r in self._records.values() for k in r.participants}
        return sorted(seen - set(self._m["purged"]))

    def update(self, round: int, client: int) -> dict[str, np.ndarray]:
        """Client ``client``'s update in ``round`` as float32 arrays.

        Raises
        ------
        HistoryError
            If the round kept no updates, or the client did not take part or was purged.
        """
        self._check_fresh()
        record = self.round_record(round)
        if client not in record.participants:
            raise HistoryError(f"client {client} did not take part in round {round}; "
                               f"participants were {list(record.participants)}")
        if client in self._purged_in[round]:
            raise HistoryError(f"client {client} was purged; its updates are gone")
        if not record.updates_retained:
            raise HistoryError(f"round {round} kept no updates (retention interval "
                               f"{self.retention_interval}); use a retained round or the sums")
        ids, rows = self._round_updates(round)
        i = ids.index(client)
        return {k: v[i].astype(np.float32) for k, v in rows.items()}

    def _updates_rel(self, round: int, purged: set[int] | None = None) -> str | None:
        """The file holding ``round``'s kept updates with ``purged`` (default: the round's
        purged clients) left out; ``None`` if the round keeps none or every row is purged."""
        record = self._records[round]
        purged = self._purged_in[round] if purged is None else purged
        if not record.updates_retained or not set(record.participants) - purged:
            return None
        suffix = f".p{len(purged)}" if purged else ""
        return f"rounds/{round:05d}/updates{suffix}.npz"

    def _round_updates(self, round: int) -> tuple[list[int], Params]:
        """Client ids and stacked updates of ``round`` (the last round read is kept)."""
        rel = self._updates_rel(round)
        if rel is None:
            raise HistoryError(f"round {round} has no stored updates left")
        if self._rows is None or self._rows[0] != rel:
            arrays = self._load(rel)
            ids = [int(k) for k in arrays.pop(_IDS, [])]
            want = [k for k in self._records[round].participants
                    if k not in self._purged_in[round]]
            if ids != want:
                raise HistoryCorruptError(f"{rel} in {self.path} holds the updates of clients "
                                          f"{ids}, the round's meta says {want}; the history "
                                          "was edited or damaged, record the run again")
            shapes = {k: (len(ids), *shape) for k, shape, is_f in self._m["schema"] if is_f}
            if list(arrays) != list(shapes) or any(
                    v.shape != shapes[k] or not _is_float(v) for k, v in arrays.items()):
                raise HistoryCorruptError(f"{rel} in {self.path} does not hold one float row "
                                          f"per client for each of {list(shapes)}; the history "
                                          "was edited or damaged, record the run again")
            self._rows = (rel, ids, arrays)
        return self._rows[1], self._rows[2]

    def _stack(self, round: int, clients: Sequence[int],
               updates: Mapping[int, Mapping[str, np.ndarray]], keys: list[str]) -> Params:
        """One array per key with a row per client (in ``clients``' order), in
        ``update_dtype``."""
        out: Params = {}
        dtype = np.dtype(self.update_dtype)
        for key in keys:
            rows = np.stack([np.asarray(updates[k][key]) for k in clients])
            cast = rows.astype(dtype)
            if not np.isfinite(cast).all():
                for i, k in enumerate(clients):
                    self._check_cast(round, k, {key: rows[i]}, {key: cast[i]})
            out[key] = cast
        return out

    def global_model(self, round: int) -> dict[str, np.ndarray]:
        """The global model at the start of ``round``.

        Raises
        ------
        HistoryPurgedError
            If a strict purge deleted it (see :meth:`globals_deleted_from`).
        """
        self._check_fresh()
        self.round_record(round)
        cut = self.globals_deleted_from()
        if cut is not None and round >= cut:
            raise HistoryPurgedError(self._purged_message(f"the global model of round {round}"))
        return self._load(f"rounds/{round:05d}/global.npz")

    def final_model(self) -> dict[str, np.ndarray]:
        """The global model after the last round.

        Raises
        ------
        HistoryPurgedError
            If a strict purge deleted it.
        """
        self._check_fresh()
        if self.globals_deleted_from() is not None:
            raise HistoryPurgedError(self._purged_message("the final model"))
        if self._m["final"] is None:
            raise HistoryError("no final model is recorded; call record_final after training")
        return self._load(self._m["final"])

    def globals_deleted_from(self) -> int | None:
        """The first round whose global model a strict purge deleted (with every later one and
        the final model), or ``None`` if every recorded global model is kept."""
        cut = self._m.get("globals_deleted_from")
        return None if cut is None else int(cut)

    def purged(self) -> list[int]:
        """Clients purged from the store, ascending."""
        return sorted(self._m["purged"])

    def running_sum(self, client: int) -> dict[str, np.ndarray]:
        """``sum_t w_k^t U_k^t`` of ``client`` over all recorded rounds, as float32."""
        self._check_fresh()
        if client not in self.clients():
            why = "was purged" if client in self._m["purged"] else "never took part"
            raise HistoryError(f"client {client} {why}; known clients are {self.clients()}")
        shapes = {k: tuple(s) for k, s, is_f in self._m["schema"] if is_f}
        return {k: v.astype(np.float32) for k, v in self._sum64(client, shapes).items()}

    def identity_deviation(self, round: int) -> float | None:
        """How far the model after ``round`` was from ``M_t + sum_k w_k U_k^t``, relative to
        its scale (see :func:`identity_deviation`); ``None`` if unchecked, ``inf`` if not
        finite."""
        self.round_record(round)
        entry = self._m.get("identity", {}).get(str(round))
        if entry is None:
            return None
        return float("inf") if entry["deviation"] is None else float(entry["deviation"])

    def identity_violations(self) -> list[int]:
        """Rounds whose next global model broke ``M_{t+1} = M_t + sum_k w_k U_k^t`` (by more
        than :data:`IDENTITY_RTOL`, relative), ascending."""
        return sorted(int(t) for t, e in self._m.get("identity", {}).items() if not e["holds"])

    def replayable(self) -> bool:
        """Whether every checked round kept ``M_{t+1} = M_t + sum_k w_k U_k^t``, so that
        stored updates and running sums add up to the trained models."""
        return not self.identity_violations()

    def bytes_used(self) -> int:
        """Total bytes of the store's files, manifest included."""
        listed = sum(int(f["bytes"]) for f in self._m["files"].values())
        return listed + (self.path / MANIFEST).stat().st_size

    # ---------------------------------------------------------------- purging
    def purge_clients(self, clients: Iterable[int], *, level: str = "strict") -> int:
        """Delete what lets ``clients``' contributions be read or solved back; return the bytes
        freed.

        Parameters
        ----------
        clients
            Client ids that took part in training. Already purged ones are skipped: purging
            them again only finishes an interrupted purge (a no-op otherwise).
        level
            ``"strict"`` (default) or ``"updates"``; see the module docstring. ``"strict"``
            deletes the targets' updates and running sums, the global models from the first
            round a target took part in, and the final model; ``"updates"`` only the targets'
            updates and running sums, which stay re-solvable from what remains.

        Round metas keep participants and weights (lineage) and list the clients as purged.
        The purge is journaled; a crash at any point is finished by the next :meth:`open` or
        purge.

        Raises
        ------
        HistoryError
            If ``level`` is unknown or a client never took part; nothing is changed then.
        """
        self._check_fresh()
        if level not in PURGE_LEVELS:
            raise HistoryError(f"purge level must be one of {', '.join(PURGE_LEVELS)}, "
                               f"got {level!r}")
        ids = sorted(set(_as_ids(clients, "clients to purge")))
        seen = {k for r in self._records.values() for k in r.participants}
        if unknown := [k for k in ids if k not in seen]:
            raise HistoryError(f"cannot purge clients {unknown}: they never took part in this "
                               f"history; known clients are {self.clients()}")
        self.flush_deletions()
        before = self.bytes_used()
        self._recover()
        todo = [k for k in ids if k not in self._m["purged"]]
        if todo:
            self._purge(todo, level)
        self._sweep_leftovers()
        return before - self.bytes_used()

    def _purge(self, ids: list[int], level: str) -> None:
        """Journal, write the new round metas, commit the manifest, delete, drop the journal."""
        m = _copy(self._m)
        gone: list[str] = []
        metas: dict[str, bytes] = {}  # new round metas and updates files without the targets
        for t, record in self._records.items():
            if hit := set(ids) & set(record.participants):
                m["round_meta"][str(t)] = self._purge_round(t, hit, metas, gone)
        gone += [m["sums"].pop(str(k)) for k in ids if str(k) in m["sums"]]
        if level == "strict":
            first = min(t for t, r in self._records.items() if set(ids) & set(r.participants))
            old_cut = self.globals_deleted_from()
            cut = first if old_cut is None else min(first, old_cut)
            gone += [rel for t in self._m["rounds"] if t >= cut
                     and (rel := f"rounds/{t:05d}/global.npz") in m["files"]]
            if m["final"] is not None:
                gone.append(m["final"])
            m["final"] = None
            m["globals_deleted_from"] = cut
        journal = {"clients": ids, "level": level, "delete": gone, "write": list(metas)}
        self.last_purge = {"deleted": len(gone), "written": len(metas)}
        _atomic_write(self.path / JOURNAL, json.dumps(journal, indent=1).encode())
        for rel, data in metas.items():
            self._write(m, rel, data)
        for rel in gone:
            m["files"].pop(rel, None)
        m["purged"] = sorted(set(m["purged"]) | set(ids))
        self._commit(m)
        for t, record in self._records.items():
            self._purged_in[t] |= set(ids) & set(record.participants)
        for k in ids:
            self._sums.pop(k, None)
        self._rows = None
        self._finish_journal(journal)

    def _purge_round(self, t: int, hit: set[int], write: dict[str, bytes],
                     gone: list[str]) -> str:
        """Round ``t`` without the clients ``hit``: add its new meta (and updates file, unless
        no row is left) to ``write`` and the files they replace to ``gone``; return the new
        meta's name."""
        purged = sorted(self._purged_in[t] | hit)
        meta = json.loads(self._read(self._m["round_meta"][str(t)]))
        meta["purged"] = purged
        rel = f"rounds/{t:05d}/meta.p{len(purged)}.json"
        write[rel] = json.dumps(meta, indent=1).encode()
        gone.append(self._m["round_meta"][str(t)])
        if old := self._updates_rel(t):
            gone.append(old)
            if new := self._updates_rel(t, set(purged)):
                kept, rows = self._round_updates(t)
                keep = [i for i, k in enumerate(kept) if k not in hit]
                write[new] = _updates_file([kept[i] for i in keep],
                                           {key: v[keep] for key, v in rows.items()})
        return rel

    def _finish_journal(self, journal: Mapping) -> None:
        """Delete the journal's files that the manifest no longer lists, then the journal."""
        listed = set(self._m["files"])
        for rel in [*journal["delete"], *journal["write"]]:
            if rel not in listed:
                _remove(self.path / rel)
        _remove(self.path / JOURNAL)

    def _recover(self) -> None:
        """Finish a purge whose journal is on disk (a crash interrupted it)."""
        path = self.path / JOURNAL
        if not path.exists():
            return
        try:
            journal = json.loads(read_confined(self.path, JOURNAL, "the purge journal"))
            ids = sorted(_as_ids(journal["clients"], "journal clients"))
            level = journal["level"]
            if level not in PURGE_LEVELS or not all(
                    isinstance(r, str) for r in [*journal["delete"], *journal["write"]]):
                raise ValueError(level)
            for rel in [*journal["delete"], *journal["write"]]:  # before anything is deleted
                confined(self.path, rel, f"{JOURNAL} in {self.path}", pattern=_STORE_FILE)
        except UnsafePathError:
            raise
        except (OSError, ValueError, KeyError, TypeError, HistoryError) as err:
            raise HistoryCorruptError(f"{JOURNAL} in {self.path} is unreadable ({err}); a purge "
                                      "was interrupted, record the run again") from None
        if todo := [k for k in ids if k not in self._m["purged"]]:
            self._purge(todo, level)  # the manifest was not committed: do the purge again
        else:
            self._finish_journal(journal)

    def _refuse_after_strict_purge(self, what: str) -> None:
        if self.globals_deleted_from() is not None:
            raise HistoryError(f"cannot {what}: a strict purge deleted the global models of "
                               "this history; record a complete run before purging")

    def _purged_message(self, what: str) -> str:
        return (f"{what} was deleted by a strict purge of clients {self.purged()} (the global "
                f"models from round {self.globals_deleted_from()} on and the final model, from "
                "which their updates could be solved back); replay from the initial model and "
                "the stored updates, or start from the model the previous request left")

    # ---------------------------------------------------------------- internals
    def _write(self, m: dict, rel: str, data: bytes) -> None:
        """Write a file the next :meth:`_commit` will list (made durable by that commit)."""
        _atomic_write(self.path / rel, data, sync=False)
        self._pending.append(self.path / rel)
        m["files"][rel] = {"sha256": _sha256(data), "bytes": len(data)}

    def _commit(self, m: dict) -> None:
        """Make every pending file durable, then replace the manifest (durably) with ``m``."""
        _sync_paths(self.path, self._pending)
        self._pending = []
        try:
            _atomic_write(self.path / MANIFEST, json.dumps(m, separators=(",", ":")).encode())
        finally:  # this object's own write, whether or not it completed, is no other's change
            self._seen = self._manifest_stamp()
        self._m = m

    def _manifest_stamp(self) -> tuple[int, int, int] | None:
        """Inode, mtime and size of the manifest (``None`` if there is none yet); each commit
        replaces the file, so another commit changes it."""
        try:
            st = (self.path / MANIFEST).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _check_fresh(self) -> None:
        """Refuse to read or write through a view of the store that another store object (in
        this process or another) has changed since: what this one holds in memory (the
        manifest, the last round's updates, running sums) could be a purged client's, and a
        commit from it would undo the other's changes.

        Raises
        ------
        HistoryError
            If the manifest on disk is not the one this object read or wrote last.
        """
        if self._manifest_stamp() != self._seen:
            raise HistoryError(f"the history at {self.path} was changed by another store "
                               "object since this one opened it (a purge or a new round); "
                               "open it again with HistoryStore.open")

    def _read(self, rel: str) -> bytes:
        """Bytes of a listed file, after checking its size and sha256 against the manifest."""
        entry = self._m["files"].get(rel)
        if entry is None:
            raise HistoryCorruptError(f"{rel} is not listed in {MANIFEST} of {self.path}; "
                                      "the history is inconsistent, record the run again")
        try:
            data = read_confined(self.path, rel, f"{MANIFEST} of {self.path}")
        except FileNotFoundError:
            raise HistoryCorruptError(f"{rel} is missing in {self.path}; the history is "
                                      "incomplete, record the run again") from None
        except OSError as err:
            raise HistoryCorruptError(f"{rel} in {self.path} cannot be read "
                                      f"({err.strerror or err}); record the run again") from None
        if len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
            what = "has the wrong size" if len(data) != entry["bytes"] else "fails its checksum"
            raise HistoryCorruptError(f"{rel} {what} in {self.path}; the file is damaged, "
                                      "record the run again")
        return data

    def _load(self, rel: str) -> Params:
        data = self._read(rel)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                names = [str(n) for n in z["arr_0"]]
                return {n: z[f"arr_{i + 1}"] for i, n in enumerate(names)}
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
            raise HistoryCorruptError(f"{rel} in {self.path} is not a readable array file "
                                      f"({err}); record the run again") from None

    def _sum64(self, client: int, shapes: Mapping[str, tuple[int, ...]]) -> Params:
        """The float64 running sum of ``client`` (zeros if it has none yet), cached."""
        if client not in self._sums:
            rel = self._m["sums"].get(str(client))
            stored = self._load(rel) if rel else {}
            self._sums[client] = {k: stored[k].astype(np.float64) if k in stored
                                  else np.zeros(shape, np.float64) for k, shape in shapes.items()}
        return self._sums[client]

    def _check_identity(self, m: dict, model: Params) -> None:
        """Enter in ``m`` how far ``model`` (the next global model) is from the expectation."""
        if self._expected is None:
            return
        t, expected = self._expected
        dev = identity_deviation(model, expected)
        m.setdefault("identity", {})[str(t)] = {
            "deviation": dev if np.isfinite(dev) else None, "holds": dev <= IDENTITY_RTOL}

    @staticmethod
    def _check_schema(model: Params, schema: list, what: str) -> None:
        names = [k for k, _, _ in schema]
        if missing := [k for k in names if k not in model]:
            raise HistoryError(f"{what} lacks {missing[0]!r}; pass the full model state")
        if extra := [k for k in model if k not in names]:
            raise HistoryError(f"{what} has unexpected {extra[0]!r}; keep the architecture fixed")
        for k, shape, is_f in schema:
            if list(model[k].shape) != shape or _is_float(model[k]) != is_f:
                raise HistoryError(f"{what}: {k!r} has shape {model[k].shape} dtype "
                                   f"{model[k].dtype}, expected shape {tuple(shape)} "
                                   f"({'float' if is_f else 'non-float'}); keep it fixed")

    @staticmethod
    def _check_update(round: int, client: int, update: Mapping[str, np.ndarray],
                      model: Params, fkeys: list[str]) -> None:
        what = f"update of client {client} in round {round}"
        if missing := [k for k in fkeys if k not in update]:
            raise HistoryError(f"{what} lacks {missing[0]!r}; send every float array")
        if extra := [k for k in update if k not in fkeys]:
            raise HistoryError(f"{what} has {extra[0]!r}, which is not a float array of the "
                               "global model; send only float arrays")
        for k in fkeys:
            u = np.asarray(update[k])
            if u.shape != model[k].shape or not _is_float(u):
                raise HistoryError(f"{what}: {k!r} has shape {u.shape} dtype {u.dtype}, expected "
                                   f"float of shape {model[k].shape}; send local - global")

    def _check_cast(self, round: int, client: int, upd: Params, cast: Params) -> None:
        for k, c in cast.items():
            if not np.isfinite(c).all() and np.isfinite(upd[k]).all():
                raise HistoryError(f"update of client {client} in round {round}: {k!r} overflows "
                                   f"{self.update_dtype}; use update_dtype float32")

    def _unlink(self, rels: Iterable[str]) -> None:
        for rel in rels:
            _remove(self.path / rel)

    def _unlink_later(self, rels: list[str]) -> None:
        """Delete files the committed manifest no longer lists, off the round's critical path.

        At 1,000 clients a round replaces about a hundred running-sum files, and deleting the
        old ones cost more than writing the new ones on this machine's disk. The files are
        unlisted already, so a crash before they go only leaves garbage, which
        :meth:`_sweep_leftovers` removes (for a purged client: on the next open or purge).
        """
        if self._deleter is None:
            self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-rm")
        self._deletions.append(self._deleter.submit(self._unlink, rels))

    def flush_deletions(self) -> None:
        """Wait until every deferred deletion is done (re-raising its error, if any)."""
        pending, self._deletions = self._deletions, []
        for future in pending:
            future.result()

    def unlisted_files(self) -> list[str]:
        """Files in the store's directory that ``manifest.json`` does not list, sorted (after
        the deferred deletions are done)."""
        self.flush_deletions()
        listed = set(self._m["files"]) | {MANIFEST, JOURNAL}
        return sorted(rel for f in self.path.rglob("*")
                      if f.is_file() and (rel := f.relative_to(self.path).as_posix()) not in listed)

    def _sweep_leftovers(self) -> None:
        """Delete unlisted files that belong to a purged client or to a global model a strict
        purge deleted (leftovers of an interrupted write or purge); never a listed file."""
        names = tuple(f"client_{k:05d}" for k in self._m["purged"])
        cut = self.globals_deleted_from()
        for rel in self.unlisted_files():
            name = rel.rsplit("/", 1)[-1]
            deleted_global = cut is not None and (
                "final.npz" in name or ("global.npz" in name and (
                    m := re.fullmatch(r"rounds/(\d+)/[^/]*", rel)) and int(m[1]) >= cut))
            # an updates file may hold a purged client's row: none unlisted survives a purge
            # (the file itself, or the temp file of a write a crash cut short)
            updates = names and re.fullmatch(
                r"rounds/\d+/\.?updates(\.p\d+)?\.npz(\.[^/]*\.tmp)?", rel)
            if any(n in name for n in names) or deleted_global or updates:
                _remove(self.path / rel)

    def _check_layout(self) -> None:
        """The manifest's own structure, before any round meta is read."""
        m, where = self._m, f"{MANIFEST} of {self.path}"
        for key in ("files", "round_meta", "sums"):
            if not isinstance(m[key], dict):
                raise HistoryCorruptError(f"{where}: '{key}' is not an object; the history was "
                                          "edited, record the run again")
        for rel in [*m["files"], *m["round_meta"].values(), *m["sums"].values(),
                    *([m["final"]] if m["final"] is not None else [])]:
            confined(self.path, rel, f"{where}", pattern=_STORE_FILE)
        for rel, entry in m["files"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise HistoryCorruptError(f"{where}: the entry of {rel} lacks an integer 'bytes' "
                                          "and a 'sha256'; the history was edited, record the "
                                          "run again")
        rounds = m["rounds"]
        if not isinstance(rounds, list) or rounds != list(range(1, len(rounds) + 1)):
            gap = next((t for t in range(1, len(rounds) + 2) if t not in rounds), None) \
                if isinstance(rounds, list) else None
            raise HistoryCorruptError(f"{where} lists rounds {rounds}, not 1..n (round {gap} is "
                                      "missing); the history was edited, record the run again")
        if extra := sorted(set(m["round_meta"]) ^ {str(t) for t in rounds}, key=str):
            raise HistoryCorruptError(f"{where}: round_meta and rounds disagree on round "
                                      f"{extra[0]}; the history was edited, record the run again")
        for rel in [*m["round_meta"].values(), *m["sums"].values(),
                    *([m["final"]] if m["final"] else [])]:
            if rel not in m["files"]:
                raise HistoryCorruptError(f"{where} points to {rel} but does not list it; the "
                                          "history was edited, record the run again")
        cut = m.get("globals_deleted_from")
        if cut is not None and (not isinstance(cut, int) or cut < 1 or m["final"] is not None):
            raise HistoryCorruptError(f"{where}: globals_deleted_from = {cut!r} contradicts the "
                                      "final model or the rounds; record the run again")

    def _check_consistency(self) -> None:
        """What the rounds, the purged clients and the listed files say must agree; raise
        :class:`HistoryCorruptError` naming the first file that does not."""
        last = self._check_round_metas()
        self._check_purged(last)
        expected = self._needed_files(last)
        listed = set(self._m["files"])
        if missing := sorted(expected - listed):
            raise self._bad(f"{MANIFEST} does not list {missing[0]}, which the recorded rounds "
                            "need")
        if extra := sorted(listed - expected):
            raise self._bad(f"{MANIFEST} lists {extra[0]}, which no recorded round needs")

    def _bad(self, what: str) -> HistoryCorruptError:
        return HistoryCorruptError(f"{what} in {self.path}; the history was edited or damaged, "
                                   "record the run again")

    def _check_round_metas(self) -> dict[int, int]:
        """Check every round meta on its own; return each client's last round."""
        last: dict[int, int] = {}
        for t, r in self._records.items():
            rel = self._m["round_meta"][str(t)]
            n = len(r.participants)
            if r.round != t or len(set(r.participants)) != n or not n \
                    or len(r.num_examples) != n or len(r.weights) != n:
                raise self._bad(f"{rel} does not describe round {t} (round number, "
                                "participants, counts and weights must agree)")
            if not all(np.isfinite(w) and w >= 0 for w in r.weights) \
                    or abs(sum(r.weights) - 1.0) > _WEIGHT_TOL:
                raise self._bad(f"{rel}: weights {list(r.weights)} sum to "
                                f"{sum(r.weights):.6g}, not 1")
            if r.updates_retained != self.retains_updates(t):
                raise self._bad(f"{rel}: updates_retained is {r.updates_retained} but the "
                                f"retention interval is {self.retention_interval}")
            last.update({k: t for k in r.participants})
        return last

    def _check_purged(self, last: Mapping[int, int]) -> None:
        """Purged clients took part, have no file listed, and every meta says so."""
        m, purged = self._m, set(self._m["purged"])
        if unknown := sorted(purged - set(last)):
            raise self._bad(f"{MANIFEST} marks client {unknown[0]} purged, who never took part")
        for rel in sorted(m["files"]):
            owner = re.search(r"client_(\d+)", rel)
            if owner and int(owner[1]) in purged:
                raise self._bad(f"{MANIFEST} marks client {int(owner[1])} purged but lists its "
                                f"file {rel}")
        for t, r in self._records.items():
            if self._purged_in[t] != purged & set(r.participants):
                raise self._bad(f"{m['round_meta'][str(t)]} lists purged clients "
                                f"{sorted(self._purged_in[t])}, {MANIFEST} says "
                                f"{sorted(purged & set(r.participants))}")

    def _needed_files(self, last: Mapping[int, int]) -> set[str]:
        """Every file the recorded rounds need, after checking the running sums' names."""
        m, purged = self._m, set(self._m["purged"])
        cut = self.globals_deleted_from() or len(self._records) + 1
        needed = set(m["round_meta"].values())
        for t in self._records:
            if t < cut:
                needed.add(f"rounds/{t:05d}/global.npz")
            if rel := self._updates_rel(t):
                needed.add(rel)
        for k, t in last.items():
            if k in purged:
                continue
            rel = f"sums/client_{k:05d}.r{t:05d}.npz"
            needed.add(rel)
            if m["sums"].get(str(k)) != rel:
                raise self._bad(f"{MANIFEST}: the running sum of client {k} should be {rel} "
                                f"(its last round is {t}), found {m['sums'].get(str(k))}")
        if extra := sorted(set(m["sums"]) - {str(k) for k in last if k not in purged}):
            raise self._bad(f"{MANIFEST} lists a running sum of client {extra[0]}, who is "
                            "purged or never took part")
        if m["final"] is not None:
            needed.add(m["final"])
        return needed
