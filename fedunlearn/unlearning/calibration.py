"""FedEraser's update calibration and the weight renormalisation of a replayed round.

Pure NumPy: no torch, no I/O. The calibration is the core step of FedEraser (Liu et al.,
IWQoS 2021, "FedEraser: Enabling Efficient Client-Level Data Removal from Federated Learning
Models"): a remaining client's update is rebuilt with the *magnitude* of the update it sent
during training and the *direction* of a short calibration training from the reconstructed
model, ``Ũ = ‖U‖ · Û / ‖Û‖``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedunlearn.params import Params, is_float

NORM_SCOPES = ("model", "layer")
"""Where norms are taken: over all float arrays together, or per array name."""


def _norm(arrays: Sequence[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def calibrate(stored: Mapping[str, np.ndarray], fresh: Mapping[str, np.ndarray], *,
              scope: str = "model", eps: float = 1e-12) -> Params:
    """FedEraser's calibrated update ``Ũ = ‖U‖ · Û / ‖Û‖`` (Liu et al., IWQoS 2021).

    Parameters
    ----------
    stored : mapping of str to np.ndarray
        ``U``, the client's update retained during training (gives the magnitude).
    fresh : mapping of str to np.ndarray
        ``Û``, the client's update from calibration training (gives the direction). Must hold
        the same float array names and shapes as ``stored``; non-float arrays are ignored.
    scope : {"model", "layer"}, optional
        ``"model"`` (default) takes both norms over all float arrays together, so the
        calibrated update keeps the fresh update's relative layer sizes; ``"layer"`` takes
        them per array name, so every array keeps its stored magnitude.
    eps : float, optional
        A fresh norm at or below ``eps`` (default ``1e-12``) gives a zero update: without a
        direction there is nothing to scale.

    Returns
    -------
    Params
        The calibrated update over the float arrays, as float32.

    Raises
    ------
    ValueError
        On an unknown ``scope`` or when the two updates do not hold the same float arrays.

    Examples
    --------
    >>> U = {"a": np.array([0.0, 4.0]), "b": np.array([3.0])}  # ‖U‖ = 5
    >>> fresh = {"a": np.array([0.6, 0.0]), "b": np.array([0.8])}  # ‖Û‖ = 1
    >>> {k: v.tolist() for k, v in calibrate(U, fresh).items()}
    {'a': [3.0, 0.0], 'b': [4.0]}
    >>> {k: v.tolist() for k, v in calibrate(U, fresh, scope="layer").items()}
    {'a': [4.0, 0.0], 'b': [3.0]}
    """
    if scope not in NORM_SCOPES:
        raise ValueError(f"unknown norm scope {scope!r}; known: {', '.join(NORM_SCOPES)}")
    names = [k for k, v in fresh.items() if is_float(np.asarray(v))]
    stored_names = [k for k, v in stored.items() if is_float(np.asarray(v))]
    if sorted(names) != sorted(stored_names):
        raise ValueError(f"stored and fresh updates hold different arrays ({sorted(stored_names)} "
                         f"vs {sorted(names)}); pass updates of the same model")
    u = {k: np.asarray(stored[k], np.float64) for k in names}
    d = {k: np.asarray(fresh[k], np.float64) for k in names}
    groups = [names] if scope == "model" else [[k] for k in names]
    out: Params = {}
    for group in groups:
        fresh_norm = _norm([d[k] for k in group])
        scale = _norm([u[k] for k in group]) / fresh_norm if fresh_norm > eps else 0.0
        for k in group:
            out[k] = (scale * d[k]).astype(np.float32)
    return out


def renormalised_weights(participants: Sequence[int], weights: Sequence[float],
                         keep: Callable[[int], bool]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The participants ``keep`` accepts, with their weights rescaled to sum to 1.

    FedAvg weights ``n_k / Σ_{j∈S} n_j`` renormalised over the kept participants equal
    ``n_k / Σ_{j∈S∩R} n_j``: the weights the round would have had without the others.

    Parameters
    ----------
    participants : sequence of int
        A round's participants.
    weights : sequence of float
        Their aggregation weights, aligned with ``participants``.
    keep : callable
        ``keep(k)`` is true for a participant to keep (e.g. ``lambda k: k not in removed``).

    Returns
    -------
    tuple
        ``(kept participants, their weights)``, in the given order; two empty tuples when no
        participant is kept.

    Raises
    ------
    ValueError
        If the lengths differ, or the kept participants' weights do not sum to a positive value.

    Examples
    --------
    >>> renormalised_weights([0, 1, 2], [0.5, 0.25, 0.25], keep=lambda k: k != 0)
    ((1, 2), (0.5, 0.5))
    >>> renormalised_weights([3], [1.0], keep=lambda k: k != 3)
    ((), ())
    """
    if len(participants) != len(weights):
        raise ValueError(f"{len(participants)} participants but {len(weights)} weights; "
                         "pass one weight per participant")
    pairs = [(int(k), float(w)) for k, w in zip(participants, weights, strict=True) if keep(k)]
    if not pairs:
        return (), ()
    total = sum(w for _, w in pairs)
    if not total > 0:
        raise ValueError(f"the kept participants' weights sum to {total}; they must be positive")
    return tuple(k for k, _ in pairs), tuple(w / total for _, w in pairs)
