"""Verification as a listener of the serving loop: every answer measured against its setting's
reference, on the same verification splits, with the cost of verifying kept apart.

Per request :class:`Verification` builds a :class:`~fedunlearn.evaluation.verify.RequestVerifier`
(the forgotten, retained and test splits, the backdoor, membership inference), measures the
models before removal, each method's answer as it comes, then every row's distances to its
setting's reference. One set of shadow models is trained per seed, on a bounded sample of the
clients outside every request (so no request's members are in it), and serves every method and
request. The wall time of all this is recorded per request (:func:`entry`), apart from the
methods' own time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedunlearn.config.requests import labels
from fedunlearn.config.tree import Config
from fedunlearn.data.federated import FederatedData
from fedunlearn.data.removal import Step, forget_set, kept_set, resolve, retain_set
from fedunlearn.evaluation.schema import (
    Role,
    Row,
)
from fedunlearn.evaluation.shadow import ShadowModels, shadow_epochs, shadow_sample_size
from fedunlearn.evaluation.verify import Outputs, RequestVerifier
from fedunlearn.history.lineage import params_hash
from fedunlearn.models.params import Params
from fedunlearn.models.seeding import derive_seed, sample_participants
from fedunlearn.models.training import local_training
from fedunlearn.run.checks import Method, RequestError, base_name
from fedunlearn.run.events import MethodAnswered, RequestAnswered, RequestStarted, ServingListener
from fedunlearn.run.serving import users_code
from fedunlearn.unlearning.base import (
    UnlearningResult,
)


class Verification(ServingListener):
    """Fills the rows of the serving loop's events (see :mod:`fedunlearn.run.events`)."""

    def __init__(self, cfg: Config, *, methods: list[Method], data: FederatedData,
                 trained: Params, build_model: Callable[[], Any],
                 predictor: Callable[[Params], Callable], settings: Collection[str],
                 shadow_cache: dict[int, Any] | None = None) -> None:
        self.cfg = cfg
        self.methods = methods
        self.data = data
        self.trained = trained
        self.predictor = predictor
        self.settings = settings
        self.federated = "federated" in settings
        self.shadow_cache = {} if shadow_cache is None else shadow_cache
        self.build_model = build_model
        self.shadows: ShadowModels | None = None
        self.shadow_pool: Any = None
        self.ready = False  # the shadows and their pool are set up at the first request
        self.target_class = cfg.backdoor.target_class if cfg.backdoor.clients else None
        self.verifier: RequestVerifier | None = None
        self.step: Step | None = None
        self.answers: list[_Answer] = []
        self.verify_s = 0.0

    def _set_up(self) -> None:
        """The seed's shadow models (trained on first use) and the pool they are drawn from:
        set up once the loop's checks have passed and a request is served, not before."""
        steps = resolve(self.cfg, self.data)
        requested = {c for s in steps if s.request.granularity != "class" for c in s.targets}
        self.shadows = _shadow_models(self.cfg, self.build_model, self.data, requested)
        if self.shadows is not None:  # no sample a request removes: not a query's twin
            self.shadow_pool = (retain_set(self.data, steps[-1], exclude=requested)
                                if any(s.request.granularity == "class" for s in steps)
                                else self.data.pooled(exclude=requested))
        self.ready = True

    def request_started(self, event: RequestStarted) -> None:
        t0 = time.perf_counter()
        if not self.ready:
            self._set_up()
        v = self.cfg.verification
        # the forget set is what the request removes; the retain set what stays in
        step = self.step = event.step
        whole = step is None or all(r.granularity == "client"
                                    for r in self.cfg.requests[:event.request + 1])
        self.verifier = RequestVerifier(
            self.data, targets=event.targets, removed=event.removed,
            forget=None if whole else forget_set(self.data, step),
            retain=None if whole else retain_set(self.data, step),
            removed_label=step.request.label if step is not None else None,
            kept=kept_set(self.data, step) if step is not None
            and step.request.granularity == "samples" else None,
            match_classes=step is not None and step.request.granularity == "samples",
            target_class=self.target_class, alpha=v.alpha, shadows=self.shadows,
            seed=derive_seed(self.cfg.seed, 0x3E7, event.request),
            shadow_phi=self.shadow_cache.get(event.request), max_members=v.max_members,
            max_population=v.max_population, shadow_pool=self.shadow_pool)
        self.answers = _originals(self.methods, self.trained, event.targets, self.verifier,
                                  self.predictor, self.federated)
        self.verify_s = time.perf_counter() - t0

    def method_answered(self, event: MethodAnswered) -> None:
        assert self.verifier is not None
        answer = _answer(event.method, event.result, event.ctx.targets, event.wall_s,
                         event.reference_wall_s, event.messages_sent, event.bytes_exchanged,
                         self.verifier, self.predictor)
        if event.client_failures:  # clients dropped in this method's client work
            answer.row.details["client_failures"] = event.client_failures
        if event.fit_wall_s is not None:
            answer.row.details["fit_wall_s"] = event.fit_wall_s
        self.answers.append(answer)
        event.row = answer.row

    def request_answered(self, event: RequestAnswered) -> None:
        verifier = self.verifier
        assert verifier is not None
        t0 = time.perf_counter()
        fits = getattr(self.shadows, "fits_", 0)
        event.rows = _with_distances(self.answers, verifier)
        step = self.step
        if step is not None and step.request.granularity != "client":
            label = labels(self.cfg.requests)[event.request]
            for row in event.rows:  # what the request removes (its clients vary with the
                row.granularity = step.request.granularity  # seed for a class)
                row.removes = label
                row.request = list(step.request.clients)
        if verifier.shadow_phi is not None:
            self.shadow_cache[event.request] = verifier.shadow_phi
        verify_s = (self.verify_s + time.perf_counter() - t0
                    + sum(a.verify_s for a in self.answers))
        event.verification = entry(
            event.request, event.targets, self.settings, verify_s, verifier, self.shadows,
            trained_now=getattr(self.shadows, "fits_", 0) > fits,
            shadow_samples=self.cfg.verification.shadow_samples)


def entry(request: int, targets: tuple[int, ...], settings: Collection[str], wall_s: float,
          verifier: RequestVerifier, shadows: Any, *, trained_now: bool,
          shadow_samples: int) -> dict[str, Any]:
    """What verifying one request cost, for ``results.json``: ``request``, ``clients``,
    ``setting``, ``wall_s`` (all verification work of the request), ``shadow_s`` (of it,
    training or querying the shadows), ``shadows`` (how many), ``shadow_epochs`` (each trained,
    after the cost bound of ``verification.shadow_budget``), ``shadow_threads`` (torch threads
    they ran with), ``shadows_trained`` (false when the seed's shadows were reused),
    ``shadow_train_samples`` (per shadow) and ``sizes`` (:attr:`RequestVerifier.sizes`)."""
    sizes = verifier.sizes
    epochs = None if shadows is None else shadows.spec.epochs
    return {"request": request, "clients": list(targets), "setting": "+".join(sorted(settings)),
            "wall_s": wall_s, "shadow_s": verifier.shadow_seconds,
            "shadows": 0 if shadows is None else shadows.num_shadows,
            "shadow_epochs": epochs,
            "shadow_threads": None if shadows is None else shadows.threads,
            "shadows_trained": trained_now,
            "shadow_train_samples": 0 if shadows is None else shadow_sample_size(
                sizes["shadow_pool"], shadow_samples),
            "sizes": sizes}


@dataclass
class _Answer:
    """A row waiting for its metrics (which need the reference's outputs)."""

    row: Row
    outputs: Outputs
    params: Params | None
    verify_s: float = 0.0


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


def _checked_predictor(m: Method, predict: Callable[[np.ndarray], np.ndarray],
                       classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` of a method's answer, refusing in one line probabilities that are not one
    row of ``classes`` per input."""
    def checked(x: np.ndarray) -> np.ndarray:
        with users_code(m, "in the predict_proba it answered with"):
            proba = np.asarray(predict(x))
        if proba.shape != (len(x), classes):
            raise RequestError(f"unlearning method '{m.name}' predicted probabilities of shape "
                               f"{proba.shape} for {len(x)} inputs, not ({len(x)}, {classes}): "
                               "one row per input, one column per class")
        return proba
    return checked


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


def verification_block(requests: list[dict[str, Any]],
                       rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``results["verification"]``: the cost of verifying, apart from the methods' own.

    ``requests`` (one entry per seed, request and serving pass, see
    :attr:`fedunlearn.run.serving.Served.verification`), ``total_s`` (their sum) and
    ``retrain_s`` (the wall time of the retrainings being judged, reference rows summed over
    seeds and requests, for comparison).
    """
    return {"requests": requests, "total_s": sum(v["wall_s"] for v in requests),
            "retrain_s": sum(r["wall_s"] for r in rows if r.get("role") == Role.REFERENCE)}
