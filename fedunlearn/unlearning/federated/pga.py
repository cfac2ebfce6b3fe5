"""PGA: the forgotten client undoes its own training by projected gradient ascent.

Halimi, Kadhe, Rawat and Baracaldo, 2022, "Federated Unlearning: How to Efficiently Erase a
Client in FL?" (arXiv:2207.05521), and the authors' code (IBM/federated-unlearning,
``federated_unlearning.ipynb``). Three steps:

1. **Reference model** (server). The average of the *other* clients' local models of the last
   round: ``w_ref = M_t + Σ_{k∈S_t, k∉removed} w̃_k U_k^t``, FedAvg weights renormalised over
   them (:func:`reference_model`). It keeps what the others taught in that round. Here ``t`` is
   the last round whose updates the history retained (``history.retention_interval``) and in
   which a remaining client took part; with Δt = 1 that is the paper's last round ``T``.
2. **Local unlearning** (the target client, on its own data). Projected gradient ascent from
   ``w_ref`` (:mod:`fedunlearn.unlearning.federated.pga_ascent`, the port's ``"ascent"`` task): maximise the
   cross-entropy with the authors' optimizer (SGD, momentum 0.9, gradient norm clipped at 5),
   projecting after every step onto the L2 ball ``‖w − w_ref‖ ≤ δ``; stop early once the
   accuracy on the target's *clean* samples (those its backdoor did not poison,
   :func:`fedunlearn.engine.local.clean_samples`) is below ``τ``. ``δ`` is a fraction (the
   paper's text: one third) of the mean distance between ``w_ref`` and randomly initialised
   models (:func:`ball_radius`), so the ascent can destroy what the target taught but cannot
   wander off to an arbitrary model. Several targets in one request ascend in parallel from
   ``w_ref``; their displacements are added and the sum projected onto the same ball.
3. **Post-training** (server and remaining clients): FedAvg rounds with the remaining
   clients only, from the unlearned model (:func:`~fedunlearn.unlearning.federated.finetune.remaining_rounds`),
   by default until the remaining clients report the accuracy the model had before the request
   (within ``tolerance``), at most as many rounds as retraining.

What the method needs, and what it costs: the target must **cooperate and still hold its
data** (its ascent is client work, counted in the cost with the post-training); for the first
request the server needs the last retained round's global model and the other clients'
updates of that round. The cost's ``client_epochs`` hold the ascent's steps in epochs, the
forward passes of its early-stop checks in epochs of the target's data (``check_epochs``: a
pass over m of its n samples is m/n), and the post-training's epochs; the post-training's
evaluations are messages, as in :mod:`~fedunlearn.unlearning.federated.finetune`.

A **later request** (an earlier one of any kind was served)
starts instead from the model it is given, ``w_ref = ctx.model``, the answer to the earlier
request: the stored rounds describe the original training, whose global models still hold the
earlier targets' contributions, and a reference built from them would bring those back. So a
later request reads no stored model, and a strict purge of an earlier target (which deletes
the global models from its first round on) does not stop it. The purge deletes the *server's*
copies of a client's updates; it never touches the client's own data, which PGA needs the
target to keep until it has answered. If the first request itself finds its ``M_t`` deleted
(a store purged before), it is refused (:class:`~fedunlearn.history.store.HistoryPurgedError`, one
line) before any client work.

Departures from the paper and the authors' code (radius rule, stop rule, post-training rounds,
optimizer, ``τ`` on clean data), each with its measured effect and the command behind it, are
in ``docs/algorithms.md``, section PGA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.engine.aggregation import apply_update, difference, weighted_sum
from fedunlearn.history.store import HistoryPurgedError, HistoryStore
from fedunlearn.models import reinitialise
from fedunlearn.models.params import Params, get_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    Cost,
    FederatedUnlearner,
    Setting,
    UnlearningContext,
    UnlearningResult,
    finite_positive,
)
from fedunlearn.unlearning.federated.calibration import renormalised_weights
from fedunlearn.unlearning.federated.finetune import check_repair, repair
from fedunlearn.unlearning.federated.pga_ascent import ASCENT_FORGET

_ASCENT_PURPOSE = 0xA5CE
_RANDOM_PURPOSE = 0x4A4D
_POST_PURPOSE = 0x9057


def _finite_number(value: object) -> bool:
    """A real number (not a bool or a string) that is finite."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def reference_model(global_model: Params, updates: Sequence[Params],
                    weights: Sequence[float]) -> Params:
    """``M + Σ_k w̃_k U_k`` with ``w̃_k = w_k / Σ_j w_j`` (the average of the local models
    ``M + U_k`` with the weights renormalised over the ones given).

    >>> m = {"w": np.array([1.0, 1.0], np.float32)}
    >>> u = [{"w": np.array([2.0, 0.0], np.float32)}, {"w": np.array([0.0, 4.0], np.float32)}]
    >>> reference_model(m, u, [0.1, 0.3])["w"].tolist()
    [1.5, 4.0]
    """
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("the reference model needs at least one update with a positive weight")
    return apply_update(global_model, weighted_sum(updates, [w / total for w in weights]))


def ball_radius(reference: Params, randoms: Sequence[Params], fraction: float,
                keys: Sequence[str]) -> float:
    """``fraction`` times the mean L2 distance, over the arrays ``keys``, between
    ``reference`` and each randomly initialised model in ``randoms``.

    >>> ref = {"w": np.array([3.0, 4.0])}
    >>> ball_radius(ref, [{"w": np.zeros(2)}, {"w": np.array([3.0, -6.0])}], 1 / 3, ["w"])
    2.5
    """
    if not randoms:
        raise ValueError("ball_radius needs at least one random model")
    dists = [math.sqrt(sum(float(np.sum((np.asarray(reference[k], np.float64) - r[k]) ** 2))
                           for k in keys)) for r in randoms]
    return fraction * float(np.mean(dists))


def project_params(params: Params, center: Params, radius: float, keys: Sequence[str]
                   ) -> Params:
    """``params`` with the arrays ``keys`` projected onto the ball of ``radius`` around
    ``center`` (:func:`fedunlearn.unlearning.federated.pga_ascent.project_onto_ball_`, the clients' projection)."""
    from fedunlearn.unlearning.federated.pga_ascent import project_onto_ball_

    tensors = [torch.from_numpy(np.array(params[k], copy=True)) for k in keys]
    project_onto_ball_(tensors, [torch.from_numpy(np.asarray(center[k])) for k in keys], radius)
    out = {k: v.copy() for k, v in params.items()}
    for k, t in zip(keys, tensors, strict=True):
        out[k] = t.numpy().astype(params[k].dtype)
    return out


def last_reference_round(history: HistoryStore, removed: frozenset[int]) -> int:
    """The last round that retained updates and had a participant not in ``removed``."""
    for t in reversed(history.rounds()):
        rec = history.round_record(t)
        if rec.updates_retained and any(k not in removed for k in rec.participants):
            return t
    raise ValueError("PGA needs a round with stored updates of a remaining client; "
                     "the history has none")


@UNLEARNERS.register("pga")
class PGA(FederatedUnlearner):
    """Projected gradient ascent by the target, then post-training (Halimi et al. 2022).

    Parameters
    ----------
    radius_fraction : float, optional
        ``δ`` as a fraction of the mean L2 distance between ``w_ref`` and 5 randomly
        initialised models of the architecture (default 1/3, the paper's text; the authors'
        code amounts to about ``1/√3``, see ``docs/algorithms.md``).
    threshold : float or None, optional
        ``τ``: the ascent stops once the target's accuracy on its clean samples is below it
        (default ``None``: chance level, ``1 / number of classes``).
    epochs : float, optional
        Largest number of ascent epochs on the target's data (default 5, the authors' code;
        the threshold usually stops it well before).
    learning_rate : float, optional
        Ascent step size (default 0.01, the authors' code).
    ascent_momentum : float, optional
        SGD momentum of the ascent, in ``[0, 1)`` (default 0.9, the authors' code; 0 is plain
        SGD).
    clip_norm : float, optional
        The ascent's gradient norm is clipped to this before each step (default 5.0, the
        authors' code); 0 switches the clipping off.
    rounds : int or None, optional
        With ``until = "recovered"``: the most post-training rounds (default ``None``:
        ``training.rounds``, what retraining spends); with ``until = "rounds"``: exactly this
        many.
    until : {"recovered", "rounds"}, optional
        End the post-training once the remaining clients' accuracy is back (default) or after
        ``rounds`` rounds (see :func:`fedunlearn.unlearning.federated.finetune.remaining_rounds`).
    tolerance : float, optional
        ``"recovered"`` means: a fixed sample of remaining clients reports, on its own data, at
        least the accuracy the original model had there minus ``tolerance`` (default 0.01).
    post_epochs : float or None, optional
        Local epochs per post-training round (default ``None``: ``training.local_epochs``).

    Notes
    -----
    Measurements behind these defaults (learning rate, post-training rounds, optimizer) are in
    ``docs/algorithms.md``, section PGA.
    """

    setting: ClassVar[Setting] = "federated"
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_target_client=True, granularities=frozenset(GRANULARITIES))
    """The forgotten clients are asked for work (the ascent, on their own data); they never
    train in the ordinary sense (the conformance suite checks both)."""

    def __init__(self, radius_fraction: float = 1 / 3, threshold: float | None = None,
                 epochs: float = 5.0, learning_rate: float = 0.01,
                 ascent_momentum: float = 0.9, clip_norm: float = 5.0,
                 rounds: int | None = None, until: str = "recovered", tolerance: float = 0.01,
                 post_epochs: float | None = None) -> None:
        self.radius_fraction = radius_fraction
        self.threshold = threshold
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.ascent_momentum = ascent_momentum
        self.clip_norm = clip_norm
        self.rounds = rounds
        self.until = until
        self.tolerance = tolerance
        self.post_epochs = post_epochs

    def check(self) -> None:
        """Refuse bad hyperparameters (one line each) before any work."""
        for key in ("radius_fraction", "epochs", "learning_rate"):
            if not finite_positive(getattr(self, key)):
                raise ValueError(f"PGA's {key} must be a finite number > 0, got "
                                 f"{getattr(self, key)!r}")
        if self.threshold is not None and not (
                isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool)
                and 0 <= self.threshold <= 1):
            raise ValueError(f"PGA's threshold must be a number in [0, 1] (an accuracy), got "
                             f"{self.threshold!r}")
        if not (_finite_number(self.ascent_momentum) and 0 <= self.ascent_momentum < 1):
            raise ValueError(f"PGA's ascent_momentum must be a finite number in [0, 1), got "
                             f"{self.ascent_momentum!r}")
        if not (_finite_number(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"PGA's clip_norm must be a finite number >= 0 (0: no clipping), "
                             f"got {self.clip_norm!r}")
        check_repair("PGA", self.rounds, self.until, self.tolerance)
        if self.post_epochs is not None and not finite_positive(self.post_epochs):
            raise ValueError(f"PGA's post_epochs must be a finite number > 0, got "
                             f"{self.post_epochs!r}")

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Reference model, the targets' projected ascent, post-training; ``ctx`` unchanged.

        Raises
        ------
        HistoryPurgedError
            If a strict purge deleted the global model the reference needs (before any work).
        """
        self.check()
        history = ctx.history
        earlier = sorted(set(ctx.removed) - set(ctx.targets))
        granular = ctx.granularity != "client"  # the targets stay: no one's round to drop
        # a later request (after any kind) starts from ctx.model: the stored rounds still hold
        # what earlier requests removed, and their purges may have deleted what a reference needs
        if earlier or granular or ctx.request > 0:
            t, others = None, []
            w_ref = {k: v.copy() for k, v in ctx.model.items()}
        else:
            t = last_reference_round(history, ctx.removed)
            cut = history.globals_deleted_from()
            if cut is not None and t >= cut:
                raise HistoryPurgedError(
                    f"pga cannot serve request for clients {list(ctx.targets)}: its reference "
                    f"model needs the global model of round {t}, deleted by the strict purge "
                    f"of clients {history.purged()}; nothing was changed")
            rec = history.round_record(t)
            others, weights = renormalised_weights(rec.participants, rec.weights,
                                                   keep=lambda k: k not in ctx.removed)
            w_ref = reference_model(history.global_model(t),
                                    [history.update(t, k) for k in others], weights)
        net = ctx.build_model()
        keys = [name for name, p in net.named_parameters() if p.requires_grad]
        randoms = [get_params(reinitialise(net, derive_seed(ctx.seed, _RANDOM_PURPOSE, i)))
                   for i in range(5)]
        radius = ball_radius(w_ref, randoms, self.radius_fraction, keys)
        threshold = (1.0 / ctx.data.num_classes) if self.threshold is None else self.threshold
        lr = self.learning_rate
        ascent = {"radius": radius, "threshold": threshold, "learning_rate": lr,
                  "momentum": float(self.ascent_momentum), "clip_norm": float(self.clip_norm)}
        if granular:  # each target ascends on the samples the request removes from it
            ascent[ASCENT_FORGET] = float(ctx.request + 1)

        first = len(history.rounds()) + 1
        results = ctx.federation.train_clients(
            w_ref, list(ctx.targets), epochs=self.epochs, server_round=first,
            tag=derive_seed(ctx.seed, _ASCENT_PURPOSE) + 1, task="ascent", task_params=ascent)
        answered = [u for u in ctx.targets if u in results]
        shift = weighted_sum([difference(results[u].model, w_ref) for u in answered],
                             [1.0] * len(answered))
        unlearned = project_params(apply_update(w_ref, shift), w_ref, radius, keys)
        # the ascent's steps and its early-stop checks' forward passes, both in epochs of the
        # target's data (docs/algorithms.md, PGA: "Cost")
        cost = Cost(client_epochs=sum(float(results[u].stats.get("epochs", 0.0))
                                      + float(results[u].stats.get("check_epochs", 0.0))
                                      for u in answered),
                    rounds=1, messages_sent=len(ctx.targets))
        post_epochs = (ctx.cfg.training.local_epochs if self.post_epochs is None
                       else self.post_epochs)
        post = repair(ctx, unlearned, rounds=self.rounds, until=self.until,
                      tolerance=self.tolerance, epochs=post_epochs, first_round=first + 1,
                      purpose=_POST_PURPOSE)
        cost.client_epochs += post.cost.client_epochs
        cost.rounds += post.cost.rounds
        cost.messages_sent += post.cost.messages_sent
        details: dict[str, Any] = {
            "reference_round": t, "reference_clients": list(others),
            "reference": ("the model the request starts from ("
                          + (f"a {ctx.granularity} request" if granular else
                             f"earlier targets {earlier} removed" if earlier else
                             "earlier requests served") + ")"
                          if earlier or granular or ctx.request > 0 else "stored round"),
            "radius": radius,
            "threshold": threshold, "learning_rate": lr,
            "ascent_momentum": self.ascent_momentum, "clip_norm": self.clip_norm,
            "ascent": {str(u): dict(results[u].stats) for u in answered},
            "ascent_dropped": [u for u in ctx.targets if u not in results],
            "post_rounds": post.log, "recovery": post.recovery,
            "radius_fraction": self.radius_fraction}
        return UnlearningResult(model=post.model, cost=cost, details=details)
