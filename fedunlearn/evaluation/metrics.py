"""Pure metric functions on predicted probabilities."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose arg-max class equals the label (NaN on empty input).

    >>> accuracy(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]))
    0.5
    """
    if len(y) == 0:
        return float("nan")
    return float(np.mean(proba.argmax(axis=1) == y))


def attack_success_rate(proba: np.ndarray, target_class: int) -> float:
    """Backdoor attack success: share of triggered inputs classified as ``target_class``.

    The inputs must all be of true classes other than the target (see
    :func:`fedunlearn.data.backdoor.triggered_test_set`).

    >>> attack_success_rate(np.array([[0.1, 0.9], [0.8, 0.2]]), 1)
    0.5
    """
    if len(proba) == 0:
        return float("nan")
    return float(np.mean(proba.argmax(axis=1) == target_class))


def sape(a: float, b: float) -> float:
    """Symmetric absolute percentage error ``|a - b| / (|a| + |b|) * 100`` (0 when both are 0).

    >>> round(sape(0.9, 0.6), 9)
    20.0
    """
    denom = abs(a) + abs(b)
    return 0.0 if denom == 0 else abs(a - b) / denom * 100.0


def kl_divergence(p_ref: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over rows of ``KL(p_ref || p) = sum_c p_ref[c] * (ln p_ref[c] - ln p[c])``.

    The direction matters: for unlearning verification call it as
    ``kl_divergence(p_retrain, p_unlearned)``, i.e. KL(p_retrain ‖ p_unlearned) with the
    retrained model as the reference distribution.

    Parameters
    ----------
    p_ref : np.ndarray
        Reference class probabilities, shape ``(N, C)``.
    p : np.ndarray
        Compared class probabilities, shape ``(N, C)``.
    eps : float
        Both arrays are clipped to ``[eps, 1]`` before taking logs; classes with
        ``p_ref[c] == 0`` contribute 0.

    Returns
    -------
    float
        The mean KL in nats (NaN for 0 rows). A row's KL is at least 0: float32 softmax rows
        that do not sum exactly to 1 can give a sum of about -1e-8, which is rounding, not
        information, and is read as 0.

    >>> round(kl_divergence(np.array([[0.5, 0.5]]), np.array([[0.25, 0.75]])), 6)
    0.143841
    >>> kl_divergence(np.array([[0.3, 0.7]]), np.array([[0.3, 0.70000005]]))
    0.0
    """
    p_ref = np.asarray(p_ref, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if len(p_ref) == 0:
        return float("nan")
    log_ratio = np.log(np.clip(p_ref, eps, 1.0)) - np.log(np.clip(p, eps, 1.0))
    terms = np.where(p_ref == 0, 0.0, p_ref * log_ratio)
    return float(np.mean(np.maximum(terms.sum(axis=1), 0.0)))


def prediction_difference(p_a: np.ndarray, p_b: np.ndarray) -> float:
    """Mean over rows of the L2 norm ``||p_a - p_b||_2`` (NaN for 0 rows).

    >>> round(prediction_difference(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])), 6)
    1.414214
    """
    p_a = np.asarray(p_a, dtype=np.float64)
    p_b = np.asarray(p_b, dtype=np.float64)
    if len(p_a) == 0:
        return float("nan")
    return float(np.mean(np.linalg.norm(p_a - p_b, axis=1)))


def param_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Euclidean distance between two parameter mappings, in float64.

    Only floating-point arrays enter the sum (integer buffers such as batch-norm counters are
    skipped).

    Raises
    ------
    ValueError
        If the key sets or the shape of an array differ.

    >>> param_distance({"w": np.array([0.0, 3.0])}, {"w": np.array([4.0, 0.0])})
    5.0
    """
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"param_distance: key sets differ (keys in only one side: {diff})")
    total = 0.0
    for key in a:
        xa, xb = np.asarray(a[key]), np.asarray(b[key])
        if xa.shape != xb.shape:
            raise ValueError(f"param_distance: shape of {key!r} differs: {xa.shape} vs {xb.shape}")
        if not (np.issubdtype(xa.dtype, np.floating) and np.issubdtype(xb.dtype, np.floating)):
            continue
        total += float(np.sum((xa.astype(np.float64) - xb.astype(np.float64)) ** 2))
    return math.sqrt(total)


def binomial_p_value(successes: int, trials: int, p0: float) -> float:
    """One-sided exact binomial test ``P(X >= successes)`` for ``X ~ Binomial(trials, p0)``.

    H0: success rate ≤ ``p0`` against H1: rate > ``p0``.

    >>> binomial_p_value(3, 3, 0.5)
    0.125
    """
    from scipy.stats import binomtest  # slow to import (docs/benchmarks.md): only when used

    return float(binomtest(int(successes), int(trials), p0, alternative="greater").pvalue)


def backdoor_test(asr: float, trials: int, num_classes: int,
                  alpha: float = 0.01) -> dict[str, float | bool]:
    """Is the backdoor trigger still active after unlearning?

    The trigger counts as *active* when the attack success rate is significantly above the
    chance rate ``1/K`` (``K = num_classes``) under a one-sided exact binomial test at level
    ``alpha``, with ``round(asr * trials)`` successes out of ``trials`` triggered inputs.

    Returns
    -------
    dict
        ``{"backdoor_p_value": p, "backdoor_trigger_active": p < alpha}``.
    """
    successes = round(asr * trials)
    p = binomial_p_value(successes, trials, 1.0 / num_classes)
    return {"backdoor_p_value": p, "backdoor_trigger_active": bool(p < alpha)}


def mcnemar_exact_p(b: int, c: int) -> float:
    """McNemar's exact test: two-sided binomial p-value of ``b`` successes in ``b + c`` trials
    at rate 1/2 (1 when ``b + c = 0``).

    ``b`` and ``c`` are the discordant pairs of two paired binary outcomes (only the first is a
    success, only the second is); concordant pairs carry no information on the difference.

    >>> mcnemar_exact_p(8, 0)
    0.0078125
    >>> mcnemar_exact_p(0, 0)
    1.0
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact_p: counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def paired_backdoor_test(proba: np.ndarray, reference_proba: np.ndarray,
                         target_class: int) -> dict[str, Any]:
    """ASR of a model against the reference's on the *same* triggered inputs (McNemar).

    Each triggered input is a pair of outcomes "predicted as ``target_class``": ``b`` counts
    the inputs only the model sends to the target, ``c`` those only the reference does.

    Returns
    -------
    dict
        ``{"backdoor_asr_vs_retrain_p": mcnemar_exact_p(b, c), "backdoor_discordant": [b, c]}``.

    >>> paired_backdoor_test(np.array([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]),
    ...                      np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]]), 1)
    {'backdoor_asr_vs_retrain_p': 1.0, 'backdoor_discordant': [1, 0]}
    """
    if len(proba) != len(reference_proba):
        raise ValueError(f"paired_backdoor_test: {len(proba)} and {len(reference_proba)} "
                         "predictions; the pairs must be the same triggered inputs")
    hit = np.asarray(proba).argmax(axis=1) == target_class
    ref_hit = np.asarray(reference_proba).argmax(axis=1) == target_class
    b, c = int(np.sum(hit & ~ref_hit)), int(np.sum(~hit & ref_hit))
    return {"backdoor_asr_vs_retrain_p": mcnemar_exact_p(b, c), "backdoor_discordant": [b, c]}
