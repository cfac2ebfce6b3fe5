"""Listeners: of the training rounds (the history store, the lineage log, progress lines, the
fan-out to several) and of the serving loop (the lineage log, progress lines); see
:mod:`fedunlearn.run.events`. The resume journal and verification listen too
(:mod:`fedunlearn.run.resume`, :mod:`fedunlearn.run.verification`)."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from typing import Any, TextIO

import numpy as np

from fedunlearn.data.removal import Step
from fedunlearn.engine.aggregation import difference
from fedunlearn.engine.port import RoundReport, RoundSummary
from fedunlearn.evaluation.summary import recovery_words
from fedunlearn.history.lineage import LineageLog, params_hash
from fedunlearn.history.store import HistoryError, HistoryStore
from fedunlearn.models.params import Params
from fedunlearn.reporting.tables import epoch_count
from fedunlearn.run.checks import Method
from fedunlearn.run.events import (
    Fitted,
    MethodAnswered,
    Purged,
    RequestAnswered,
    RequestStarted,
    ServingListener,
)
from fedunlearn.unlearning.base import (
    UnlearningContext,
    capabilities_of,
)


class HistoryRecorder:
    """Round listener writing every aggregated round into a :class:`HistoryStore`."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self.committed = max(store.rounds(), default=0)  # > 0 when a run is resumed

    def round_aggregated(self, report: RoundReport) -> None:
        if report.server_round <= self.committed:
            # resumed past a round the store committed before the checkpoint was written:
            # the redone round must be the same round, and the store keeps its copy
            stored = self.store.participants(report.server_round)
            if tuple(stored) != tuple(report.participants):
                raise HistoryError(f"resumed round {report.server_round} had participants "
                                   f"{list(report.participants)}, the store holds {list(stored)}")
            return
        updates = {p: difference(m, report.global_model) for p, m in report.client_models.items()}
        self.store.record_round(report.server_round, global_model=report.global_model,
                                participants=report.participants,
                                num_examples=report.num_examples, weights=report.weights,
                                updates=updates)

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        pass


class LineageRecorder:
    """Round listener appending each round's participants, update hashes and model hash (and
    the clients dropped from it, ``failures``, when any were)."""

    def __init__(self, log: LineageLog) -> None:
        self.log = log
        self._pending: dict[str, Any] = {}
        self.logged = max((e["round"] for e in log.read() if e["event"] == "round"), default=0)

    def round_aggregated(self, report: RoundReport) -> None:
        self._pending = {"participants": list(report.participants),
                         "update_hashes": {str(p): params_hash(difference(m, report.global_model))
                                           for p, m in report.client_models.items()}}

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        pending = self._pending or {"participants": [], "update_hashes": {}}
        if summary.failures:  # clients dropped under engine.on_client_failure = "drop"
            pending["failures"] = summary.failures
        self._pending = {}
        if server_round > self.logged:
            self.log.append("round", round=server_round, model_hash=params_hash(model), **pending)


class Progress:
    """Round listener printing one line per round as it finishes."""

    def __init__(self, total: int, label: str = "train", stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.label = label
        self.stream = stream

    def round_aggregated(self, report: RoundReport) -> None:
        pass

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        print(f"[{self.label}] round {server_round:>3}/{self.total}  "
              f"clients {len(summary.participants):>3}  test acc {summary.test_accuracy:.4f}  "
              f"loss {summary.test_loss:.4f}  {summary.wall_s:6.2f}s", file=self.stream,
              flush=True)


class Listeners:
    """Fan one event out to several listeners."""

    def __init__(self, *listeners: object) -> None:
        self.listeners = listeners

    def round_aggregated(self, report: RoundReport) -> None:
        for listener in self.listeners:
            listener.round_aggregated(report)  # type: ignore[attr-defined]

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        for listener in self.listeners:
            listener.round_evaluated(server_round, model, summary)  # type: ignore[attr-defined]


class LineageListener(ServingListener):
    """Appends the serving loop's requests, answers, fits and purges to the lineage log."""

    def __init__(self, log: LineageLog, *, federated: bool) -> None:
        self.log = log
        self.federated = federated

    def request_started(self, event: RequestStarted) -> None:
        if self.federated:
            self.log.append("request", request=event.request, clients=list(event.targets),
                            **_removal_entry(event.step))

    def method_answered(self, event: MethodAnswered) -> None:
        m = event.method
        assert event.row is not None, "the verification listener comes first"
        exact = capabilities_of(m.method).exact
        self.log.append("model", kind="unlearned", method=m.name, request=event.request,
                        setting=m.setting, model_hash=event.row.model_hash, exact=exact,
                        derived_from=event.derived_from,
                        trained_with=_trained_with(m, event.ctx, event.reached_before,
                                                   exact=exact),
                        forgot=sorted(event.ctx.removed))

    def purged(self, event: Purged) -> None:
        clients = event.purge["clients"]
        if not (event.resumed and any(e["event"] == "purge" and e.get("clients") == clients
                                      for e in self.log.read())):
            self.log.append("purge", **event.purge)

    def fitted(self, event: Fitted) -> None:
        self.log.append("model", kind="fitted", method=event.method.name, setting="centralized",
                        model_hash=event.model_hash, trained_with=event.trained_with, exact=True)


def _trained_with(m: Method, ctx: UnlearningContext, reached_before: Counter[int], *,
                  exact: bool) -> list[int]:
    """The clients whose data shaped ``m``'s answer: the clients its own client work reached
    and, unless it retrained from scratch (``exact``), every client that took part in the
    recorded training its answer derives from; the removed ones never. A centralized method
    trains on every remaining client's data, pooled."""
    if m.setting != "federated":
        return sorted(set(range(ctx.cfg.data.num_clients)) - ctx.removed)
    now = getattr(ctx.federation, "reached", Counter())
    shaped = {c for c, n in now.items() if n > reached_before.get(c, 0)}
    if not exact:
        shaped |= {c for t in ctx.history.rounds() for c in ctx.history.participants(t)}
    return sorted(shaped - ctx.removed)


class ServingProgress(ServingListener):
    """One progress line per answer, verification, purge and centralized fit."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.what: dict[int, str] = {}  # request -> how its lines name it

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _named(self, request: int, targets: Any) -> str:
        return self.what.get(request) or str(list(targets))

    def request_started(self, event: RequestStarted) -> None:
        """A sample or class request is named by what it removes (clients: by their ids)."""
        step = event.step
        if step is not None and step.request.granularity != "client":
            self.what[event.request] = f"({step.request.describe()})"

    def method_answered(self, event: MethodAnswered) -> None:
        row = event.row
        assert row is not None, "the verification listener comes first"
        repaired = recovery_words(event.result.details.get("recovery") or {})
        self._say(f"[unlearn] request {event.request} "
                  f"{self._named(event.request, event.ctx.targets)}  "
                  f"{event.method.name:<22} {event.wall_s:7.2f}s  "
                  f"test {row.metrics['test_accuracy']:.3f}  "
                  f"forget {row.metrics['forget_accuracy']:.3f}"
                  + (f"  {repaired}" if repaired else ""))

    def request_answered(self, event: RequestAnswered) -> None:
        v = event.verification
        if v is None:
            return
        sizes, epochs = v["sizes"], v["shadow_epochs"]
        self._say(f"[verify] request {event.request} {self._named(event.request, event.targets)}"
                  f"  {v['wall_s']:7.2f}s"
                  f"  (shadows {v['shadow_s']:.2f}s"
                  f"{'' if epochs is None else f', {epoch_count(epochs)}'}; "
                  f"members {sizes['members']} of {sizes['members_available']}, population "
                  f"{sizes['population']})")

    def purged(self, event: Purged) -> None:
        purge, counts = event.purge, event.counts
        targets = purge["clients"]
        cut = purge["globals_deleted_from"]
        files = (f"{counts['deleted']} files deleted, {counts['written']} written anew without "
                 f"the client{'s' if len(targets) > 1 else ''}" if counts else
                 f"{purge['files_removed']} fewer files")
        self._say(f"[purge] request {event.request} {self._named(event.request, targets)}  "
                  f"{purge['level']}: "
                  f"{files}, {purge['bytes_freed']} bytes freed"
                  + (f"; global models from round {cut} on and the final model deleted"
                     if cut is not None else "; global models kept (re-solvable)"))

    def fitted(self, event: Fitted) -> None:
        self._say(f"[central] fitted {event.method.name:<22} {event.wall_s:7.2f}s on pooled data")


def _removal_entry(step: Step | None) -> dict[str, Any]:
    """What the lineage records of a sample or class request: its granularity and label, how
    many samples it removes and a SHA-256 of their positions per client, never the samples;
    nothing for a client request (its clients are the record)."""
    if step is None or step.request.granularity == "client":
        return {}
    digest = hashlib.sha256()
    for client, idx in sorted(step.forget.items()):
        digest.update(f"{client}:".encode() + np.asarray(idx, dtype="<i8").tobytes() + b";")
    entry: dict[str, Any] = {"granularity": step.request.granularity,
                             "samples": step.num_forgotten, "samples_sha256": digest.hexdigest()}
    if step.request.label is not None:
        entry["label"] = step.request.label
    return entry
