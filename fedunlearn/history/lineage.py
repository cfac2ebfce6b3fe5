"""The lineage log: an append-only record of which data shaped which model, and its removal.

``RUN_DIR/lineage.jsonl`` gets one JSON object per line, never rewritten:

* ``round``: a training round's participants, the hash of each participant's update and of the
  global model the round produced;
* ``model``: a model that was produced (the trained model, each unlearned model) with the
  clients whose data it was trained with (directly or through stored updates) and the method;
* ``request``: who asked to be removed; ``purge``: what was deleted from the history store.

:func:`client_lineage` answers "which models were ever trained with client k's data, and when
was it removed?" (also ``fedunlearn lineage RUN_DIR --client k``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "lineage.jsonl"


def params_hash(params: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the arrays, in order."""
    h = hashlib.sha256()
    for name, array in params.items():
        a = np.ascontiguousarray(array)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# the fields each event must carry for the lineage questions to be answerable
REQUIRED = {"round": ("round", "participants", "model_hash", "time"),
            "model": ("kind", "model_hash", "trained_with", "time"),
            "request": ("request", "clients", "time"),
            "purge": ("clients", "time")}


def _check_event(record: Any) -> None:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - caught with the JSON errors
    missing = [k for k in REQUIRED.get(record.get("event"), ()) if k not in record]
    if "event" not in record or missing:
        raise ValueError(f"missing {missing or ['event']}")


class LineageError(ValueError):
    """The lineage log is damaged somewhere other than its last, interrupted line."""


class LineageLog:
    """Append-only JSON-lines log in a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / FILENAME

    def append(self, event: str, **fields: Any) -> None:
        """Append one event (flushed and fsynced)."""
        record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # never through a symbolic link: a shared run directory must not make us append to a
        # file outside it (docs/history.md, "Threat model")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All events in order (empty if the log does not exist).

        A last line cut short by a crash mid-append (no trailing newline) is skipped: every
        complete event before it was fsynced and stands. Damage anywhere else is a
        :class:`LineageError` naming the line, since the log is append-only.
        """
        if not self.path.exists() and not self.path.is_symlink():
            return []
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise LineageError(f"{self.path} cannot be read ({exc.strerror or exc}; a lineage "
                               "log is never a symbolic link)") from None
        with os.fdopen(fd, "rb") as fh:
            text = fh.read().decode(errors="replace")
        lines = text.split("\n")
        events: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                _check_event(record)
            except ValueError as exc:
                if number == len(lines):  # unterminated last line: an interrupted append
                    self.truncated_tail = line
                    break
                raise LineageError(f"{self.path} line {number} is damaged ({exc}); the log is "
                                   "append-only, so restore it from a copy") from None
            events.append(record)
        return events

    truncated_tail: str | None = None


def discarded_models(events: list[dict[str, Any]]) -> set[int]:
    """Positions in ``events`` of the models an interrupted serving pass produced and its
    resumption produced again: a ``resume`` event with ``request = r`` and ``setting = s``
    discards every earlier model of setting ``s`` served for request ``r`` or later (and, for
    ``r = 0``, the centralized methods' fits). They existed, in memory, and are kept in the
    log; the answers are the later ones.

    >>> ev = [{"event": "model", "kind": "unlearned", "request": 0, "setting": "federated"},
    ...       {"event": "model", "kind": "unlearned", "request": 1, "setting": "federated"},
    ...       {"event": "resume", "request": 1, "setting": "federated"},
    ...       {"event": "model", "kind": "unlearned", "request": 1, "setting": "federated"}]
    >>> sorted(discarded_models(ev))
    [1]
    """
    out: set[int] = set()
    for i, e in enumerate(events):
        if e["event"] != "resume" or "request" not in e:
            continue
        for j in range(i):
            m = events[j]
            if m["event"] != "model" or m.get("setting", "federated") != e.get("setting"):
                continue
            if m.get("request", -1) >= e["request"] or (m["kind"] == "fitted"
                                                        and e["request"] == 0):
                out.add(j)
    return out


def client_lineage(events: list[dict[str, Any]], client: int) -> dict[str, Any]:
    """What the log says about ``client``: rounds it shaped, models trained with its data,
    and its removal request and purge. Models of a serving pass that was interrupted and
    done again carry ``"discarded": true`` (:func:`discarded_models`)."""
    dropped = discarded_models(events)
    events = [{**e, "discarded": True} if i in dropped else e for i, e in enumerate(events)]
    rounds = [e["round"] for e in events if e["event"] == "round"
              and client in e["participants"]]
    keys = ("model_hash", "kind", "method", "request", "round", "time", "exact", "discarded")
    # every global model from the client's first round on carries its data
    models = [{**{k: e[k] for k in keys if k in e}, "kind": "global"} for e in events
              if e["event"] == "round" and rounds and e["round"] >= rounds[0]]
    models += [{k: e[k] for k in keys if k in e}
               for e in events if e["event"] == "model" and client in e["trained_with"]]
    free = [{k: e[k] for k in keys if k in e} for e in events if e["event"] == "model" and client in e.get("forgot", [])]
    requests = [e for e in events if e["event"] == "request" and client in e["clients"]]
    purges = [e for e in events if e["event"] == "purge" and client in e["clients"]]
    # every request that removed any of its data (a redone one: its last record), with the
    # models that answered it and its purge
    latest = {e["request"]: e for e in requests}
    every = [{**entry,
              "served_by": [{k: m[k] for k in keys if k in m} for m in events
                            if m["event"] == "model" and m.get("kind") == "unlearned"
                            and m.get("request") == i],
              "purge": next((p for p in purges if p.get("request") == i), None)}
             for i, entry in sorted(latest.items())]
    return {"client": client, "rounds": rounds, "models_trained_with_data": models,
            "removal_request": requests[-1] if requests else None,  # a redone one is the last
            "models_after_removal": free, "purge": purges[0] if purges else None,
            "requests": every}


_DISCARDED = "  [discarded: its serving pass was interrupted and done again]"


def format_client_lineage(info: dict[str, Any]) -> str:
    """Human-readable answer for the command line."""
    c = info["client"]
    lines = [f"client {c} took part in rounds: {info['rounds'] or 'none'}"]
    lines.append(f"models trained with client {c}'s data ({len(info['models_trained_with_data'])}):")
    lines += [f"  {m['model_hash'][:12]}  {m['kind']:<7} "
              f"{'round ' + str(m['round']) if 'round' in m else m.get('method', '')}  {m['time']}"
              f"{_DISCARDED if m.get('discarded') else ''}"
              for m in info["models_trained_with_data"]]
    every = info.get("requests")
    if every is None:  # an answer computed before requests below the client level
        every = [] if info["removal_request"] is None else [
            {**info["removal_request"], "served_by": info["models_after_removal"],
             "purge": info["purge"]}]
    if not every:
        lines.append(f"client {c} has not asked to be removed")
    for req in every:
        lines.append(f"removal requested: request {req['request']} at {req['time']} "
                     f"({_what(req)})")
        lines += [f"  served by {m.get('method')}: model {m['model_hash'][:12]} at {m['time']}"
                  f" ({'exact' if m.get('exact') else 'approximate'} removal)"
                  f"{_DISCARDED if m.get('discarded') else ''}"
                  for m in req.get("served_by") or []]
        purge = req.get("purge")
        if purge is not None:
            lines.append(f"  stored updates purged at {purge['time']}: "
                         f"{purge['files_removed']} files, {purge['bytes_freed']} bytes freed")
    return "\n".join(lines)


def _what(req: dict[str, Any]) -> str:
    """``clients [3]``; ``samples of client 3: 2 samples, sha256 1f0c...``; ``class 5: 40
    samples on clients [0, 2]``."""
    granularity = req.get("granularity")
    if granularity is None:
        return f"clients {req['clients']}"
    digest = f", sha256 {str(req.get('samples_sha256', ''))[:12]}"
    if granularity == "class":
        return (f"class {req.get('label')}: {req.get('samples')} samples on clients "
                f"{req['clients']}{digest}")
    return f"samples of client {req['clients'][0]}: {req.get('samples')} samples{digest}"
