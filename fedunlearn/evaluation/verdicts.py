"""Verdicts against retraining: one decision rule for every criterion, written once.

A removal method is judged by how close it comes to **retraining of the same seed**. The unit
of replication is the seed (the training randomness), for every criterion, binary ones such as
the backdoor's attack success rate included. For a criterion and seeds ``s = 1..n``:

* the paired difference ``d_s = metric(method, s) − metric(retrain, s)`` (for the KL criterion,
  ``d_s = KL(retrain ‖ method) − KL(retrain ‖ noise floor)``, the method's divergence beyond
  the noise floor's);
* the **margin** ``δ``: how far two retrainings of the same seed are apart on that metric,
  ``mean_s |metric(noise floor, s) − metric(retrain, s)|``, never below the criterion's stated
  minimum (:data:`CRITERIA`); for KL, the noise floor's own mean KL (at least 0.01 nats).

The rule (:func:`decide`, level ``α``, default 0.05):

* fewer than two seeds: no verdict (``–``);
* **matches**: equivalence shown by two one-sided t-tests (TOST, Schuirmann 1987), each at
  level ``α`` — the ``(1 − 2α)`` t-interval of the mean difference lies inside ``[−δ, +δ]``;
* otherwise, when a two-sided t-test at level ``α`` rejects ``d = 0`` (the ``(1 − α)``
  interval excludes 0): **worse** / **better** for the accuracies on the data the model should
  keep (test, retain), **differs (above)** / **differs (below)** for the criteria whose target
  is retraining's value (forgotten-data accuracy, ASR, MIA AUC, KL): below retraining is not
  "better", it is also a difference an auditor can see;
* otherwise **inconclusive**, with the smallest margin the run could have decided
  (``resolution``, ``|mean| + t_{1−α, n−1} · sd / √n``) and the number of seeds that would
  decide at ``δ`` with the observed spread (:func:`seeds_needed`).

Per-input McNemar tests (a method's and retraining's triggered inputs, one seed) answer whether
two fixed models differ on those inputs, not whether the method differs from retraining across
training randomness; they stay in the rows as a per-seed diagnostic
(``backdoor_asr_vs_retrain_p``), never as the verdict. See ``docs/algorithms.md`` ("Verdicts
against retraining").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ALPHA = 0.05
"""Default level of the verdict's tests (``verification.verdict_alpha``)."""

LEVEL = 0.95
"""Confidence level of the descriptive intervals of every figure (means over seeds)."""

MATCHES, WORSE, BETTER, ABOVE, BELOW, INCONCLUSIVE, NO_VERDICT = (
    "matches", "worse", "better", "differs (above)", "differs (below)", "inconclusive", "–")

DECIDED = frozenset({MATCHES, WORSE, BETTER, ABOVE, BELOW})
"""Verdicts that end the question (``inconclusive`` and ``–`` do not)."""

ACCURACY, TARGET = "accuracy", "target"
"""Directions: higher is better (``worse``/``better``), or retraining's value is the target
(``differs (above|below)``)."""

MAX_SEEDS = 100_000
""":func:`seeds_needed` searches up to this many seeds, then answers ``inf``."""


@dataclass(frozen=True)
class Criterion:
    """One verdict column.

    Attributes
    ----------
    name : str
        The verdict's key in ``results.json`` and its column label.
    keys : tuple of str
        The metric judged: the first key present in the rows.
    floor : float
        Minimum margin.
    direction : str
        :data:`ACCURACY` or :data:`TARGET`.
    vs_noise_floor : bool
        Compare with the noise floor's value of the metric instead of retraining's (for
        distances to retraining, whose value for retraining itself is 0).
    needs_backdoor : bool
        Judged only where the original model carries the backdoor (its ASR above retraining's
        by more than the margin); otherwise ``–`` with a note.
    granular : bool
        Measured only below the client level (a class or sample request): where the metric is
        absent the summary records no verdict for it at all.
    """

    name: str
    keys: tuple[str, ...]
    floor: float
    direction: str
    vs_noise_floor: bool = False
    needs_backdoor: bool = False
    granular: bool = False


CRITERIA: tuple[Criterion, ...] = (
    Criterion("test", ("test_accuracy",), 0.01, ACCURACY),
    Criterion("retain", ("retain_accuracy",), 0.01, ACCURACY),
    Criterion("forget", ("forget_accuracy",), 0.01, TARGET),
    Criterion("asr", ("backdoor_asr",), 0.02, TARGET, needs_backdoor=True),
    # membership of the *clean* forgotten samples: the triggered ones measure the backdoor
    Criterion("mia", ("mia_lira_auc_clean", "mia_loss_auc_clean", "mia_lira_auc",
                      "mia_loss_auc"), 0.02, TARGET),
    Criterion("kl", ("kl_forget",), 0.01, TARGET, vs_noise_floor=True),
    # below the client level: the removed class (target: retraining's, near 0), the other
    # classes and what a sample request's client keeps (accuracies)
    Criterion("class", ("removed_class_accuracy",), 0.01, TARGET, granular=True),
    Criterion("others", ("other_classes_accuracy",), 0.01, ACCURACY, granular=True),
    Criterion("kept", ("kept_accuracy",), 0.01, ACCURACY, granular=True),
)
"""The criteria every method row is judged on, in column order."""


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([float(x) for x in values if x is not None and math.isfinite(x)],
                      dtype=np.float64)


def _t(q: float, df: int) -> float:
    from scipy.stats import t as student_t  # slow to import (docs/benchmarks.md): only when used

    return float(student_t.ppf(q, df))


def t_interval(values: Sequence[float | None], level: float = LEVEL
               ) -> tuple[float, float] | None:
    """Two-sided Student-t interval of the mean; None with fewer than two finite values.

    >>> lo, hi = t_interval([1.0, 2.0, 3.0])
    >>> round(lo, 4), round(hi, 4)
    (-0.4841, 4.4841)
    """
    v = _finite(values)
    if len(v) < 2:
        return None
    half = _t(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def seeds_needed(mean: float, sd: float, margin: float, *, alpha: float = ALPHA) -> float:
    """The smallest number of seeds ``n >= 2`` at which TOST at ``margin`` would pass with
    the observed mean and spread: ``t_{1−α, n−1} · sd / √n < margin − |mean|``; ``inf`` when
    ``|mean| >= margin`` (no number of seeds shows equivalence) or beyond :data:`MAX_SEEDS`.

    >>> seeds_needed(0.0, 0.01, 0.02)
    3
    >>> seeds_needed(0.03, 0.01, 0.02)
    inf
    """
    room = margin - abs(mean)
    if not room > 0:
        return math.inf
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while _t(1 - alpha, hi - 1) * sd / math.sqrt(hi) >= room:  # grow, then bisect
        if hi >= MAX_SEEDS:
            return math.inf
        lo, hi = hi, min(2 * hi, MAX_SEEDS)
    while lo < hi:
        mid = (lo + hi) // 2
        if _t(1 - alpha, mid - 1) * sd / math.sqrt(mid) < room:
            hi = mid
        else:
            lo = mid + 1
    return hi


def decide(diffs: Sequence[float | None], margin: float, *, direction: str,
           alpha: float = ALPHA) -> dict[str, Any]:
    """The verdict of paired per-seed differences ``diffs`` at ``margin`` (module docstring).

    Returns ``verdict``, ``n``, ``diff`` (mean), ``sd``, ``ci`` (the ``(1 − α)`` interval),
    ``tost_ci`` (the ``(1 − 2α)`` interval), ``p_equivalence`` (TOST's larger one-sided p),
    ``p_difference`` (two-sided t-test), ``margin``, ``alpha``, ``resolution`` (the smallest
    margin TOST would have passed at) and, for every verdict but ``matches``, ``seeds_needed``
    (at ``margin`` with the observed spread; ``None`` when ``|mean| >= margin``, no number of
    seeds would show equivalence).

    >>> decide([0.03, -0.03, 0.02], 0.02, direction=TARGET)["verdict"]
    'inconclusive'
    >>> decide([0.01], 0.02, direction=TARGET)["verdict"]
    '–'
    >>> ten = [0.004, -0.003, 0.001, 0.005, -0.004, 0.0, 0.002, -0.001, 0.003, -0.005]
    >>> decide(ten, 0.02, direction=TARGET)["verdict"]
    'matches'
    >>> decide([-0.05, -0.06, -0.04], 0.01, direction=ACCURACY)["verdict"]
    'worse'
    >>> decide([-0.05, -0.06, -0.04], 0.01, direction=TARGET)["verdict"]
    'differs (below)'
    """
    v = _finite(diffs)
    out: dict[str, Any] = {"n": len(v), "margin": float(margin), "alpha": float(alpha),
                           "diff": float(v.mean()) if len(v) else None}
    if len(v) < 2:
        out.update(verdict=NO_VERDICT, ci=None, tost_ci=None, sd=None,
                   reason="one seed: no interval (run with more seeds)" if len(v) else
                   "no paired values")
        return out
    n, mean, sd = len(v), float(v.mean()), float(v.std(ddof=1))
    se = sd / math.sqrt(n)
    from scipy.stats import t as student_t

    if se > 0:
        p_diff = float(2 * student_t.sf(abs(mean) / se, n - 1))
        p_equiv = float(max(student_t.sf((mean + margin) / se, n - 1),
                            student_t.cdf((mean - margin) / se, n - 1)))
    else:  # every seed gave the same difference
        p_diff = 0.0 if mean != 0 else 1.0
        p_equiv = 0.0 if abs(mean) < margin else 1.0
    half_tost = _t(1 - alpha, n - 1) * se
    half_diff = _t(1 - alpha / 2, n - 1) * se
    out.update(sd=sd, ci=[mean - half_diff, mean + half_diff],
               tost_ci=[mean - half_tost, mean + half_tost], p_equivalence=p_equiv,
               p_difference=p_diff, resolution=abs(mean) + half_tost)
    if p_equiv < alpha:
        verdict = MATCHES
    elif p_diff < alpha:
        up = mean > 0
        if direction == ACCURACY:
            verdict = BETTER if up else WORSE
        else:
            verdict = ABOVE if up else BELOW
    else:
        verdict = INCONCLUSIVE
    out["verdict"] = verdict
    if verdict != MATCHES:  # JSON has no infinity: null means no number of seeds would do
        needed = seeds_needed(mean, sd, margin, alpha=alpha)
        out["seeds_needed"] = int(needed) if math.isfinite(needed) else None
    return out


def margin_of(retrain: Sequence[float | None], noise_floor: Sequence[float | None],
              floor: float) -> float:
    """``max(floor, mean |noise_floor_s − retrain_s|)`` over seeds with both values.

    >>> round(margin_of([0.90, 0.92], [0.86, 0.92], 0.01), 9)
    0.02
    """
    gaps = [abs(b - a) for a, b in zip(retrain, noise_floor, strict=True)
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    return max(floor, float(np.mean(gaps))) if gaps else floor


def sequential_alpha(alpha: float, looks: int) -> float:
    """The level of each look of a sequential run that adds seeds until every verdict is
    decided: ``α / looks`` (Bonferroni α-spending over the planned looks; the union bound keeps
    the probability that any look gives a false ``matches`` or ``differs`` at most ``α``,
    whenever the run stops).

    >>> sequential_alpha(0.05, 5)
    0.01
    """
    if looks < 1:
        raise ValueError(f"looks must be >= 1, got {looks}")
    return alpha / looks
