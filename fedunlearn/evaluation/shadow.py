"""Shadow models for offline LiRA: OUT models trained on random halves of a disjoint pool.

The queries (members and non-members of the target model) must not be in the pool: every
shadow model is then an OUT model for every query, as offline LiRA (Carlini et al., S&P 2022)
requires. Scoring is in :mod:`fedunlearn.evaluation.mia`.

Cost. Each shadow trains on a seeded random half of the pool, cut to at most ``max_samples``
samples, so the shadows cost at most ``num_shadows × epochs × max_samples`` sample-epochs
however large the federation is; :func:`shadow_epochs` also cuts the epochs so that they cost
no more than the retraining they judge (on a short run of a costly model fixed epochs would
cost several times the retraining; docs/benchmarks.md, "Verification's cost").
:class:`ShadowModels` keeps the trained models, so one set of
shadows answers every method and every request whose queries lie outside its pool.

Threads. The shadows are small models trained in small batches; torch's intra-op threads only
add synchronisation there (one thread was several times faster than torch's default on the
shared 2-core machine; docs/benchmarks.md, "Verification's cost"), so :class:`ShadowModels`
trains with ``threads`` torch threads (:mod:`fedunlearn.run.verification` passes
``engine.num_cpus``, as each client gets) and restores the caller's setting afterwards. The
shadows train one after another: a fork-started process pool was faster
(``scripts/bench_shadow_parallel.py``), but forking the Flower driver, which runs Ray's and
gRPC's threads, is unsafe, and a spawned pool pays torch's import per worker for shadows that
take about a second each.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from fedunlearn.engine.faults import nonfinite
from fedunlearn.evaluation.mia import logit_confidence
from fedunlearn.models import reinitialise
from fedunlearn.models.params import get_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import LocalTraining, batch_bounds, predict_proba, train


class ShadowDiverged(ValueError):
    """A shadow model's training diverged: its confidences would be NaN."""


def shadow_sample(n: int, shadow: int, *, seed: int, max_samples: int | None = None) -> np.ndarray:
    """Sorted pool positions shadow ``shadow`` trains on: the first ``min(n // 2, max_samples)``
    of a permutation drawn from ``derive_seed(seed, shadow)``.

    Without a cap (or when the cap does not bind) this is the random half used before the cap
    existed, so small runs are unchanged.

    >>> shadow_sample(10, 0, seed=0).size, shadow_sample(10, 0, seed=0, max_samples=3).size
    (5, 3)
    """
    rng = np.random.default_rng(derive_seed(seed, shadow))
    return np.sort(rng.permutation(n)[:shadow_sample_size(n, max_samples)])


def shadow_sample_size(n: int, max_samples: int | None = None) -> int:
    """Samples each shadow trains on from a pool of ``n``: ``min(n // 2, max_samples)``.

    >>> shadow_sample_size(89_000, 1000), shadow_sample_size(1100, 1000)
    (1000, 550)
    """
    return n // 2 if max_samples is None else min(n // 2, max_samples)


def shadow_epochs(epochs: float, *, num_shadows: int, samples: int, budget: float,
                  batch_size: int) -> float:
    """Epochs each shadow trains: ``epochs``, cut so that all shadows together train at most
    ``budget`` sample-epochs (``num_shadows × epochs × samples ≤ budget``), and never below one
    batch of ``batch_size``, whether the cut or ``epochs`` itself asks for less (no step at
    all would leave the shadows as their random initialisation, and LiRA would compare the
    target with untrained models).

    One batch is counted as training counts it with BatchNorm, whose last batch of one sample
    joins the batch before (:func:`~fedunlearn.models.training.batch_bounds`): fewer batches, so the
    floor holds with or without it.

    The run (:mod:`fedunlearn.run.verification`) passes the retraining's sample-epochs (times
    ``verification.shadow_budget``) as ``budget``: the shadows then cost no more than the
    retraining they help to judge, and on a short run they see each sample about as often as
    the target did, which is what LiRA's shadows are meant to imitate (Carlini et al., S&P 2022, sec. IV: shadows trained "on the
    same training procedure" as the target).

    >>> shadow_epochs(20, num_shadows=4, samples=1000, budget=180_000, batch_size=32)
    20.0
    >>> shadow_epochs(20, num_shadows=2, samples=560, budget=2 * 1 * 1400, batch_size=32)
    2.5
    >>> shadow_epochs(20, num_shadows=4, samples=1000, budget=10, batch_size=100)  # one batch
    0.1
    >>> shadow_epochs(0.001, num_shadows=2, samples=17, budget=1e9, batch_size=16)  # 16 + 1
    1.0
    """
    if num_shadows <= 0 or samples <= 0:
        return float(epochs)
    one_batch = 1 / len(batch_bounds(samples, batch_size, fold_single=True))
    return float(max(min(epochs, budget / (num_shadows * samples)), one_batch))


class ShadowModels:
    """OUT shadow models trained once on a pool and queried for any examples outside it.

    Parameters
    ----------
    build_model : callable
        Returns a new, untrained model.
    spec : LocalTraining
        Training hyperparameters (use the target model's).
    num_shadows : int
    seed : int
        Shadow ``s`` draws its sample with :func:`shadow_sample` (``derive_seed(seed, s)``), is
        re-initialised from ``derive_seed(seed, s, 1)`` and shuffles with
        ``derive_seed(seed, s, 2)``; the global torch generator is left untouched.
    max_samples : int or None
        Cap on each shadow's training samples (default None: half the pool).
    threads : int or None
        Torch intra-op threads while training and querying (default None: leave the
        process's setting).

    Attributes
    ----------
    models_ : list of torch.nn.Module
    train_samples_ : int
        Samples each shadow trained on.
    pool_size_ : int
    fit_seconds_ : float
        Wall time of the last :meth:`fit`.
    fits_ : int
        How often the shadows were trained (1 once fitted: every later request reuses them).
    """

    def __init__(self, build_model: Callable[[], torch.nn.Module], spec: LocalTraining, *,
                 num_shadows: int, seed: int, max_samples: int | None = None,
                 threads: int | None = None) -> None:
        self.build_model = build_model
        self.spec = spec
        self.num_shadows = num_shadows
        self.seed = seed
        self.max_samples = max_samples
        self.threads = threads

    def fit(self, pool_x: np.ndarray, pool_y: np.ndarray) -> ShadowModels:
        """Train every shadow on its sample of the pool."""
        t0 = time.perf_counter()
        n = len(pool_x)
        self.models_ = []
        self.train_samples_ = 0
        with torch_threads(self.threads):
            for s in range(self.num_shadows):
                idx = shadow_sample(n, s, seed=self.seed, max_samples=self.max_samples)
                model = reinitialise(self.build_model(), derive_seed(self.seed, s, 1))
                train(model, pool_x[idx], pool_y[idx], self.spec,
                      seed=derive_seed(self.seed, s, 2))
                if nonfinite(get_params(model)):
                    raise ShadowDiverged(
                        f"verification: shadow model {s} diverged (NaN or Inf weights) when "
                        "trained with the run's local training settings; lower "
                        "training.learning_rate, or set verification.mia_shadows = 0 to "
                        "measure membership without shadow models")
                self.models_.append(model)
                self.train_samples_ = len(idx)
        self.pool_size_ = n
        self.fingerprint_ = pool_fingerprint(pool_x, pool_y)
        self.fit_seconds_ = time.perf_counter() - t0
        self.fits_ = getattr(self, "fits_", 0) + 1
        return self

    def confidences(self, queries_x: np.ndarray, queries_y: np.ndarray) -> np.ndarray:
        """``phi`` of every shadow on the queries, shape ``(num_shadows, n_queries)``, float64."""
        rows = np.empty((len(self.models_), len(queries_x)), dtype=np.float64)
        with torch_threads(self.threads):
            for s, model in enumerate(self.models_):
                rows[s] = logit_confidence(predict_proba(model, queries_x), queries_y)
        return rows

    def __call__(self, pool_x: np.ndarray, pool_y: np.ndarray, queries_x: np.ndarray,
                 queries_y: np.ndarray) -> np.ndarray:
        """The :data:`~fedunlearn.evaluation.verify.ShadowFn` protocol: (re)fit only when the
        pool differs from the one the shadows were trained on, then answer the queries."""
        if getattr(self, "fingerprint_", None) != pool_fingerprint(pool_x, pool_y):
            self.fit(pool_x, pool_y)
        return self.confidences(queries_x, queries_y)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: unchanged), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pool_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """A hash of a pool's shape and contents (tells whether shadows can be reused)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (x, y):
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shadow_logit_confidences(build_model: Callable[[], torch.nn.Module], spec: LocalTraining,
                             pool_x: np.ndarray, pool_y: np.ndarray, queries_x: np.ndarray,
                             queries_y: np.ndarray, *, num_shadows: int, seed: int,
                             max_samples: int | None = None) -> np.ndarray:
    """Logit confidences of ``num_shadows`` OUT shadow models on the queries.

    Shadow ``s`` trains a fresh ``build_model()``, re-initialised from
    ``derive_seed(seed, s, 1)``, with ``spec`` (shuffling seed ``derive_seed(seed, s, 2)``) on
    :func:`shadow_sample` of the pool (a random half, at most ``max_samples``). The global
    torch generator is left untouched, and the same arguments give the same array bit for bit.

    Parameters
    ----------
    build_model : callable
        Returns a new, untrained model.
    spec : LocalTraining
        Training hyperparameters (use the target model's).
    pool_x, pool_y : np.ndarray
        Data the shadows are trained on, disjoint from the queries.
    queries_x, queries_y : np.ndarray
        Examples whose membership is tested.
    num_shadows : int
    seed : int
    max_samples : int or None
        Cap on each shadow's training samples (default None: half the pool).

    Returns
    -------
    np.ndarray
        ``phi`` of shape ``(num_shadows, n_queries)``, float64.
    """
    shadows = ShadowModels(build_model, spec, num_shadows=num_shadows, seed=seed,
                           max_samples=max_samples)
    return shadows.fit(pool_x, pool_y).confidences(queries_x, queries_y)
