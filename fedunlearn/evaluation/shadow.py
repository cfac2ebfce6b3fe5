"""Shadow models for offline LiRA: OUT models trained on random halves of a disjoint pool.

The queries (members and non-members of the target model) must not be in ``pool_x``: every
shadow model is then an OUT model for every query, as offline LiRA (Carlini et al., S&P 2022)
requires. Scoring is in :mod:`fedunlearn.evaluation.mia`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedunlearn.evaluation.mia import logit_confidence
from fedunlearn.models import reinitialise
from fedunlearn.seeding import derive_seed
from fedunlearn.training import LocalTraining, predict_proba, train


def shadow_logit_confidences(build_model: Callable[[], torch.nn.Module], spec: LocalTraining,
                             pool_x: np.ndarray, pool_y: np.ndarray, queries_x: np.ndarray,
                             queries_y: np.ndarray, *, num_shadows: int,
                             seed: int) -> np.ndarray:
    """Logit confidences of ``num_shadows`` OUT shadow models on the queries.

    Shadow ``s`` trains a fresh ``build_model()``, re-initialised from
    ``derive_seed(seed, s, 1)``, with ``spec`` (shuffling seed ``derive_seed(seed, s, 2)``) on a
    random half of the pool drawn from ``derive_seed(seed, s)``. The global torch generator is
    left untouched, and the same arguments give the same array bit for bit.

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

    Returns
    -------
    np.ndarray
        ``phi`` of shape ``(num_shadows, n_queries)``, float64.
    """
    n = len(pool_x)
    rows = np.empty((num_shadows, len(queries_x)), dtype=np.float64)
    for s in range(num_shadows):
        rng = np.random.default_rng(derive_seed(seed, s))
        idx = np.sort(rng.permutation(n)[: n // 2])
        model = reinitialise(build_model(), derive_seed(seed, s, 1))
        train(model, pool_x[idx], pool_y[idx], spec, seed=derive_seed(seed, s, 2))
        rows[s] = logit_confidence(predict_proba(model, queries_x), queries_y)
    return rows
