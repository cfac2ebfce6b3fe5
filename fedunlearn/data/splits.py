"""Carve a pool into the federated training pool, a held-out test split and a server split."""

from __future__ import annotations

import numpy as np

from fedunlearn.data.dataset import ArrayDataset


def train_test_server_split(
    ds: ArrayDataset, *, test_fraction: float, server_fraction: float, seed: int
) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    """Split ``ds`` three ways, stratified by label.

    Split sizes are ``round(fraction * len(ds))``; each split keeps the pool's order.

    Parameters
    ----------
    ds : ArrayDataset
        The whole pool.
    test_fraction : float
        Share held out for evaluation, ``> 0``.
    server_fraction : float
        Share kept by the server, ``>= 0``. It is meant to be used **unlabelled** (e.g. as
        distillation inputs); its ``y`` is kept only so that it can be evaluated, and
        methods must not train on it. ``0`` gives an empty split with the right shape.
    seed : int
        Seed of the shuffles; the same seed gives the same splits.

    Returns
    -------
    tuple of ArrayDataset
        ``(train, test, server)``: the pool to partition across clients, the test split,
        and the server split.

    Raises
    ------
    ValueError
        On fractions out of range, or when a split is too small to hold every class.
    """
    if not test_fraction > 0:
        raise ValueError(f"test_fraction must be > 0, got {test_fraction}")
    if not server_fraction >= 0:
        raise ValueError(f"server_fraction must be >= 0, got {server_fraction}")
    if not test_fraction + server_fraction < 1:
        raise ValueError(
            f"test_fraction + server_fraction must be < 1, got "
            f"{test_fraction} + {server_fraction} = {test_fraction + server_fraction}"
        )
    n = len(ds)
    n_test = max(1, round(test_fraction * n))
    n_server = round(server_fraction * n)
    if n - n_test - n_server < 1:
        raise ValueError(f"{n} samples leave nothing to train on after the test and server splits")

    positions = np.arange(n, dtype=np.int64)
    rest, test = _stratified(positions, ds.y, n_test, seed, "test")
    if n_server > 0:
        train, server = _stratified(rest, ds.y[rest], n_server, seed + 1, "server")
    else:
        train, server = rest, np.empty(0, dtype=np.int64)
    return (
        ds.subset(np.sort(train)),
        ds.subset(np.sort(test)),
        ds.subset(np.sort(server)),
    )


def _stratified(
    positions: np.ndarray, labels: np.ndarray, n_take: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``positions`` into ``(kept, taken)`` with ``n_take`` taken, stratified by label."""
    from sklearn.model_selection import train_test_split  # on use (see fedunlearn.data.cache)

    try:
        kept, taken = train_test_split(
            positions, test_size=n_take, random_state=seed, stratify=labels
        )
    except ValueError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(f"cannot stratify the {what} split ({n_take} samples): {reason}") from err
    return np.asarray(kept, dtype=np.int64), np.asarray(taken, dtype=np.int64)
