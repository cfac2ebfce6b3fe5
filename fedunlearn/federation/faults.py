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
This module imports neither Flower nor torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from fedunlearn.config import EngineSection

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


@dataclass(frozen=True)
class FaultPolicy:
    """``engine.on_client_failure``, ``engine.client_retries`` and ``engine.client_timeout_s``.

    Parameters
    ----------
    on_failure : {"abort", "drop"}
    retries : int
    timeout_s : float
        The wait on clients, quoted in the messages.
    """

    on_failure: str = "abort"
    retries: int = 0
    timeout_s: float = 120.0

    @classmethod
    def of(cls, engine: EngineSection) -> FaultPolicy:
        """The policy configured in ``[engine]``."""
        return cls(on_failure=engine.on_client_failure, retries=engine.client_retries,
                   timeout_s=engine.client_timeout_s)

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
        if self.on_failure == "abort":
            raise ClientFailure(self.describe(failures[0], more=len(failures) - 1))
        if stage != "evaluate" and not survivors:
            who = ", ".join(f"client {f.client} ({f.reason})" for f in failures)
            raise ClientFailure(f"every client of round {server_round} failed: {who}; nothing "
                                f"can be aggregated - {self._advice(failures[0])}")
        return failures

    def describe(self, failure: Failure, *, more: int = 0) -> str:
        """The one-line abort message for ``failure``."""
        what = {"timeout": f"sent no reply within engine.client_timeout_s = {self.timeout_s:g} s",
                "non-finite": "returned a model with NaN or Inf values (never aggregated)"}
        did = what.get(failure.reason, f"failed ({failure.reason})")
        also = f" (and {more} more client{'s' if more > 1 else ''})" if more else ""
        doing = {"evaluate": "evaluation", "train": "training"}.get(
            failure.stage, f"its '{failure.stage}' task")
        return (f"client {failure.client} {did} in round {failure.round} ({doing}){also}; "
                f"{self._advice(failure)}")

    def _advice(self, failure: Failure) -> str:
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
