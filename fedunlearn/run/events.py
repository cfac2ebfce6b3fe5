"""The serving loop's events and the listener base (:mod:`fedunlearn.run.serving`).

The loop emits, per request: :class:`RequestStarted`, one :class:`MethodAnswered` per method,
:class:`RequestAnswered`, then :class:`Purged`; before the first request, one :class:`Fitted`
per centralized method. Listeners are told in order; the verification listener comes first and
fills ``MethodAnswered.row`` and ``RequestAnswered.rows``/``verification`` for the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedunlearn.data.removal import Step
from fedunlearn.evaluation.schema import Row
from fedunlearn.models.params import Params
from fedunlearn.run.checks import Method
from fedunlearn.unlearning.base import UnlearningContext, UnlearningResult


@dataclass
class RequestStarted:
    """Request ``request`` (clients ``targets``; every client out of the federation so far:
    ``removed``; what it removes: ``step``) is about to be served."""

    request: int
    targets: tuple[int, ...]
    removed: frozenset[int]
    step: Step | None = None


@dataclass
class MethodAnswered:
    """Method ``method`` answered request ``request`` with ``result`` (checked: an
    :class:`UnlearningResult` whose model fits the network and is finite)."""

    request: int
    method: Method
    ctx: UnlearningContext
    result: UnlearningResult
    wall_s: float
    reference_wall_s: float | None
    """The wall time of the setting's reference on this request (None while it runs)."""
    messages_sent: int
    bytes_exchanged: int
    derived_from: str | None
    """Hash of the model the method started from (None for references: they start afresh)."""
    reached_before: Counter[int]
    """How often each client's work had been asked for before the method ran."""
    client_failures: list[dict[str, Any]]
    fit_wall_s: float | None = None
    """A centralized method's one-off fit on the pooled data."""
    row: Row | None = None
    """The method's row, filled by the verification listener."""


@dataclass
class RequestAnswered:
    """Every method answered request ``request``; its purge comes next (``purge_pending``)."""

    request: int
    targets: tuple[int, ...]
    current: dict[str, Params]
    """Each method's model after the request (the ones that changed the trained model)."""
    states: dict[str, tuple[dict[str, Any], dict[str, Any]]]
    """What each method carries into the next request (:func:`~fedunlearn.run.resume.carried_state`)."""
    purge_pending: bool
    rows: list[Row] = field(default_factory=list)
    """The request's rows with their metrics, filled by the verification listener."""
    verification: dict[str, Any] | None = None
    """What verifying the request cost, filled by the verification listener."""


@dataclass
class Purged:
    """The history store was purged of request ``request``'s clients (``purge``: the record).
    ``resumed``: a purge a resumed run found already done before the interruption."""

    request: int
    purge: dict[str, Any]
    counts: dict[str, int] | None
    resumed: bool = False


@dataclass
class Fitted:
    """A centralized method was fitted once on the pooled data."""

    method: Method
    wall_s: float
    model_hash: str
    trained_with: list[int]


class ServingListener:
    """Told of every event of the serving loop; each hook does nothing unless overridden."""

    def request_started(self, event: RequestStarted) -> None:
        """Before the first method serves the request."""

    def method_answered(self, event: MethodAnswered) -> None:
        """After a method answered (the verification listener fills ``event.row``)."""

    def request_answered(self, event: RequestAnswered) -> None:
        """After every method answered, before the request's purge."""

    def purged(self, event: Purged) -> None:
        """After the request's purge."""

    def fitted(self, event: Fitted) -> None:
        """After a centralized method's fit on the pooled data."""


class _Fanout(ServingListener):
    """One event to every listener, in order."""

    def __init__(self, listeners: Sequence[ServingListener]) -> None:
        self.listeners = list(listeners)

    def request_started(self, event: RequestStarted) -> None:
        for listener in self.listeners:
            listener.request_started(event)

    def method_answered(self, event: MethodAnswered) -> None:
        for listener in self.listeners:
            listener.method_answered(event)

    def request_answered(self, event: RequestAnswered) -> None:
        for listener in self.listeners:
            listener.request_answered(event)

    def purged(self, event: Purged) -> None:
        for listener in self.listeners:
            listener.purged(event)

    def fitted(self, event: Fitted) -> None:
        for listener in self.listeners:
            listener.fitted(event)
