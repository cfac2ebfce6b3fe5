"""Retraining from scratch: the reference every removal method is judged against.

The same FL configuration (seed, rounds, local epochs, sampling) is run again through the
federation port with the removed clients excluded from every round: each round's participants
are the original round's sampled participants minus the removed clients. At sample and class
level the clients stay and train on the samples they keep (a client left with none is out).

The noise floor of every comparison with retraining is a second retraining that shares what the
methods share with the reference — the initial model and the participants — and draws fresh
client-side randomness (local shuffles): ``stream`` 1 (docs/algorithms.md, "Noise floor"). A
``variant`` other than 0 retrains fully independently (initial weights, sampling, shuffles).
"""

from __future__ import annotations

from typing import ClassVar

from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.models import reinitialise
from fedunlearn.models.params import get_params
from fedunlearn.models.seeding import run_seed
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    Cost,
    FederatedUnlearner,
    Setting,
    UnlearningContext,
    UnlearningResult,
)


@UNLEARNERS.register("retrain")
class Retrain(FederatedUnlearner):
    """Federated retraining without the removed clients (the gold standard).

    Parameters
    ----------
    variant : int
        0 (default) replays the experiment's seeds exactly; another value retrains with
        seeds derived from it (initial model and participants included).
    stream : int
        With variant 0: 0 (default) uses the training's client-side random streams; another
        value the same initial model and participants with fresh client-side streams.
    """

    setting: ClassVar[Setting] = "federated"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True, granularities=frozenset(GRANULARITIES))

    def __init__(self, variant: int = 0, stream: int = 0) -> None:
        self.variant = variant
        self.stream = stream

    def check(self) -> None:
        for name in ("variant", "stream"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value}")

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Run FedAvg from the initial model with every removed client left out and every other
        client training on the samples it keeps."""
        initial = ctx.initial
        if self.variant:
            model = ctx.build_model()
            reinitialise(model, run_seed(ctx.cfg.seed, self.variant))
            initial = get_params(model)
        run = ctx.federation.fedavg(initial, exclude=ctx.removed, variant=self.variant,
                                    stream=self.stream, **ctx.kept)
        rounds = sum(1 for r in run.rounds if r.participants)
        return UnlearningResult(
            model=run.final,
            cost=Cost(client_epochs=run.client_epochs, rounds=rounds,
                      messages_sent=run.messages_sent),
            details={"final_test_accuracy": run.rounds[-1].test_accuracy if run.rounds else None,
                     "variant": self.variant, "stream": self.stream})
