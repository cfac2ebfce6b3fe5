"""FedAvg rounds with the remaining clients only: the repair step of PGA and NoT.

Both PGA (Halimi et al. 2022, "post-training") and NoT (Khalil et al., CVPR 2025,
"fine-tuning") end with ordinary federated rounds in which only the remaining clients train,
from the model the removal step left. The rounds go through the port
(``ctx.federation.train_clients``, real Flower messages in a run) and are averaged with FedAvg
weights ``n_k / Σ n_j`` over the clients that answered, as FedEraser's calibration does.

How many rounds? Neither paper gives a number that carries over to another federation (PGA's
text: "one round ... is sufficient" on its MNIST CNN; NoT's: "subsequent fine-tuning rounds
restore essential knowledge"). So the repair can run until it has *recovered*
(:func:`remaining_rounds` with a ``tolerance``): before the first round a fixed, seeded sample
of remaining clients evaluates the model the request started from (the original, which still
holds the targets' contribution) on their own data, and after each round the same clients
evaluate the repaired model (Flower's federated evaluation, ``ctx.federation.evaluate_clients``;
one message per client, counted). The repair stops after the first round whose pooled
accuracy is at least the original's minus ``tolerance``, or after ``rounds`` rounds. The
server sees only the clients' figures; it never uses the test split. The targets take no part.

Each round's participants are drawn with the training's seeded sampler
(``training.sample_fraction``) and the removed clients dropped; the rounds are numbered after
the recorded training rounds, and the local shuffles use a tag derived from the request seed
and the method's purpose (never training's tag 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedunlearn.engine.aggregation import apply_update, difference, fedavg_weights, weighted_sum
from fedunlearn.engine.port import ClientEvaluation
from fedunlearn.models.params import Params
from fedunlearn.models.seeding import derive_seed, sample_participants
from fedunlearn.unlearning.base import Cost, UnlearningContext

UNTIL = ("recovered", "rounds")
"""How a repair ends: once the remaining clients' accuracy is back (``"recovered"``, at most
``rounds`` rounds) or after exactly ``rounds`` rounds (``"rounds"``)."""

_EVAL_PURPOSE = 0xE7A1


@dataclass
class Repair:
    """What :func:`remaining_rounds` did.

    ``log`` holds per round ``{"round", "clients", "answered"}`` and, when the repair watched
    its recovery, the round's pooled ``"accuracy"`` on the evaluating clients. ``recovery`` is
    empty for a fixed number of rounds, else ``{"evaluators", "reference_accuracy",
    "target_accuracy", "tolerance", "recovered", "rounds", "accuracy", "compared",
    "compared_target", "unanswered"}``: ``accuracy`` is the last round's pooled accuracy on
    the ``compared`` evaluators that answered both before the repair and in that round, to be
    read against ``compared_target`` (``target_accuracy`` when all answered); ``unanswered``
    counts evaluations that did not come back.
    """

    model: Params
    cost: Cost
    log: list[dict[str, Any]] = field(default_factory=list)
    recovery: dict[str, Any] = field(default_factory=dict)


def check_repair(method: str, rounds: Any, until: Any, tolerance: Any) -> None:
    """Refuse a repair's parameters (one line) before any work.

    >>> check_repair("NoT", None, "rounds", 0.01)
    Traceback (most recent call last):
    ...
    ValueError: NoT's until = "rounds" needs rounds = N (an integer >= 0)
    """
    if until not in UNTIL:
        raise ValueError(f"{method}'s until must be one of {', '.join(map(repr, UNTIL))}, got "
                         f"{until!r}")
    if rounds == 0 and until == "recovered":
        raise ValueError(f'{method}\'s rounds = 0 with until = "recovered" repairs nothing; '
                         'for no repair set until = "rounds"')
    if rounds is None and until == "rounds":
        raise ValueError(f'{method}\'s until = "rounds" needs rounds = N (an integer >= 0)')
    if rounds is not None and (not isinstance(rounds, int) or isinstance(rounds, bool)
                               or rounds < 0):
        raise ValueError(f"{method}'s rounds must be an integer >= 0, got {rounds!r}")
    if (isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
            or not 0 <= tolerance <= 1):
        raise ValueError(f"{method}'s tolerance must be a number in [0, 1] (accuracy), got "
                         f"{tolerance!r}")


def repair(ctx: UnlearningContext, model: Params, *, rounds: int | None, until: str,
           tolerance: float, epochs: float, first_round: int, purpose: int) -> Repair:
    """:func:`remaining_rounds` with a method's parameters: ``until = "recovered"`` watches
    the recovery (at most ``rounds`` rounds, ``None``: ``training.rounds``, what retraining
    spends), ``"rounds"`` runs exactly ``rounds``."""
    cap = ctx.cfg.training.rounds if rounds is None else rounds
    return remaining_rounds(ctx, model, cap, epochs=epochs, first_round=first_round,
                            purpose=purpose,
                            tolerance=tolerance if until == "recovered" else None)


def evaluators(ctx: UnlearningContext, purpose: int) -> list[int]:
    """The remaining clients that judge a repair's recovery: a seeded sample of
    ``max(1, round(f·R))`` of the ``R`` remaining clients (``f = training.sample_fraction``),
    drawn once per request and method, so every round is compared on the same data."""
    remaining = [k for k in range(ctx.federation.num_clients) if k not in ctx.removed]
    m = min(len(remaining), max(1, round(ctx.cfg.training.sample_fraction * len(remaining))))
    rng = np.random.default_rng(derive_seed(ctx.seed, purpose, _EVAL_PURPOSE))
    return sorted(int(c) for c in rng.choice(remaining, size=m, replace=False))


def pooled_accuracy(answers: Mapping[int, ClientEvaluation], clients: Sequence[int]
                    ) -> float | None:
    """``Σ correct / Σ n`` over the answers of ``clients`` (``None`` without examples).

    >>> from fedunlearn.engine.port import ClientEvaluation as E
    >>> pooled_accuracy({1: E(30, 0.1, 0.9), 2: E(10, 0.2, 0.5), 3: E(5, 0.0, 0.0)}, [1, 2])
    0.8
    """
    n = sum(answers[k].num_examples for k in clients)
    if not n:
        return None
    return sum(answers[k].accuracy * answers[k].num_examples for k in clients) / n


def remaining_rounds(ctx: UnlearningContext, model: Params, rounds: int, *, epochs: float,
                     first_round: int, purpose: int, tolerance: float | None = None) -> Repair:
    """FedAvg rounds over the remaining clients from ``model``.

    Parameters
    ----------
    ctx : UnlearningContext
    model : Params
        The model to start from (not modified).
    rounds : int
        Number of rounds; with ``tolerance``, the most rounds (0 returns a copy of ``model``).
    epochs : float
        Local epochs per client per round.
    first_round : int
        The ``server_round`` of the first round (seeds derive from it).
    purpose : int
        Mixed into ``ctx.seed`` to derive the shuffling tag and the evaluating clients.
    tolerance : float or None, optional
        Stop after the first round whose pooled accuracy on the evaluating clients
        (:func:`evaluators`) is at least ``ctx.model``'s minus ``tolerance``; ``None`` (the
        default) runs exactly ``rounds`` rounds and evaluates nothing. ``ctx.model`` is the
        model the request starts from: the trained model for a first request, the method's
        answer to the previous request after that.

    Returns
    -------
    Repair
        The new model, the client work (epochs, rounds, messages, evaluation messages
        included), the per-round log and the recovery record.

    Notes
    -----
    Under ``engine.on_client_failure = "drop"`` an evaluator may not answer. A round then
    compares only the evaluators that answered both before the repair and in that round, on
    both sides (its log entry adds ``"evaluated"`` and that subset's ``"target"``, also when
    an evaluator missed the reference evaluation); with none it counts as not recovered.
    ``recovery["unanswered"]`` counts the evaluations missing.
    """
    t = ctx.cfg.training
    tag = derive_seed(ctx.seed, purpose) + 1
    kept = ctx.kept  # below the client level clients train and evaluate on what they keep
    out = {k: v.copy() for k, v in model.items()}
    repair = Repair(model=out, cost=Cost())
    watch: list[int] = []
    tol = 0.0 if tolerance is None else tolerance
    before: Mapping[int, ClientEvaluation] = {}
    if tolerance is not None and rounds > 0:
        watch = evaluators(ctx, purpose)
        before = ctx.federation.evaluate_clients(ctx.model, watch, server_round=first_round,
                                                 **kept)
        repair.cost.messages_sent += len(watch)
        reference = pooled_accuracy(before, list(before))
        repair.recovery = {"evaluators": watch, "reference_accuracy": reference,
                           "target_accuracy": None if reference is None else
                           reference - tolerance,
                           "tolerance": tolerance, "recovered": False, "rounds": 0,
                           "accuracy": None, "compared": 0, "compared_target": None,
                           "unanswered": len(watch) - len(before)}
    for i in range(rounds):
        r = first_round + i
        clients = sample_participants(ctx.cfg.seed, r, ctx.federation.num_clients,
                                      t.sample_fraction, set(ctx.removed))
        if not clients:
            continue
        results = ctx.federation.train_clients(out, clients, epochs=epochs, server_round=r,
                                               tag=tag, **kept)
        done = [k for k in clients if k in results]
        weights = fedavg_weights([results[k].num_examples for k in done])
        out = apply_update(out, weighted_sum([difference(results[k].model, out) for k in done],
                                             weights))
        repair.cost.client_epochs += len(clients) * epochs
        repair.cost.rounds += 1
        repair.cost.messages_sent += len(clients)
        entry: dict[str, Any] = {"round": r, "clients": list(clients), "answered": done}
        repair.log.append(entry)
        if watch:
            now = ctx.federation.evaluate_clients(out, watch, server_round=r, **kept)
            repair.cost.messages_sent += len(watch)
            both = [k for k in watch if k in now and k in before]
            accuracy, reference = pooled_accuracy(now, both), pooled_accuracy(before, both)
            target = None if reference is None else reference - tol
            entry["accuracy"] = accuracy
            if len(both) < len(watch):
                entry.update(evaluated=both, target=target)
            repair.recovery["unanswered"] += len(watch) - len(now)
            repair.recovery.update(rounds=repair.cost.rounds, accuracy=accuracy,
                                   compared=len(both), compared_target=target)
            if accuracy is not None and target is not None and accuracy >= target:
                repair.recovery["recovered"] = True
                break
    repair.model = out
    return repair
