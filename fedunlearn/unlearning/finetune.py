"""FedAvg rounds with the remaining clients only: the repair step of PGA and NoT.

Both PGA (Halimi et al. 2022, "post-training") and NoT (Khalil et al., CVPR 2025,
"fine-tuning") end with a few ordinary federated rounds in which only the remaining clients
train, from the model the removal step left. The rounds go through the port
(``ctx.federation.train_clients``, real Flower messages in a run) and are averaged with FedAvg
weights ``n_k / Σ n_j`` over the clients that answered, as FedEraser's calibration does.

Each round's participants are drawn with the training's seeded sampler
(``training.sample_fraction``) and the removed clients dropped; the rounds are numbered after
the recorded training rounds, and the local shuffles use a tag derived from the request seed
and the method's purpose (never training's tag 0).
"""

from __future__ import annotations

from typing import Any

from fedunlearn.aggregation import apply_update, difference, fedavg_weights, weighted_sum
from fedunlearn.params import Params
from fedunlearn.seeding import derive_seed, sample_participants
from fedunlearn.unlearning.base import Cost, UnlearningContext


def remaining_rounds(ctx: UnlearningContext, model: Params, rounds: int, *, epochs: float,
                     first_round: int, purpose: int
                     ) -> tuple[Params, Cost, list[dict[str, Any]]]:
    """``rounds`` FedAvg rounds over the remaining clients from ``model``.

    Parameters
    ----------
    ctx : UnlearningContext
    model : Params
        The model to start from (not modified).
    rounds : int
        Number of rounds (0 returns a copy of ``model``).
    epochs : float
        Local epochs per client per round.
    first_round : int
        The ``server_round`` of the first round (seeds derive from it).
    purpose : int
        Mixed into ``ctx.seed`` to derive the shuffling tag.

    Returns
    -------
    tuple
        ``(model, cost, log)``: the new model, the client work (epochs, rounds, messages) and
        per round ``{"round", "clients", "answered"}``.
    """
    t = ctx.cfg.training
    tag = derive_seed(ctx.seed, purpose) + 1
    out = {k: v.copy() for k, v in model.items()}
    cost = Cost()
    log: list[dict[str, Any]] = []
    for i in range(rounds):
        r = first_round + i
        clients = sample_participants(ctx.cfg.seed, r, ctx.federation.num_clients,
                                      t.sample_fraction, set(ctx.removed))
        if not clients:
            continue
        results = ctx.federation.train_clients(out, clients, epochs=epochs, server_round=r,
                                               tag=tag)
        done = [k for k in clients if k in results]
        weights = fedavg_weights([results[k].num_examples for k in done])
        out = apply_update(out, weighted_sum([difference(results[k].model, out) for k in done],
                                             weights))
        cost.client_epochs += len(clients) * epochs
        cost.rounds += 1
        cost.messages_sent += len(clients)
        log.append({"round": r, "clients": list(clients), "answered": done})
    return out, cost, log
