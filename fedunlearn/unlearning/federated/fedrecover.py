"""FedRecover: replay training without the removed clients, estimating most client updates.

Cao, Jia, Zhang, Gong, IEEE S&P 2023, "FedRecover: Recovering from Poisoning Attacks in
Federated Learning using Historical Information". The paper recovers a poisoned model once
malicious clients are detected; here the removed clients play their part. Recovery replays
the stored rounds from the initial model ``ŵ_1 = M_1`` with each round's stored participants
minus the removed clients, aggregated with their FedAvg weights renormalised over them (the
replay loop of :class:`~fedunlearn.unlearning.federated.federaser.HistoryReplay`; this module adds the
step). In round ``t`` each remaining participant ``k``'s update is either

* **exact**: ``k`` trains ``training.local_epochs`` epochs from ``ŵ_t`` through
  ``ctx.federation.train_clients`` (round ``t``) with FedRecover's own random streams, the
  seed tag :func:`exact_tag` derived from the request seed (``derive_seed(ctx.seed,
  EXACT_PURPOSE) + 1``), never the tag 0 of training and retraining; or
* **estimated** by the server, with no message (the Cauchy mean-value theorem, paper eq. 3):
  ``ĝ_k^t = ḡ_k^t + H̃_k^t (ŵ_t − w̄_t)``, where ``w̄_t`` is the original global model of round
  ``t``, ``ḡ_k^t`` the client's stored update and ``H̃_k^t`` an L-BFGS approximation of its
  integrated Hessian (:func:`lbfgs_hvp`) built from the client's newest ``buffer_size`` pairs
  ``(Δw, Δg) = (ŵ_t − w̄_t, exact update − stored update)`` of earlier exact rounds.

Up to ``t_u``, the first round a removed client took part in, the recovery passes through the
models training had (``ŵ_t = w̄_t``: the same participants, weights and model), so the stored
updates of those rounds are what the remaining clients sent from that very model: they are
used as they are, at no cost (stored work, not fresh work: they keep training's random
streams). From ``t_u`` on, exact updates are asked for in the first ``warmup_rounds`` rounds
(warm-up, ``T_w``: rounds ``t_u .. t_u + T_w − 1``, round ``t_u`` itself free), every
``correction_interval`` rounds after it (periodic correction, ``T_c``: rounds
``t_u − 1 + T_w + T_c``, ``+ 2T_c``, ...), in the last ``final_rounds`` rounds (final tuning,
``T_f``), from a client whose estimate is **abnormal** and from a client without any pair
yet. With ``t_u = 1`` (a target in round 1) this is the paper's schedule counted from round 1.

Abnormal: some coordinate of the estimate has a magnitude above ``τ`` (the paper's test
``‖ĝ_k^t‖_∞ > τ``). ``τ`` follows the paper's rule, from the stored updates themselves
(:func:`abnormality_threshold`): per replayed round, the ``abnormal_quantile``-quantile of the
magnitudes of every coordinate of the remaining clients' updates of the replayed record, then
the largest over the rounds. It is computed once per request, when the first estimate needs
it (one more read of those updates); ``abnormal_threshold`` overrides it with an absolute
value. ``details["abnormal_tau"]`` holds the ``τ`` used (``None`` if nothing was estimated).

Every exact update adds a pair to its client's buffer (the paper collects them in warm-up and
correction rounds; an abnormality fix is an exact update too, and its pair is the freshest
curvature there is); the buffer keeps the newest ``buffer_size``. A pair is skipped unless
``Δwᵀ y > 1e-10 ‖Δw‖‖y‖`` (the usual L-BFGS curvature safeguard, ``y`` below); rounds up to
``t_u`` (``Δw ≈ 0``) give none.

Sign convention: the paper's update ``g`` moves the model by ``−η g`` (a gradient); ours,
``U = client model − global model``, moves it by ``+U``. The pairs therefore use
``y = −(U_exact − U_stored)`` (positive curvature ``Δwᵀ y > 0`` on a convex loss) and the
estimate is ``Û_k = Ū_k − H̃_k (ŵ_t − w̄_t)``. ``τ`` bounds ``|Û|``, a change of parameters in
one round, as the quantile rule measures the stored ``U``.

Cost: only the exact requests count, in the same :class:`~fedunlearn.unlearning.base.Cost`
fields as retraining (client epochs, rounds with at least one message, messages); ``details``
says how many rounds were exact, estimated or had abnormal estimates fixed, and why.

History needed: the original global model ``w̄_t`` and every remaining client's update of every
round, so ``history.retention_interval`` must be 1 (``needs_every_round``; refused before
training otherwise) and the history must keep ``M_{t+1} = M_t + Σ w U`` (inherited
``needs_replayable_history``).

Later requests (the recovered trajectory as the new history): the method keeps, in memory, the
trajectory it recovered (``trajectory_``: per round ``ŵ_t`` and the remaining participants'
updates it aggregated, exact or estimated, with their weights). The next request it serves on
the same store replays from ``M_1`` again, taking ``ŵ_t`` as ``w̄_t`` and those updates as
``ḡ_k^t`` (and ``τ`` from them): the recovered run is the training the remaining clients took
part in, and it is closer to the new recovery than the original run. It never reads a stored
global model then, so it gives the same model whether the first request's purge was
``"strict"`` (which deleted them) or ``"updates"``. The history store is never written. A
FedRecover without such a trajectory (a new instance) on a store whose global models a strict
purge deleted refuses in one line. A client dropped in a round of the trajectory
(``on_client_failure = "drop"``) stays out of that round in later requests.

Where this departs from the paper (``τ``'s quantile, ``T_w``, ``T_c``, ``T_f``, the sign
convention, the free rounds before ``t_u``, the own random streams, the later-request
trajectory), and the measured effect of each: ``docs/algorithms.md``, section FedRecover.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedunlearn.engine.aggregation import difference
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.params import Params, float_keys
from fedunlearn.models.seeding import derive_seed
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    Cost,
    HistoryNotReplayable,
    MethodState,
    UnlearningContext,
    UnlearningResult,
)
from fedunlearn.unlearning.federated.federaser import HistoryReplay, RoundUpdates, Step

CURVATURE_EPS = 1e-10
"""A pair is kept only if ``Δwᵀ y > CURVATURE_EPS · ‖Δw‖ ‖y‖``."""

EXACT_PURPOSE = 0xFEC0
"""Mixed into the request seed to derive the seed tag of the exact updates
(:func:`exact_tag`); training and retraining use tag 0."""


def exact_tag(seed: int) -> int:
    """The seed tag of FedRecover's exact updates for a request seeded ``seed``: its own
    random streams, never the training's and retraining's tag 0.

    >>> exact_tag(3) == exact_tag(3) != 0
    True
    """
    return derive_seed(seed, EXACT_PURPOSE) + 1


def abnormality_threshold(rounds: Iterable[Sequence[np.ndarray]], quantile: float) -> float:
    """``τ = max_t Q_q(|u|, u ∈ coordinates of round t's updates)``.

    Per round, the ``quantile``-quantile (linear interpolation, :func:`numpy.quantile`) of the
    magnitudes of every coordinate of the round's updates taken together; then the largest
    over the rounds (FedRecover's rule for its abnormality threshold, from the stored
    updates themselves).

    Parameters
    ----------
    rounds : iterable of sequences of np.ndarray
        Per round, the updates (any shapes) of its clients; a round without any is skipped.
    quantile : float
        In ``(0, 1]``; 1 takes each round's largest magnitude.

    Returns
    -------
    float
        ``τ``; ``inf`` when no round holds an update (nothing to bound).

    Examples
    --------
    Round 1's magnitudes are 1, 2, 3, 4 (median 2.5, max 4); round 2's 0.5, 0.5:

    >>> rounds = [[np.array([1.0, -2.0]), np.array([3.0, -4.0])], [np.array([0.5, -0.5])]]
    >>> abnormality_threshold(rounds, 1.0), abnormality_threshold(rounds, 0.5)
    (4.0, 2.5)
    """
    tau = -np.inf
    for updates in rounds:
        flat = [np.abs(np.asarray(u, np.float64).ravel()) for u in updates]
        if not flat:
            continue
        tau = max(tau, float(np.quantile(np.concatenate(flat), quantile)))
    return float(tau) if np.isfinite(tau) else float("inf")


def lbfgs_hvp(s: np.ndarray, y: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``B v`` for the L-BFGS matrix ``B`` of the pairs ``(s_i, y_i)``, never formed.

    ``B`` is what ``m`` BFGS updates of ``B_0 = σ I`` with the pairs in order give, in the
    compact representation of Byrd, Nocedal and Schnabel (Math. Programming 63, 1994, Thm 2.3):
    ``B = σI − [σS  Y] [[σSᵀS, L], [Lᵀ, −D]]⁻¹ [σSᵀ; Yᵀ]`` with ``D = diag(s_iᵀ y_i)``, ``L``
    the strictly lower triangle of ``SᵀY`` (``L_ij = s_iᵀ y_j``, ``i > j``) and, as FedRecover
    uses it, ``σ = y_mᵀ s_m / s_mᵀ s_m`` from the newest pair. ``B s_m = y_m`` always; on a
    quadratic with Hessian ``H`` (``y_i = H s_i``) and ``H``-conjugate steps ``B s_i = H s_i``
    for every pair, so ``B = H`` on their span.

    Parameters
    ----------
    s, y : np.ndarray
        ``(n, m)`` arrays whose columns are the pairs, oldest first; every ``s_iᵀ y_i > 0``.
    v : np.ndarray
        ``(n,)`` vector.

    Returns
    -------
    np.ndarray
        ``B v`` as float64, shape ``(n,)``. A singular middle matrix (nearly parallel steps)
        is solved in the least-squares sense.

    Raises
    ------
    ValueError
        On mismatched shapes or no pair.

    Examples
    --------
    One pair ``s = (1, 0)``, ``y = (2, 1)``: ``σ = 2`` and
    ``B = 2I − 2 s sᵀ + y yᵀ / 2 = [[2, 1], [1, 2.5]]``, so ``B (1, 1) = (3, 3.5)``:

    >>> lbfgs_hvp(np.array([[1.0], [0.0]]), np.array([[2.0], [1.0]]), np.array([1.0, 1.0]))
    array([3. , 3.5])
    """
    s = np.asarray(s, np.float64)
    y = np.asarray(y, np.float64)
    v = np.asarray(v, np.float64)
    if s.ndim != 2 or s.shape != y.shape or s.shape[1] == 0 or v.shape != (s.shape[0],):
        raise ValueError(f"lbfgs_hvp needs s and y of one shape (n, m >= 1) and v of shape "
                         f"(n,); got {s.shape}, {y.shape}, {v.shape}")
    m = s.shape[1]
    sy = s.T @ y
    sigma = sy[-1, -1] / float(s[:, -1] @ s[:, -1])
    lower = np.tril(sy, -1)
    middle = np.block([[sigma * (s.T @ s), lower], [lower.T, -np.diag(np.diag(sy))]])
    rhs = np.concatenate([sigma * (s.T @ v), y.T @ v])
    try:
        p = np.linalg.solve(middle, rhs)
    except np.linalg.LinAlgError:
        p = np.linalg.lstsq(middle, rhs, rcond=None)[0]
    return sigma * v - (sigma * (s @ p[:m]) + y @ p[m:])


def _flat(params: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(params[k], np.float64).ravel() for k in keys])


def _unflat(vector: np.ndarray, like: Mapping[str, np.ndarray], keys: Sequence[str]) -> Params:
    out: Params = {}
    at = 0
    for k in keys:
        size = int(np.asarray(like[k]).size)
        out[k] = vector[at:at + size].reshape(np.shape(like[k])).astype(np.float32)
        at += size
    return out


@dataclass(frozen=True)
class RecoveredRound:
    """One round of a recovered trajectory: the model it started from (``ŵ_t``) and the
    updates aggregated into it (``round.stored``: exact or estimated, per client)."""

    model: Params
    round: RoundUpdates


@dataclass(frozen=True)
class Trajectory:
    """A recovered run, kept as the history of the method's next request.

    Attributes
    ----------
    store : str
        The history store it was recovered from (its path).
    removed : frozenset of int
        The clients left out of it.
    rounds : dict of int to RecoveredRound
        Every round that had remaining participants.
    """

    store: str
    removed: frozenset[int]
    rounds: dict[int, RecoveredRound]


@dataclass
class _Recovery:
    """The working state of one request (reset at every :meth:`FedRecover.unlearn`)."""

    last_round: int
    start: int
    keys: list[str]
    previous: Trajectory | None
    seed: int
    rounds: dict[int, RecoveredRound] = field(default_factory=dict)
    buffers: dict[int, deque[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    modes: dict[int, str] = field(default_factory=dict)
    abnormal: dict[int, list[int]] = field(default_factory=dict)
    no_pairs: dict[int, list[int]] = field(default_factory=dict)
    pairs_kept: int = 0
    pairs_skipped: int = 0
    estimated_updates: int = 0
    tau: float | None = None


@UNLEARNERS.register("fedrecover")
class FedRecover(HistoryReplay):
    """FedRecover (Cao et al., IEEE S&P 2023): replay with estimated client updates.

    Parameters
    ----------
    warmup_rounds : int, optional
        ``T_w``: the rounds ``t_u .. t_u + T_w − 1`` use exact updates, ``t_u`` being the first
        round a removed client took part in (default 5; round ``t_u``'s, and every earlier
        round's, are the stored ones: see the module docstring).
    correction_interval : int, optional
        ``T_c``: after the warm-up, every ``T_c``-th round uses exact updates (default 10;
        0 disables periodic correction).
    final_rounds : int, optional
        ``T_f``: the last ``T_f`` rounds use exact updates (default 5, the paper's).
    buffer_size : int, optional
        ``s``: pairs kept per client for the L-BFGS approximation, the newest ones (default 2).
    abnormal_quantile : float, optional
        ``q`` in ``(0, 1]`` of the paper's rule for ``τ`` (:func:`abnormality_threshold`): per
        replayed round the ``q``-quantile of the magnitudes of the remaining clients' stored
        update coordinates, ``τ`` the largest over the rounds; an estimate with a coordinate
        of magnitude above ``τ`` is replaced by the client's exact update. ``q = 1 − α``
        for the paper's tolerance rate ``α`` (default ``0.999999``, ``α = 1e-6``: at most
        one stored coordinate in a million, per round, lies above ``τ``; see
        ``docs/algorithms.md`` for the choice and its measured effect).
    abnormal_threshold : float or None, optional
        An absolute ``τ`` (finite, > 0) in the units of the updates, overriding the quantile
        rule (default ``None``: the rule).
    track_accuracy : bool, optional
        Evaluate the reconstruction on the test split after every replayed round (default
        ``True``); see :class:`~fedunlearn.unlearning.federated.federaser.HistoryReplay`.

    Attributes
    ----------
    trajectory_ : Trajectory or None
        The trajectory recovered by the last request, the history of the next one.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_replayable_history=True, needs_every_round=True, carries_state=True,
        saves_state=True)
    """Needs the global model and every client's update of every round (``Δt = 1``);
    ``trajectory_`` serves the next request (module docstring), saved between requests with
    :meth:`state_arrays` and restored with :meth:`load_state`."""
    fresh_kind: ClassVar[str | None] = "exact"
    """The replay diagnostics' ``ratio`` and ``cosine`` compare, in the rounds whose updates
    were all exact, the stored update ``ḡ_k^t`` with the exact one from ``ŵ_t``:
    ``‖ḡ‖ / ‖g_exact‖`` and ``cos(ḡ, g_exact)``, how far the recovered run's updates have
    moved from the original run's (what the estimates must bridge), not a calibration."""

    def __init__(self, warmup_rounds: int = 5, correction_interval: int = 10,
                 final_rounds: int = 5, buffer_size: int = 2,
                 abnormal_quantile: float = 0.999999,
                 abnormal_threshold: float | None = None, track_accuracy: bool = True) -> None:
        super().__init__(track_accuracy=track_accuracy)
        self.warmup_rounds = warmup_rounds
        self.correction_interval = correction_interval
        self.final_rounds = final_rounds
        self.buffer_size = buffer_size
        self.abnormal_quantile = abnormal_quantile
        self.abnormal_threshold = abnormal_threshold
        self.trajectory_: Trajectory | None = None
        self._run: _Recovery | None = None

    def check(self) -> None:
        def whole(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"FedRecover's {name} must be an integer >= {low}, "
                                 f"got {value!r}")

        whole("warmup_rounds", 1)
        whole("correction_interval", 0)
        whole("final_rounds", 0)
        whole("buffer_size", 1)
        q = self.abnormal_quantile
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
            raise ValueError(f"FedRecover's abnormal_quantile must be a number in (0, 1], "
                             f"got {q!r}")
        tau = self.abnormal_threshold
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int | float)
                                or not math.isfinite(tau) or not tau > 0):
            raise ValueError(f"FedRecover's abnormal_threshold must be a finite number > 0, "
                             f"or left out to set it by the abnormal_quantile rule; "
                             f"got {tau!r}")

    # ------------------------------------------------------------------ the request
    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Recover without ``ctx.removed``; see the module docstring.

        Raises
        ------
        HistoryNotReplayable
            Before any work, if the history does not retain every round (``Δt != 1``), breaks
            ``M_{t+1} = M_t + Σ w U``, or lost its global models to a strict purge while this
            method holds no trajectory of an earlier request on it.
        """
        history = ctx.history
        self.check()
        if history.retention_interval != 1:
            raise HistoryNotReplayable(
                f"FedRecover needs every round's global model and client updates, but the "
                f"history retains updates every {history.retention_interval} rounds; train with "
                "history.retention_interval = 1 to use it, nothing was changed")
        previous = self._previous(ctx)
        cut = history.globals_deleted_from()
        if previous is None and cut is not None:
            raise HistoryNotReplayable(
                f"FedRecover needs the original global models, but a strict purge deleted them "
                f"from round {cut} on and this FedRecover recovered no earlier request on this "
                "store to replay from instead; serve every request with the same FedRecover, or "
                "use history.purge = \"updates\", nothing was changed")
        rounds = history.rounds()
        self._run = _Recovery(last_round=rounds[-1] if rounds else 0,
                              start=_first_affected(history, previous, ctx.removed),
                              keys=float_keys(ctx.initial), previous=previous,
                              seed=ctx.seed)
        try:
            result = super().unlearn(ctx)
            run = self._run
            self.trajectory_ = Trajectory(str(history.path), frozenset(ctx.removed),
                                          dict(run.rounds))
        finally:
            self._run = None
        return result

    def state_arrays(self) -> MethodState:
        """``trajectory_`` as JSON-able ``meta`` and named arrays (for a resumable run).

        >>> m, a = FedRecover().state_arrays()
        >>> m, a
        ({'trajectory': None}, {})
        """
        t = self.trajectory_
        if t is None:
            return MethodState({"trajectory": None}, {})
        rounds: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for r, rec in t.rounds.items():
            rounds[str(r)] = {"round": rec.round.round, "clients": list(rec.round.clients),
                              "weights": list(rec.round.weights), "model": list(rec.model),
                              "stored": [list(u) for u in rec.round.stored]}
            arrays.update({f"{r}/m/{k}": v for k, v in rec.model.items()})
            for i, u in enumerate(rec.round.stored):
                arrays.update({f"{r}/u{i}/{k}": v for k, v in u.items()})
        return MethodState({"trajectory": {"removed": sorted(t.removed), "rounds": rounds}},
                           arrays)

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], *,
                   store: str) -> None:
        """Restore ``trajectory_`` from :meth:`state_arrays`' output, as recovered on the
        history store at ``store``."""
        t = meta.get("trajectory")
        if t is None:
            self.trajectory_ = None
            return
        rounds = {}
        for r, info in t["rounds"].items():
            stored = tuple({k: arrays[f"{r}/u{i}/{k}"] for k in keys}
                           for i, keys in enumerate(info["stored"]))
            rounds[int(r)] = RecoveredRound(
                {k: arrays[f"{r}/m/{k}"] for k in info["model"]},
                RoundUpdates(int(info["round"]), tuple(int(c) for c in info["clients"]),
                             tuple(float(w) for w in info["weights"]), stored))
        self.trajectory_ = Trajectory(store, frozenset(int(c) for c in t["removed"]), rounds)

    def _previous(self, ctx: UnlearningContext) -> Trajectory | None:
        """The trajectory of this method's previous request on the same store, if it removed
        a subset of ``ctx.removed`` (else ``None``: replay the store's original history)."""
        t = self.trajectory_
        if t is None or t.store != str(ctx.history.path) or not t.removed <= ctx.removed:
            return None
        return t

    # ------------------------------------------------------------------ the replay's hooks
    def replay_round(self, ctx: UnlearningContext, t: int, clients: tuple[int, ...],
                     weights: tuple[float, ...]) -> RoundUpdates:
        """From the previous request's trajectory when there is one (see module docstring)."""
        run = self._state()
        if run.previous is None:
            return super().replay_round(ctx, t, clients, weights)
        old = run.previous.rounds.get(t)
        if old is None:
            return RoundUpdates(t, (), (), ())
        return old.round.only(set(clients))

    def first_step(self, ctx: UnlearningContext, model: Params, rnd: RoundUpdates) -> Step:
        """A round up to ``t_u`` (round 1 always): ``ŵ_t = w̄_t``, so the stored updates are
        the exact ones; replayed as they are, no message, no pair."""
        step = super().first_step(ctx, model, rnd)
        run = self._state()
        run.modes[rnd.round] = "stored"
        run.rounds[rnd.round] = RecoveredRound(_copy(model), rnd)
        return step

    def step(self, ctx: UnlearningContext, model: Params, rnd: RoundUpdates) -> Step:
        """Exact updates in planned rounds; otherwise L-BFGS estimates, abnormal ones (and
        those of clients without pairs) replaced by exact updates."""
        run = self._state()
        t = rnd.round
        if t <= run.start:  # training's own model: the stored updates are the exact ones
            return self.first_step(ctx, model, rnd)
        planned = self._planned(t, run)
        reference = self._reference(ctx, t)
        dw = _flat(model, run.keys) - _flat(reference, run.keys)
        estimates: dict[int, Params] = {}
        exact_for: list[int] = list(rnd.clients)
        if planned is None:
            exact_for = []
            tau = self._tau(ctx, run)
            for k, stored in zip(rnd.clients, rnd.stored, strict=True):
                guess = self._estimate(run, k, stored, dw)
                if guess is None:
                    run.no_pairs.setdefault(t, []).append(k)
                    exact_for.append(k)
                    continue
                if not np.all(np.abs(guess) <= tau):  # NaN is abnormal too
                    run.abnormal.setdefault(t, []).append(k)
                    exact_for.append(k)
                    continue
                estimates[k] = _unflat(guess, stored, run.keys)
        epochs = float(ctx.cfg.training.local_epochs)
        answers = (ctx.federation.train_clients(model, exact_for, epochs=epochs, server_round=t,
                                                tag=exact_tag(ctx.seed)) if exact_for else {})
        exact: dict[int, Params] = {}
        for k, stored in zip(rnd.clients, rnd.stored, strict=True):
            if k in answers:
                exact[k] = difference(answers[k].model, model)
                self._add_pair(run, k, dw, exact[k], stored)
        kept = rnd.only(set(estimates) | set(exact))
        updates = [estimates[k] if k in estimates else exact[k] for k in kept.clients]
        run.estimated_updates += len(estimates)
        run.modes[t] = planned or ("estimated" if not exact_for else
                                   "abnormal" if t in run.abnormal else "no_pairs")
        run.rounds[t] = RecoveredRound(_copy(model), RoundUpdates(
            t, kept.clients, kept.weights, tuple(updates)))
        n = len(exact_for)
        cost = Cost(client_epochs=n * epochs, rounds=1 if n else 0, messages_sent=n)
        fresh = updates if not estimates and kept.clients == rnd.clients else None
        return Step(updates, cost, fresh=fresh, round=kept if kept.clients != rnd.clients
                    else None)

    def details(self) -> dict[str, Any]:
        run = self._state()
        modes = list(run.modes.values())
        return {
            "warmup_rounds": self.warmup_rounds,
            "correction_interval": self.correction_interval,
            "final_rounds": self.final_rounds, "buffer_size": self.buffer_size,
            "abnormal_quantile": self.abnormal_quantile,
            "abnormal_threshold": self.abnormal_threshold,
            "abnormal_tau": run.tau if self.abnormal_threshold is None
            else float(self.abnormal_threshold),
            "exact_tag": exact_tag(run.seed),
            "replayed_from": "original history" if run.previous is None
            else "recovered trajectory of the previous request",
            "first_affected_round": run.start,
            "rounds_exact": sum(m not in ("estimated", "stored") for m in modes),
            "rounds_estimated": modes.count("estimated"),
            "rounds_abnormal": len(run.abnormal),
            "rounds_by_mode": {m: modes.count(m) for m in sorted(set(modes))},
            "round_modes": {str(t): m for t, m in sorted(run.modes.items())},
            "abnormal_clients": {str(t): ks for t, ks in sorted(run.abnormal.items())},
            "no_pair_clients": {str(t): ks for t, ks in sorted(run.no_pairs.items())},
            "estimated_updates": run.estimated_updates,
            "pairs_kept": run.pairs_kept, "pairs_skipped": run.pairs_skipped,
        }

    # ------------------------------------------------------------------ helpers
    def _state(self) -> _Recovery:
        if self._run is None:
            raise RuntimeError("FedRecover's replay hooks run only inside unlearn()")
        return self._run

    def _planned(self, t: int, run: _Recovery) -> str | None:
        """Why round ``t`` is exact by schedule (warm-up, correction, final), or ``None``."""
        k = t - run.start + 1  # the round of the recovery proper, 1 at t_u
        if k <= self.warmup_rounds:
            return "warmup"
        if t > run.last_round - self.final_rounds:
            return "final"
        if self.correction_interval and (k - self.warmup_rounds) % self.correction_interval == 0:
            return "correction"
        return None

    def _reference(self, ctx: UnlearningContext, t: int) -> Params:
        """``w̄_t``: the previous trajectory's model of round ``t``, or the stored one."""
        previous = self._state().previous
        if previous is not None:
            return previous.rounds[t].model
        return _stored_global(ctx.history, t)

    def _tau(self, ctx: UnlearningContext, run: _Recovery) -> float:
        """``τ``: the override, or the quantile rule over the remaining clients' updates of
        the replayed record (the previous trajectory's, or the store's), computed once per
        request, when the first estimate needs it."""
        if self.abnormal_threshold is not None:
            return float(self.abnormal_threshold)
        if run.tau is None:
            run.tau = abnormality_threshold(_replayed_updates(ctx, run), self.abnormal_quantile)
        return run.tau

    def _estimate(self, run: _Recovery, k: int, stored: Params,
                  dw: np.ndarray) -> np.ndarray | None:
        """``Ū_k − H̃_k Δw`` (flat, float64) from client ``k``'s buffered pairs, or ``None``
        if it has none."""
        pairs = run.buffers.get(k)
        if not pairs:
            return None
        s = np.stack([p[0] for p in pairs], axis=1)
        y = np.stack([p[1] for p in pairs], axis=1)
        return _flat(stored, run.keys) - lbfgs_hvp(s, y, dw)

    def _add_pair(self, run: _Recovery, k: int, dw: np.ndarray, exact: Params,
                  stored: Params) -> None:
        """Buffer ``(Δw, y = −(U_exact − U_stored))`` for client ``k`` (its newest
        ``buffer_size`` kept), unless it fails the curvature safeguard."""
        y = -(_flat(exact, run.keys) - _flat(stored, run.keys))
        if not float(dw @ y) > CURVATURE_EPS * float(np.linalg.norm(dw) * np.linalg.norm(y)):
            run.pairs_skipped += 1
            return
        run.buffers.setdefault(k, deque(maxlen=self.buffer_size)).append((dw.copy(), y))
        run.pairs_kept += 1


def _first_affected(history: HistoryStore, previous: Trajectory | None,
                    removed: frozenset[int]) -> int:
    """``t_u``: the first round in which a client removed since the replayed record took part
    (the record being ``previous`` or, without it, the store's original rounds); the last
    round + 1 if none did."""
    rounds = history.rounds()
    newly = set(removed) - (set(previous.removed) if previous is not None else set())
    for t in rounds:
        if previous is None:
            took_part = set(history.round_record(t).participants)
        else:
            old = previous.rounds.get(t)
            took_part = set(old.round.clients) if old is not None else set()
        if took_part & newly:
            return t
    return (rounds[-1] if rounds else 0) + 1


def _replayed_updates(ctx: UnlearningContext, run: _Recovery) -> Iterable[list[np.ndarray]]:
    """Per replayed round, the remaining clients' updates of the record being replayed (the
    previous request's trajectory, or the store's rounds), flat; one round at a time."""
    if run.previous is not None:
        for rec in run.previous.rounds.values():
            yield [_flat(u, run.keys) for k, u in zip(rec.round.clients, rec.round.stored,
                                                      strict=True) if k not in ctx.removed]
        return
    history = ctx.history
    for t in history.rounds():
        record = history.round_record(t)
        if record.updates_retained:
            yield [_flat(history.update(t, k), run.keys) for k in record.participants
                   if k not in ctx.removed]


def _stored_global(history: HistoryStore, t: int) -> Params:
    return history.global_model(t)


def _copy(params: Mapping[str, np.ndarray]) -> Params:
    return {k: np.array(v, copy=True) for k, v in params.items()}
