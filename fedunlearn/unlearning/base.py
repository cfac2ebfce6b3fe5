"""The protocol every removal method implements, the capabilities it declares, the registry.

A method is a class registered in :data:`UNLEARNERS`. Its constructor only stores
hyperparameters (each with a default), :meth:`~Unlearner.check` validates them without data and
:meth:`~Unlearner.unlearn` serves one request. What it needs from the run, or offers it, beyond
that is declared, typed, in its class attribute ``capabilities`` (:class:`Capabilities`, after
scikit-learn's estimator tags); a hook (``check_config``, ``check_model``, the state hooks) is
implemented exactly when its capability is declared. :func:`protocol_gaps` names what a method
lacks; the run refuses such a method before any work and the conformance suite checks every
registered one. Federated methods reach clients only through ``ctx.federation`` and read the
server's history through ``ctx.history``; centralized ones use the pooled ``ctx.data``::

    @UNLEARNERS.register("my_method")
    class MyMethod(FederatedUnlearner):          # subclassing is optional
        capabilities = Capabilities(needs_replayable_history=True)

        def __init__(self, strength: float = 1.0) -> None:
            self.strength = strength

        def check(self) -> None:
            if not finite_positive(self.strength):
                raise ValueError(f"strength must be > 0, got {self.strength}")

        def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
            ...

Methods outside this package are loaded by listing their module in ``[experiment] extensions``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, cast

import numpy as np

from fedunlearn.config.registry import Registry
from fedunlearn.config.requests import GRANULARITIES, Granularity
from fedunlearn.config.tree import Config
from fedunlearn.data.federated import FederatedData
from fedunlearn.data.removal import Step
from fedunlearn.engine.port import Federation
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.params import Params

Setting = Literal["federated", "centralized"]


@dataclass(frozen=True)
class UnlearningContext:
    """Everything a method may use to serve one removal request (read-only for methods).

    ``targets`` are the clients to forget now, ``removed`` every client forgotten so far (the
    targets included). ``model`` is the model to remove them from: the trained model for request
    0, this method's previous answer afterwards; ``initial`` is ``M_1``. ``history`` holds the
    server's stored rounds (purging is the orchestrator's job). ``data``: federated methods may
    use ``data.server.x`` only, centralized ones pool ``data.clients``. ``build_model()`` returns
    a fresh network of the experiment's architecture. ``request`` is the position of this request
    in ``cfg.unlearning.requests`` and ``removal`` what it removes, resolved against the data
    (:class:`~fedunlearn.data.removal.Step`: per client the positions it removes, ``forget``,
    and everything removed so far); for a sample or class request ``targets`` are the clients it
    removes samples from, who stay in the federation (``removed`` lists those out of it).
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
    removal: Step | None = None

    @property
    def removed_through(self) -> int:
        """How many requests' samples the clients leave out once this one is served (pass it
        to ``federation.fedavg``/``train_clients``): ``request + 1``, or 0 when every client
        still in the federation keeps all its samples (client requests only)."""
        return self.request + 1 if self.removal is not None and self.removal.partial else 0

    @property
    def kept(self) -> dict[str, int]:
        """``{"removed_through": N}`` to pass to the federation's calls when clients must work
        on what they keep, else ``{}`` (a client request's federation need not know samples)."""
        return {"removed_through": self.removed_through} if self.removed_through else {}

    @property
    def granularity(self) -> Granularity:
        """The request's granularity (``"client"`` when the context has no resolved request)."""
        return self.removal.request.granularity if self.removal is not None else "client"


@dataclass
class Cost:
    """What serving a request cost: local epochs summed over clients, rounds of client
    communication, messages to clients (0: no client contacted), epochs of server-side training
    and, for centralized methods, training samples times epochs."""

    client_epochs: float = 0.0
    rounds: int = 0
    messages_sent: int = 0
    server_epochs: float = 0.0
    sample_epochs: float = 0.0


@dataclass
class UnlearningResult:
    """A method's answer: the unlearned model (or a predictor), its cost and details."""

    model: Params | None = None
    predict_proba: Callable[[np.ndarray], np.ndarray] | None = None
    cost: Cost = field(default_factory=Cost)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a method declares beyond ``check`` and ``unlearn``; every field but
    ``granularities`` (default: client requests only) defaults to False.

    Invariant: ``saves_state`` implies ``carries_state``; :func:`protocol_gaps` checks that the
    hooks of ``checks_config``, ``checks_model`` and ``saves_state`` exist exactly when declared.
    """

    granularities: frozenset[Granularity] = frozenset({"client"})
    """The request granularities the method serves (:data:`~fedunlearn.config.requests.GRANULARITIES`):
    a request of another is refused before any work, never served at client level."""
    exact: bool = False
    """The answer equals retraining without the targets (retrain, central_retrain, SISA); the
    lineage log records it."""
    needs_replayable_history: bool = False
    """Uses stored updates or running sums as if ``M_{t+1} = M_t + Σ_k w_k U_k`` held (FedEraser,
    FedAccum, FedRecover, distillation): refused before training under a strategy declared to
    break it, and before any work on a history whose ``replayable()`` is false."""
    needs_every_round: bool = False
    """Reads the global model and every update of every round (FedRecover): refused before
    training unless ``history.retention_interval = 1``."""
    needs_target_client: bool = False
    """Asks the forgotten clients themselves for work (PGA's ascent on their data); any other
    federated method must never contact a target."""
    checks_config: bool = False
    """Implements ``check_config(cfg)`` (:class:`ChecksConfig`), run before any training."""
    checks_model: bool = False
    """Implements ``check_model(net)`` (:class:`ChecksModel`), run on a copy of the initial
    network before any training."""
    carries_state: bool = False
    """Carries into the next request what it computed beyond the model it returned (FedRecover's
    recovered trajectory); without ``saves_state`` a run stopped between requests cannot resume."""
    saves_state: bool = False
    """Implements ``state_arrays()`` and ``load_state(meta, arrays, *, store)``
    (:class:`SavesState`): the carried state is saved after each request, restored on resume."""

    def __post_init__(self) -> None:
        bad = [k for k, v in dataclasses.asdict(self).items()
               if k != "granularities" and not isinstance(v, bool)]
        if bad:
            raise TypeError(f"Capabilities fields are True or False; {', '.join(bad)} is not")
        if not isinstance(self.granularities, frozenset) or not self.granularities or not (
                self.granularities <= set(GRANULARITIES)):
            raise TypeError(f"Capabilities.granularities must be a non-empty frozenset of "
                            f"{', '.join(GRANULARITIES)}; got {self.granularities!r}")
        if self.saves_state and not self.carries_state:
            raise ValueError("Capabilities(saves_state=True) needs carries_state=True")


class MethodState(NamedTuple):
    """A method's carried state: JSON-able ``meta`` and named NumPy ``arrays``."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


class Unlearner(Protocol):
    """A removal method: ``setting``, ``capabilities``, ``check()`` and ``unlearn(ctx)``.

    Conformance is structural; a subclass inherits ``capabilities = Capabilities()``.
    """

    setting: ClassVar[Setting]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad hyperparameter; needs no data."""
        ...

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Serve one request; must not modify ``ctx.model``, ``ctx.history`` or the data."""
        ...


class FederatedUnlearner(Unlearner, Protocol):
    """A federated method (``setting = "federated"``): client work through ``ctx.federation``
    only, never client data (``ctx.data.server.x`` excepted)."""


class CentralizedUnlearner(Unlearner, Protocol):
    """A centralized method (``setting = "centralized"``) on the clients' data pooled at one site.

    :meth:`fit` learns its own original model once, before the first request and outside the
    timed removal, and sets ``original_params_`` (``None`` when its model is not the experiment's
    network, e.g. an ensemble); each :meth:`unlearn` continues from the previous removal and may
    answer with ``predict_proba`` instead of ``model``.
    """

    original_params_: Params | None

    def fit(self, ctx: UnlearningContext) -> CentralizedUnlearner:
        """Learn the original model on every client's pooled data; return ``self``."""
        ...

    def predict_proba_original(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of the fitted (pre-removal) model, shape ``(len(x), K)``."""
        ...


class ChecksConfig(Protocol):
    """The hook of ``Capabilities.checks_config``."""

    def check_config(self, cfg: Config) -> None:
        """Raise ``ValueError`` if the hyperparameters do not fit the rest of the config."""
        ...


class ChecksModel(Protocol):
    """The hook of ``Capabilities.checks_model``."""

    def check_model(self, net: Any) -> None:
        """Raise ``ValueError`` if the hyperparameters do not fit the network ``net`` (a copy)."""
        ...


class SavesState(Protocol):
    """The hooks of ``Capabilities.saves_state``."""

    def state_arrays(self) -> MethodState:
        """The state carried into the next request."""
        ...

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], *,
                   store: str) -> None:
        """Restore :meth:`state_arrays`' output, recorded on the history store at ``store``."""
        ...


REQUIRED: dict[Setting, tuple[str, ...]] = {
    "federated": ("check", "unlearn"),
    "centralized": ("check", "unlearn", "fit", "predict_proba_original"),
}
"""The methods each setting's protocol requires."""

_SIGNATURES = {"check": "check()", "unlearn": "unlearn(ctx)", "fit": "fit(ctx)",
               "predict_proba_original": "predict_proba_original(x)",
               "check_config": "check_config(cfg)", "check_model": "check_model(net)",
               "state_arrays": "state_arrays()",
               "load_state": "load_state(meta, arrays, *, store)"}

HOOKS: dict[str, tuple[str, ...]] = {"checks_config": ("check_config",),
                                     "checks_model": ("check_model",),
                                     "saves_state": ("state_arrays", "load_state")}
"""The hook methods each capability promises."""

_OLD_NAMES = {"exact": "exact", "needs_replayable_history": "needs_replayable_history",
              "needs_every_round": "needs_every_round",
              "needs_target_client": "needs_target_client",
              "keeps_state_across_requests": "carries_state"}
"""Class attributes that declared capabilities before :class:`Capabilities`; no longer read."""


def _declared(method: object, name: str) -> Any:
    """``name`` as the method's own classes define it (the protocol classes it may subclass
    skipped), or ``None``."""
    cls = method if isinstance(method, type) else type(method)
    for klass in cls.__mro__:
        attributes = vars(klass)
        if not attributes.get("_is_protocol", False) and name in attributes:
            return attributes[name]
    return None


def _implements(method: object, name: str) -> bool:
    found = _declared(method, name)
    return callable(found) or isinstance(found, classmethod | staticmethod)


def capabilities_of(method: object) -> Capabilities:
    """The capabilities a method (class or instance) declares; ``Capabilities()`` if it declares
    none or something else (which :func:`protocol_gaps` reports)."""
    declared = _declared(method, "capabilities")
    return declared if isinstance(declared, Capabilities) else Capabilities()


def declared_setting(method: object) -> object:
    """The ``setting`` a method declares, as declared (``None`` if none)."""
    return _declared(method, "setting")


def setting_of(method: object) -> Setting:
    """The setting a method declares (as declared, even an unknown one: :func:`protocol_gaps`
    names that); ``"federated"`` if it declares none."""
    setting = declared_setting(method)
    return "federated" if setting is None else cast(Setting, setting)


def capability_gaps(method: object) -> list[str]:
    """Where a method's hooks and declared capabilities disagree, one phrase per gap naming the
    capability: a hook declared but missing, a hook present but undeclared (never called), or
    a capability set by an old class attribute (never read).

    >>> class Half:
    ...     capabilities = Capabilities(checks_config=True)
    ...     def check_model(self, net): ...
    >>> capability_gaps(Half)  # doctest: +NORMALIZE_WHITESPACE
    ["check_config(cfg), which its declared capability 'checks_config' promises",
     "the capability 'checks_model' in its capabilities: it implements check_model(net),
     which is never called undeclared"]
    """
    declared = _declared(method, "capabilities")
    if declared is not None and not isinstance(declared, Capabilities):
        return [f"class attribute 'capabilities' as a Capabilities (got {declared!r})"]
    flags = dataclasses.asdict(capabilities_of(method))
    gaps: list[str] = []
    for capability, hooks in HOOKS.items():
        present = [h for h in hooks if _implements(method, h)]
        absent = [_SIGNATURES[h] for h in hooks if h not in present]
        if flags[capability] and absent:
            gaps.append(f"{' and '.join(absent)}, which its declared capability "
                        f"'{capability}' promises")
        elif present and not flags[capability]:
            gaps.append(f"the capability '{capability}' in its capabilities: it implements "
                        f"{' and '.join(_SIGNATURES[h] for h in present)}, which "
                        f"{'is' if len(present) == 1 else 'are'} never called undeclared")
    for old, capability in _OLD_NAMES.items():
        value = _declared(method, old)
        if isinstance(value, bool) and value != flags[capability]:
            gaps.append(f"the capability '{capability}' in its capabilities: its class "
                        f"attribute {old} = {value} is no longer read (declare capabilities = "
                        f"Capabilities({capability}={value}))")
    return gaps


def protocol_gaps(method: object) -> list[str]:
    """What ``method`` (a class or an instance) lacks of its setting's protocol, one phrase per
    gap (:func:`capability_gaps` included); empty when it conforms.

    >>> class Half:
    ...     setting = "centralized"
    ...     def unlearn(self, ctx): ...
    >>> protocol_gaps(Half)
    ['check()', 'fit(ctx)', 'predict_proba_original(x)']
    """
    setting = declared_setting(method)
    if setting not in REQUIRED:
        return ["class attribute 'setting' ('federated' or 'centralized')"]
    missing = [_SIGNATURES[name] for name in REQUIRED[cast(Setting, setting)]
               if not _implements(method, name)]
    return missing + capability_gaps(method)


# --- the calls the run makes, each guarded by its declared capability ----------------------

def call_check_config(method: object, cfg: Config) -> None:
    """``method.check_config(cfg)`` if it declares ``checks_config``; else nothing."""
    if capabilities_of(method).checks_config:
        cast(ChecksConfig, method).check_config(cfg)


def call_check_model(method: object, net: Any) -> None:
    """``method.check_model(net)`` if it declares ``checks_model``; else nothing."""
    if capabilities_of(method).checks_model:
        cast(ChecksModel, method).check_model(net)


def can_resume(method: object) -> bool:
    """Whether a run stopped between requests can resume with ``method``: it carries no state
    into the next request, or it saves it."""
    capabilities = capabilities_of(method)
    return not capabilities.carries_state or capabilities.saves_state


def saved_state(method: object) -> MethodState | None:
    """The state ``method`` carries into the next request, if it declares ``saves_state``."""
    if not capabilities_of(method).saves_state:
        return None
    meta, arrays = cast(SavesState, method).state_arrays()
    return MethodState(meta, arrays)


def restore_state(method: object, state: tuple[dict[str, Any], dict[str, np.ndarray]], *,
                  store: str) -> None:
    """Give ``method`` back the state :func:`saved_state` returned, recorded on ``store``."""
    if not capabilities_of(method).saves_state:
        raise ValueError(f"{type(method).__name__} does not declare saves_state")
    meta, arrays = state
    cast(SavesState, method).load_state(meta, arrays, store=store)


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
