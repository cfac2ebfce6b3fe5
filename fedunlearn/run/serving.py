"""Serving removal requests: every method, in order, on the same trained run.

For each request (in config order) every method starts from the model *it* left after the
previous request (the trained model for the first one). Methods are grouped by setting:
federated ones work on the Flower federation and its history, centralized ones on the same
clients' data pooled at one site (they are fitted once, before the first request). Each setting
has a reference — ``retrain`` (federated) or ``central_retrain`` (centralized) — which runs
first, and the speed-ups and distances of that setting are measured against it; with
``verification.noise_floor`` a second retraining gives the noise floor: the same initial model
and participants, fresh client-side randomness (docs/algorithms.md, "Noise floor").
After a request the history store is purged of the targets (unless ``unlearning.purge =
false``) at the level ``history.purge``: ``"strict"`` (default) also deletes the global models
from the targets' first round on and the final model, so nothing left re-solves their updates;
``"updates"`` deletes only their updates and running sums. Later requests need no stored global
model: the history replays start from ``initial`` and the remaining clients' stored updates,
distillation subtracts the next targets' running sums from the model it left, FedRecover
replays the trajectory it recovered for the previous request. The lineage log
records the request, each resulting model and the purge (level, files and bytes removed, and
the first round whose global model is gone).

Verification is timed apart from the methods: per request, the wall time of building the
verifier, predicting every model on the verification splits, training (or reusing) the shadow
models and computing the metrics, with the sample sizes used (``Served.verification``). One set
of shadow models is trained per seed, on a bounded sample of the clients outside every request
(so no request's members are in it), and serves every method and request.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import numpy as np

from fedunlearn.config.extensions import USER_ERRORS, describe_failure
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.data.federated import FederatedData
from fedunlearn.engine.faults import ClientFailure, nonfinite, recording_failures
from fedunlearn.engine.port import Federation
from fedunlearn.evaluation.schema import (
    INDEPENDENT_SUFFIX,
    NOISE_SUFFIX,
    REFERENCE,
    SETTINGS,
    Role,
    Row,
)
from fedunlearn.evaluation.shadow import ShadowModels, shadow_epochs, shadow_sample_size
from fedunlearn.evaluation.summary import recovery_words
from fedunlearn.evaluation.verify import Outputs, RequestVerifier
from fedunlearn.history.lineage import LineageLog, params_hash
from fedunlearn.history.store import HistoryError, HistoryStore
from fedunlearn.models.params import Params
from fedunlearn.models.seeding import derive_seed, sample_participants
from fedunlearn.models.training import local_training
from fedunlearn.reporting.tables import epoch_count
from fedunlearn.run import interrupt
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    HistoryNotReplayable,
    Unlearner,
    UnlearningContext,
    UnlearningResult,
    protocol_gaps,
    setting_of,
)

EXACT = frozenset(REFERENCE.values())


class RequestError(ValueError):
    """A removal request that cannot be served (nothing was changed)."""


@dataclass
class Method:
    """A configured method instance with its name and role in the table."""

    name: str
    method: Unlearner
    role: str  # a Role

    @property
    def setting(self) -> str:
        return setting_of(self.method)


def base_name(name: str) -> str:
    """The registered method behind a configured name: ``"federaser:r1"`` is FedEraser with
    the parameters of ``[unlearning.params."federaser:r1"]``, so one run can compare several
    settings of one method.

    >>> base_name("federaser:r1"), base_name("retrain")
    ('federaser', 'retrain')
    """
    return name.split(":", 1)[0]


def factory_of(name: str) -> Callable[..., Unlearner]:
    """The registered factory of a configured method name (see :func:`base_name`)."""
    return UNLEARNERS.get(base_name(name))


def method_order(cfg: Config) -> list[str]:
    """Configured methods grouped by setting, each setting's reference first.

    ``retrain`` is always present (the federated run is always trained); ``central_retrain``
    joins as soon as a centralized method is configured.
    """
    names = list(cfg.unlearning.methods)
    for name in names:
        _check_name("unlearning.methods", name)
        if setting_of(factory_of(name)) not in REFERENCE:  # it would never run, silently
            raise _protocol_error(name, factory_of(name))
    order: list[str] = []
    for setting, ref in REFERENCE.items():
        members = [n for n in names if setting_of(factory_of(n)) == setting and n != ref]
        if setting == "federated" or members or ref in names:
            order += [ref, *members]
    return order


_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")


def _check_name(key: str, name: str) -> None:
    """A registered method, optionally with a ``:label`` of letters, digits, ``_.+-``."""
    base, sep, label = name.partition(":")
    if base not in UNLEARNERS:
        raise ConfigError(f"config key '{key}': {UNLEARNERS.unknown_message(base)}")
    if sep and not _LABEL.fullmatch(label):
        raise ConfigError(f"config key '{key}': '{name}' has an empty or unusual label after "
                          "':'; use letters, digits and _.+- (e.g. 'federaser:r1')")


def _protocol_error(name: str, method: object) -> ConfigError:
    cls = method if isinstance(method, type) else type(method)
    setting = getattr(method, "setting", None)
    which = f"the {setting} protocol" if setting in REFERENCE else "a protocol"
    declared = "" if setting in REFERENCE or setting is None else f" (it declares {setting!r})"
    return ConfigError(f"unlearning method '{name}' ({cls.__name__}) does not implement {which} "
                       f"of fedunlearn.unlearning.base: it lacks "
                       f"{', '.join(protocol_gaps(method))}{declared}")


def _check_types(name: str, factory: Callable[..., Any], params: dict[str, Any]) -> None:
    """A value of the wrong kind for its default (a string or a list for a number, anything
    but true/false for a flag) is named here, before the method's own range checks."""
    defaults = {p.name: p.default for p in inspect.signature(factory).parameters.values()}
    for key, value in params.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"config key 'unlearning.params.{name}.{key}' must be true or "
                                  f"false, got {value!r}")
        elif isinstance(default, int | float) and (
                isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"config key 'unlearning.params.{name}.{key}' must be a number "
                              f"(default {default!r}), got {value!r}")


def _create(cfg: Config, name: str, **forced: Any) -> Unlearner:
    factory = factory_of(name)
    params = dict(cfg.unlearning.params.get(name, {}))
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"config key 'unlearning.params.{name}' has unknown parameters "
                          f"{unknown}; accepted: {', '.join(accepted) or 'none'}")
    _check_types(name, factory, params)
    try:
        method = factory(**{**params, **forced})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'unlearning.params.{name}': {exc}") from None
    except USER_ERRORS as exc:  # a user's constructor: its error, in one line
        raise ConfigError(f"unlearning method '{name}' could not be built: "
                          f"{describe_failure(exc)}") from None
    if protocol_gaps(method):
        raise _protocol_error(name, method)
    try:
        method.check()  # hyperparameter checks that need no data run before any work
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'unlearning.params.{name}': {exc}") from None
    except USER_ERRORS as exc:  # a user's check failing otherwise, in one line
        raise ConfigError(f"unlearning method '{name}': its check() failed: "
                          f"{describe_failure(exc)}") from None
    return method


def _check_config(cfg: Config, name: str, method: Unlearner) -> None:
    """A configured method's optional ``check_config(cfg)``: checks that need the rest of the
    config (the requests, the purge level), run before any work; ``ValueError`` becomes a
    one-line :class:`ConfigError`."""
    check = getattr(method, "check_config", None)
    if callable(check):
        try:
            check(cfg)
        except ValueError as exc:
            raise ConfigError(f"config key 'unlearning.methods' ({name}): {exc}") from None
        except USER_ERRORS as exc:  # a user's check failing otherwise
            raise ConfigError(f"unlearning method '{name}': its check_config(cfg) failed: "
                              f"{describe_failure(exc)}") from None


def build_methods(cfg: Config) -> list[Method]:
    """Instantiate every configured method (and each setting's references); unknown names or
    parameters are ConfigErrors raised before any work."""
    out: list[Method] = []
    for name in method_order(cfg):
        role = Role.REFERENCE if name in EXACT else Role.METHOD
        method = _create(cfg, name)
        _check_config(cfg, name, method)
        out.append(Method(name, method, role))
        if role == Role.REFERENCE and cfg.verification.noise_floor:
            out.append(Method(name + NOISE_SUFFIX, _create(cfg, name, stream=1),
                              Role.NOISE_FLOOR))
        if role == Role.REFERENCE and cfg.verification.independent_retrain:
            out.append(Method(name + INDEPENDENT_SUFFIX, _create(cfg, name, variant=1),
                              Role.CONTEXT))
    unlisted_methods(cfg, {m.name for m in out})
    return out


def unlisted_methods(cfg: Config, listed: Collection[str]) -> list[tuple[str, Unlearner]]:
    """Instances of the methods that have parameters in ``unlearning.params`` but are not in
    ``listed`` (the ones run this time, e.g. after ``--set unlearning.methods``): their
    parameters are still checked, so a typo in them is caught now rather than on the next
    run."""
    out = []
    for name in sorted(set(cfg.unlearning.params) - set(listed)):
        _check_name(f"unlearning.params.{name}", name)
        method = _create(cfg, name)
        _check_config(cfg, name, method)
        out.append((name, method))
    return out


def settings_in(cfg: Config) -> set[str]:
    """The settings the configured methods (and their references) serve."""
    return {setting_of(factory_of(name)) for name in method_order(cfg)}


def check_requests(cfg: Config, store: HistoryStore, start: int = 0) -> None:
    """Every target of request ``start`` and later (the ones still to serve) must have taken
    part in training and still be in the store."""
    present = set(store.clients())
    for i, request in enumerate(cfg.unlearning.requests):
        if i < start:
            continue
        absent = sorted(set(request) - present)
        if absent:
            raise RequestError(f"request {i} asks to remove clients {absent}, which never took "
                               "part in training (or were already purged); nothing was changed")


def check_replayable_history(methods: list[Method], store: HistoryStore) -> None:
    """Methods that consume stored updates or running sums refuse, before any of them runs, a
    history whose rounds broke ``M_{t+1} = M_t + Σ w U`` (e.g. server momentum)."""
    needy = [m.name for m in methods if getattr(m.method, "needs_replayable_history", False)]
    if needy and not store.replayable():
        rounds = store.identity_violations()
        raise HistoryNotReplayable(
            f"the stored history is not replayable: training broke M_(t+1) = M_t + Σ w U in "
            f"rounds {rounds[:5]}{' ...' if len(rounds) > 5 else ''} (a server-side optimiser "
            f"such as momentum), so {', '.join(needy)} cannot use it; train with fedavg or "
            "fedprox, or drop those methods")


@dataclass
class Served:
    """Everything the requests produced."""

    rows: list[Row]
    purges: list[dict[str, Any]]
    verification: list[dict[str, Any]] = field(default_factory=list)
    """Per request: ``request``, ``clients``, ``setting``, ``wall_s`` (all verification work of
    the request), ``shadow_s`` (of it, training or querying the shadows), ``shadows`` (how
    many), ``shadow_threads`` (torch threads they ran with), ``shadows_trained`` (false when
    the seed's shadows were reused), ``shadow_epochs`` (each trained, after the cost bound of
    ``verification.shadow_budget``), ``shadow_train_samples`` (per shadow) and ``sizes``
    (:attr:`RequestVerifier.sizes`)."""


@dataclass
class Resumption:
    """Where an interrupted federated pass goes on: at request ``next_request``, each method
    from the model it left (``current``, by method name); ``pending_purge``: the purge of
    request ``next_request - 1`` may not have happened (it is done again, a no-op if it had)."""

    next_request: int
    current: dict[str, Params]
    pending_purge: bool = False
    before_purge: dict[str, int] | None = None
    """``files`` and ``bytes`` of the store before the pending purge (see :func:`_purge`)."""
    states: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    """Method name -> what it carries into the next request (:func:`carried_state`)."""


def resumable(method: object) -> bool:
    """Whether a run with ``method`` can be resumed between requests: it carries nothing
    into the next request, or it can save and restore what it carries
    (``keeps_state_across_requests`` with ``state_arrays`` and ``load_state``)."""
    return not getattr(method, "keeps_state_across_requests", False) or (
        callable(getattr(method, "state_arrays", None))
        and callable(getattr(method, "load_state", None)))


def carried_state(methods: list[Method]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """What each method that carries state into the next request would carry now."""
    return {m.name: m.method.state_arrays() for m in methods  # type: ignore[attr-defined]
            if getattr(m.method, "keeps_state_across_requests", False)
            and callable(getattr(m.method, "state_arrays", None))}


class Journal(Protocol):
    """Told after each request of a federated pass, so that an interrupted pass can go on
    from the next request (:class:`Resumption`; the runner writes it to disk)."""

    def served(self, request: int, served: Served, current: dict[str, Params], *,
               purge_pending: bool,
               states: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Request ``request`` was answered (``served`` holds its rows and verification);
        ``current``: each method's model after it; ``states``: what the methods carry into
        the next request (:func:`carried_state`). Called before the request's purge."""

    def purged(self, request: int, purge: dict[str, Any]) -> None:
        """The purge of request ``request`` is done (``purge``: its record)."""


@dataclass
class _Answer:
    """A row waiting for its metrics (which need the reference's outputs)."""

    row: Row
    outputs: Outputs
    params: Params | None
    verify_s: float = 0.0


def serve_requests(cfg: Config, *, data: FederatedData, trained: Params, initial: Params,
                   store: HistoryStore, federation: Federation | None, lineage: LineageLog,
                   build_model: Callable[[], Any], predictor: Callable[[Params], Callable],
                   stream: TextIO | None = sys.stderr,
                   settings: Collection[str] = SETTINGS,
                   shadow_cache: dict[int, Any] | None = None,
                   resume: Resumption | None = None, journal: Journal | None = None) -> Served:
    """Serve ``cfg.unlearning.requests`` with every configured method; see module docstring.

    ``settings`` restricts the methods served: the runner serves the federated ones inside the
    live Flower engine, then the centralized ones after it has shut down (a single site runs no
    federation engine; its timings are not disturbed by one). The federated pass checks the
    requests and purges the history store; ``shadow_cache`` (request index -> shadow models'
    confidences) lets the second pass reuse the first pass's shadow models.

    ``resume`` starts the pass at a later request (the earlier ones' rows are the caller's);
    ``journal`` is told after each request (:class:`Journal`). A stop requested with Ctrl-C
    (:mod:`fedunlearn.run.interrupt`) is honoured before each method and each exchange of client
    work, and never between a request's answer and its purge.
    """
    methods = [m for m in build_methods(cfg) if m.setting in settings]
    federated = "federated" in settings
    if federated:
        check_requests(cfg, store, 0 if resume is None else resume.next_request)
        check_replayable_history(methods, store)
    shadow_cache = {} if shadow_cache is None else shadow_cache
    target_class = cfg.backdoor.target_class if cfg.backdoor.clients else None

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
                                 request=max(request, 0))

    fit_wall = _fit_centralized(methods, context((), frozenset(), trained, -1), lineage, stream,
                                after_federated=not federated)
    requested = {c for r in cfg.unlearning.requests for c in r}
    shadows = _shadow_models(cfg, build_model, data, requested)
    shadow_pool = data.pooled(exclude=requested) if shadows is not None else None
    v = cfg.verification
    current = {m.name: trained for m in methods}
    removed: frozenset[int] = frozenset()
    rows: list[Row] = []
    purges: list[dict[str, Any]] = []
    verification: list[dict[str, Any]] = []
    purging = federated and cfg.unlearning.purge
    start = 0 if resume is None else resume.next_request
    if resume is not None:
        current.update(resume.current)
        for m in methods:
            if m.name in resume.states:
                meta, arrays = resume.states[m.name]
                m.method.load_state(meta, arrays, store=str(store.path))  # type: ignore[attr-defined]
        removed = frozenset(c for r in cfg.unlearning.requests[:start] for c in r)
        if resume.pending_purge and purging:
            last = tuple(sorted(cfg.unlearning.requests[start - 1]))
            purges.append(_purge(store, start - 1, last, cfg.history.purge, lineage, stream,
                                 before=resume.before_purge))
            if journal is not None:
                journal.purged(start - 1, purges[-1])
    for i, request in enumerate(cfg.unlearning.requests):
        if i < start:
            continue
        targets = tuple(sorted(request))
        removed = removed | set(targets)
        if federated:
            lineage.append("request", request=i, clients=list(targets))
        t_verify = time.perf_counter()
        cached = shadow_cache.get(i)
        verifier = RequestVerifier(data, targets=targets, removed=removed,
                                   target_class=target_class, alpha=v.alpha,
                                   shadows=shadows, seed=derive_seed(cfg.seed, 0x3E7, i),
                                   shadow_phi=cached, max_members=v.max_members,
                                   max_population=v.max_population, shadow_pool=shadow_pool)
        answers = _originals(methods, trained, targets, verifier, predictor, federated)
        verify_s = time.perf_counter() - t_verify
        reference_wall: dict[str, float] = {}
        for m in methods:
            interrupt.check()
            ctx = context(targets, removed, current[m.name], i)
            answer, result = _serve(m, ctx, i, reference_wall, verifier, predictor, lineage,
                                    stream)
            if m.name in fit_wall:
                answer.row.details["fit_wall_s"] = fit_wall[m.name]
            answers.append(answer)
            if result.model is not None:
                current[m.name] = result.model
        t_verify = time.perf_counter()
        fits = getattr(shadows, "fits_", 0)
        answered = _with_distances(answers, verifier)
        if verifier.shadow_phi is not None:
            shadow_cache[i] = verifier.shadow_phi
        verify_s += time.perf_counter() - t_verify + sum(a.verify_s for a in answers)
        entry = _verification_entry(
            i, targets, settings, verify_s, verifier, shadows,
            trained_now=getattr(shadows, "fits_", 0) > fits,
            shadow_samples=v.shadow_samples, stream=stream)
        rows += answered
        verification.append(entry)
        if journal is not None:
            journal.served(i, Served(rows=answered, purges=[], verification=[entry]),
                           {m.name: current[m.name] for m in methods
                            if current[m.name] is not trained},
                           purge_pending=purging, states=carried_state(methods))
        if purging:
            purges.append(_purge(store, i, targets, cfg.history.purge, lineage, stream))
            if journal is not None:
                journal.purged(i, purges[-1])
    return Served(rows=rows, purges=purges, verification=verification)


def _serve(m: Method, ctx: UnlearningContext, request: int, reference_wall: dict[str, float],
           verifier: RequestVerifier, predictor: Callable[[Params], Callable],
           lineage: LineageLog, stream: TextIO | None) -> tuple[_Answer, UnlearningResult]:
    """One method serves one request: timed, its traffic counted, logged in the lineage."""
    sent, exchanged = _traffic(ctx.federation)
    reached = Counter(getattr(ctx.federation, "reached", ()))
    source = params_hash(ctx.model) if m.role == Role.METHOD else None
    t0 = time.perf_counter()
    with recording_failures() as dropped, \
            _users_code(m, f"on request {request}", _then_resume(ctx.cfg, request)):
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
    answer = _answer(m, result, ctx.targets, wall, reference_wall.get(m.setting),
                     after[0] - sent, after[1] - exchanged, verifier, predictor)
    if dropped:  # clients dropped in this method's client work, as training's are recorded
        answer.row.details["client_failures"] = [dataclasses.asdict(f) for f in dropped]
    exact = bool(getattr(m.method, "exact", m.role != Role.METHOD))
    lineage.append("model", kind="unlearned", method=m.name, request=request, setting=m.setting,
                   model_hash=answer.row.model_hash, exact=exact,
                   derived_from=source,
                   trained_with=_trained_with(m, ctx, reached, exact=exact),
                   forgot=sorted(ctx.removed))
    repaired = recovery_words(result.details.get("recovery") or {})
    _say(stream, f"[unlearn] request {request} {list(ctx.targets)}  {m.name:<22} {wall:7.2f}s  "
         f"test {answer.row.metrics['test_accuracy']:.3f}  "
         f"forget {answer.row.metrics['forget_accuracy']:.3f}"
         + (f"  {repaired}" if repaired else ""))
    return answer, result


def _trained_with(m: Method, ctx: UnlearningContext, reached_before: Counter[int], *,
                  exact: bool) -> list[int]:
    """The clients whose data shaped ``m``'s answer: the clients its own client work reached
    and, unless it retrained from scratch (``exact``), every client that took part in the
    recorded training its answer derives from; the removed ones never. A centralized method
    trains on every remaining client's data, pooled."""
    if m.setting != "federated":
        return sorted(set(range(ctx.cfg.data.num_clients)) - ctx.removed)
    now = getattr(ctx.federation, "reached", Counter())
    shaped = {c for c, n in now.items() if n > reached_before.get(c, 0)}
    if not exact:
        shaped |= {c for t in ctx.history.rounds() for c in ctx.history.participants(t)}
    return sorted(shaped - ctx.removed)


def _verification_entry(request: int, targets: tuple[int, ...], settings: Collection[str],
                        wall_s: float, verifier: RequestVerifier, shadows: Any, *,
                        trained_now: bool, shadow_samples: int,
                        stream: TextIO | None) -> dict[str, Any]:
    """What verifying one request cost, for ``results.json`` (and one progress line)."""
    sizes = verifier.sizes
    epochs = None if shadows is None else shadows.spec.epochs
    _say(stream, f"[verify] request {request} {list(targets)}  {wall_s:7.2f}s  (shadows "
         f"{verifier.shadow_seconds:.2f}s{'' if epochs is None else f', {epoch_count(epochs)}'}; "
         f"members {sizes['members']} of "
         f"{sizes['members_available']}, population {sizes['population']})")
    return {"request": request, "clients": list(targets), "setting": "+".join(sorted(settings)),
            "wall_s": wall_s, "shadow_s": verifier.shadow_seconds,
            "shadows": 0 if shadows is None else shadows.num_shadows,
            "shadow_epochs": epochs,
            "shadow_threads": None if shadows is None else shadows.threads,
            "shadows_trained": trained_now,
            "shadow_train_samples": 0 if shadows is None else shadow_sample_size(
                sizes["shadow_pool"], shadow_samples),
            "sizes": sizes}


def _purge(store: HistoryStore, request: int, targets: tuple[int, ...], level: str,
           lineage: LineageLog, stream: TextIO | None, *,
           before: dict[str, int] | None = None) -> dict[str, Any]:
    """Purge the request's clients from the history store at ``level``; log what went.

    ``before`` (a resumed pending purge: the store's ``files`` and ``bytes`` when the request
    was answered): if the purge had already happened before the interruption, it is recorded
    from those figures (and logged, unless the lineage already has it), not as a no-op."""
    done = before is not None and set(targets) <= set(store.purged())
    store.last_purge = None
    if before is not None and done:
        files_before, bytes_before = before["files"], before["bytes"]
    else:
        files_before, bytes_before = store_files(store), store.bytes_used()
        store.purge_clients(targets, level=level)
    counts = store.last_purge or {}  # None: finished before an interruption (counts unknown)
    purge = {"request": request, "clients": list(targets), "level": level,
             "bytes_freed": bytes_before - store.bytes_used(),
             "files_removed": files_before - store_files(store),
             "files_deleted": counts.get("deleted"), "files_written": counts.get("written"),
             "globals_deleted_from": store.globals_deleted_from()}
    if not (done and any(e["event"] == "purge" and e.get("clients") == list(targets)
                         for e in lineage.read())):
        lineage.append("purge", **purge)
    cut = purge["globals_deleted_from"]
    files = (f"{counts['deleted']} files deleted, {counts['written']} written anew without "
             f"the client{'s' if len(targets) > 1 else ''}" if counts else
             f"{purge['files_removed']} fewer files")
    _say(stream, f"[purge] request {request} {list(targets)}  {level}: "
         f"{files}, {purge['bytes_freed']} bytes freed"
         + (f"; global models from round {cut} on and the final model deleted"
            if cut is not None else "; global models kept (re-solvable)"))
    return purge


def _traffic(federation: Federation | None) -> tuple[int, int]:
    if federation is None:
        return 0, 0
    return federation.messages_sent, federation.bytes_exchanged


def _fit_centralized(methods: list[Method], ctx: UnlearningContext, lineage: LineageLog,
                     stream: TextIO | None, *, after_federated: bool) -> dict[str, float]:
    """Fit every centralized method once on the pooled data (not part of removal time).
    ``after_federated``: the federated requests were served (and kept) before this pass."""
    walls: dict[str, float] = {}
    then = (" (the federated requests are answered and kept: `fedunlearn resume RUN_DIR` goes "
            "on with the centralized methods)" if after_federated else
            " (nothing of the removals has run yet)")
    for m in methods:
        if m.setting == "centralized":
            t0 = time.perf_counter()
            with _users_code(m, "in fit(ctx) on the pooled data", then):
                m.method.fit(ctx)  # type: ignore[attr-defined]
                walls[m.name] = time.perf_counter() - t0
                fitted = _fitted_hash(m, ctx)
            lineage.append("model", kind="fitted", method=m.name, setting="centralized",
                           model_hash=fitted,
                           trained_with=list(range(len(ctx.data.clients))), exact=True)
            _say(stream, f"[central] fitted {m.name:<22} {walls[m.name]:7.2f}s on pooled data")
    return walls


def _fitted_hash(m: Method, ctx: UnlearningContext) -> str:
    params = m.method.original_params_  # type: ignore[attr-defined]
    if params is not None:
        return params_hash(params)
    proba = m.method.predict_proba_original(ctx.data.test.x)  # type: ignore[attr-defined]
    return params_hash({"test_proba": proba})


def retraining_sample_epochs(cfg: Config, sizes: Sequence[int],
                             exclude: Collection[int]) -> float:
    """What retraining without ``exclude`` trains, in sample-epochs: ``local_epochs`` times the
    samples of each round's participants, drawn as training and retraining draw them
    (:func:`~fedunlearn.models.seeding.sample_participants`: ``max(1, round(f·K))`` per round, then
    ``exclude`` dropped); ``sizes[k]`` is client ``k``'s number of training samples.

    >>> from fedunlearn.config.tree import load_config
    >>> cfg = load_config(None, ["training.rounds=2", "training.local_epochs=3"])
    >>> retraining_sample_epochs(cfg, [10, 20, 30], exclude={0})  # 2 rounds x 3 x (20 + 30)
    300.0
    """
    t = cfg.training
    drop = set(exclude)
    return float(t.local_epochs * sum(
        sizes[k] for r in range(1, t.rounds + 1)
        for k in sample_participants(cfg.seed, r, len(sizes), t.sample_fraction, drop)))


def _shadow_models(cfg: Config, build_model: Callable[[], Any], data: FederatedData,
                   requested: set[int]) -> ShadowModels | None:
    """The seed's shadow models (trained on first use, then kept), or None without LiRA.

    They train on the pool of the clients outside every request (``requested``) for
    ``verification.shadow_epochs``, cut so that together they cost at most
    ``verification.shadow_budget`` times the retraining of those clients
    (:func:`~fedunlearn.evaluation.shadow.shadow_epochs`, :func:`retraining_sample_epochs`)."""
    v = cfg.verification
    if v.mia_shadows == 0:
        return None
    sizes = [len(c) for c in data.clients]
    pool = sum(n for k, n in enumerate(sizes) if k not in requested)
    retraining = retraining_sample_epochs(cfg, sizes, requested)
    epochs = shadow_epochs(v.shadow_epochs, num_shadows=v.mia_shadows,
                           samples=shadow_sample_size(pool, v.shadow_samples),
                           budget=v.shadow_budget * retraining,
                           batch_size=cfg.training.batch_size)
    return ShadowModels(build_model, local_training(cfg, epochs),
                        num_shadows=v.mia_shadows, seed=derive_seed(cfg.seed, 0x5AD0),
                        max_samples=v.shadow_samples,
                        threads=max(1, int(cfg.engine.num_cpus)))


def _originals(methods: list[Method], trained: Params, targets: tuple[int, ...],
               verifier: RequestVerifier, predictor: Callable[[Params], Callable],
               federated: bool) -> list[_Answer]:
    """The models before removal: the federated model, and the centralized reference's own
    model fitted on all the pooled data."""
    out = []
    if federated:
        out.append(_blank_answer(Role.ORIGINAL, "federated", targets,
                                 verifier.outputs(predictor(trained)), trained,
                                 params_hash(trained)))
    central = next((m for m in methods if m.role == Role.REFERENCE and m.setting == "centralized"),
                   None)
    if central is not None:
        params = central.method.original_params_  # type: ignore[attr-defined]
        outputs = verifier.outputs(central.method.predict_proba_original)  # type: ignore[attr-defined]
        out.append(_blank_answer(Role.ORIGINAL, "centralized", targets, outputs, params,
                                 _model_hash(params, outputs)))
    return out


def _blank_answer(method: str, setting: str, targets: tuple[int, ...], outputs: Outputs,
                  params: Params | None, model_hash: str) -> _Answer:
    row = Row(list(targets), method, setting, Role.ORIGINAL, 0.0, None, 0.0, 0, 0, 0, 0.0, 0.0,
              {}, model_hash)
    return _Answer(row, outputs, params)


@contextmanager
def _users_code(m: Method, where: str, then: str = "") -> Iterator[None]:
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


def _checked_predictor(m: Method, predict: Callable[[np.ndarray], np.ndarray],
                       classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` of a method's answer, refusing in one line probabilities that are not one
    row of ``classes`` per input."""
    def checked(x: np.ndarray) -> np.ndarray:
        with _users_code(m, "in the predict_proba it answered with"):
            proba = np.asarray(predict(x))
        if proba.shape != (len(x), classes):
            raise RequestError(f"unlearning method '{m.name}' predicted probabilities of shape "
                               f"{proba.shape} for {len(x)} inputs, not ({len(x)}, {classes}): "
                               "one row per input, one column per class")
        return proba
    return checked


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


def _answer(m: Method, result: UnlearningResult, targets: tuple[int, ...], wall: float,
            reference_wall: float | None, sent: int, exchanged: int,
            verifier: RequestVerifier, predictor: Callable[[Params], Callable]) -> _Answer:
    if result.predict_proba is not None:
        predict = _checked_predictor(m, result.predict_proba, verifier.data.num_classes)
    elif result.model is not None:
        predict = predictor(result.model)
    else:
        raise RuntimeError(f"method '{m.name}' returned neither a model nor a predictor")
    c = result.cost
    t0 = time.perf_counter()
    outputs = verifier.outputs(predict)
    arrays = (getattr(outputs, f.name) for f in dataclasses.fields(outputs))
    if not all(np.isfinite(a).all() for a in arrays if a is not None):
        raise RequestError(f"unlearning method '{m.name}' answered with a model whose "
                           "predictions are NaN or Inf (its weights overflow the forward "
                           f"pass); its parameters (unlearning.params.{base_name(m.name)}) "
                           "make it diverge: use smaller steps, or leave it out")
    accuracies = verifier.basic_accuracies(outputs)
    verify_s = time.perf_counter() - t0
    row = Row(list(targets), m.name, m.setting, m.role, wall,
              (reference_wall / wall) if reference_wall and wall > 0 else None,
              c.client_epochs, c.rounds, sent, exchanged, c.sample_epochs, c.server_epochs,
              accuracies, _model_hash(result.model, outputs), details=dict(result.details))
    return _Answer(row, outputs, result.model, verify_s)


def _model_hash(params: Params | None, outputs: Outputs) -> str:
    """Hash of the parameters; for a predictor without them (an ensemble, a linear head on
    features), hash of its test-set probabilities, a fingerprint of its behaviour."""
    return params_hash(params if params is not None else {"test_proba": outputs.test})


def _with_distances(answers: list[_Answer], verifier: RequestVerifier) -> list[Row]:
    """Fill every row's metrics, with distances to its setting's reference."""
    refs = {a.row.setting: a for a in answers if a.row.role == Role.REFERENCE}
    rows = []
    for a in answers:
        ref = refs.get(a.row.setting)
        a.row.metrics = verifier.metrics(
            a.outputs, reference=ref.outputs if ref else None, params=a.params,
            reference_params=ref.params if ref else None)
        rows.append(a.row)
    return rows


def store_files(store: HistoryStore) -> int:
    """Files under the store's directory (what a purge's ``files_removed`` counts)."""
    return sum(1 for p in store.path.rglob("*") if p.is_file())


def _say(stream: TextIO | None, text: str) -> None:
    if stream is not None:
        print(text, file=stream, flush=True)

