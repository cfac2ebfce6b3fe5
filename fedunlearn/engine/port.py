"""The narrow port through which training and unlearning algorithms ask for client work.

Algorithms never import Flower: they receive a :class:`Federation` and ask it to run FedAvg
(optionally without some clients) or to have chosen clients train from a given model. Flower
implements the port (:mod:`fedunlearn.engine.flower`); an in-process implementation
(:mod:`fedunlearn.engine.inprocess`) doing identical work serves as a cross-check and as
the baseline of the engine benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedunlearn.models.params import Params


@dataclass(frozen=True)
class RoundReport:
    """One aggregated round: what the history store records.

    Attributes
    ----------
    server_round : int
    global_model : Params
        The global model the round started from.
    participants : tuple of int
        Partition ids, ascending.
    num_examples, weights : tuple
        Aligned with ``participants``; weights are FedAvg's ``n_k / sum n``.
    client_models : dict
        Each participant's model after local training.
    """

    server_round: int
    global_model: Params
    participants: tuple[int, ...]
    num_examples: tuple[int, ...]
    weights: tuple[float, ...]
    client_models: dict[int, Params]


@dataclass
class RoundSummary:
    """What the results file lists per round.

    ``participants`` are the clients whose updates were aggregated; ``failures`` the clients
    dropped in the round under ``engine.on_client_failure = "drop"`` (empty otherwise), each
    ``{"round", "client", "reason", "stage"}`` (a :class:`~fedunlearn.engine.faults.Failure`
    as a dict).
    """

    round: int
    participants: list[int]
    test_accuracy: float
    test_loss: float
    wall_s: float
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainingRun:
    """Outcome of a FedAvg run."""

    final: Params
    rounds: list[RoundSummary] = field(default_factory=list)
    wall_s: float = 0.0
    messages_sent: int = 0
    bytes_exchanged: int = 0
    client_epochs: float = 0.0
    client_seconds: list[float] = field(default_factory=list)

    @property
    def client_failures(self) -> list[dict[str, Any]]:
        """Every client dropped during the run, in round order (see :class:`RoundSummary`)."""
        return [f for r in self.rounds for f in r.failures]


class RoundListener(Protocol):
    """Observes a FedAvg run (history recording, progress, evaluation)."""

    def round_aggregated(self, report: RoundReport) -> None:
        """Called after each round's aggregation, before the next round starts."""

    def round_evaluated(self, server_round: int, model: Params, summary: RoundSummary) -> None:
        """Called with the new global model after each round (``summary`` is filled in)."""


@dataclass(frozen=True)
class ClientResult:
    """A client's answer to a training request.

    ``stats`` holds what the client reported about a task other than plain training (for
    ``"ascent"``: ``steps``, ``epochs``, ``stopped_early``, ``accuracy``, ``distance``; see
    :func:`fedunlearn.unlearning.federated.pga_ascent.projected_ascent`); empty for training.
    """

    model: Params
    num_examples: int
    stats: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientEvaluation:
    """A client's answer to an evaluation request: the received model's mean cross-entropy
    and accuracy on the client's own training data (Flower's federated evaluation)."""

    num_examples: int
    loss: float
    accuracy: float


class Federation(Protocol):
    """Client work on demand; implemented by Flower and by an in-process loop.

    ``messages_sent`` counts messages to clients and ``bytes_exchanged`` the bytes of model
    arrays carried to and from clients (payload only: no protocol overhead), both cumulative.
    """

    num_clients: int
    messages_sent: int
    bytes_exchanged: int

    def fedavg(self, initial: Params, *, exclude: frozenset[int] = frozenset(),
               listener: RoundListener | None = None, variant: int = 0, stream: int = 0,
               start: Any = None, removed_through: int = 0) -> TrainingRun:
        """Run the configured FedAvg from ``initial`` with ``exclude`` left out of every round
        and every client training on what it keeps after the first ``removed_through`` removal
        requests (:func:`fedunlearn.engine.local.client_data`).

        ``start`` (a :class:`fedunlearn.run.resume.Checkpoint`) continues a resumed run: its
        model after ``start.round`` rounds, the remaining rounds numbered on from there.

        ``variant`` 0 is the experiment's own seed; another value draws client sampling and
        local shuffling from other seeds (an independent retraining). ``stream`` (with variant
        0) keeps the participants and draws other client-side randomness (local shuffles):
        the noise floor's second retraining (:mod:`fedunlearn.unlearning.federated.retrain`)."""
        ...

    def train_clients(self, model: Params, clients: Sequence[int], *, epochs: float,
                      server_round: int, tag: int, task: str = "train",
                      task_params: Mapping[str, float] | None = None,
                      removed_through: int = 0) -> dict[int, ClientResult]:
        """Have ``clients`` train ``epochs`` local epochs from ``model`` (on what each keeps
        after the first ``removed_through`` removal requests); seeds derive from
        ``(seed, server_round, client, tag)``.

        ``task`` selects the client job (:data:`fedunlearn.engine.local.TASKS`): local
        training by default, or ``"ascent"``, projected gradient ascent on the client's own
        data within an L2 ball around ``model`` (PGA unlearning), whose ``task_params`` are
        ``radius``, ``threshold`` and ``learning_rate`` (floats).

        A client that fails (see :mod:`fedunlearn.engine.faults`) raises
        :class:`~fedunlearn.engine.faults.ClientFailure` under ``on_client_failure =
        "abort"``; under ``"drop"`` it is missing from the result (never all of them)."""
        ...

    def evaluate_clients(self, model: Params, clients: Sequence[int], *, server_round: int,
                         removed_through: int = 0) -> dict[int, ClientEvaluation]:
        """Have ``clients`` evaluate ``model`` on their own training data (what each keeps
        after the first ``removed_through`` removal requests; one message each,
        counted in ``messages_sent``; the model's bytes in ``bytes_exchanged``).

        Failures follow the fault policy as in :meth:`train_clients`, except that under
        ``"drop"`` every client may be missing (the caller then has no figure)."""
        ...
