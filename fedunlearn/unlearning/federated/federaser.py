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
explicitly, via :func:`~fedunlearn.engine.aggregation.apply_update` (training keeps them at ``M_1``'s
value too, see :func:`~fedunlearn.engine.aggregation.keep_non_float`). Float buffers (the running
mean and variance of torch's normalisation layers, named ``*.running_mean`` / ``*.running_var``,
:data:`~fedunlearn.models.params.RUNNING_STATS`) are replayed like parameters, but FedEraser does not
calibrate them: a calibrated round takes their fresh update ``Û_k`` as it is (so the rebuilt
statistics are the FedAvg mean of those the calibrating clients measured on the reconstructed
model) and leaves them out of the norms that scale the parameters; stretching a statistic by
``‖U‖/‖Û‖`` could make a variance negative.

A client that fails its calibration request (no reply within ``engine.client_timeout_s``, an
error, or a model with NaN/Inf; see :mod:`fedunlearn.engine.faults`) stops the removal with
a one-line :class:`~fedunlearn.engine.faults.ClientFailure` under ``engine.on_client_failure
= "abort"``. Under ``"drop"`` the round is calibrated with the clients that answered, their
FedAvg weights renormalised over them (the dropped clients' stored updates are not used in that
round); the replay entry lists them under ``dropped`` and ``details["calibration_dropped"]``
maps each such round to its dropped clients. A round whose every client fails stops the removal
under both policies.

Both replays assume training kept ``M_{t+1} = M_t + Σ_k w_k U_k`` (``needs_replayable_history``);
a history the store found breaking it (e.g. trained with server momentum) is refused with
:class:`~fedunlearn.unlearning.base.HistoryNotReplayable` before any work.

Replay diagnostics (``details["replay"]``, one entry per replayed round): ``stored_norm``, the
FedAvg-weighted mean (weights renormalised over the round's remaining participants) of
``‖U_k‖``; for a calibrated round also ``fresh_norm`` (of ``‖Û_k‖``), ``ratio`` (of
``‖U_k‖ / ‖Û_k‖``, how much calibration stretches the fresh step) and ``cosine`` (of
``cos(U_k, Û_k)``), all over the whole model's float arrays (``None`` in rounds without a fresh
step: FedAccum's, and FedEraser's first). The whole-model ratio is the overall stretch in
both norm scopes, since a layer-scope calibration gives every array its stored norm and so
the whole update the stored ``‖U_k‖`` too; with ``norm_scope = "layer"`` an entry also holds
``layers``, the same four values per array (the ratio being the scale each array got).
``test_accuracy`` is the reconstructed model's test accuracy after the round's update was
added (``track_accuracy``); with retention interval Δt it stands in for training's model
after round ``t + Δt - 1``. ``details["replay_summary"]`` condenses them
(:func:`~fedunlearn.unlearning.federated.calibration.summarise_replay`, plus ``accuracy_seconds``, the
evaluation time included in the method's wall time, and ``fresh_kind``, what the fresh step is:
``"calibration"`` here; FedRecover's fresh step is the exact update from the recovered model,
so there the ratio and cosine compare the stored update with the exact one, ``"exact"``).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedunlearn.engine.aggregation import apply_update, difference, l2_norm, weighted_sum
from fedunlearn.history.store import IDENTITY_RTOL, HistoryStore
from fedunlearn.models.params import Params, running_stat_names, set_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import evaluate
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    Cost,
    FederatedUnlearner,
    HistoryNotReplayable,
    Setting,
    UnlearningContext,
    UnlearningResult,
)
from fedunlearn.unlearning.federated.calibration import (
    NORM_SCOPES,
    calibrate,
    calibration_stats,
    renormalised_weights,
    summarise_replay,
    weighted_mean_stats,
)

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

    def only(self, kept: Collection[int]) -> RoundUpdates:
        """This round restricted to the clients in ``kept``, weights renormalised over them."""
        clients, weights = renormalised_weights(self.clients, self.weights,
                                                keep=lambda k: k in kept)
        stored = tuple(u for k, u in zip(self.clients, self.stored, strict=True) if k in kept)
        return RoundUpdates(self.round, clients, weights, stored)


@dataclass
class Step:
    """What :meth:`HistoryReplay.step` gives for one retained round.

    Attributes
    ----------
    updates : list of Params
        The updates ``Ũ_k`` to aggregate, aligned with the round's clients.
    cost : Cost
        What obtaining them cost.
    fresh : list of Params or None
        The fresh updates ``Û_k`` they were derived from, if any (for the diagnostics).
    norm_scope : str
        The norm scope of the calibration (``"layer"`` adds per-array diagnostics).
    round : RoundUpdates or None
        The round the updates are aligned with, when the step dropped clients from the one it
        was given (failed calibration under ``on_client_failure = "drop"``); ``None``: the same.
    uncalibrated : frozenset of str
        Arrays taken from the fresh updates as they are (the model's buffers), left out of the
        calibration norms and of the diagnostics.
    """

    updates: list[Params]
    cost: Cost = field(default_factory=Cost)
    fresh: list[Params] | None = None
    norm_scope: str = "model"
    round: RoundUpdates | None = None
    uncalibrated: frozenset[str] = frozenset()


class HistoryReplay(FederatedUnlearner):
    """The replay loop shared by FedAccum, FedEraser and FedRecover; subclasses override
    :meth:`step` (and, to replay another record than the store's or to act in the first
    retained round, :meth:`replay_round` and :meth:`first_step`).

    The loop starts from ``ctx.initial`` and, for every retained round with remaining
    participants, adds ``Σ_k w̃_k Ũ_k`` where ``Ũ_k`` comes from :meth:`step` (the stored
    update itself for the first retained round), and records the round's diagnostics.

    Parameters
    ----------
    track_accuracy : bool, optional
        Evaluate the reconstructed model on ``ctx.data.test`` after every replayed round
        (default ``True``; one forward pass of a small model, counted in the method's time).
    """

    setting: ClassVar[Setting] = "federated"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_replayable_history=True)
    fresh_kind: ClassVar[str | None] = None
    """What :attr:`Step.fresh` holds, so the diagnostics (``details.replay_summary.fresh_kind``)
    say what their ratio and cosine compare the stored update with: ``"calibration"``
    (FedEraser's short calibration training), ``"exact"`` (FedRecover's exact updates from the
    recovered model) or ``None`` (no fresh step: FedAccum)."""

    def __init__(self, track_accuracy: bool = True) -> None:
        self.track_accuracy = track_accuracy

    def step(self, ctx: UnlearningContext, model: Params, rnd: RoundUpdates) -> Step:
        """The updates to aggregate in a later retained round, and what obtaining them cost.

        The base replay (FedAccum) returns the stored updates at no cost.
        """
        return Step(list(rnd.stored))

    def first_step(self, ctx: UnlearningContext, model: Params, rnd: RoundUpdates) -> Step:
        """The updates of the first retained round: the stored ones, at no cost (``M_1`` holds
        nothing of the removed clients)."""
        return Step(list(rnd.stored))

    def replay_round(self, ctx: UnlearningContext, t: int, clients: tuple[int, ...],
                     weights: tuple[float, ...]) -> RoundUpdates:
        """Round ``t`` as the replay sees it: its remaining participants ``clients`` with their
        renormalised FedAvg ``weights`` and their updates stored in ``ctx.history``. A method
        replaying another record (FedRecover's recovered trajectory) overrides it; the round
        it returns may hold fewer clients (weights renormalised over them), or none."""
        return RoundUpdates(t, clients, weights, tuple(ctx.history.update(t, k) for k in clients))

    def details(self) -> dict[str, Any]:
        """Method-specific entries of the result's ``details``."""
        return {}

    def check(self) -> None:
        """Validate the hyperparameters before any work starts."""

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Replay the retained rounds without ``ctx.removed``; ``ctx`` is not modified.

        Raises
        ------
        HistoryNotReplayable
            If the history breaks ``M_{t+1} = M_t + Σ_k w_k U_k`` (checked first).
        ValueError
            On bad hyperparameters (before any client work).
        """
        refuse_unreplayable(type(self).__name__, ctx.history)
        self.check()
        history = ctx.history
        retained = [t for t in history.rounds() if history.round_record(t).updates_retained]
        model: Params = {k: v.copy() for k, v in ctx.initial.items()}
        cost = Cost()
        accuracy = _TestAccuracy(ctx) if self.track_accuracy else None
        replay: list[dict[str, Any]] = []
        dropped: dict[str, list[int]] = {}
        for t in retained:
            record = history.round_record(t)
            clients, weights = renormalised_weights(record.participants, record.weights,
                                                    keep=lambda k: k not in ctx.removed)
            if not clients:
                continue
            rnd = self.replay_round(ctx, t, clients, weights)
            if not rnd.clients:
                continue
            weights = rnd.weights
            if t == retained[0]:
                step = self.first_step(ctx, model, rnd)
            else:
                step = self.step(ctx, model, rnd)
                cost = _add(cost, step.cost)
            extra: dict[str, Any] = {}
            if step.round is not None and step.round.clients != rnd.clients:
                gone = sorted(set(rnd.clients) - set(step.round.clients))
                dropped[str(t)] = extra["dropped"] = gone
                rnd, weights = step.round, step.round.weights
            model = apply_update(model, weighted_sum(step.updates, weights))
            replay.append({**round_diagnostics(rnd, step), **extra,
                           "test_accuracy": accuracy(model) if accuracy else None})
        summary = {**summarise_replay(replay),
                   "accuracy_seconds": accuracy.seconds if accuracy else 0.0,
                   "fresh_kind": self.fresh_kind}
        details = {"retained_rounds": retained, "calibrated_rounds": cost.rounds,
                   **self.details(), "replay": replay, "replay_summary": summary}
        if dropped:
            details["calibration_dropped"] = dropped
        return UnlearningResult(model=model, cost=cost, details=details)


def refuse_unreplayable(method: str, history: HistoryStore) -> None:
    """Raise :class:`HistoryNotReplayable` (one line) if ``history`` broke the identity."""
    if history.replayable():
        return
    bad = history.identity_violations()
    worst = max(history.identity_deviation(t) or float("inf") for t in bad)
    rounds = ("round " if len(bad) == 1 else "rounds ") + ", ".join(map(str, bad[:5])) \
        + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
    raise HistoryNotReplayable(
        f"{method} cannot replay this history: training broke M_{{t+1}} = M_t + Σ w U after "
        f"{rounds} (relative deviation up to {worst:.1e} > {IDENTITY_RTOL:g}), as server "
        "momentum or another non-averaging aggregation does; train with fedavg or fedprox to "
        "use it, nothing was changed")


def round_diagnostics(rnd: RoundUpdates, step: Step) -> dict[str, Any]:
    """One replayed round's diagnostics (see the module docstring), as JSON-ready values."""
    stored = float(sum(w * l2_norm(u) for w, u in zip(rnd.weights, rnd.stored, strict=True)))
    entry: dict[str, Any] = {"round": int(rnd.round), "stored_norm": stored,
                             "fresh_norm": None, "ratio": None, "cosine": None}
    if step.fresh is None:
        return entry
    pairs = list(zip(rnd.stored, step.fresh, strict=True))
    skip = step.uncalibrated
    whole = [calibration_stats(u, f, uncalibrated=skip)["model"] for u, f in pairs]
    entry.update(weighted_mean_stats(whole, rnd.weights).as_dict())
    if step.norm_scope == "layer":
        per = [calibration_stats(u, f, scope="layer", uncalibrated=skip) for u, f in pairs]
        entry["layers"] = {name: weighted_mean_stats([p[name] for p in per],
                                                     rnd.weights).as_dict() for name in per[0]}
    return entry


class _TestAccuracy:
    """Test accuracy of a parameter set, on one model built on first use; times itself."""

    def __init__(self, ctx: UnlearningContext) -> None:
        self.ctx = ctx
        self.net: Any = None
        self.seconds = 0.0

    def __call__(self, params: Params) -> float | None:
        test = self.ctx.data.test
        if len(test.x) == 0:
            return None
        t0 = time.perf_counter()
        if self.net is None:
            self.net = self.ctx.build_model()
        set_params(self.net, params)
        acc = float(evaluate(self.net, test.x, test.y)["accuracy"])
        self.seconds += time.perf_counter() - t0
        return acc


def _add(a: Cost, b: Cost) -> Cost:
    return Cost(client_epochs=a.client_epochs + b.client_epochs, rounds=a.rounds + b.rounds,
                messages_sent=a.messages_sent + b.messages_sent,
                server_epochs=a.server_epochs + b.server_epochs,
                sample_epochs=a.sample_epochs + b.sample_epochs)


@UNLEARNERS.register("fedaccum")
class FedAccum(HistoryReplay):
    """FedAccum: ``M_1 + Σ_{retained t} Σ_{k ∈ S_t \\ removed} w̃_k U_k^t``, no client work.

    The uncalibrated baseline of FedEraser (Liu et al., IWQoS 2021). With every round
    retained and nothing removed it reproduces the trained FedAvg model. Its only parameter
    is :class:`HistoryReplay`'s ``track_accuracy``.
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
    track_accuracy : bool, optional
        Evaluate the reconstruction on the test split after every replayed round (default
        ``True``); see :class:`HistoryReplay`.

    Notes
    -----
    Calibration training asks ``ctx.federation`` for work with ``server_round`` equal to the
    retained round and a tag derived from ``ctx.seed`` (never the training tag 0), so its
    shuffles differ from training's. Removed clients are never contacted.
    """

    fresh_kind: ClassVar[str | None] = "calibration"

    def __init__(self, r: float = 0.5, norm_scope: str = "model",
                 track_accuracy: bool = True) -> None:
        super().__init__(track_accuracy=track_accuracy)
        self.r = r
        self.norm_scope = norm_scope

    def check(self) -> None:
        if not self.r > 0:
            raise ValueError(f"FedEraser's calibration ratio r must be > 0, got {self.r}")
        if self.norm_scope not in NORM_SCOPES:
            raise ValueError(f"unknown norm_scope {self.norm_scope!r}; "
                             f"known: {', '.join(NORM_SCOPES)}")

    def step(self, ctx: UnlearningContext, model: Params, rnd: RoundUpdates) -> Step:
        """Calibration training of the remaining participants, then per-client calibration."""
        epochs = self.r * ctx.cfg.training.local_epochs
        tag = derive_seed(ctx.seed, _CALIBRATION_PURPOSE) + 1
        n = len(rnd.clients)
        results = ctx.federation.train_clients(model, rnd.clients, epochs=epochs,
                                               server_round=rnd.round, tag=tag)
        kept = rnd if len(results) == n else rnd.only(results)  # clients dropped on failure
        fresh = [difference(results[k].model, model) for k in kept.clients]
        buffers = running_stat_names(model)  # statistics: taken fresh, not calibrated
        updates = [calibrate(stored, f, scope=self.norm_scope, uncalibrated=buffers)
                   for stored, f in zip(kept.stored, fresh, strict=True)]
        return Step(updates, Cost(client_epochs=n * epochs, rounds=1, messages_sent=n),
                    fresh=fresh, norm_scope=self.norm_scope,
                    round=kept if kept is not rnd else None, uncalibrated=buffers)

    def details(self) -> dict[str, Any]:
        return {"r": self.r, "norm_scope": self.norm_scope}
