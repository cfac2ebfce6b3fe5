"""Serving removal requests: every method, in order, on the same trained run.

For each request (in config order) every method starts from the model *it* left after the
previous request (the trained model for the first one). Methods are grouped by setting:
federated ones work on the Flower federation and its history, centralized ones on the same
clients' data pooled at one site (they are fitted once, before the first request). Each setting
has a reference — ``retrain`` (federated) or ``central_retrain`` (centralized) — which runs
first; with ``verification.noise_floor`` a second retraining gives the noise floor
(docs/algorithms.md, "Noise floor"). After a request the history store is purged of the targets
(unless ``unlearning.purge = false``) at the level ``history.purge`` (docs/history.md).

The loop only serves: it builds each request's context, runs every method, checks what it
answered, purges the history, and emits events to its listeners, in order:
:class:`RequestStarted`, one :class:`MethodAnswered` per method, :class:`RequestAnswered`,
:class:`Purged` (and :class:`Fitted` for each centralized method before the first request).
Verification (:class:`fedunlearn.run.verification.Verification`) listens first and fills the
rows (``MethodAnswered.row``, ``RequestAnswered.rows``) that the listeners after it read: the
lineage log and the progress lines (:mod:`fedunlearn.run.listeners`) and the resume journal
(:class:`fedunlearn.run.resume.ResumeJournal`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from fedunlearn.config.extensions import USER_ERRORS, describe_failure
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.data.federated import FederatedData
from fedunlearn.data.removal import resolve
from fedunlearn.engine.faults import ClientFailure, nonfinite, recording_failures
from fedunlearn.engine.port import Federation
from fedunlearn.evaluation.schema import (
    SETTINGS,
    Role,
    Row,
)
from fedunlearn.history.lineage import LineageLog, params_hash
from fedunlearn.history.store import HistoryError, HistoryStore
from fedunlearn.models.params import Params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.run import interrupt
from fedunlearn.run.checks import (
    Method,
    RequestError,
    base_name,
    build_methods,
    check_replayable_history,
    check_requests,
)
from fedunlearn.run.events import (
    Fitted,
    MethodAnswered,
    Purged,
    RequestAnswered,
    RequestStarted,
    ServingListener,
    _Fanout,
)
from fedunlearn.run.resume import Resumption, carried_state, store_files
from fedunlearn.unlearning.base import (
    HistoryNotReplayable,
    UnlearningContext,
    UnlearningResult,
    restore_state,
)


@dataclass
class Served:
    """Everything the requests produced."""

    rows: list[Row]
    purges: list[dict[str, Any]]
    verification: list[dict[str, Any]] = field(default_factory=list)
    """Per request: what verifying it cost (:func:`fedunlearn.run.verification.entry`)."""


def serve_requests(cfg: Config, *, data: FederatedData, trained: Params, initial: Params,
                   store: HistoryStore, federation: Federation | None, lineage: LineageLog,
                   build_model: Callable[[], Any], predictor: Callable[[Params], Callable],
                   stream: TextIO | None = sys.stderr,
                   settings: Collection[str] = SETTINGS,
                   shadow_cache: dict[int, Any] | None = None,
                   resume: Resumption | None = None,
                   journal: ServingListener | None = None) -> Served:
    """Serve ``cfg.unlearning.requests`` with every configured method of ``settings``, with
    the run's listeners: verification, the lineage log, progress lines on ``stream`` (none when
    ``None``) and the resume ``journal``; see the module docstring.

    The pipeline serves the federated methods inside the live Flower engine, then the centralized
    ones after it has shut down (a single site runs no federation engine). ``shadow_cache``
    (request index -> shadow models' confidences) lets the second pass reuse the first pass's
    shadow models. ``resume`` starts the pass at a later request (the earlier ones' rows are the
    caller's).
    """
    from fedunlearn.run.listeners import LineageListener, ServingProgress
    from fedunlearn.run.verification import Verification

    methods = [m for m in build_methods(cfg) if m.setting in settings]
    verification = Verification(cfg, methods=methods, data=data, trained=trained,
                                build_model=build_model, predictor=predictor, settings=settings,
                                shadow_cache=shadow_cache)
    listeners: list[ServingListener] = [
        verification, LineageListener(lineage, federated="federated" in settings)]
    if stream is not None:
        listeners.append(ServingProgress(stream))
    if journal is not None:
        listeners.append(journal)
    return serve(cfg, methods, trained=trained, initial=initial, store=store,
                 federation=federation, data=data, build_model=build_model,
                 federated="federated" in settings, resume=resume, listener=_Fanout(listeners))


def serve(cfg: Config, methods: list[Method], *, trained: Params, initial: Params,
          store: HistoryStore, federation: Federation | None, data: FederatedData,
          build_model: Callable[[], Any], federated: bool, resume: Resumption | None,
          listener: ServingListener) -> Served:
    """The serving loop: every request in order, every method on it, then the purge; each
    step told to ``listener``. A stop requested with Ctrl-C (:mod:`fedunlearn.run.interrupt`)
    is honoured before each method and each exchange of client work, and never between a
    request's answer and its purge."""
    start = 0 if resume is None else resume.next_request
    if federated:
        check_requests(cfg, store, start)
        check_replayable_history(methods, store)

    steps = resolve(cfg, data)
    purging = federated and cfg.unlearning.purge

    def context(targets: tuple[int, ...], removed: frozenset[int], model: Params,
                request: int) -> UnlearningContext:
        # its own copies: a method that edits ctx.model or ctx.initial in place must not
        # change what the methods after it, the original's row and the journal start from
        return UnlearningContext(cfg=cfg, targets=targets, removed=removed,
                                 model={k: v.copy() for k, v in model.items()},
                                 initial={k: v.copy() for k, v in initial.items()},
                                 history=store, federation=federation,
                                 data=data, build_model=build_model,
                                 seed=derive_seed(cfg.seed, 0xA11, request),
                                 request=max(request, 0),
                                 removal=steps[request] if request >= 0 else None)

    fit_wall = _fit_centralized(methods, context((), frozenset(), trained, -1), listener,
                                after_federated=not federated)
    current = {m.name: trained for m in methods}
    removed: frozenset[int] = frozenset()
    served = Served(rows=[], purges=[])

    def purge(request: int, targets: tuple[int, ...], *,
              before: dict[str, int] | None = None) -> None:
        record, counts, done = _purge(store, request, targets, cfg.history.purge, before=before)
        served.purges.append(record)
        listener.purged(Purged(request, record, counts, resumed=done))

    if resume is not None:
        current.update(resume.current)
        for m in methods:
            if m.name in resume.states:
                restore_state(m.method, resume.states[m.name], store=str(store.path))
        removed = steps[start - 1].gone if start else frozenset()
        if resume.pending_purge and purging:
            purge(start - 1, steps[start - 1].targets, before=resume.before_purge)
    for i, step in enumerate(steps):
        if i < start:
            continue
        targets = step.targets
        removed = step.gone
        listener.request_started(RequestStarted(i, targets, removed, step))
        reference_wall: dict[str, float] = {}
        for m in methods:
            interrupt.check()
            event = _serve(m, context(targets, removed, current[m.name], i), i, reference_wall)
            event.fit_wall_s = fit_wall.get(m.name)
            listener.method_answered(event)
            if event.result.model is not None:
                current[m.name] = event.result.model
        answered = RequestAnswered(i, targets,
                                   {m.name: current[m.name] for m in methods
                                    if current[m.name] is not trained},
                                   carried_state(methods), purge_pending=purging)
        listener.request_answered(answered)
        served.rows += answered.rows
        if answered.verification is not None:
            served.verification.append(answered.verification)
        if purging:
            purge(i, targets)
    return served


def _serve(m: Method, ctx: UnlearningContext, request: int,
           reference_wall: dict[str, float]) -> MethodAnswered:
    """One method serves one request: timed, its traffic counted, its answer checked."""
    sent, exchanged = _traffic(ctx.federation)
    reached = Counter(getattr(ctx.federation, "reached", ()))
    source = params_hash(ctx.model) if m.role == Role.METHOD else None
    t0 = time.perf_counter()
    with recording_failures() as dropped, \
            users_code(m, f"on request {request}", _then_resume(ctx.cfg, request)):
        result = m.method.unlearn(ctx)
    wall = time.perf_counter() - t0
    if not isinstance(result, UnlearningResult):
        raise RequestError(f"unlearning method '{m.name}' returned {type(result).__name__}, "
                           "not an UnlearningResult (fedunlearn.unlearning.base); fix its "
                           "unlearn(ctx)")
    if result.model is not None:
        model = _scalars_as_arrays(result.model)
        if misfit := _misfit(model, ctx.initial):
            raise RequestError(f"unlearning method '{m.name}' answered request {request} with "
                               f"a model that does not fit the experiment's network: {misfit}; "
                               "fix its unlearn(ctx) to return arrays like ctx.model's")
        # in the network's order (a model rebuilt from the history may list the non-float
        # buffers last): distances and hashes compare arrays in order
        result = dataclasses.replace(result, model={k: model[k] for k in ctx.initial})
    if result.model is not None and (bad := nonfinite(result.model)):
        raise RequestError(f"unlearning method '{m.name}' answered request {request} with a "
                           f"model holding NaN or Inf (in {', '.join(bad[:3])}); its "
                           f"parameters (unlearning.params.{base_name(m.name)}) make it "
                           "diverge: use smaller steps, or leave it out")
    after = _traffic(ctx.federation)
    if m.role == Role.REFERENCE:
        reference_wall[m.setting] = wall
    return MethodAnswered(request, m, ctx, result, wall, reference_wall.get(m.setting),
                          after[0] - sent, after[1] - exchanged, source, reached,
                          [dataclasses.asdict(f) for f in dropped])


def _purge(store: HistoryStore, request: int, targets: tuple[int, ...], level: str, *,
           before: dict[str, int] | None = None
           ) -> tuple[dict[str, Any], dict[str, int] | None, bool]:
    """Purge the request's clients from the history store at ``level``: the purge's record,
    the store's file counts (None when unknown) and whether it had been done already.

    ``before`` (a resumed pending purge: the store's ``files`` and ``bytes`` when the request
    was answered): if the purge had already happened before the interruption, it is recorded
    from those figures, not as a no-op."""
    done = before is not None and set(targets) <= set(store.purged())
    store.last_purge = None
    if before is not None and done:
        files_before, bytes_before = before["files"], before["bytes"]
    else:
        files_before, bytes_before = store_files(store), store.bytes_used()
        store.purge_clients(targets, level=level)
    counts = store.last_purge or None  # None: finished before an interruption (counts unknown)
    record = {"request": request, "clients": list(targets), "level": level,
              "bytes_freed": bytes_before - store.bytes_used(),
              "files_removed": files_before - store_files(store),
              "files_deleted": (counts or {}).get("deleted"),
              "files_written": (counts or {}).get("written"),
              "globals_deleted_from": store.globals_deleted_from()}
    return record, counts, done


def _traffic(federation: Federation | None) -> tuple[int, int]:
    if federation is None:
        return 0, 0
    return federation.messages_sent, federation.bytes_exchanged


def _fit_centralized(methods: list[Method], ctx: UnlearningContext, listener: ServingListener,
                     *, after_federated: bool) -> dict[str, float]:
    """Fit every centralized method once on the pooled data (not part of removal time).
    ``after_federated``: the federated requests were served (and kept) before this pass."""
    walls: dict[str, float] = {}
    then = (" (the federated requests are answered and kept: `fedunlearn resume RUN_DIR` goes "
            "on with the centralized methods)" if after_federated else
            " (nothing of the removals has run yet)")
    for m in methods:
        if m.setting == "centralized":
            t0 = time.perf_counter()
            with users_code(m, "in fit(ctx) on the pooled data", then):
                m.method.fit(ctx)  # type: ignore[attr-defined]
                walls[m.name] = time.perf_counter() - t0
                fitted = _fitted_hash(m, ctx)
            listener.fitted(Fitted(m, walls[m.name], fitted,
                                   list(range(len(ctx.data.clients)))))
    return walls


def _fitted_hash(m: Method, ctx: UnlearningContext) -> str:
    params = m.method.original_params_  # type: ignore[attr-defined]
    if params is not None:
        return params_hash(params)
    proba = m.method.predict_proba_original(ctx.data.test.x)  # type: ignore[attr-defined]
    return params_hash({"test_proba": proba})


@contextmanager
def users_code(m: Method, where: str, then: str = "") -> Iterator[None]:
    """An exception raised in a method that is not fedunlearn's own becomes one line naming
    the method, ``where`` it failed and where in the user's code; ours propagate as they are."""
    try:
        yield
    except (*USER_ERRORS, KeyboardInterrupt) as exc:
        # KeyboardInterrupt too: while requests are served a Ctrl-C only sets interrupt.STOP
        # (its handler raises nothing), so one here was raised by the method's own code
        if type(m.method).__module__.startswith("fedunlearn.") or isinstance(exc, _SAID):
            raise
        raise RequestError(f"unlearning method '{m.name}' failed {where}: "
                           f"{describe_failure(exc)}; fix it{then}, or leave it out") from exc


def _then_resume(cfg: Config, request: int) -> str:
    """How a run stopped by a failing method in ``request`` goes on once the method is fixed."""
    if request > 0 and cfg.unlearning.purge and cfg.history.purge == "strict":
        return (" and rerun into a new --out (a strict purge of the requests answered before "
                "deleted the trained model the rest are measured against)")
    return (" (the requests answered before are kept: `fedunlearn resume RUN_DIR` goes on "
            "from this one)")


_SAID = (RequestError, ConfigError, HistoryError, HistoryNotReplayable, ClientFailure,
         interrupt.Interrupted)
"""Errors that already say, in one line, what went wrong and what to do."""


def _scalars_as_arrays(model: Any) -> Any:
    """A NumPy scalar as the 0-d array it stands for: NumPy gives a scalar, not a 0-d array,
    for arithmetic on a 0-d array (``v * 0.9``)."""
    if not isinstance(model, dict):
        return model
    return {k: np.asarray(v) if isinstance(v, np.generic) else v for k, v in model.items()}


def _misfit(model: Any, like: Params) -> str | None:
    """Why ``model`` cannot stand for the experiment's network ``like`` (the same names,
    NumPy arrays of the same shapes and dtypes), or ``None`` if it can.

    >>> like = {"w": np.zeros((2, 3), np.float32)}
    >>> _misfit({"w": np.zeros((2, 3), np.float64)}, like)
    "'w' is float64, the network's is float32 (cast it with .astype)"
    >>> _misfit({"v": np.zeros((2, 3), np.float32)}, like)
    "missing ['w'], unexpected ['v']"
    """
    if not isinstance(model, dict):
        return f"a {type(model).__name__}, not a dict of NumPy arrays"
    missing = [k for k in like if k not in model]
    extra = [k for k in model if k not in like]
    if missing or extra:
        return ", ".join(f"{what} {names[:5]}" for what, names in
                         (("missing", missing), ("unexpected", extra)) if names)
    for k, ref in like.items():
        v = model[k]
        if not isinstance(v, np.ndarray):
            return f"'{k}' is a {type(v).__name__}, not a NumPy array"
        if v.shape != ref.shape:
            return f"'{k}' has shape {v.shape}, the network's {ref.shape}"
        if v.dtype != ref.dtype:
            return f"'{k}' is {v.dtype}, the network's is {ref.dtype} (cast it with .astype)"
    return None
