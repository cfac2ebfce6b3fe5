"""What each removal request removes from the federated data, request after request.

:func:`resolve` turns ``cfg.requests`` (:mod:`fedunlearn.config.requests`) into one
:class:`Step` per request: the samples that request removes from each client (positions in the
client's data as built by :func:`~fedunlearn.data.federated.build_federated_data`), every
sample removed so far, and the clients out of the federation so far (removed whole, or left
with no sample). It is deterministic in the config and the data, so the server and every client
process resolve the same steps from the job alone; nothing but a request's position travels.

Rules (the docs: docs/running.md, "Removal requests"):

* a client request removes what the client still holds and takes it out of the federation;
* ``samples = [...]`` removes those positions; a position past the client's data or already
  removed is refused;
* ``fraction = f`` draws ``max(1, round(f * n))`` of the ``n`` samples the client still holds,
  with the request's ``seed`` or, when none is given, a seed derived from the run's seed and the
  request's position;
* ``samples = "backdoor"`` removes the client's poisoned samples still held (those carrying the
  trigger and the target label, :func:`~fedunlearn.data.backdoor.clean_samples`);
* ``label = L`` removes every sample labelled ``L`` still held by a client still in.

A request that would remove nothing is refused (:class:`RemovalError`), before any work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedunlearn.config.requests import Request
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.data.backdoor import clean_samples
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.federated import FederatedData
from fedunlearn.models.seeding import derive_seed

FRACTION_STREAM = 0x5A3
"""Seed purpose of a fraction drawn without a seed of its own (:func:`derive_seed`)."""


class RemovalError(ConfigError):
    """A request that does not fit the data (a sample position past the client's data, a label
    the data does not have, a request that would remove nothing): one line, before any work."""


@dataclass(frozen=True)
class Step:
    """One request, resolved.

    ``forget``: client -> sorted positions this request removes (clients it removes nothing
    from are absent). ``removed``: client -> boolean mask of every sample removed by this and
    the earlier requests (clients with none absent). ``gone``: the clients out of the
    federation after this request (removed whole, or left with no sample).
    """

    request: Request
    forget: Mapping[int, np.ndarray]
    removed: Mapping[int, np.ndarray] = field(repr=False)
    gone: frozenset[int]

    @property
    def targets(self) -> tuple[int, ...]:
        """The clients this request removes samples from (all of them for a client request)."""
        return tuple(sorted(self.forget))

    @property
    def partial(self) -> bool:
        """Some client still in the federation has lost samples (it trains on fewer)."""
        return any(c not in self.gone for c in self.removed)

    @property
    def num_forgotten(self) -> int:
        return int(sum(len(v) for v in self.forget.values()))


def resolve(cfg: Config, data: FederatedData) -> tuple[Step, ...]:
    """Every request of ``cfg.requests`` resolved against ``data``, in order.

    Raises
    ------
    RemovalError
        For a request that does not fit the data (see the module docstring).
    """
    removed = [np.zeros(len(d), dtype=bool) for d in data.clients]
    gone: set[int] = set()
    steps: list[Step] = []
    for i, request in enumerate(cfg.requests):
        forget = _forget(cfg, data, i, request, removed, gone)
        forget = {c: idx for c, idx in forget.items() if len(idx)}
        if not forget:
            raise RemovalError(f"config key 'unlearning.requests' entry {i} "
                               f"({request.describe()}) removes nothing: "
                               + _why_nothing(request, gone))
        for c, idx in forget.items():
            removed[c][idx] = True
        if request.granularity == "client":
            gone.update(request.clients)
        gone.update(c for c, mask in enumerate(removed) if len(mask) and mask.all())
        steps.append(Step(request=request, forget=forget,
                          removed={c: m.copy() for c, m in enumerate(removed) if m.any()},
                          gone=frozenset(gone)))
    if len(gone) >= len(data.clients):
        raise RemovalError("config key 'unlearning.requests' would leave no client with any "
                           "sample; keep at least one")
    return tuple(steps)


def forget_set(data: FederatedData, step: Step) -> ArrayDataset:
    """The samples ``step``'s request removes, pooled (clients ascending, positions ascending)."""
    parts = [data.clients[c].subset(idx) for c, idx in sorted(step.forget.items())]
    return _pool(parts, data.num_classes, "forget")


def retain_set(data: FederatedData, step: Step, exclude: frozenset[int] | set[int] = frozenset()
               ) -> ArrayDataset:
    """Every sample still in the federation after ``step``, pooled in client order (the
    clients in ``exclude`` left out too)."""
    parts = []
    for c, d in enumerate(data.clients):
        if c in step.gone or c in exclude:
            continue
        mask = step.removed.get(c)
        parts.append(d if mask is None else d.subset(np.flatnonzero(~mask)))
    return _pool(parts, data.num_classes, "retain")


def kept_set(data: FederatedData, step: Step) -> ArrayDataset:
    """What the request's clients keep after it (a sample request: the client's other
    samples), pooled in client order."""
    parts = [data.clients[c].subset(np.flatnonzero(~step.removed[c])) for c in step.targets
             if c not in step.gone]
    if not parts:
        return ArrayDataset(x=data.clients[0].x[:0], y=data.clients[0].y[:0],
                            num_classes=data.num_classes, name="kept")
    return _pool(parts, data.num_classes, "kept")


def pooled_ids(data: FederatedData, forget: Mapping[int, np.ndarray]) -> np.ndarray:
    """Positions in ``data.pooled()`` (every client, in client order) of the samples
    ``forget`` names per client: how a centralized method, holding the pooled data, finds a
    request's samples. Sorted."""
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data.clients])])
    if not forget:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([offsets[c] + np.asarray(idx, dtype=np.int64)
                           for c, idx in sorted(forget.items())])


def _pool(parts: list[ArrayDataset], num_classes: int, name: str) -> ArrayDataset:
    return ArrayDataset(x=np.concatenate([p.x for p in parts]),
                        y=np.concatenate([p.y for p in parts]), num_classes=num_classes,
                        name=name)


def retained_mask(steps: tuple[Step, ...], client: int, through: int, size: int
                  ) -> np.ndarray | None:
    """Boolean mask of the samples ``client`` keeps after the first ``through`` requests, or
    ``None`` when it keeps all of them."""
    if through <= 0:
        return None
    mask = steps[through - 1].removed.get(client)
    if mask is None:
        return None
    assert len(mask) == size
    return ~mask


def _forget(cfg: Config, data: FederatedData, i: int, request: Request,
            removed: list[np.ndarray], gone: set[int]) -> dict[int, np.ndarray]:
    if request.granularity == "client":
        return {c: np.flatnonzero(~removed[c]) for c in request.clients}
    if request.granularity == "class":
        label = request.label
        assert label is not None
        if label >= data.num_classes:
            raise RemovalError(f"config key 'unlearning.requests' entry {i}: label = {label} is "
                               f"not a class of the data (0..{data.num_classes - 1})")
        return {c: np.flatnonzero((d.y == label) & ~removed[c])
                for c, d in enumerate(data.clients) if c not in gone}
    c = request.client
    if c in gone:  # emptied by earlier sample or class requests (named whole: parse refused)
        raise RemovalError(f"config key 'unlearning.requests' entry {i} asks for samples of "
                           f"client {c}, which no longer holds any")
    held = ~removed[c]
    if request.backdoor:
        return {c: np.flatnonzero(~clean_samples(cfg, data, c) & held)}
    if request.fraction is not None:
        avail = np.flatnonzero(held)
        take = max(1, round(request.fraction * len(avail)))
        seed = request.seed if request.seed is not None else derive_seed(
            cfg.seed, FRACTION_STREAM, i)
        rng = np.random.default_rng(seed)
        return {c: np.sort(rng.choice(avail, size=take, replace=False))}
    n = len(data.clients[c])
    past = [p for p in request.indices if p >= n]  # as Python ints: no overflow
    if past:
        raise RemovalError(f"config key 'unlearning.requests' entry {i} asks for sample "
                           f"{past[0]} of client {c}, which holds {n} samples "
                           f"(positions 0..{n - 1})")
    idx = np.asarray(request.indices, dtype=np.int64)
    again = idx[~held[idx]]
    if len(again):
        raise RemovalError(f"config key 'unlearning.requests' entry {i} asks for sample "
                           f"{int(again[0])} of client {c}, already removed by an earlier "
                           "request")
    return {c: idx}


def _why_nothing(request: Request, gone: set[int]) -> str:
    if request.granularity == "class":
        return f"no client still in the federation holds class {request.label}"
    if request.backdoor:
        return "the client holds no poisoned sample (none was poisoned, or all are removed)"
    return "the client holds no sample any more"
