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
        def check(self) -> None:
            if not self.strength > 0:
                raise ValueError(f"strength must be > 0, got {self.strength}")
        def unlearn(self, ctx):
            ...
            return UnlearningResult(model=new_params)

and list the module in ``[experiment] extensions``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from fedunlearn.config.registry import Registry
from fedunlearn.config.tree import Config
from fedunlearn.data.federated import FederatedData
from fedunlearn.engine.port import Federation
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.params import Params

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
    request : int
        Position of this request in ``cfg.unlearning.requests`` (0 for the first; the method
        has served every earlier one, so ``model`` is its answer to request ``request − 1``).
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
    request: int = 0


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
    """What every removal method has: ``setting``, ``check()`` and ``unlearn(ctx)``.

    The constructor only stores hyperparameters (every one has a default); :meth:`check`
    validates them without data and is called when the config is read, before any training;
    :meth:`unlearn` serves one request. :class:`FederatedUnlearner` and
    :class:`CentralizedUnlearner` add what each setting needs; :func:`protocol_gaps` lists what
    a method lacks, and the runner refuses such a method before any work.

    Optional class attributes, for both settings:

    - ``exact = True`` declares that the result equals retraining without the targets
      (retraining, SISA); the lineage log records it. Centralized methods must declare it.
    - ``needs_replayable_history = True`` declares that the method consumes stored updates or
      running sums as if training had been plain weighted averaging,
      ``M_{t+1} = M_t + Σ_k w_k U_k`` (FedEraser, FedAccum, distillation). Such methods are
      refused before training when the configured strategy is declared to break that identity
      (server momentum, for instance); after training, a history whose ``replayable()`` is
      false must be refused with :class:`HistoryNotReplayable` before any work.
    - ``needs_every_round = True`` declares that the method reads the global model and every
      participant's update of every round (FedRecover); it is refused before training unless
      ``history.retention_interval = 1``.
    - ``check_config(cfg)``, a method, checks what depends on the rest of the config (SISA
      sharded by client refuses more shards than clients); it runs with :meth:`check`, before any training, and raises ``ValueError``.
    - ``check_model(net)``, a method, checks the hyperparameters against the experiment's
      network (NoT's layer indices); it runs once the data and the initial model are built,
      before any training, and raises ``ValueError``.
    - ``needs_target_client = True`` declares that the method asks the forgotten clients
      themselves for work (PGA's gradient ascent on the target's own data); every other
      federated method must never contact a target.
    - ``keeps_state_across_requests = True`` declares that the method carries, in memory,
      what it computed for one request into the next beyond the model it returned
      (FedRecover's recovered trajectory). With ``state_arrays() -> (meta, arrays)`` (meta
      JSON-able, arrays named NumPy arrays) and ``load_state(meta, arrays, *, store)`` it is
      saved after each request and restored when a stopped run resumes; without them such a
      run cannot be resumed between requests, and ``resume`` refuses in one line.
    """

    setting: ClassVar[Setting]

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad hyperparameter; needs no data."""
        ...

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Serve one request; must not modify ``ctx.model``, ``ctx.history`` or the data."""
        ...


class FederatedUnlearner(Unlearner, Protocol):
    """A federated method (``setting = "federated"``).

    It asks for client work only through ``ctx.federation`` and reads the server's stored
    history through ``ctx.history``; it never touches client data (``ctx.data.server.x``, the
    server's own unlabeled split, excepted). Its cost lands in :class:`Cost`.
    """


class CentralizedUnlearner(Unlearner, Protocol):
    """A centralized method (``setting = "centralized"``), on the clients' data pooled at one
    site (``ctx.data``).

    :meth:`fit` learns the method's own original model on all the pooled data, once, before the
    first request and outside the timed removal (``ctx.targets`` is empty there); fitted
    attributes end in ``_``. Each :meth:`unlearn` continues from the previous removal; its
    :class:`UnlearningResult` may carry ``predict_proba`` instead of ``model`` when the method's
    model is not the experiment's network (an ensemble, a linear head).

    Attributes
    ----------
    exact : bool
        Whether the result equals retraining on the pooled data without the targets.
    original_params_ : Params or None
        Set by :meth:`fit`: the fitted model's parameters when it is the experiment's network,
        else ``None`` (its predictions then identify it).
    """

    exact: ClassVar[bool]
    original_params_: Params | None

    def fit(self, ctx: UnlearningContext) -> CentralizedUnlearner:
        """Learn the original model on every client's pooled data; return ``self``."""
        ...

    def predict_proba_original(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of the fitted (pre-removal) model, shape ``(len(x), K)``."""
        ...


REQUIRED: dict[Setting, tuple[str, ...]] = {
    "federated": ("check", "unlearn"),
    "centralized": ("check", "unlearn", "fit", "predict_proba_original"),
}
"""The methods each setting's protocol requires (attributes are checked separately)."""


def protocol_gaps(method: object) -> list[str]:
    """What ``method`` (a class or an instance) lacks of its setting's protocol, one phrase per
    gap; empty when it conforms. Attributes set by ``fit`` are not checked here.

    >>> class Half:
    ...     setting = "centralized"
    ...     def unlearn(self, ctx): ...
    >>> protocol_gaps(Half)
    ['check()', 'fit(ctx)', 'predict_proba_original(x)', "class attribute 'exact' (bool)"]
    """
    setting = getattr(method, "setting", None)
    if setting not in REQUIRED:
        return ["class attribute 'setting' ('federated' or 'centralized')"]
    arguments = {"check": "", "unlearn": "ctx", "fit": "ctx", "predict_proba_original": "x"}
    gaps = [f"{name}({arguments[name]})" for name in REQUIRED[setting]
            if not callable(getattr(method, name, None))]
    if setting == "centralized" and not isinstance(getattr(method, "exact", None), bool):
        gaps.append("class attribute 'exact' (bool)")
    return gaps


class HistoryNotReplayable(ValueError):
    """The stored history breaks ``M_{t+1} = M_t + Σ_k w_k U_k``, so a method that replays or
    subtracts stored updates cannot serve the request (nothing was changed)."""


UNLEARNERS: Registry[Callable[..., Unlearner]] = Registry("unlearning method")


def finite_positive(value: object) -> bool:
    """True for a real number that is finite and ``> 0`` (not a bool, a string, NaN or inf).

    >>> [finite_positive(v) for v in (0.5, 2, 0, float("inf"), float("nan"), "1", True)]
    [True, True, False, False, False, False, False]
    """
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def setting_of(method: object) -> Setting:
    """The setting a method (class or instance) declares; ``"federated"`` if it declares none."""
    return getattr(method, "setting", "federated")
