"""The one protocol every removal method implements, so that all of them land on one table.

A method is created by name from :data:`UNLEARNERS` with its hyperparameters (scikit-learn
style: the constructor only stores them) and serves a request with
:meth:`Unlearner.unlearn`, which receives an :class:`UnlearningContext` and returns an
:class:`UnlearningResult`. Federated methods ask for client work only through
``ctx.federation`` (the port; never Flower directly) and read the server's stored history
through ``ctx.history``; they never touch client data. Centralized methods use ``ctx.data``.

Add a method from your own module::

    from fedunlearn.unlearning import UNLEARNERS, UnlearningResult

    @UNLEARNERS.register("my_method")
    class MyMethod:
        setting = "federated"
        def __init__(self, strength: float = 1.0) -> None:
            self.strength = strength
        def unlearn(self, ctx):
            ...
            return UnlearningResult(model=new_params)

and list the module in ``[experiment] extensions``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from fedunlearn.config import Config
from fedunlearn.data.federated import FederatedData
from fedunlearn.federation.port import Federation
from fedunlearn.history import HistoryStore
from fedunlearn.params import Params
from fedunlearn.registry import Registry

Setting = Literal["federated", "centralized"]


@dataclass(frozen=True)
class UnlearningContext:
    """Everything a method may use to serve one removal request.

    Attributes
    ----------
    cfg : Config
        The experiment config (training hyperparameters to replay, seed).
    targets : tuple of int
        Clients to forget in this request.
    removed : frozenset of int
        All clients forgotten so far, this request's targets included.
    model : Params
        The model to remove the targets from: the trained model for the first request, this
        method's previous output afterwards. Read-only.
    initial : Params
        The global model the federation started from (``M_1``).
    history : HistoryStore
        The server's stored rounds (participants, weights, updates, running sums). Read-only
        for methods; purging is the orchestrator's job.
    federation : Federation
        The port for client work (Flower in every real run).
    data : FederatedData
        The data of the simulation. Federated methods may use ``data.server.x`` (the server's
        unlabeled split) and nothing else; centralized methods pool ``data.clients``.
    build_model : callable
        ``build_model()`` returns a fresh ``torch.nn.Module`` of the experiment's architecture.
    seed : int
        Seed for this method and request.
    """

    cfg: Config
    targets: tuple[int, ...]
    removed: frozenset[int]
    model: Params
    initial: Params
    history: HistoryStore
    federation: Federation
    data: FederatedData
    build_model: Callable[[], Any]
    seed: int


@dataclass
class Cost:
    """What serving a request cost.

    ``client_epochs`` counts local epochs summed over clients; ``rounds`` counts rounds of
    client communication; ``messages_sent`` counts messages to clients (0 means no client was
    contacted); ``server_epochs`` counts epochs of server-side training (e.g. distillation);
    ``sample_epochs`` counts training samples times epochs (centralized methods, e.g. SISA's
    retrained slices).
    """

    client_epochs: float = 0.0
    rounds: int = 0
    messages_sent: int = 0
    server_epochs: float = 0.0
    sample_epochs: float = 0.0


@dataclass
class UnlearningResult:
    """A method's answer: the unlearned model (or predictor), its cost and method details."""

    model: Params | None = None
    predict_proba: Callable[[np.ndarray], np.ndarray] | None = None
    cost: Cost = field(default_factory=Cost)
    details: dict[str, Any] = field(default_factory=dict)


class Unlearner(Protocol):
    """A removal method: ``setting`` plus :meth:`unlearn`.

    Centralized methods also define ``fit(ctx) -> self``: it learns the method's own original
    model on the pooled data of all clients (fitted attributes end in ``_``) and is called
    once, before the first request, outside the timed removal (``ctx.targets`` is empty there).
    Their :class:`UnlearningResult` may carry ``predict_proba`` instead of ``model`` when the
    method's model is not the experiment's network (an ensemble, a linear head). After
    ``fit``, ``predict_proba_original(x)`` gives the fitted (pre-removal) model's predictions,
    for the setting's "original" row. Each ``unlearn`` continues from the previous removal.

    An optional class attribute ``exact = True`` declares that the result equals retraining
    without the targets (retraining, SISA); the lineage log records it.

    An optional class attribute ``needs_replayable_history = True`` (default ``False``)
    declares that the method consumes stored updates or running sums as if training had been
    plain weighted averaging, ``M_{t+1} = M_t + Σ_k w_k U_k`` (FedEraser, FedAccum,
    distillation). Such methods are refused before training when the configured strategy is
    declared to break that identity (server momentum, for instance); after training, a history
    whose ``replayable()`` is false must be refused with :class:`HistoryNotReplayable` before
    any work (FedEraser and FedAccum check it first thing in ``unlearn``).
    """

    setting: ClassVar[Setting]

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Serve one request; must not modify ``ctx.model``, ``ctx.history`` or the data."""
        ...


class HistoryNotReplayable(ValueError):
    """The stored history breaks ``M_{t+1} = M_t + Σ_k w_k U_k``, so a method that replays or
    subtracts stored updates cannot serve the request (nothing was changed)."""


UNLEARNERS: Registry[Callable[..., Unlearner]] = Registry("unlearning method")


def setting_of(method: object) -> Setting:
    """The setting a method (class or instance) declares; ``"federated"`` if it declares none."""
    return getattr(method, "setting", "federated")
