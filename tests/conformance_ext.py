"""A user's removal method registered from their own module (an ``experiment.extensions``
entry), so the conformance suite covers extension methods as well as the built-in ones. It does
not subclass the protocol: conformance is structural."""

from __future__ import annotations

import numpy as np

from fedunlearn.unlearning import UNLEARNERS, Capabilities, Cost, UnlearningResult


@UNLEARNERS.register("user_scaled_subtraction")
class ScaledSubtraction:
    """Subtract ``scale`` times the targets' stored running sums (no client work)."""

    setting = "federated"
    capabilities = Capabilities(needs_replayable_history=True)  # it subtracts stored sums

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def check(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    def unlearn(self, ctx):
        model = {k: v.copy() for k, v in ctx.model.items()}
        for c in ctx.targets:
            for k, v in ctx.history.running_sum(c).items():
                if np.issubdtype(model[k].dtype, np.floating):
                    model[k] = (model[k] - self.scale * v).astype(model[k].dtype)
        return UnlearningResult(model=model, cost=Cost())
