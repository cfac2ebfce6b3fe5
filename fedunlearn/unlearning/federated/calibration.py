"""FedEraser's update calibration and the weight renormalisation of a replayed round.

Pure NumPy: no torch, no I/O. The calibration is the core step of FedEraser (Liu et al.,
IWQoS 2021, "FedEraser: Enabling Efficient Client-Level Data Removal from Federated Learning
Models"): a remaining client's update is rebuilt with the *magnitude* of the update it sent
during training and the *direction* of a short calibration training from the reconstructed
model, ``Ũ = ‖U‖ · Û / ‖Û‖``.

The replay diagnostics (:func:`calibration_stats`, :func:`weighted_mean_stats`,
:func:`summarise_replay`) describe each calibrated round with the same norms: how far the
stored step went (‖U‖), how far the fresh one went (‖Û‖), their ratio (how much calibration
stretches the fresh step) and the cosine between them (whether both point the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedunlearn.models.params import Params, is_float

NORM_SCOPES = ("model", "layer")
"""Where norms are taken: over all float arrays together, or per array name."""


def _norm(arrays: Sequence[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def calibrate(stored: Mapping[str, np.ndarray], fresh: Mapping[str, np.ndarray], *,
              scope: str = "model", eps: float = 1e-12,
              uncalibrated: Collection[str] = ()) -> Params:
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
    uncalibrated : collection of str, optional
        Array names taken from ``Û`` as they are and left out of every norm (default none).
        FedEraser passes the model's buffers: BatchNorm's running mean and variance are
        statistics measured on the reconstructed model, not optimisation steps, and a
        stretched step could turn a variance negative.

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
    >>> {k: v.tolist() for k, v in calibrate(U, fresh, uncalibrated=["b"]).items()}
    {'a': [4.0, 0.0], 'b': [0.800000011920929]}
    """
    u, d, groups = _grouped(stored, fresh, scope, uncalibrated)
    out: Params = {k: d[k].astype(np.float32) for k in d if k in uncalibrated}
    for name, stats in _stats(u, d, groups, eps).items():
        for k in groups[name]:
            out[k] = (stats.ratio * d[k]).astype(np.float32)
    return {k: out[k] for k in d}


def _grouped(stored: Mapping[str, np.ndarray], fresh: Mapping[str, np.ndarray], scope: str,
             uncalibrated: Collection[str] = (),
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[str]]]:
    """The float arrays of both updates as float64, and the norm groups of ``scope`` (without
    the ``uncalibrated`` names)."""
    if scope not in NORM_SCOPES:
        raise ValueError(f"unknown norm scope {scope!r}; known: {', '.join(NORM_SCOPES)}")
    names = [k for k, v in fresh.items() if is_float(np.asarray(v))]
    stored_names = [k for k, v in stored.items() if is_float(np.asarray(v))]
    if sorted(names) != sorted(stored_names):
        raise ValueError(f"stored and fresh updates hold different arrays ({sorted(stored_names)} "
                         f"vs {sorted(names)}); pass updates of the same model")
    u = {k: np.asarray(stored[k], np.float64) for k in names}
    d = {k: np.asarray(fresh[k], np.float64) for k in names}
    scaled = [k for k in names if k not in uncalibrated]
    groups = {"model": scaled} if scope == "model" else {k: [k] for k in scaled}
    return u, d, groups


@dataclass(frozen=True)
class CalibrationStats:
    """How a stored update ``U`` and a fresh update ``Û`` compare over one norm group.

    Attributes
    ----------
    stored_norm : float
        ``‖U‖``.
    fresh_norm : float
        ``‖Û‖``.
    ratio : float
        ``‖U‖ / ‖Û‖``: the factor :func:`calibrate` multiplies ``Û`` by (0.0 when
        ``‖Û‖ <= eps``, as :func:`calibrate` then returns a zero update).
    cosine : float
        ``⟨U, Û⟩ / (‖U‖ ‖Û‖)`` (0.0 when either norm is ``<= eps``).
    """

    stored_norm: float
    fresh_norm: float
    ratio: float
    cosine: float

    def as_dict(self) -> dict[str, float]:
        """The four values as plain floats (JSON-serialisable)."""
        return {"stored_norm": self.stored_norm, "fresh_norm": self.fresh_norm,
                "ratio": self.ratio, "cosine": self.cosine}


def calibration_stats(stored: Mapping[str, np.ndarray], fresh: Mapping[str, np.ndarray], *,
                      scope: str = "model", eps: float = 1e-12,
                      uncalibrated: Collection[str] = ()) -> dict[str, CalibrationStats]:
    """Norms, ratio and cosine of ``U`` and ``Û`` per norm group of :func:`calibrate`.

    Parameters
    ----------
    stored, fresh : mapping of str to np.ndarray
        ``U`` and ``Û`` as for :func:`calibrate` (non-float arrays are ignored).
    scope : {"model", "layer"}, optional
        ``"model"`` (default) gives one entry, ``"model"``, over all float arrays together;
        ``"layer"`` gives one entry per array name. Each entry's ``ratio`` is exactly the scale
        :func:`calibrate` applies to that group.
    eps : float, optional
        Norms at or below ``eps`` (default ``1e-12``) count as zero.
    uncalibrated : collection of str, optional
        Names left out, as in :func:`calibrate`.

    Returns
    -------
    dict of str to CalibrationStats

    Raises
    ------
    ValueError
        As :func:`calibrate`.

    Examples
    --------
    >>> U = {"a": np.array([0.0, 4.0]), "b": np.array([3.0])}  # ‖U‖ = 5
    >>> fresh = {"a": np.array([0.0, 1.0]), "b": np.array([0.0])}  # ‖Û‖ = 1, ⟨U, Û⟩ = 4
    >>> calibration_stats(U, fresh)["model"].as_dict()
    {'stored_norm': 5.0, 'fresh_norm': 1.0, 'ratio': 5.0, 'cosine': 0.8}
    >>> {k: (s.ratio, s.cosine) for k, s in calibration_stats(U, fresh, scope="layer").items()}
    {'a': (4.0, 1.0), 'b': (0.0, 0.0)}
    """
    return _stats(*_grouped(stored, fresh, scope, uncalibrated), eps)


def _stats(u: Mapping[str, np.ndarray], d: Mapping[str, np.ndarray],
           groups: Mapping[str, list[str]], eps: float) -> dict[str, CalibrationStats]:
    out: dict[str, CalibrationStats] = {}
    for name, group in groups.items():
        stored_norm = _norm([u[k] for k in group])
        fresh_norm = _norm([d[k] for k in group])
        dot = sum(float(np.sum(u[k] * d[k])) for k in group)
        both = stored_norm > eps and fresh_norm > eps
        out[name] = CalibrationStats(
            stored_norm=stored_norm, fresh_norm=fresh_norm,
            ratio=stored_norm / fresh_norm if fresh_norm > eps else 0.0,
            cosine=dot / (stored_norm * fresh_norm) if both else 0.0)
    return out


def weighted_mean_stats(stats: Sequence[CalibrationStats],
                        weights: Sequence[float]) -> CalibrationStats:
    """Each field of ``stats`` averaged with ``weights`` (e.g. a round's renormalised FedAvg
    weights, which sum to 1; they are divided by their sum either way).

    The ratio is the weighted mean of the clients' ratios, not the ratio of the mean norms.

    Raises
    ------
    ValueError
        If the lengths differ, nothing is given, or the weights do not sum to a positive value.

    Examples
    --------
    >>> a = CalibrationStats(stored_norm=2.0, fresh_norm=1.0, ratio=2.0, cosine=1.0)
    >>> b = CalibrationStats(stored_norm=1.0, fresh_norm=4.0, ratio=0.25, cosine=-0.5)
    >>> weighted_mean_stats([a, b], [0.75, 0.25]).as_dict()
    {'stored_norm': 1.75, 'fresh_norm': 1.75, 'ratio': 1.5625, 'cosine': 0.625}
    """
    if not stats or len(stats) != len(weights):
        raise ValueError(f"{len(stats)} stats but {len(weights)} weights; pass one weight per "
                         "client, at least one")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"the weights sum to {total}; they must be positive")
    w = [float(x) / total for x in weights]

    def mean(field: str) -> float:
        return float(sum(wk * getattr(s, field) for wk, s in zip(w, stats, strict=True)))

    return CalibrationStats(stored_norm=mean("stored_norm"), fresh_norm=mean("fresh_norm"),
                            ratio=mean("ratio"), cosine=mean("cosine"))


def summarise_replay(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """A replay's diagnostics in three numbers.

    Parameters
    ----------
    rounds : sequence of mapping
        Per replayed round ``{"ratio", "cosine", "test_accuracy", ...}``; ``ratio`` and
        ``cosine`` are ``None`` in rounds without a fresh step (FedAccum, FedEraser's first
        retained round), ``test_accuracy`` is ``None`` when not tracked.

    Returns
    -------
    dict
        ``calibrated_rounds`` (rounds with a fresh step), ``mean_ratio`` and ``mean_cosine``
        (plain means over those rounds of the per-round, FedAvg-weighted values; ``None``
        without any), and ``final_test_accuracy`` (of the last replayed round, or ``None``).

    Examples
    --------
    >>> summarise_replay([{"ratio": None, "cosine": None, "test_accuracy": 0.5},
    ...                   {"ratio": 2.0, "cosine": 0.5, "test_accuracy": 0.6},
    ...                   {"ratio": 4.0, "cosine": 0.25, "test_accuracy": 0.7}])
    {'calibrated_rounds': 2, 'mean_ratio': 3.0, 'mean_cosine': 0.375, 'final_test_accuracy': 0.7}
    """
    fresh = [r for r in rounds if r.get("ratio") is not None]

    def mean(key: str) -> float | None:
        return float(np.mean([float(r[key]) for r in fresh])) if fresh else None

    last = rounds[-1].get("test_accuracy") if rounds else None
    return {"calibrated_rounds": len(fresh), "mean_ratio": mean("ratio"),
            "mean_cosine": mean("cosine"),
            "final_test_accuracy": None if last is None else float(last)}


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
