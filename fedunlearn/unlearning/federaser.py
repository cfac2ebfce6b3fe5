"""FedEraser and its uncalibrated baseline FedAccum: replaying the retained rounds without u.

FedEraser (Liu et al., IWQoS 2021, "FedEraser: Enabling Efficient Client-Level Data Removal
from Federated Learning Models") rebuilds the global model from the initial model ``M_1`` over
the rounds whose client updates the server retained (``t_1 = 1, t_2 = 1 + Δt, ...``, Δt being
the history's retention interval). In every retained round the remaining participants' updates
are aggregated with FedAvg weights renormalised over them. The first retained round uses the
stored updates as they are (``M_1`` holds nothing of the forgotten clients); every later one
calibrates them: each remaining participant trains ``r · E_loc`` epochs from the reconstructed
model, and its update becomes ``‖U_k‖ · Û_k / ‖Û_k‖`` (:func:`calibrate`), per client and
before aggregation. ``U_k`` is the stored update, relative to the global model at the *start*
of its round, as the history records it.

FedAccum is the same replay without calibration: ``M_1 + Σ_t Σ_k w̃_k U_k``. It costs no
client work and shows what calibration buys.

Non-float arrays (e.g. BatchNorm's integer ``num_batches_tracked``) carry no updates; the
reconstruction copies them from the model being rebuilt (that is, from ``M_1``) in every step,
explicitly, via :func:`~fedunlearn.aggregation.apply_update`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedunlearn.aggregation import apply_update, difference, weighted_sum
from fedunlearn.params import Params
from fedunlearn.seeding import derive_seed
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Cost,
    Setting,
    UnlearningContext,
    UnlearningResult,
)
from fedunlearn.unlearning.calibration import NORM_SCOPES, calibrate, renormalised_weights

_CALIBRATION_PURPOSE = 0xCA1B
"""Mixed into the request seed to derive the calibration tag (training uses tag 0)."""


@dataclass(frozen=True)
class RoundUpdates:
    """One retained round, as the replay sees it.

    Attributes
    ----------
    round : int
        The retained round ``t_j``.
    clients : tuple of int
        Its remaining participants (never a removed client).
    weights : tuple of float
        Their FedAvg weights renormalised over ``clients``.
    stored : tuple of Params
        Their stored updates ``U_k^{t_j}``, aligned with ``clients``.
    """

    round: int
    clients: tuple[int, ...]
    weights: tuple[float, ...]
    stored: tuple[Params, ...]


class HistoryReplay:
    """The replay loop shared by FedAccum and FedEraser; subclasses override :meth:`step`.

    The loop starts from ``ctx.initial`` and, for every retained round with remaining
    participants, adds ``Σ_k w̃_k Ũ_k`` where ``Ũ_k`` comes from :meth:`step` (the stored
    update itself for the first retained round).
    """

    setting: ClassVar[Setting] = "federated"

    def step(self, ctx: UnlearningContext, model: Params,
             rnd: RoundUpdates) -> tuple[list[Params], Cost]:
        """The updates to aggregate in a later retained round, and what obtaining them cost.

        The base replay (FedAccum) returns the stored updates at no cost.
        """
        return list(rnd.stored), Cost()

    def details(self) -> dict[str, Any]:
        """Method-specific entries of the result's ``details``."""
        return {}

    def check(self) -> None:
        """Validate the hyperparameters before any work starts."""

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Replay the retained rounds without ``ctx.removed``; ``ctx`` is not modified."""
        self.check()
        history = ctx.history
        retained = [t for t in history.rounds() if history.round_record(t).updates_retained]
        model: Params = {k: v.copy() for k, v in ctx.initial.items()}
        cost = Cost()
        for t in retained:
            record = history.round_record(t)
            clients, weights = renormalised_weights(record.participants, record.weights,
                                                    keep=lambda k: k not in ctx.removed)
            if not clients:
                continue
            rnd = RoundUpdates(t, clients, weights,
                               tuple(history.update(t, k) for k in clients))
            if t == retained[0]:
                updates = list(rnd.stored)
            else:
                updates, spent = self.step(ctx, model, rnd)
                cost = _add(cost, spent)
            model = apply_update(model, weighted_sum(updates, weights))
        details = {"retained_rounds": retained, "calibrated_rounds": cost.rounds,
                   **self.details()}
        return UnlearningResult(model=model, cost=cost, details=details)


def _add(a: Cost, b: Cost) -> Cost:
    return Cost(client_epochs=a.client_epochs + b.client_epochs, rounds=a.rounds + b.rounds,
                messages_sent=a.messages_sent + b.messages_sent,
                server_epochs=a.server_epochs + b.server_epochs,
                sample_epochs=a.sample_epochs + b.sample_epochs)


@UNLEARNERS.register("fedaccum")
class FedAccum(HistoryReplay):
    """FedAccum: ``M_1 + Σ_{retained t} Σ_{k ∈ S_t \\ removed} w̃_k U_k^t``, no client work.

    The uncalibrated baseline of FedEraser (Liu et al., IWQoS 2021). With every round
    retained and nothing removed it reproduces the trained FedAvg model. It has no
    hyperparameters.
    """


@UNLEARNERS.register("federaser")
class FedEraser(HistoryReplay):
    """FedEraser (Liu et al., IWQoS 2021): replay retained rounds with calibrated updates.

    Parameters
    ----------
    r : float, optional
        Calibration epoch ratio: the remaining participants train ``r · training.local_epochs``
        epochs per calibration round (default 0.5, the paper's value; the expected speed-up
        over retraining is ``Δt / r``).
    norm_scope : {"model", "layer"}, optional
        Where the calibration's norms are taken (default ``"model"``); see :func:`calibrate`.

    Notes
    -----
    Calibration training asks ``ctx.federation`` for work with ``server_round`` equal to the
    retained round and a tag derived from ``ctx.seed`` (never the training tag 0), so its
    shuffles differ from training's. Removed clients are never contacted.
    """

    def __init__(self, r: float = 0.5, norm_scope: str = "model") -> None:
        self.r = r
        self.norm_scope = norm_scope

    def check(self) -> None:
        if not self.r > 0:
            raise ValueError(f"FedEraser's calibration ratio r must be > 0, got {self.r}")
        if self.norm_scope not in NORM_SCOPES:
            raise ValueError(f"unknown norm_scope {self.norm_scope!r}; "
                             f"known: {', '.join(NORM_SCOPES)}")

    def step(self, ctx: UnlearningContext, model: Params,
             rnd: RoundUpdates) -> tuple[list[Params], Cost]:
        """Calibration training of the remaining participants, then per-client calibration."""
        epochs = self.r * ctx.cfg.training.local_epochs
        tag = derive_seed(ctx.seed, _CALIBRATION_PURPOSE) + 1
        results = ctx.federation.train_clients(model, rnd.clients, epochs=epochs,
                                               server_round=rnd.round, tag=tag)
        updates = [calibrate(stored, difference(results[k].model, model), scope=self.norm_scope)
                   for k, stored in zip(rnd.clients, rnd.stored, strict=True)]
        n = len(rnd.clients)
        return updates, Cost(client_epochs=n * epochs, rounds=1, messages_sent=n)

    def details(self) -> dict[str, Any]:
        return {"r": self.r, "norm_scope": self.norm_scope}
