"""Bookkeeping shared by every implementation of the FedAvg loop: timing, evaluation, listeners."""

from __future__ import annotations

import time
from collections.abc import Callable

from fedunlearn.federation.port import RoundListener, RoundReport, RoundSummary, TrainingRun
from fedunlearn.params import Params

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
    """

    def __init__(self, evaluate: Evaluator, listener: RoundListener | None,
                 local_epochs: float) -> None:
        self.evaluate = evaluate
        self.listener = listener
        self.local_epochs = local_epochs
        self.run = TrainingRun(final={})
        self._t0 = time.perf_counter()
        self._round_t0 = self._t0
        self._participants: list[int] = []

    def aggregated(self, report: RoundReport) -> None:
        """A round was aggregated."""
        self._participants = list(report.participants)
        self.run.client_epochs += len(report.participants) * self.local_epochs
        if self.listener is not None:
            self.listener.round_aggregated(report)

    def evaluated(self, server_round: int, model: Params) -> dict[str, float]:
        """The global model after ``server_round`` (0: the initial one, only starts the clock)."""
        metrics = self.evaluate(model)
        if server_round > 0:
            summary = RoundSummary(round=server_round, participants=self._participants,
                                   test_accuracy=metrics["accuracy"], test_loss=metrics["loss"],
                                   wall_s=time.perf_counter() - self._round_t0)
            self.run.rounds.append(summary)
            if self.listener is not None:
                self.listener.round_evaluated(server_round, model, summary)
        self._participants = []
        self._round_t0 = time.perf_counter()
        return metrics

    def finish(self, final: Params, messages_sent: int) -> TrainingRun:
        """Close the run."""
        self.run.final = final
        self.run.wall_s = time.perf_counter() - self._t0
        self.run.messages_sent = messages_sent
        return self.run
