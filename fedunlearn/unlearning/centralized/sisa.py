"""SISA training: sharded, isolated, sliced and aggregated, so removal retrains one shard.

Bourtoule et al., IEEE S&P 2021, "Machine Unlearning". The data is split into ``S`` disjoint
shards and each shard trains its own model, in isolation. A shard is cut into ``R`` slices;
slice ``i`` continues from the checkpoint after slice ``i - 1`` and trains on slices ``1..i``
together for ``e' = 2e / (R + 1)`` epochs, so that the whole schedule costs what one plain run of
``e`` epochs costs (``Σ_i (i n / R) e' = n e``). Removing a point retrains only its shard, from
the checkpoint before the point's slice; prediction aggregates the shard models by majority vote
or by the mean of their probabilities. The unlearned ensemble equals, bit for bit under the same
seeds, an ensemble trained without the removed points.

Here checkpoints are content-addressed: a checkpoint's key hashes everything its weights depend
on (shard, slice, the retained ids of slices ``1..i``, data, architecture, training spec,
seed), so a shard is (re)built by walking its slices and training only where no checkpoint has
that key. An unchanged prefix of slices is reused without any bookkeeping.

:class:`SisaEnsemble` is the algorithm on plain arrays; :class:`Sisa` serves the centralized
removal requests of an experiment with it, on the pooled data of all clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.config.tree import Config
from fedunlearn.data.federated import FederatedData
from fedunlearn.data.removal import pooled_ids
from fedunlearn.models import reinitialise
from fedunlearn.models.params import Params, get_params, num_bytes, set_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import (
    LocalTraining,
    device_for,
    local_training,
    predict_proba,
    train,
)
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    CentralizedUnlearner,
    Cost,
    Setting,
    UnlearningContext,
    UnlearningResult,
)

AGGREGATES = ("vote", "mean")
SHARD_BY = ("client", "random")

_RANDOM_SHARDS = 0x5A4D
"""Seed purpose of the permutation of sample ids into shards."""
_GROUP_SHARDS = 0x6409
"""Seed purpose of the permutation of groups (clients) into shards."""
_SLICES = 0x511C
"""Seed purpose of the permutation of a shard's ids into slices."""
_SISA_SEED = 0x515A
"""Mixed into the experiment seed to seed :class:`Sisa`."""


# --- pure helpers -------------------------------------------------------------------------


def _check_layout(shards: int, slices: int, epochs: float, aggregate: str) -> None:
    """Validate the ensemble's layout (one-line ValueErrors)."""
    if int(shards) != shards or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards}")
    if int(slices) != slices or slices < 1:
        raise ValueError(f"slices must be an integer >= 1, got {slices}")
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}; got "
                         f"{aggregate!r}")


def slice_epochs(epochs: float, slices: int) -> float:
    """Epochs of each slice, ``e' = 2e / (R + 1)``, so the schedule costs one plain run.

    >>> slice_epochs(20.0, 4)
    8.0
    """
    return 2.0 * epochs / (slices + 1)


def assign_shards(ids: np.ndarray, shards: int, seed: int,
                  groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Split sample ids into ``shards`` disjoint sorted arrays (a function of the ids only).

    Parameters
    ----------
    ids : np.ndarray
        Unique integer sample ids, in any order.
    shards : int
        Number of shards ``S``.
    seed : int
        Seed of the permutation.
    groups : np.ndarray, optional
        Group (e.g. client) of each sample, aligned with ``ids``. When given, whole groups are
        dealt to shards: the sorted group ids are permuted with ``seed`` and the group at
        position ``j`` goes to shard ``j mod S``. Otherwise the sorted ids are permuted and cut
        into ``S`` near-equal contiguous chunks.

    Returns
    -------
    list of np.ndarray
        The ids of shard ``s`` at index ``s``, sorted (possibly empty).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if groups is None:
        order = np.sort(ids)
        perm = np.random.default_rng(derive_seed(seed, _RANDOM_SHARDS)).permutation(len(order))
        return [np.sort(chunk) for chunk in np.array_split(order[perm], shards)]
    groups = np.asarray(groups, dtype=np.int64)
    unique = np.unique(groups)
    perm = np.random.default_rng(derive_seed(seed, _GROUP_SHARDS)).permutation(len(unique))
    shard_of_group = np.empty(len(unique), dtype=np.int64)
    shard_of_group[perm] = np.arange(len(unique)) % shards
    shard_of_sample = shard_of_group[np.searchsorted(unique, groups)]
    return [np.sort(ids[shard_of_sample == s]) for s in range(shards)]


def assign_slices(shard_ids: np.ndarray, slices: int, seed: int, shard: int) -> list[np.ndarray]:
    """Cut a shard's ids into ``slices`` sorted chunks by a permutation seeded per shard."""
    order = np.sort(np.asarray(shard_ids, dtype=np.int64))
    perm = np.random.default_rng(derive_seed(seed, _SLICES, shard)).permutation(len(order))
    return [np.sort(chunk) for chunk in np.array_split(order[perm], slices)]


def aggregate_probabilities(probs: Sequence[np.ndarray], how: str) -> np.ndarray:
    """Combine the shard models' class probabilities, each ``(N, C)``.

    ``"mean"`` averages them. ``"vote"`` gives each model one vote for its argmax class
    (ties toward the lower class index) and returns the share of votes per class, so that the
    argmax of the result is the majority vote (again with ties toward the lower class index).

    >>> p1 = np.array([[0.6, 0.4]]); p2 = np.array([[0.1, 0.9]])
    >>> aggregate_probabilities([p1, p2], "vote").tolist()
    [[0.5, 0.5]]
    >>> aggregate_probabilities([p1, p2], "mean").tolist()
    [[0.35, 0.65]]
    """
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}; got {how!r}")
    if not probs:
        raise ValueError("no shard model to aggregate (every shard is empty)")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    if how == "mean":
        return stacked.mean(axis=0)
    num_classes = stacked.shape[2]
    votes = np.eye(num_classes)[stacked.argmax(axis=2)]
    return votes.sum(axis=0) / len(probs)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _ids_bytes(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def _short(ids: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)} ids)"


# --- the ensemble -------------------------------------------------------------------------


class SisaEnsemble:
    """A SISA ensemble over samples with stable integer ids.

    Parameters
    ----------
    build_model : callable
        ``build_model()`` returns a fresh ``torch.nn.Module``; each shard's initial weights are
        redrawn from the seed (``reset_parameters`` of every submodule, under
        ``torch.manual_seed(derive_seed(seed, s))``).
    spec : LocalTraining
        Batch size, optimizer, learning rate and so on; its ``epochs`` is replaced by ``e'``.
    shards : int
        Number of shards ``S`` (>= 1).
    slices : int
        Slices per shard ``R`` (>= 1).
    epochs : float
        Epochs ``e`` of the plain run whose cost the schedule matches; each slice trains
        ``e' = 2e / (R + 1)`` epochs.
    aggregate : str, optional
        ``"vote"`` (default, majority vote) or ``"mean"`` (mean of probabilities).
    seed : int
        Seeds sharding, slicing, initial weights (``derive_seed(seed, s)``) and the shuffles of
        slice ``i`` of shard ``s`` (``derive_seed(seed, s, i)``; shards from 0, slices from 1).
    checkpoint_dir : str or Path, optional
        Also keep checkpoints there as ``<key>.npz`` (no pickle) and look them up there.
    device : str, optional
        Torch device of training and prediction (default ``"cpu"``).

    Notes
    -----
    A shard left without samples (all removed, or no group dealt to it) keeps no model and is
    skipped in prediction; :meth:`shard_params` gives ``None`` for it. Checkpoints that no
    longer lie on a shard's current path (they saw removed samples) are deleted.
    """

    def __init__(self, build_model: Callable[[], nn.Module], spec: LocalTraining, *,
                 shards: int, slices: int, epochs: float, aggregate: str = "vote", seed: int,
                 checkpoint_dir: str | Path | None = None, device: str = "cpu") -> None:
        _check_layout(shards, slices, epochs, aggregate)
        self.build_model = build_model
        self.shards = int(shards)
        self.slices = int(slices)
        self.epochs = float(epochs)
        self.aggregate = aggregate
        self.seed = int(seed)
        self.slice_epochs_ = slice_epochs(self.epochs, self.slices)
        self.spec = dataclasses.replace(spec, epochs=self.slice_epochs_)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.device = device
        self.store_: dict[str, Params] = {}
        self._model: nn.Module | None = None

    # fitting -------------------------------------------------------------------------------

    def fit(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray,
            groups: np.ndarray | None = None, exclude: Iterable[int] = ()) -> SisaEnsemble:
        """Assign ids to shards and slices, drop ``exclude``, train every shard.

        Parameters
        ----------
        x, y : np.ndarray
            Inputs and labels, aligned with ``ids``.
        ids : np.ndarray
            Unique integer ids of the samples; the assignment depends on the id set (and on
            ``groups``), not on the order of the arrays.
        groups : np.ndarray, optional
            Group of each sample: shard by group (each group in one shard) instead of randomly.
        exclude : iterable of int
            Ids left out *after* the assignment, so that the result equals fitting on all ids
            and then :meth:`remove`-ing these.

        Returns
        -------
        SisaEnsemble
            ``self``, with ``assignment_`` (id -> (shard, slice from 1)) and ``fit_stats_``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        self._check_arrays(x, y, ids, groups)
        self._x, self._y = x, y
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._context = self._context_digest(x, y, ids)
        self.slices_ = [assign_slices(shard, self.slices, self.seed, s)
                        for s, shard in enumerate(assign_shards(ids, self.shards, self.seed,
                                                                groups))]
        self.assignment_ = {int(i): (s, r + 1) for s, cut in enumerate(self.slices_)
                            for r, part in enumerate(cut) for i in part}
        drop = self._known(exclude)
        self.slices_ = [[np.setdiff1d(part, drop) for part in cut] for cut in self.slices_]
        self._paths: list[list[str]] = [[] for _ in range(self.shards)]
        self._final: list[Params | None] = [None] * self.shards
        self.fit_stats_ = self._rebuild(range(self.shards))
        return self

    def remove(self, ids: Iterable[int]) -> dict[str, float]:
        """Forget ``ids``: retrain exactly the shards that held them, reusing unchanged slices.

        Returns
        -------
        dict
            ``shards_retrained`` (shards that held a removed id), ``slices_retrained`` and
            ``slices_reused`` (checkpoints computed / found in the store, over all shards),
            ``sample_epochs`` (Σ over trained slices of #samples in slices 1..i times ``e'``).

        Raises
        ------
        ValueError
            If an id is not in the ensemble (never fitted, or already removed).
        """
        drop = self._known(ids)
        touched = sorted({self.assignment_[int(i)][0] for i in drop})
        for s in touched:
            self.slices_[s] = [np.setdiff1d(part, drop) for part in self.slices_[s]]
        return {"shards_retrained": len(touched), **self._rebuild(range(self.shards))}

    # prediction and state ------------------------------------------------------------------

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Aggregated class probabilities of the current shard models, ``(N, C)``."""
        return self.predictor()(x)

    def predictor(self) -> Callable[[np.ndarray], np.ndarray]:
        """``predict_proba`` bound to the current shard models (later removals do not change it;
        checkpoints are never modified in place)."""
        params = [p for p in self._final if p is not None]
        model = self._template()
        how, dev = self.aggregate, self.device

        def predict(x: np.ndarray) -> np.ndarray:
            probs = []
            for p in params:
                set_params(model, p)
                probs.append(predict_proba(model, x, device=dev))
            return aggregate_probabilities(probs, how)

        return predict

    def shard_params(self) -> list[Params | None]:
        """Each shard's final checkpoint (the stored arrays themselves: read-only), ``None`` for
        an empty shard."""
        return list(self._final)

    def retained_ids(self) -> np.ndarray:
        """The sorted ids the ensemble currently learns from."""
        parts = [part for cut in self.slices_ for part in cut]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def checkpoint_bytes(self) -> int:
        """Bytes held by the stored checkpoints (all slices of all shards)."""
        return int(sum(num_bytes(p) for p in self.store_.values()))

    # internals -----------------------------------------------------------------------------

    @staticmethod
    def _check_arrays(x: np.ndarray, y: np.ndarray, ids: np.ndarray,
                      groups: np.ndarray | None) -> None:
        if not len(x) == len(y) == len(ids):
            raise ValueError(f"x, y and ids must align; got {len(x)}, {len(y)}, {len(ids)}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("sample ids must be unique")
        if groups is not None and len(groups) != len(ids):
            raise ValueError(f"groups must align with ids; got {len(groups)} for {len(ids)}")

    def _known(self, ids: Iterable[int]) -> np.ndarray:
        """``ids`` as a sorted unique array; raise if one is not currently retained."""
        wanted = np.unique(np.fromiter((int(i) for i in ids), dtype=np.int64))
        retained = self.retained_ids()
        missing = wanted[~np.isin(wanted, retained)]
        if len(missing):
            raise ValueError(f"cannot remove ids {_short(missing.tolist())}: not in the "
                             "ensemble (unknown or already removed)")
        return wanted

    def _template(self) -> nn.Module:
        if self._model is None:
            self._model = self.build_model()
        return self._model

    def _context_digest(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> bytes:
        """What every checkpoint depends on besides its shard and ids."""
        arch = [(k, v.shape, str(v.dtype)) for k, v in get_params(self._template()).items()]
        return bytes.fromhex(_digest(
            _ids_bytes(ids), np.ascontiguousarray(x).tobytes(),
            np.ascontiguousarray(y).tobytes(), repr(arch).encode(), repr(self.spec).encode(),
            repr((self.seed, self.device)).encode()))

    def _key(self, shard: int, upto: int) -> str:
        parts = [_ids_bytes(p) for p in self.slices_[shard][:upto]]
        return _digest(b"sisa-checkpoint-v1", self._context, repr((shard, upto)).encode(),
                       *parts)

    def _rebuild(self, shards: Iterable[int]) -> dict[str, float]:
        """Walk the given shards' slices; train where the store misses."""
        total = {"slices_retrained": 0, "slices_reused": 0, "sample_epochs": 0.0}
        for s in shards:
            for name, value in self._walk(s).items():
                total[name] += value
        return total

    def _walk(self, shard: int) -> dict[str, float]:
        stats = {"slices_retrained": 0, "slices_reused": 0, "sample_epochs": 0.0}
        keys: list[str] = []
        prev: Params | None = None
        if sum(len(p) for p in self.slices_[shard]):
            for i in range(1, self.slices + 1):
                key = self._key(shard, i)
                ckpt = self._lookup(key)
                if ckpt is None:
                    ckpt, n = self._train_slice(shard, i, prev)
                    self._save(key, ckpt)
                    stats["slices_retrained"] += 1
                    stats["sample_epochs"] += n * self.slice_epochs_
                else:
                    stats["slices_reused"] += 1
                keys.append(key)
                prev = ckpt
        self._forget_stale(self._paths[shard], keys)
        self._paths[shard] = keys
        self._final[shard] = prev
        return stats

    def _train_slice(self, shard: int, upto: int, start: Params | None) -> tuple[Params, int]:
        """Train slice ``upto`` of ``shard`` from ``start`` (a fresh model when ``None``) on
        slices ``1..upto``, ordered by id; return the checkpoint and the number of samples."""
        model = self.build_model()
        if start is None:
            reinitialise(model, derive_seed(self.seed, shard))
        else:
            set_params(model, start)
        ids = np.sort(np.concatenate(self.slices_[shard][:upto]))
        rows = self._order[np.searchsorted(self._sorted_ids, ids)]
        train(model, self._x[rows], self._y[rows], self.spec,
              seed=derive_seed(self.seed, shard, upto), device=self.device)
        return get_params(model), len(ids)

    def _path(self, key: str) -> Path | None:
        return self.checkpoint_dir / f"{key}.npz" if self.checkpoint_dir else None

    def _lookup(self, key: str) -> Params | None:
        if key in self.store_:
            return self.store_[key]
        path = self._path(key)
        if path is None or not path.exists():
            return None
        order = list(get_params(self._template()))
        with np.load(path, allow_pickle=False) as f:
            self.store_[key] = {k: f[k] for k in order}
        return self.store_[key]

    def _save(self, key: str, params: Params) -> None:
        self.store_[key] = params
        path = self._path(key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                np.savez(f, **params)

    def _forget_stale(self, old: list[str], new: list[str]) -> None:
        """Delete the checkpoints of an old path that the new one does not reuse."""
        for key in set(old) - set(new):
            self.store_.pop(key, None)
            path = self._path(key)
            if path is not None:
                path.unlink(missing_ok=True)


# --- the registered method ----------------------------------------------------------------


def pooled_clients(data: FederatedData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All clients' training data in client order: ``(x, y, client of each sample)``.

    A sample's id is its position, so client ``k`` holds the ids ``offset_k .. offset_k +
    n_k - 1``.
    """
    pooled = data.pooled()
    return pooled.x, pooled.y, data.owners()


@UNLEARNERS.register("sisa")
class Sisa(CentralizedUnlearner):
    """SISA on the pooled data of all clients (centralized).

    Parameters
    ----------
    shards : int, optional
        Number of shards ``S`` (default 5).
    slices : int, optional
        Slices per shard ``R`` (default 4).
    epochs : float, optional
        Epochs of the plain run the schedule matches in cost (default 20.0); each slice trains
        ``2e / (R + 1)`` epochs.
    shard_by : str, optional
        ``"client"`` (default: each client's samples lie in one shard, clients dealt to shards
        at random) or ``"random"`` (samples dealt at random).
    aggregate : str, optional
        ``"vote"`` (default, majority vote) or ``"mean"`` (mean of probabilities).
    learning_rate : float, optional
        Defaults to ``training.learning_rate``; batch size, optimizer and momentum are always
        the experiment's.
    """

    setting: ClassVar[Setting] = "centralized"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True, checks_config=True, granularities=frozenset(GRANULARITIES))
    """Exact: the ensemble equals one trained without the removed ids."""

    def __init__(self, shards: int = 5, slices: int = 4, epochs: float = 20.0,
                 shard_by: str = "client", aggregate: str = "vote",
                 learning_rate: float | None = None) -> None:
        self.shards = shards
        self.slices = slices
        self.epochs = epochs
        self.shard_by = shard_by
        self.aggregate = aggregate
        self.learning_rate = learning_rate

    def check(self) -> None:
        _check_layout(self.shards, self.slices, self.epochs, self.aggregate)
        if self.shard_by not in SHARD_BY:
            raise ValueError(f"shard_by must be one of {', '.join(SHARD_BY)}; "
                             f"got {self.shard_by!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 or None, got {self.learning_rate}")

    def check_config(self, cfg: Config) -> None:
        """Sharded by client, each shard holds whole clients: no more shards than clients."""
        if self.shard_by == "client" and self.shards > cfg.data.num_clients:
            raise ValueError(f"{self.shards} shards by client need at least as many clients; "
                             f"data.num_clients is {cfg.data.num_clients}: lower shards")

    def fit(self, ctx: UnlearningContext) -> Sisa:
        """Fit the ensemble on every client's data (ids are positions in the pooled data)."""
        x, y, groups = pooled_clients(ctx.data)
        spec = local_training(ctx.cfg, self.epochs, learning_rate=self.learning_rate)
        self.ensemble_ = SisaEnsemble(
            ctx.build_model, spec, shards=self.shards, slices=self.slices, epochs=self.epochs,
            aggregate=self.aggregate, seed=derive_seed(ctx.cfg.seed, _SISA_SEED),
            device=device_for(ctx.cfg))
        self.ensemble_.fit(x, y, np.arange(len(y)),
                           groups=groups if self.shard_by == "client" else None)
        self.client_ids_ = [np.flatnonzero(groups == k) for k in range(len(ctx.data.clients))]
        self.original_ = self.ensemble_.predictor()
        self.original_params_ = None  # an ensemble: its predictions identify it
        return self

    def predict_proba_original(self, x: np.ndarray) -> np.ndarray:
        """Predictions of the ensemble as fitted, before any removal."""
        return self.original_(x)

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Remove the request's samples (a client's, some of a client's, a class's): retrain
        the shards holding them from the last unaffected slice."""
        if not hasattr(self, "ensemble_"):
            raise RuntimeError("Sisa.unlearn called before fit(ctx)")
        if ctx.removal is not None:  # what this request removes, as positions in the pool
            ids = pooled_ids(ctx.data, ctx.removal.forget)
        else:
            ids = np.concatenate([self.client_ids_[k] for k in ctx.targets]) if ctx.targets \
                else np.zeros(0, np.int64)
        stats = self.ensemble_.remove(ids)
        details: dict[str, Any] = {
            **stats, "shards": self.ensemble_.shards, "slices": self.ensemble_.slices,
            "shard_by": self.shard_by, "slice_epochs": self.ensemble_.slice_epochs_,
            "checkpoint_bytes": self.ensemble_.checkpoint_bytes()}
        return UnlearningResult(predict_proba=self.ensemble_.predictor(), model=None,
                                cost=Cost(sample_epochs=stats["sample_epochs"]),
                                details=details)


@UNLEARNERS.register("sisa_random")
class SisaRandom(Sisa):
    """:class:`Sisa` with random sharding by default (the name ``fedunlearn compare`` uses).

    Parameters are those of :class:`Sisa`; ``shard_by`` defaults to ``"random"``.
    """

    def __init__(self, shards: int = 5, slices: int = 4, epochs: float = 20.0,
                 shard_by: str = "random", aggregate: str = "vote",
                 learning_rate: float | None = None) -> None:
        super().__init__(shards=shards, slices=slices, epochs=epochs, shard_by=shard_by,
                         aggregate=aggregate, learning_rate=learning_rate)

    def check(self) -> None:
        super().check()
        if self.shard_by != "random":
            raise ValueError(f"sisa_random shards at random (shard_by = {self.shard_by!r} would "
                             "make it a copy of sisa); list sisa for sharding by client")
