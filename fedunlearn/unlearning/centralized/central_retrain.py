"""Centralized retraining from scratch: the reference of the centralized setting.

The exact-unlearning baseline of Bourtoule et al., IEEE S&P 2021, "Machine Unlearning": the
experiment's network is trained again, from its initial weights, on the data of every client not
removed so far, pooled at one site. Every centralized method (SISA, the Newton step) is judged
against it. Its noise floor keeps the initial weights and draws other shuffles (``stream`` 1,
docs/algorithms.md, "Noise floor"); a ``variant`` other than 0 also redraws the initial weights.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.data.removal import Step, retain_set
from fedunlearn.models import reinitialise
from fedunlearn.models.params import Params, get_params, set_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import device_for, local_training, predict_proba, train
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    CentralizedUnlearner,
    Cost,
    Setting,
    UnlearningContext,
    UnlearningResult,
)

_CENTRAL_SEED = 0xCE17
"""Mixed into the experiment seed to seed centralized retraining."""


@UNLEARNERS.register("central_retrain")
class CentralRetrain(CentralizedUnlearner):
    """Train the experiment's model on the pooled data of the clients not removed.

    Parameters
    ----------
    epochs : float, optional
        Passes over the pooled data (default 20.0).
    learning_rate : float, optional
        Defaults to ``training.learning_rate``; batch size, optimizer and momentum are always
        the experiment's.
    variant : int, optional
        0 (default) starts from the experiment's initial weights; another value redraws them
        (and the shuffles) from seeds derived from it.
    stream : int, optional
        With variant 0: another value than 0 (default) keeps the initial weights and draws
        other shuffles.
    """

    setting: ClassVar[Setting] = "centralized"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True, granularities=frozenset(GRANULARITIES))

    def __init__(self, epochs: float = 20.0, learning_rate: float | None = None,
                 variant: int = 0, stream: int = 0) -> None:
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.variant = variant
        self.stream = stream

    def check(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 or None, got {self.learning_rate}")
        for name in ("variant", "stream"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value}")

    def fit(self, ctx: UnlearningContext) -> CentralRetrain:
        """Train the centralized original on every client's data (``original_params_``)."""
        self.original_params_, self.original_samples_ = self._train(ctx, frozenset())
        return self

    def predict_proba_original(self, x: np.ndarray) -> np.ndarray:
        """Predictions of the model fitted on all clients."""
        model = self._model
        set_params(model, self.original_params_)
        return predict_proba(model, x)

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Retrain from scratch on the pooled data without every sample removed so far (every
        client in ``ctx.removed``, and the samples sample and class requests took)."""
        params, n = self._train(ctx, ctx.removed, kept=ctx.removal)
        return UnlearningResult(model=params, cost=Cost(sample_epochs=n * self.epochs),
                                details={"samples": n})

    def _train(self, ctx: UnlearningContext, removed: frozenset[int],
               kept: Step | None = None) -> tuple[Params, int]:
        """The one training run behind ``fit`` and ``unlearn``: (params, #samples)."""
        # the config keeps at least one client (and one sample); in client order either way
        pooled = retain_set(ctx.data, kept) if kept is not None else ctx.data.pooled(
            exclude=removed)
        x, y = pooled.x, pooled.y
        spec = local_training(ctx.cfg, self.epochs, learning_rate=self.learning_rate)
        model = ctx.build_model()
        if self.variant:
            reinitialise(model, derive_seed(ctx.cfg.seed, _CENTRAL_SEED, self.variant, 1))
        seed = derive_seed(ctx.cfg.seed, _CENTRAL_SEED, self.variant)
        if self.stream and not self.variant:
            seed = derive_seed(ctx.cfg.seed, _CENTRAL_SEED, 0, 0x57, self.stream)
        train(model, x, y, spec, seed=seed, device=device_for(ctx.cfg))
        self._model = model
        return get_params(model), len(y)
