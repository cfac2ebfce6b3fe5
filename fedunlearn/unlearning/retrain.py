"""Retraining from scratch: the reference every removal method is judged against.

The same FL configuration (seed, rounds, local epochs, sampling) is run again through the
federation port with the removed clients excluded from every round: each round's participants
are the original round's sampled participants minus the removed clients.
"""

from __future__ import annotations

from typing import ClassVar

from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Cost,
    Setting,
    UnlearningContext,
    UnlearningResult,
)


@UNLEARNERS.register("retrain")
class Retrain:
    """Federated retraining without the removed clients (the gold standard)."""

    setting: ClassVar[Setting] = "federated"

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Run FedAvg from the initial model with every removed client left out."""
        run = ctx.federation.fedavg(ctx.initial, exclude=ctx.removed)
        rounds = sum(1 for r in run.rounds if r.participants)
        return UnlearningResult(
            model=run.final,
            cost=Cost(client_epochs=run.client_epochs, rounds=rounds,
                      messages_sent=run.messages_sent),
            details={"final_test_accuracy": run.rounds[-1].test_accuracy if run.rounds else None})
