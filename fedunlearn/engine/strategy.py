"""Flower strategies, and the wrapper that makes any of them replayable and recorded.

:class:`RecordingStrategy` wraps a Flower ``Strategy`` without copying its loop. It

* chooses each round's participants with fedunlearn's seeded sampler (by partition id), and
  hands the wrapped strategy a grid that shows only those nodes, so a retraining without a
  client replays exactly the original sampling minus that client;
* orders replies by partition id before aggregation, so a fixed seed gives a bit-identical
  model whatever order Ray returns them in;
* keeps integer buffers (BatchNorm's ``num_batches_tracked``) out of the aggregation: the wrapped
  strategy averages every array, and the new global model takes them back from the model the
  round started from (:func:`~fedunlearn.engine.aggregation.keep_non_float`), with their dtype;
* reports every round (global model it started from, participants, example counts, FedAvg
  weights, each participant's returned model) to a callback — the history store listens there;
* screens every reply before the wrapped strategy sees it (:mod:`fedunlearn.engine.faults`):
  a node that did not answer within the round's timeout, answered with an error, or sent a model
  with NaN/Inf is asked again ``client_retries`` times (training only; the re-sends go through
  the same grid within ``aggregate_train``, so Flower's round loop is not copied), then the fault
  policy aborts the run or drops it from the round. The wrapped strategy aggregates only the
  screened replies, so the FedAvg weights the round reports are over those that contributed.

Strategies are created by name from :data:`STRATEGIES`. A factory receives the evaluation
fraction and ``training.strategy_params`` and must return a strategy that trains *every* node
it is offered (``fraction_train=1.0``): fedunlearn has already done the sampling.

A factory may declare whether its strategy keeps the history identity
``M_{t+1} = M_t + Σ_k w_k U_k`` (new global model = old one plus the FedAvg-weighted client
updates), which FedEraser, FedAccum and distillation rely on, with
:func:`declare_history_identity`. A declared breach is refused before training when such a
method is configured; an undeclared strategy is checked at run time only (the history store
checks every round as it records it)::

    @STRATEGIES.register("mine")
    @declare_history_identity(True)
    def mine(evaluate_fraction=0.0, **params): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx, Strategy

from fedunlearn.config.registry import Registry
from fedunlearn.config.tree import ConfigError
from fedunlearn.engine.aggregation import fedavg_weights, keep_non_float
from fedunlearn.engine.faults import (
    Failure,
    FaultPolicy,
    error_reason,
    nonfinite,
    with_retries,
)
from fedunlearn.engine.messages import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    PARTITION,
    array_bytes,
    from_record,
    to_record,
)
from fedunlearn.engine.port import RoundReport
from fedunlearn.models.params import Params

StrategyFactory = Callable[..., Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")

KeepsIdentity = bool | Callable[[Mapping[str, Any]], bool]
"""A declaration: a constant, or a predicate on ``training.strategy_params``."""
_F = TypeVar("_F")


def declare_history_identity(keeps: KeepsIdentity, breaks_by: str = "") -> Callable[[_F], _F]:
    """Decorator declaring whether a strategy factory keeps ``M_{t+1} = M_t + Σ_k w_k U_k``.

    Parameters
    ----------
    keeps : bool or callable
        ``True``/``False``, or ``keeps(strategy_params) -> bool`` when it depends on them.
    breaks_by : str, optional
        What breaks the identity when it does (e.g. ``"server momentum"``), for the message.

    The factory gets the attributes ``keeps_history_identity`` and
    ``history_identity_breaks_by``; setting them by hand is the same declaration.
    """

    def mark(factory: _F) -> _F:
        factory.keeps_history_identity = keeps  # type: ignore[attr-defined]
        factory.history_identity_breaks_by = breaks_by  # type: ignore[attr-defined]
        return factory

    return mark


def keeps_history_identity(name: str, params: Mapping[str, Any] | None = None) -> bool | None:
    """Whether registered strategy ``name`` with ``params`` keeps the history identity:
    ``True``/``False`` as declared, ``None`` if undeclared (checked at run time only).

    Raises
    ------
    KeyError
        If ``name`` is not registered (listing the known names).
    """
    declared = getattr(STRATEGIES.get(name), "keeps_history_identity", None)
    if declared is None or isinstance(declared, bool):
        return declared
    return bool(declared(dict(params or {})))


def identity_breaker(name: str) -> str:
    """What breaks the history identity in strategy ``name``, as declared (may be empty)."""
    return str(getattr(STRATEGIES.get(name), "history_identity_breaks_by", ""))


def _common(evaluate_fraction: float) -> dict[str, Any]:
    return {"fraction_train": 1.0, "fraction_evaluate": evaluate_fraction, "min_train_nodes": 1,
            "min_evaluate_nodes": 1 if evaluate_fraction > 0 else 0, "min_available_nodes": 1}


@STRATEGIES.register("fedavg")
@declare_history_identity(True)
def fedavg(evaluate_fraction: float = 0.0, **params: Any) -> Strategy:
    """Flower's ``FedAvg`` (McMahan et al., 2017)."""
    return FedAvg(**_common(evaluate_fraction), **params)


@STRATEGIES.register("fedprox")
@declare_history_identity(True)
def fedprox(evaluate_fraction: float = 0.0, proximal_mu: float = 0.01, **params: Any) -> Strategy:
    """Flower's ``FedProx`` (Li et al., 2020); pair it with ``training.step = "proximal"``."""
    if not proximal_mu >= 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    return FedProx(proximal_mu=proximal_mu, **_common(evaluate_fraction), **params)


def _plain_server_step(params: Mapping[str, Any]) -> bool:
    """FedAvgM without momentum and with server learning rate 1 is FedAvg (Flower skips its
    server optimiser then); anything else moves the model off ``M_t + Σ w U``."""
    return (params.get("server_momentum", DEFAULT_SERVER_MOMENTUM) == 0
            and params.get("server_learning_rate", 1) == 1)


DEFAULT_SERVER_MOMENTUM = 0.9
"""FedAvgM's server momentum unless ``strategy_params`` say otherwise (Hsu et al. 2019 use
0.9; Flower's own default 0 would make ``fedavgm`` plain FedAvg)."""


@STRATEGIES.register("fedavgm")
@declare_history_identity(_plain_server_step, "server momentum / server learning rate")
def fedavgm(evaluate_fraction: float = 0.0, **params: Any) -> Strategy:
    """Flower's ``FedAvgM`` (Hsu et al., 2019), server momentum 0.9 unless
    ``strategy_params`` set ``server_momentum``. With ``server_momentum`` > 0 or
    ``server_learning_rate`` != 1 the history no longer sums to the model, so the history
    methods refuse it; momentum 0 and learning rate 1 make it FedAvg."""
    params.setdefault("server_momentum", DEFAULT_SERVER_MOMENTUM)
    return FedAvgM(**_common(evaluate_fraction), **params)


class _SubsetGrid:
    """A view of a Flower grid that shows only some nodes (everything else is delegated)."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


Screened = tuple[dict[int, Message], dict[int, str]]


def screen_replies(replies: Iterable[Message], expected: Mapping[int, int], *,
                   model: bool) -> Screened:
    """Sort the replies to messages sent to ``expected`` (node id -> partition id).

    Returns ``(ok, failed)``: ``ok`` maps a partition id to its usable reply, ``failed`` to the
    reason it is not usable (see :class:`~fedunlearn.engine.faults.Failure`): an error
    reply, a model with NaN/Inf (when ``model``), or no reply at all (``"timeout"``: Flower's
    ``send_and_receive`` returns only the replies that arrived in time).
    """
    ok: dict[int, Message] = {}
    failed: dict[int, str] = {}
    for msg in replies:
        pid = expected.get(msg.metadata.src_node_id)
        if pid is None:  # not a reply to these messages
            continue
        if msg.has_error():
            failed[pid] = error_reason(msg.error.reason)
        elif model and nonfinite(from_record(msg.content[ARRAYS])):
            failed[pid] = "non-finite"
        else:
            ok[pid] = msg
    for pid in expected.values():
        if pid not in ok and pid not in failed:
            failed[pid] = "timeout"
    return ok, failed


def partition_of(msg: Message) -> int:
    """The partition id a client put in its reply."""
    return int(msg.content[METRICS][PARTITION])


class RecordingStrategy(Strategy):
    """Wrap a Flower strategy: seeded participant sampling, ordered aggregation, recording,
    fault screening.

    Parameters
    ----------
    inner : Strategy
        The Flower strategy doing the actual configuration and aggregation.
    sampler : callable
        ``sampler(server_round) -> list of partition ids`` taking part in the round.
    node_of : dict
        Partition id to Flower node id.
    on_round : callable
        Receives a :class:`RoundReport` after each aggregation.
    policy : FaultPolicy, optional
        What a failed client does (default: abort on the first failure, no retries); its
        ``timeout_s`` bounds the wait of each retry.
    on_failures : callable, optional
        Receives the failures dropped in a round (only under ``on_failure = "drop"``).
    """

    def __init__(self, inner: Strategy, *, sampler: Callable[[int], list[int]],
                 node_of: dict[int, int], on_round: Callable[[RoundReport], None],
                 policy: FaultPolicy | None = None,
                 on_failures: Callable[[list[Failure]], None] | None = None) -> None:
        self.inner = inner
        self.sampler = sampler
        self.node_of = node_of
        self.on_round = on_round
        self.policy = policy or FaultPolicy()
        self.on_failures = on_failures
        self.messages_sent = 0
        self.bytes_exchanged = 0
        self.client_seconds: list[float] = []
        self._global: Params = {}
        self._partition = {node: pid for pid, node in node_of.items()}
        self._grid: Grid | None = None
        self._train_sent: dict[int, Message] = {}
        self._evaluate_sent: dict[int, int] = {}

    round_offset = 0
    """Rounds already trained before ``start`` (a resumed run): Flower counts from 1 again."""

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset  # rounds continue a resumed run
        self._global = from_record(arrays)
        self._grid = grid
        self._train_sent = {}
        pids = self.sampler(server_round)
        if not pids:
            return []
        wanted = {self.node_of[p] for p in pids}
        msgs = list(self.inner.configure_train(server_round, arrays, config,
                                               _SubsetGrid(grid, sorted(wanted))))  # type: ignore[arg-type]
        got = {m.metadata.dst_node_id for m in msgs}
        if got != wanted:
            raise ConfigError(f"strategy {type(self.inner).__name__} sampled {len(got)} of the "
                               f"{len(wanted)} offered nodes; its factory must set "
                               "fraction_train=1.0 (fedunlearn samples participants itself)")
        self._train_sent = {m.metadata.dst_node_id: m for m in msgs}
        self._count(msgs)
        return msgs

    def _count(self, msgs: list[Message], *, outgoing: bool = True) -> None:
        if outgoing:
            self.messages_sent += len(msgs)
        self.bytes_exchanged += sum(array_bytes(m.content) for m in msgs if m.has_content())

    def _resend(self, pids: list[int]) -> Screened:
        """Send the round's train messages again to ``pids`` and screen the replies."""
        assert self._grid is not None
        msgs = [Message(self._train_sent[n].content, dst_node_id=n,
                        message_type=self._train_sent[n].metadata.message_type,
                        group_id=self._train_sent[n].metadata.group_id)
                for n in (self.node_of[p] for p in pids)]
        self._count(msgs)
        replies = list(self._grid.send_and_receive(msgs, timeout=self.policy.timeout_s))
        self._count(replies, outgoing=False)
        return screen_replies(replies, {self.node_of[p]: p for p in pids}, model=True)

    def _settle(self, failed: dict[int, str], ok: Mapping[int, Message], server_round: int,
                stage: str) -> None:
        failures = self.policy.settle(failed, ok, server_round=server_round, stage=stage)
        if failures and self.on_failures is not None:
            self.on_failures(failures)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset  # rounds continue a resumed run
        replies = list(replies)
        self._count(replies, outgoing=False)
        expected = {n: self._partition[n] for n in self._train_sent}
        first = screen_replies(replies, expected, model=True)
        ok, failed = with_retries(self._resend, sorted(expected.values()), self.policy.retries,
                                  first=first)
        self._settle(failed, ok, server_round, "train")
        ordered = [ok[p] for p in sorted(ok)]
        arrays, metrics = self.inner.aggregate_train(server_round, ordered)
        if arrays is not None:  # integer buffers are not averaged: they stay as in M_t
            arrays = to_record(keep_non_float(from_record(arrays), self._global))
        self.client_seconds += [float(m.content[METRICS].get("train-seconds", 0.0))
                                for m in ordered]
        if ordered:
            pids = tuple(sorted(ok))
            counts = tuple(int(m.content[METRICS][NUM_EXAMPLES]) for m in ordered)
            self.on_round(RoundReport(
                server_round=server_round, global_model=self._global, participants=pids,
                num_examples=counts, weights=tuple(fedavg_weights(counts)),
                client_models={p: from_record(m.content[ARRAYS]) for p, m in zip(pids, ordered,
                                                                                  strict=True)}))
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset  # rounds continue a resumed run
        msgs = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._evaluate_sent = {m.metadata.dst_node_id: self._partition[m.metadata.dst_node_id]
                               for m in msgs}
        self._count(msgs)
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        server_round += self.round_offset  # rounds continue a resumed run
        """Federated evaluation: failures follow the policy, without retries (a dropped
        client's metrics are left out; the model is not affected)."""
        replies = list(replies)
        self._count(replies, outgoing=False)
        ok, failed = screen_replies(replies, self._evaluate_sent, model=False)
        self._settle(failed, ok, server_round, "evaluate")
        return self.inner.aggregate_evaluate(server_round, [ok[p] for p in sorted(ok)])
