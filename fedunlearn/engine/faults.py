"""Client faults as a policy: what a round does when a client stalls, errs or sends NaN.

A client *fails* a request when its reply does not arrive within ``engine.client_timeout_s``
(``"timeout"``), arrives carrying an error (``"error: ..."``), or carries a model with a NaN or
Inf in any float array (``"non-finite"``). A non-finite model is never aggregated and never
stored, whatever the policy. Failed clients are first asked again ``engine.client_retries``
times within the same round (:func:`with_retries`); then ``engine.on_client_failure`` applies
(:meth:`FaultPolicy.settle`):

* ``"abort"`` (default): the run stops with a one-line :class:`ClientFailure` naming the
  client, the round and what to do;
* ``"drop"``: the round goes on with the clients whose replies arrived and are finite; the
  FedAvg weights are renormalised over them, so the history identity
  ``M_{t+1} = M_t + Σ_k w_k U_k`` holds over the clients that actually contributed, and each
  failure is recorded as a :class:`Failure`. A round in which *every* client fails stops the run
  under both policies: nothing can be aggregated, and the history keeps consecutive rounds.

Both engines (Flower and the in-process twin) apply these functions, so they behave the same.
Every message names the phase the client work was for (:attr:`FaultPolicy.phase`: training, a
retraining, an unlearning method's client work) and, for a timeout, an earlier request that was
given up on but still runs on the engine (:attr:`FaultPolicy.still_running`): a client stalled
and dropped in training keeps a client process busy, and the requests queued behind it time out
through no fault of theirs. :func:`recording_failures` collects the failures dropped inside a
block (a removal method's client work), which the serving code records in the method's row.
This module imports neither Flower nor torch.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from fedunlearn.run.console import listed

if TYPE_CHECKING:
    from fedunlearn.config.tree import EngineSection

ON_CLIENT_FAILURE = ("abort", "drop")
"""The policies of ``engine.on_client_failure``."""

T = TypeVar("T")


class ClientFailure(RuntimeError):
    """A client failed and the run cannot go on faithfully; the message is one line."""


@dataclass(frozen=True)
class Failure:
    """One client's failed request, as results and the lineage log record it.

    Attributes
    ----------
    round : int
        The server round (for a calibration, the replayed round).
    client : int
        The partition id.
    reason : str
        ``"timeout"``, ``"non-finite"`` or ``"error: <last line of the client's error>"``.
    stage : str
        ``"train"`` or ``"evaluate"`` (federated evaluation on the clients).
    """

    round: int
    client: int
    reason: str
    stage: str = "train"


def nonfinite(params: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the float arrays of ``params`` holding a NaN or an Inf.

    >>> nonfinite({"w": np.array([1.0, np.nan]), "b": np.zeros(2), "n": np.array([3])})
    ['w']
    >>> nonfinite({"w": np.array([np.inf], np.float32)})
    ['w']
    """
    return [k for k, v in params.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]


def error_reason(text: str) -> str:
    """``"error: <last non-empty line>"`` of a client's error text (a traceback), without the
    wrapping Flower's engine puts around a ClientApp's exception.

    >>> error_reason("<class 'flwr.clientapp.client_app.ClientAppException'>:<'" + chr(10) +
    ...              "Exception ClientAppException occurred. Message: ValueError: bad'>")
    'error: ValueError: bad'
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else "no reason given"
    wrapped = re.fullmatch(r"Exception \w+ occurred\. Message: (.*)'>", last)
    return f"error: {wrapped.group(1) if wrapped else last}"


def with_retries(attempt: Callable[[list[int]], tuple[dict[int, T], dict[int, str]]],
                 clients: Sequence[int], retries: int, *,
                 first: tuple[dict[int, T], dict[int, str]] | None = None,
                 ) -> tuple[dict[int, T], dict[int, str]]:
    """Ask ``clients`` once, then the failed ones again up to ``retries`` times.

    Parameters
    ----------
    attempt : callable
        ``attempt(clients) -> (ok, failed)``: ``ok`` maps a client to its accepted result,
        ``failed`` maps a client to its failure reason.
    clients : sequence of int
    retries : int
        Further attempts for the clients that failed (``engine.client_retries``).
    first : tuple, optional
        The outcome of a first attempt already made elsewhere (Flower's round loop).

    Returns
    -------
    ok, failed : dict, dict
        Every client ends in exactly one of them; ``failed`` holds the last reason.

    >>> slow = {2}  # client 2 stalls once, then answers
    >>> def attempt(cs):
    ...     ok = {c: f"model {c}" for c in cs if c not in slow}
    ...     failed = {c: "timeout" for c in cs if c in slow}
    ...     slow.clear()
    ...     return ok, failed
    >>> with_retries(attempt, [1, 2, 3], retries=1)
    ({1: 'model 1', 3: 'model 3', 2: 'model 2'}, {})
    """
    ok, failed = first if first is not None else attempt(list(clients))
    ok, failed = dict(ok), dict(failed)
    for _ in range(retries):
        if not failed:
            break
        more, failed = attempt(sorted(failed))
        ok.update(more)
    return ok, failed


METHOD_PHASE = "an unlearning method's client training"
"""The phase of client training asked for by a removal method (a calibration, a fine-tuning)."""


def fedavg_phase(exclude: Collection[int], variant: int = 0, stream: int = 0) -> str:
    """The phase of a FedAvg run through the federation port, for messages.

    >>> fedavg_phase(())
    'training'
    >>> fedavg_phase({0}), fedavg_phase({3, 1}, stream=1), fedavg_phase((), variant=2)
    ('retraining without clients [0]', 'retraining without clients [1, 3]', 'retraining')
    """
    if not exclude and not variant and not stream:
        return "training"
    return "retraining" + (f" without {listed(sorted(exclude))}" if exclude else "")


_RECORDERS: contextvars.ContextVar[tuple[list[Failure], ...]] = contextvars.ContextVar(
    "fedunlearn_failure_recorders", default=())


@contextmanager
def recording_failures() -> Iterator[list[Failure]]:
    """Collect every failure a :class:`FaultPolicy` drops inside the block, whatever the engine
    and the phase (under ``"abort"`` nothing is dropped: the first failure raises).

    >>> with recording_failures() as dropped:
    ...     _ = FaultPolicy(on_failure="drop").settle({3: "timeout"}, [0], server_round=2)
    >>> [(f.round, f.client, f.reason) for f in dropped]
    [(2, 3, 'timeout')]
    """
    got: list[Failure] = []
    token = _RECORDERS.set((*_RECORDERS.get(), got))
    try:
        yield got
    finally:
        _RECORDERS.reset(token)


@dataclass(frozen=True)
class Stalled:
    """A request given up on after its timeout, as :attr:`FaultPolicy.timeouts` keeps it."""

    failure: Failure
    phase: str

    def __str__(self) -> str:
        return f"client {self.failure.client}'s request of round {self.failure.round} " \
               f"({self.phase})"


@dataclass(frozen=True)
class FaultPolicy:
    """``engine.on_client_failure``, ``engine.client_retries`` and ``engine.client_timeout_s``.

    Parameters
    ----------
    on_failure : {"abort", "drop"}
    retries : int
    timeout_s : float
        The wait on clients, quoted in the messages.
    phase : str
        What the clients' training is for, quoted in the messages (default ``"training"``;
        e.g. ``"retraining without clients [0]"``; ``dataclasses.replace`` gives a policy for
        another phase that shares :attr:`timeouts`).
    still_running : callable, optional
        ``still_running() -> clients`` whose request was given up on after a timeout and has
        not answered since: it runs on a client process, or waits for one (the Flower engine
        knows; default: none known). A later timeout is attributed to them.
    timeouts : list
        Every request this policy (and its replacements) gave up on, as :class:`Stalled`.
    """

    on_failure: str = "abort"
    retries: int = 0
    timeout_s: float = 120.0
    phase: str = "training"
    still_running: Callable[[], Collection[int]] | None = field(default=None, compare=False,
                                                                 repr=False)
    timeouts: list[Stalled] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def of(cls, engine: EngineSection,
           still_running: Callable[[], Collection[int]] | None = None) -> FaultPolicy:
        """The policy configured in ``[engine]``."""
        return cls(on_failure=engine.on_client_failure, retries=engine.client_retries,
                   timeout_s=engine.client_timeout_s, still_running=still_running)

    def settle(self, failed: Mapping[int, str], survivors: Collection[int], *,
               server_round: int, stage: str = "train") -> list[Failure]:
        """Apply the policy to a request's failures; return them as :class:`Failure` records.

        Raises
        ------
        ClientFailure
            Under ``"abort"`` on any failure; under ``"drop"`` when a training request (or
            another client task, e.g. ``"ascent"``) has no survivor.
        """
        failures = [Failure(server_round, int(c), failed[c], stage) for c in sorted(failed)]
        if not failures:
            return []
        behind = self._stalled_before(failures)
        self.timeouts.extend(Stalled(f, self._doing(f.stage)) for f in failures
                             if f.reason == "timeout")
        if self.on_failure == "abort":
            raise ClientFailure(self.describe(failures[0], more=len(failures) - 1,
                                              behind=behind))
        if stage != "evaluate" and not survivors:
            raise ClientFailure(f"every client of round {server_round}{self._of_phase(stage)} "
                                f"failed: {_who(failures)}{_behind(behind)}; nothing can be "
                                f"aggregated - {self._advice(failures[0], behind)}")
        for recorder in _RECORDERS.get():
            recorder.extend(failures)
        return failures

    def _stalled_before(self, failures: Sequence[Failure]) -> list[Stalled]:
        """When ``failures`` hold a timeout, the earlier requests given up on after their own
        timeout that are still unanswered: the timed-out requests may have waited behind them
        for a client process."""
        if self.still_running is None or not self.timeouts or \
                not any(f.reason == "timeout" for f in failures):
            return []
        pending = set(self.still_running())
        found: dict[int, Stalled] = {}
        for stalled in self.timeouts:  # each client's first request still unanswered
            if stalled.failure.client in pending:
                found.setdefault(stalled.failure.client, stalled)
        return [found[c] for c in sorted(found)]

    def _doing(self, stage: str) -> str:
        if stage == "train":
            return self.phase
        return {"evaluate": "evaluation"}.get(stage, f"its '{stage}' task")

    def _of_phase(self, stage: str) -> str:
        """`` of retraining without clients [0]`` (nothing for the training itself)."""
        doing = self._doing(stage)
        return "" if doing == "training" else f" of {doing}"

    def describe(self, failure: Failure, *, more: int = 0,
                 behind: Sequence[Stalled] = ()) -> str:
        """The one-line abort message for ``failure``."""
        what = {"timeout": f"sent no reply within engine.client_timeout_s = {self.timeout_s:g} s",
                "non-finite": "returned a model with NaN or Inf values (never aggregated)"}
        did = what.get(failure.reason, f"failed ({failure.reason})")
        also = f" (and {more} more client{'s' if more > 1 else ''})" if more else ""
        return (f"client {failure.client} {did} in round {failure.round} "
                f"({self._doing(failure.stage)}){also}{_behind(behind)}; "
                f"{self._advice(failure, behind)}")

    def _advice(self, failure: Failure, behind: Sequence[Stalled] = ()) -> str:
        if failure.reason == "timeout" and behind:
            stalled = sorted({s.failure.client for s in behind})
            return (f"find what stalls {listed(stalled)} (rerun with --set "
                    "engine.verbose=true), or raise engine.client_timeout_s above its stall, "
                    "or give the engine more client processes (engine.ray_num_cpus)")
        lower = ("training.learning_rate" if failure.stage in ("train", "evaluate") else
                 "the learning rate of the method that asked for the task (for 'ascent': "
                 "unlearning.params.pga.learning_rate)")
        in_code = " (at " in failure.reason  # raised in code, which will fail again
        raised = ("fix the code where it was raised" if in_code else
                  "rerun with --set engine.verbose=true for its traceback")
        fix = {"timeout": "raise engine.client_timeout_s",
               "non-finite": f"check its data and lower {lower}"}.get(failure.reason, raised)
        drop = ("" if self.on_failure == "drop" else
                ", or set engine.on_client_failure=\"drop\" to go on without it")
        retry = ", or set engine.client_retries" if failure.reason != "non-finite" \
            and not in_code and self.retries == 0 else ""
        return f"{fix}{retry}{drop}"


def _who(failures: Sequence[Failure], first: int = 5) -> str:
    """``client 0 (non-finite), client 1 (timeout)``; more than ``first`` grouped by reason.

    >>> _who([Failure(1, c, "timeout") for c in range(100_000)])
    '100000 clients (0, 1, 2, 3, 4, ...) (timeout)'
    """
    if len(failures) <= first:
        return ", ".join(f"client {f.client} ({f.reason})" for f in failures)
    by_reason: dict[str, list[int]] = {}
    for f in failures:
        by_reason.setdefault(f.reason, []).append(f.client)
    return "; ".join(f"{listed(cs)} ({reason})" for reason, cs in by_reason.items())


def _behind(stalled: Sequence[Stalled]) -> str:
    """Why a timeout may not be the timed-out client's fault: earlier requests given up on
    after a timeout, still unanswered, holding (or waiting for) the engine's client processes."""
    if not stalled:
        return ""
    shown = ", ".join(str(s) for s in stalled[:3]) + (
        f" and {len(stalled) - 3} more" if len(stalled) > 3 else "")
    n = len(stalled)
    return (f", while {'an earlier request' if n == 1 else f'{n} earlier requests'} given up "
            f"on after a timeout {'was' if n == 1 else 'were'} still unanswered on the engine, "
            f"holding the client processes the later ones waited for ({shown})")
