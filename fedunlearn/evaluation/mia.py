"""Membership inference attacks (MIA) on predicted probabilities, as pure NumPy functions.

Two attacks are provided:

* the **loss attack** of Yeom et al., "Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting", CSF 2018: a low loss on an example suggests it was trained on;
* the **offline LiRA** of Carlini et al., "Membership Inference Attacks From First Principles",
  IEEE S&P 2022: the target model's logit-scaled confidence on an example is compared with its
  distribution under OUT shadow models (trained without the example), using a global variance;
* the same offline LiRA **calibrated on a population** (:func:`calibrated_lira_attack`): LiRA
  assumes the shadows are trained like the target, which a centrally trained shadow and a
  federated (or unlearned) target are not; a less confident target then looks like a member of
  every example the shadows find hard. Fitting ``phi_target ~ a * mu_shadows + c`` on population
  points that no model trained on (as RMIA compares with population samples: Zarifzadeh et al.,
  "Low-Cost High-Power Membership Inference Attacks", ICML 2024) removes that scale mismatch.

Every score follows the convention *higher = more likely a member*. Training the shadow models
needs torch and lives in :mod:`fedunlearn.evaluation.shadow`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def per_example_loss(proba: np.ndarray, y: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Cross-entropy of each row: ``-ln(max(proba[i, y_i], eps))``.

    Parameters
    ----------
    proba : np.ndarray
        Class probabilities, shape ``(N, C)``.
    y : np.ndarray
        Integer labels, shape ``(N,)``.
    eps : float
        Floor on the probability of the true class.

    Returns
    -------
    np.ndarray
        Losses in nats, shape ``(N,)``, float64.

    >>> per_example_loss(np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([1, 0])).round(4)
    array([ 0.6931, 27.631 ])
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    p_y = proba[np.arange(len(y)), y]
    return -np.log(np.maximum(p_y, eps))


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve of the rule "higher score = member".

    Equals the probability that a random member scores above a random non-member, ties counting
    one half. NaN if either group is empty.

    >>> roc_auc(np.array([3.0, 1.0]), np.array([2.0, 1.0]))
    0.625
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if len(members) == 0 or len(nonmembers) == 0:
        return float("nan")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    return float(roc_auc_score(labels, np.concatenate([members, nonmembers])))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray,
               fpr: float = 0.01) -> float:
    """Largest true-positive rate at a false-positive rate of at most ``fpr``.

    Definition: for a threshold ``t`` the rule is "member iff score ≥ t", with
    ``TPR(t) = #{members ≥ t} / n_members`` and ``FPR(t) = #{non-members ≥ t} / n_nonmembers``.
    The result is ``max TPR(t)`` over all real ``t`` (including ``+inf``) with ``FPR(t) ≤ fpr``.

    Let ``k`` be the largest integer with ``k / n_nonmembers ≤ fpr`` (so with 100 non-members
    and ``fpr = 0.01`` at most ``k = 1`` non-member may be flagged). If ``k ≥ n_nonmembers`` the
    result is 1; otherwise, with ``s_k`` the ``(k+1)``-th largest non-member score, the best
    threshold lies just above ``s_k`` and the result is ``#{members > s_k} / n_members``
    (strictly greater: a member tied with ``s_k`` cannot be flagged without flagging ``s_k``
    too). NaN if either group is empty.

    >>> tpr_at_fpr(np.array([5.0, 4.0, 3.0, 2.0]), np.array([4.5, 1.0, 0.0]), fpr=0.0)
    0.25
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if fpr < 0:
        raise ValueError(f"tpr_at_fpr: fpr must be >= 0, got {fpr}")
    n_non = len(nonmembers)
    if len(members) == 0 or n_non == 0:
        return float("nan")
    k = max(0, math.floor(fpr * n_non))
    while (k + 1) <= n_non and (k + 1) / n_non <= fpr:  # guard against fpr * n rounding down
        k += 1
    while k > 0 and k / n_non > fpr:  # and against it rounding up
        k -= 1
    if k >= n_non:
        return 1.0
    s_k = np.sort(nonmembers)[::-1][k]
    return float(np.mean(members > s_k))


def logit_confidence(proba: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """LiRA's logit-scaled confidence ``phi = ln(p_y) - ln(1 - p_y)``.

    ``p_y`` (the probability of the true class) is clipped to ``[eps, 1 - eps]``, so ``phi`` is
    finite and roughly Gaussian across models (Carlini et al., S&P 2022, Sec. IV-B).

    >>> logit_confidence(np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([0, 1])).round(4)
    array([0.    , 1.3863])
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    p_y = np.clip(proba[np.arange(len(y)), y], eps, 1.0 - eps)
    return np.log(p_y) - np.log1p(-p_y)


def loss_attack(proba_members: np.ndarray, y_members: np.ndarray, proba_nonmembers: np.ndarray,
                y_nonmembers: np.ndarray) -> dict[str, float]:
    """Loss-threshold attack (Yeom et al., CSF 2018) with score ``-loss``.

    Returns
    -------
    dict
        ``{"mia_loss_auc": ..., "mia_loss_tpr_at_1fpr": ...}``.
    """
    member_scores = -per_example_loss(proba_members, y_members)
    nonmember_scores = -per_example_loss(proba_nonmembers, y_nonmembers)
    return {"mia_loss_auc": roc_auc(member_scores, nonmember_scores),
            "mia_loss_tpr_at_1fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01)}


def lira_offline_scores(target_phi: np.ndarray, shadow_phi: np.ndarray,
                        min_std: float = 1e-3) -> np.ndarray:
    """Offline LiRA scores with a global variance (Carlini et al., S&P 2022).

    Parameters
    ----------
    target_phi : np.ndarray
        Logit confidence of the target model on each query, shape ``(n_queries,)``.
    shadow_phi : np.ndarray
        Logit confidences of OUT shadow models (trained without any query), shape
        ``(n_shadow, n_queries)``.
    min_std : float
        Floor on the global standard deviation.

    Returns
    -------
    np.ndarray
        ``score_i = (target_phi_i - mu_i) / sigma`` with ``mu_i`` the mean of
        ``shadow_phi[:, i]`` and ``sigma = max(min_std, std(shadow_phi - mu))`` pooled over all
        entries (``ddof=0``). Higher means member; the score is a monotone transform of the
        one-sided Gaussian likelihood test ``1 - Phi((phi - mu_i) / sigma)``.
    """
    target = np.asarray(target_phi, dtype=np.float64).ravel()
    shadows = np.asarray(shadow_phi, dtype=np.float64)
    if shadows.ndim != 2 or shadows.shape[1] != len(target):
        raise ValueError(f"lira_offline_scores: shadow_phi must have shape (n_shadow, "
                         f"{len(target)}), got {shadows.shape}")
    mu = shadows.mean(axis=0)
    sigma = max(min_std, float(np.std(shadows - mu)))
    return (target - mu) / sigma


def lira_attack(target_phi_members: np.ndarray, target_phi_nonmembers: np.ndarray,
                shadow_phi_members: np.ndarray,
                shadow_phi_nonmembers: np.ndarray) -> dict[str, float]:
    """Offline LiRA on members vs non-members, sharing one global variance.

    The two query groups are concatenated before :func:`lira_offline_scores`, so ``sigma`` is
    pooled over both.

    Returns
    -------
    dict
        ``{"mia_lira_auc": ..., "mia_lira_tpr_at_1fpr": ...}``.
    """
    t_m = np.asarray(target_phi_members, dtype=np.float64).ravel()
    t_n = np.asarray(target_phi_nonmembers, dtype=np.float64).ravel()
    s_m = np.asarray(shadow_phi_members, dtype=np.float64)
    s_n = np.asarray(shadow_phi_nonmembers, dtype=np.float64)
    scores = lira_offline_scores(np.concatenate([t_m, t_n]), np.concatenate([s_m, s_n], axis=1))
    member_scores, nonmember_scores = scores[:len(t_m)], scores[len(t_m):]
    return {"mia_lira_auc": roc_auc(member_scores, nonmember_scores),
            "mia_lira_tpr_at_1fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01)}


def population_calibration(target_phi_population: np.ndarray,
                           shadow_phi_population: np.ndarray,
                           min_std: float = 1e-3) -> tuple[float, float, float]:
    """Affine map from the shadows' mean confidence to the target's, fitted on population points.

    Least squares ``phi_target(z) ~ a * mu(z) + c`` over population points ``z`` (members of no
    model), ``mu(z)`` the mean over shadows; returns ``(a, c, s)`` with ``s`` the residual standard
    deviation (ddof=0, at least ``min_std``). Fewer than 3 points give ``(1, 0, pooled std)``.

    >>> a, c, s = population_calibration(np.array([1.0, 3.0, 5.0]), np.array([[0.0, 1.0, 2.0]]))
    >>> round(a, 9), round(c, 9), s
    (2.0, 1.0, 0.001)
    """
    t = np.asarray(target_phi_population, dtype=np.float64).ravel()
    shadow = np.asarray(shadow_phi_population, dtype=np.float64)
    mu = shadow.mean(axis=0)
    if len(t) < 3 or np.ptp(mu) == 0:
        return 1.0, 0.0, max(min_std, float(np.std(shadow - mu)))
    a, c = np.polyfit(mu, t, 1)
    resid = t - (a * mu + c)
    return float(a), float(c), max(min_std, float(np.std(resid)))


def calibrated_lira_attack(target_phi_members: np.ndarray, target_phi_nonmembers: np.ndarray,
                           shadow_phi_members: np.ndarray, shadow_phi_nonmembers: np.ndarray,
                           target_phi_population: np.ndarray,
                           shadow_phi_population: np.ndarray) -> dict[str, float]:
    """Offline LiRA with the target's confidence scale calibrated on a population.

    score(x) = (phi_target(x) - (a * mu(x) + c)) / s with ``(a, c, s)`` from
    :func:`population_calibration`; ``mu(x)`` is the mean of the OUT shadows' ``phi`` on ``x``.
    With ``a = 1, c = 0`` and ``s`` the shadows' spread it is :func:`lira_offline_scores`.

    Returns
    -------
    dict
        ``{"mia_lira_auc": ..., "mia_lira_tpr_at_1fpr": ...}``.
    """
    a, c, s = population_calibration(target_phi_population, shadow_phi_population)

    def scores(target: np.ndarray, shadow: np.ndarray) -> np.ndarray:
        mu = np.asarray(shadow, dtype=np.float64).mean(axis=0)
        return (np.asarray(target, dtype=np.float64).ravel() - (a * mu + c)) / s

    member_scores = scores(target_phi_members, shadow_phi_members)
    nonmember_scores = scores(target_phi_nonmembers, shadow_phi_nonmembers)
    return {"mia_lira_auc": roc_auc(member_scores, nonmember_scores),
            "mia_lira_tpr_at_1fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01)}
