"""Bookkeeping shared by every implementation of the FedAvg loop: timing, evaluation, listeners."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fedunlearn.engine.faults import Failure
from fedunlearn.engine.port import RoundListener, RoundReport, RoundSummary, TrainingRun
from fedunlearn.models.params import Params
from fedunlearn.run import interrupt

if TYPE_CHECKING:
    from fedunlearn.run.resume import Checkpoint

Evaluator = Callable[[Params], dict[str, float]]


class FedAvgTracker:
    """Collects the per-round summaries of one FedAvg run and forwards events to a listener.

    Parameters
    ----------
    evaluate : callable
        Server-side evaluation of a global model, returning ``loss`` and ``accuracy``.
    listener : RoundListener or None
    local_epochs : float
        Counted per participant and round into ``client_epochs``.
    start : Checkpoint or None
        A resumed run: its rounds so far; the engine's round numbers count on from it.

    After every evaluated round (once the listener has committed it) a pending stop request
    (Ctrl-C, SIGTERM) is raised as :class:`~fedunlearn.run.interrupt.Interrupted`.
    """

    def __init__(self, evaluate: Evaluator, listener: RoundListener | None,
                 local_epochs: float, start: Checkpoint | None = None) -> None:
        self.evaluate = evaluate
        self.listener = listener
        self.local_epochs = local_epochs
        self.run = TrainingRun(final={})
        self.offset = start.round if start is not None else 0
        if start is not None:
            self.run.rounds = list(start.rounds)
            self.run.client_epochs = sum(len(r.participants) for r in start.rounds) * local_epochs
        self._t0 = time.perf_counter()
        self._round_t0 = self._t0
        self._participants: list[int] = []
        self._failures: list[Failure] = []

    def aggregated(self, report: RoundReport) -> None:
        """A round was aggregated."""
        self._participants = list(report.participants)
        self.run.client_epochs += len(report.participants) * self.local_epochs
        if self.listener is not None:
            self.listener.round_aggregated(report)

    def failed(self, failures: Sequence[Failure]) -> None:
        """Clients were dropped from the current round (``on_client_failure = "drop"``)."""
        self._failures += failures

    def evaluated(self, server_round: int, model: Params) -> dict[str, float]:
        """The global model after ``server_round`` (the start's round, 0 for a new run: the
        initial model, which only starts the clock)."""
        metrics = self.evaluate(model)
        if server_round > self.offset:
            summary = RoundSummary(round=server_round, participants=self._participants,
                                   test_accuracy=metrics["accuracy"], test_loss=metrics["loss"],
                                   wall_s=time.perf_counter() - self._round_t0,
                                   failures=[dataclasses.asdict(f) for f in self._failures])
            self.run.rounds.append(summary)
            if self.listener is not None:
                self.listener.round_evaluated(server_round, model, summary)
            interrupt.check()
        self._participants = []
        self._failures = []
        self._round_t0 = time.perf_counter()
        return metrics

    def finish(self, final: Params, messages_sent: int) -> TrainingRun:
        """Close the run."""
        self.run.final = final
        self.run.wall_s = time.perf_counter() - self._t0
        self.run.messages_sent = messages_sent
        return self.run
