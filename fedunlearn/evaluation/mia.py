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

Every score follows the convention *higher = more likely a member*. An attack is summarised by
:func:`summarize_attack`: ROC AUC with a percentile bootstrap interval (members and non-members
resampled independently, :func:`bootstrap_auc_interval`) and the TPR at 1 % FPR with the number
of non-members behind it. Training the shadow models needs torch and lives in
:mod:`fedunlearn.evaluation.shadow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
    from sklearn.metrics import roc_auc_score  # slow to import: only when an attack runs

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
    if len(t) < 3 or np.ptp(mu) == 0:  # (no population at all: the shadows' spread is unknown)
        return 1.0, 0.0, max(min_std, float(np.std(shadow - mu)) if shadow.size else 0.0)
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
    member_scores = calibrated_lira_scores(target_phi_members, shadow_phi_members,
                                           target_phi_population, shadow_phi_population)
    nonmember_scores = calibrated_lira_scores(target_phi_nonmembers, shadow_phi_nonmembers,
                                              target_phi_population, shadow_phi_population)
    return {"mia_lira_auc": roc_auc(member_scores, nonmember_scores),
            "mia_lira_tpr_at_1fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01)}


def calibrated_lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray,
                           target_phi_population: np.ndarray,
                           shadow_phi_population: np.ndarray) -> np.ndarray:
    """Per-query scores of :func:`calibrated_lira_attack`: ``(phi - (a * mu + c)) / s``.

    ``(a, c, s)`` come from :func:`population_calibration` on the population points, ``mu`` is
    the mean over the OUT shadows (``shadow_phi`` has shape ``(n_shadow, n_queries)``).

    >>> calibrated_lira_scores(np.array([4.0]), np.array([[1.0], [1.0]]),
    ...                        np.array([1.0, 3.0, 5.0]), np.array([[0.0, 1.0, 2.0]]))
    array([1000.])
    """
    a, c, s = population_calibration(target_phi_population, shadow_phi_population)
    mu = np.asarray(shadow_phi, dtype=np.float64).mean(axis=0)
    return (np.asarray(target_phi, dtype=np.float64).ravel() - (a * mu + c)) / s


def weighted_aucs(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                  member_counts: np.ndarray, nonmember_counts: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of multiplicities, without materialising the resampled sets.

    Row ``b`` is the AUC of ``np.repeat(member_scores, member_counts[b])`` against
    ``np.repeat(nonmember_scores, nonmember_counts[b])`` (ties count one half): the non-members
    are sorted once and every member's weighted wins read off cumulative counts, so ``B`` rows
    cost ``O(B * (n_members + n_nonmembers))``.

    Parameters
    ----------
    member_scores, nonmember_scores : np.ndarray
        Scores, shapes ``(n_m,)`` and ``(n_n,)``.
    member_counts, nonmember_counts : np.ndarray
        Non-negative multiplicities, shapes ``(B, n_m)`` and ``(B, n_n)``; every row must have
        a positive sum.

    Returns
    -------
    np.ndarray
        Shape ``(B,)``, float64.

    >>> weighted_aucs(np.array([3.0, 1.0]), np.array([2.0, 1.0]),
    ...               np.array([[1, 1], [2, 0]]), np.array([[1, 1], [1, 1]]))
    array([0.625, 1.   ])
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    w_m = np.asarray(member_counts, dtype=np.float64)
    w_n = np.asarray(nonmember_counts, dtype=np.float64)
    order = np.argsort(nonmembers, kind="stable")
    sorted_n = nonmembers[order]
    below = np.zeros((len(w_n), len(sorted_n) + 1))
    np.cumsum(np.take(w_n, order, axis=1), axis=1, out=below[:, 1:])  # weight of the k smallest
    lo = np.searchsorted(sorted_n, members, side="left")
    hi = np.searchsorted(sorted_n, members, side="right")
    # wins of member i: non-members below it, plus half of those tied with it; shape (B, n_m)
    wins = 0.5 * (np.take(below, lo, axis=1) + np.take(below, hi, axis=1))
    return np.einsum("bi,bi->b", w_m, wins) / (w_m.sum(axis=1) * w_n.sum(axis=1))


def bootstrap_counts(n: int, resamples: int, rng: np.random.Generator,
                     strata: np.ndarray | None = None) -> np.ndarray:
    """Multiplicities of ``resamples`` draws of ``n`` items with replacement, shape
    ``(resamples, n)``; each row sums to ``n``.

    With ``strata`` (one label per item) every stratum is resampled at its own size, so each
    row keeps the strata's sizes.

    >>> bootstrap_counts(4, 3, np.random.default_rng(0)).sum(axis=1)
    array([4, 4, 4])
    >>> c = bootstrap_counts(5, 3, np.random.default_rng(0), strata=np.array([0, 0, 0, 1, 1]))
    >>> c[:, :3].sum(axis=1), c[:, 3:].sum(axis=1)
    (array([3, 3, 3]), array([2, 2, 2]))
    """
    groups = [np.arange(n)] if strata is None else [
        np.flatnonzero(strata == s) for s in np.unique(strata)]
    if strata is not None and len(strata) != n:
        raise ValueError(f"bootstrap_counts: {len(strata)} strata labels for {n} items")
    offsets = n * np.arange(resamples)[:, None]  # row b counts into [b * n, (b + 1) * n)
    draws = [members[rng.integers(0, len(members), size=(resamples, len(members)))] + offsets
             for members in groups]
    flat = np.concatenate([d.ravel() for d in draws])
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


def bootstrap_auc_interval(member_scores: np.ndarray, nonmember_scores: np.ndarray, *,
                           member_strata: np.ndarray | None = None,
                           nonmember_strata: np.ndarray | None = None, resamples: int = 400,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC.

    Members and non-members are resampled independently (each with replacement, at its own
    size, and within each stratum when strata are given: a group whose composition is fixed by
    design keeps it), ``resamples`` times, from ``np.random.default_rng(seed)``; the interval is
    the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled AUCs
    (:func:`weighted_aucs`). ``(nan, nan)`` if either group is empty.

    Parameters
    ----------
    member_scores, nonmember_scores : np.ndarray
    member_strata, nonmember_strata : np.ndarray, optional
        A stratum label per member / non-member (default: one stratum).
    resamples : int
        Number of bootstrap resamples (default 400).
    level : float
        Coverage (default 0.95).
    seed : int
        Seed of the resampling (default 0).

    >>> bootstrap_auc_interval(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    (1.0, 1.0)
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if len(members) == 0 or len(nonmembers) == 0:
        return float("nan"), float("nan")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"bootstrap_auc_interval: need 0 < level < 1 and resamples >= 1, "
                         f"got level={level}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    aucs = weighted_aucs(members, nonmembers,
                         bootstrap_counts(len(members), resamples, rng, member_strata),
                         bootstrap_counts(len(nonmembers), resamples, rng, nonmember_strata))
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class AttackSummary:
    """One membership attack on one set of members and non-members.

    Attributes
    ----------
    auc : float
        ROC AUC (0.5 = chance; NaN when a group is empty).
    auc_ci : tuple of float
        Percentile bootstrap interval of ``auc``.
    tpr_at_1fpr : float
        TPR at 1 % FPR; below 100 non-members it allows no false positive at all.
    members, nonmembers : int
        Group sizes.
    """

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1fpr: float
    members: int
    nonmembers: int


def summarize_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray, *,
                     member_strata: np.ndarray | None = None,
                     nonmember_strata: np.ndarray | None = None, resamples: int = 400,
                     seed: int = 0) -> AttackSummary:
    """AUC with its bootstrap interval (:func:`bootstrap_auc_interval`, same arguments), TPR at
    1 % FPR and the group sizes.

    >>> s = summarize_attack(np.array([3.0, 1.0]), np.array([2.0, 1.0]))
    >>> s.auc, s.tpr_at_1fpr, s.members, s.nonmembers
    (0.625, 0.5, 2, 2)
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    return AttackSummary(auc=roc_auc(members, nonmembers),
                         auc_ci=bootstrap_auc_interval(
                             members, nonmembers, member_strata=member_strata,
                             nonmember_strata=nonmember_strata, resamples=resamples, seed=seed),
                         tpr_at_1fpr=tpr_at_fpr(members, nonmembers, 0.01),
                         members=len(members), nonmembers=len(nonmembers))
