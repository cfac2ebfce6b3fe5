"""Serving removal requests: every method, in order, on the same trained run.

For each request (in config order) every method starts from the model *it* left after the
previous request (the trained model for the first one); ``retrain`` runs first and is the
reference of the speed-ups. After a request the targets' stored updates and running sums are
purged from the history store (unless ``unlearning.purge = false``), and the lineage log
records the request, each resulting model and the purge.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from fedunlearn.config import Config, ConfigError
from fedunlearn.data.federated import FederatedData
from fedunlearn.evaluation.verify import request_metrics
from fedunlearn.federation.port import Federation
from fedunlearn.history import HistoryStore
from fedunlearn.lineage import LineageLog, params_hash
from fedunlearn.params import Params
from fedunlearn.seeding import derive_seed
from fedunlearn.unlearning.base import UNLEARNERS, Unlearner, UnlearningContext, UnlearningResult

EXACT = frozenset({"retrain"})


class RequestError(ValueError):
    """A removal request that cannot be served (nothing was changed)."""


def method_order(cfg: Config) -> list[str]:
    """Configured methods with ``retrain`` first (always present: it is the reference)."""
    names = list(cfg.unlearning.methods)
    return ["retrain"] + [n for n in names if n != "retrain"]


def build_methods(cfg: Config) -> dict[str, Unlearner]:
    """Instantiate every configured method; unknown names or parameters are ConfigErrors."""
    out: dict[str, Unlearner] = {}
    for name in method_order(cfg):
        if name not in UNLEARNERS:
            raise ConfigError(f"config key 'unlearning.methods': {UNLEARNERS.unknown_message(name)}")
        factory = UNLEARNERS.get(name)
        params = cfg.unlearning.params.get(name, {})
        accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(f"config key 'unlearning.params.{name}' has unknown parameters "
                              f"{unknown}; accepted: {', '.join(accepted) or 'none'}")
        try:
            out[name] = factory(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config key 'unlearning.params.{name}': {exc}") from None
    return out


def check_requests(cfg: Config, store: HistoryStore) -> None:
    """Every target must have taken part in training and still be in the store."""
    present = set(store.clients())
    for i, request in enumerate(cfg.unlearning.requests):
        absent = sorted(set(request) - present)
        if absent:
            raise RequestError(f"request {i} asks to remove clients {absent}, which never took "
                               "part in training (or were already purged); nothing was changed")


@dataclass
class Row:
    """One line of the comparison table."""

    request: list[int]
    method: str
    setting: str
    wall_s: float
    speedup_vs_retrain: float | None
    client_epochs: float
    rounds: int
    messages_sent: int
    metrics: dict[str, float]
    model_hash: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Served:
    """Everything the requests produced."""

    rows: list[Row]
    purges: list[dict[str, Any]]


def serve_requests(cfg: Config, *, data: FederatedData, trained: Params, initial: Params,
                   store: HistoryStore, federation: Federation, lineage: LineageLog,
                   build_model: Callable[[], Any], predictor: Callable[[Params], Callable],
                   stream: TextIO | None = sys.stderr) -> Served:
    """Serve ``cfg.unlearning.requests`` with every configured method; see module docstring."""
    methods = build_methods(cfg)
    check_requests(cfg, store)
    target_class = cfg.backdoor.target_class if cfg.backdoor.clients else None
    current = {name: trained for name in methods}
    removed: frozenset[int] = frozenset()
    rows: list[Row] = []
    purges: list[dict[str, Any]] = []
    trained_hash = params_hash(trained)
    everyone = set(range(cfg.data.num_clients))
    for i, request in enumerate(cfg.unlearning.requests):
        targets = tuple(sorted(request))
        removed = removed | set(targets)
        lineage.append("request", request=i, clients=list(targets))
        metrics = request_metrics(predictor(trained), data, targets=targets, removed=removed,
                                  target_class=target_class)
        rows.append(Row(list(targets), "original", "federated", 0.0, None, 0.0, 0, 0, metrics,
                        trained_hash))
        retrain_wall = None
        for name, method in methods.items():
            ctx = UnlearningContext(cfg=cfg, targets=targets, removed=removed,
                                    model=current[name], initial=initial, history=store,
                                    federation=federation, data=data, build_model=build_model,
                                    seed=derive_seed(cfg.seed, 0xA11, i))
            sent_before = federation.messages_sent
            t0 = time.perf_counter()
            result = method.unlearn(ctx)
            wall = time.perf_counter() - t0
            sent = federation.messages_sent - sent_before
            retrain_wall = wall if name == "retrain" else retrain_wall
            rows.append(_row(name, method, result, targets, wall, retrain_wall, sent, data,
                             removed, target_class, predictor))
            if result.model is not None:
                current[name] = result.model
            lineage.append("model", kind="unlearned", method=name, request=i,
                           model_hash=rows[-1].model_hash, exact=name in EXACT,
                           derived_from=params_hash(ctx.model) if name not in EXACT else None,
                           trained_with=sorted(everyone - removed), forgot=sorted(removed))
            _say(stream, f"[unlearn] request {i} {list(targets)}  {name:<13} {wall:7.2f}s  "
                 + "  ".join(f"{k} {v:.3f}" for k, v in rows[-1].metrics.items()))
        if cfg.unlearning.purge:
            files_before = _files(store)
            freed = store.purge_clients(targets)
            purge = {"request": i, "clients": list(targets), "bytes_freed": freed,
                     "files_removed": files_before - _files(store)}
            purges.append(purge)
            lineage.append("purge", **purge)
    return Served(rows=rows, purges=purges)


def _row(name: str, method: Unlearner, result: UnlearningResult, targets: tuple[int, ...],
         wall: float, retrain_wall: float | None, sent: int, data: FederatedData,
         removed: frozenset[int], target_class: int | None,
         predictor: Callable[[Params], Callable]) -> Row:
    if result.predict_proba is not None:
        predict = result.predict_proba
    elif result.model is not None:
        predict = predictor(result.model)
    else:
        raise RuntimeError(f"method '{name}' returned neither a model nor a predictor")
    metrics = request_metrics(predict, data, targets=targets, removed=removed,
                              target_class=target_class)
    c = result.cost
    return Row(list(targets), name, getattr(method, "setting", "federated"), wall,
               (retrain_wall / wall) if retrain_wall and wall > 0 else None,
               c.client_epochs, c.rounds, sent, metrics,
               params_hash(result.model) if result.model is not None else "",
               details=result.details)


def _files(store: HistoryStore) -> int:
    return sum(1 for p in store.path.rglob("*") if p.is_file())


def _say(stream: TextIO | None, text: str) -> None:
    if stream is not None:
        print(text, file=stream, flush=True)
