"""Verdicts against retraining: the one decision rule, written once.

A removal method is judged by how close it comes to **retraining of the same seed**, not to
zero and not to chance. For a criterion (a metric) and seeds ``s = 1..n``:

* the paired difference ``d_s = metric(method, s) - metric(retrain, s)`` (for the KL
  criterion, ``d_s = KL(retrain || method) - KL(retrain || retrain_seed2)``: the method's
  divergence beyond the noise floor);
* its mean, standard deviation (``ddof = 1``) and two-sided 95 % Student-t interval
  ``mean ± t_{0.975, n-1} · sd / sqrt(n)`` (no interval with one seed);
* the **margin** ``δ``: how far two retrainings are apart on that metric,
  ``mean_s |metric(retrain_seed2, s) - metric(retrain, s)|``, never below a stated minimum
  (:data:`CRITERIA`: 0.01 for accuracies, 0.02 for ASR and MIA AUC); for KL, the mean
  noise-floor KL itself (at least 0.01 nats), so "matches" means at most about twice the
  divergence of two retrainings.

The rule (:func:`decide`), an equivalence test first, then a difference test:

* **matches**: the whole interval lies inside ``[-δ, +δ]``;
* **worse** / **better**: the whole interval lies on one side of 0 (which side is worse is
  the criterion's direction: lower test accuracy; higher forgotten-data accuracy, ASR, MIA AUC
  or KL, i.e. the model still remembers more of the forgotten data than retraining does);
* **inconclusive**: anything else (typically: too few seeds for an interval that narrow).

With one seed there is no interval and no verdict (shown as ``–``), except for the backdoor
ASR, which compares binary outcomes on the *same* triggered inputs: McNemar's exact test on
the discordant pairs ``b`` (method hits the target, retraining does not) and ``c`` (the
reverse), pooled over seeds (under H0 each discordant pair is a fair coin). ASR is **worse** /
**better** when that test rejects at ``verification.alpha``, **matches** when it does not and
``|mean d| <= δ``, **inconclusive** otherwise. The test of ASR against chance ``1/K`` stays in
the table beside it, but it is not a verdict against retraining.

The rule is the ALGORITHMS.md one ("Verdicts, intervals and the membership attack"); it is not
tuned to any result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedunlearn.evaluation.metrics import mcnemar_exact_p

LEVEL = 0.95
"""Confidence level of every interval."""

MATCHES, WORSE, BETTER, INCONCLUSIVE, NO_VERDICT = (
    "matches", "worse", "better", "inconclusive", "–")


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
    higher_is_worse : bool
        The direction called *worse*.
    vs_noise_floor : bool
        Compare with the noise floor's value of the metric instead of retraining's (for
        distances to retraining, whose value for retraining itself is 0).
    paired_binary : bool
        Judge by McNemar's exact test on paired binary outcomes (backdoor ASR).
    """

    name: str
    keys: tuple[str, ...]
    floor: float
    higher_is_worse: bool
    vs_noise_floor: bool = False
    paired_binary: bool = False


CRITERIA: tuple[Criterion, ...] = (
    Criterion("test", ("test_accuracy",), 0.01, higher_is_worse=False),
    Criterion("forget", ("forget_accuracy",), 0.01, higher_is_worse=True),
    Criterion("asr", ("backdoor_asr",), 0.02, higher_is_worse=True, paired_binary=True),
    # membership of the *clean* forgotten samples: the triggered ones measure the backdoor
    Criterion("mia", ("mia_lira_auc_clean", "mia_loss_auc_clean", "mia_lira_auc",
                      "mia_loss_auc"), 0.02, higher_is_worse=True),
    Criterion("kl", ("kl_forget",), 0.01, higher_is_worse=True, vs_noise_floor=True),
)
"""The criteria every method row is judged on, in column order."""


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Two-sided Student-t interval of the mean; None with fewer than two finite values.

    >>> lo, hi = t_interval([1.0, 2.0, 3.0])
    >>> round(lo, 4), round(hi, 4)
    (-0.4841, 4.4841)
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) < 2:
        return None
    from scipy.stats import t as student_t  # 0.4 s to import: only when used

    half = float(student_t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return float(v.mean() - half), float(v.mean() + half)


def decide(interval: tuple[float, float] | None, margin: float, *,
           higher_is_worse: bool) -> str:
    """The verdict of an interval of paired differences (see the module docstring).

    >>> decide((-0.004, 0.006), 0.01, higher_is_worse=False)
    'matches'
    >>> decide((-0.09, -0.02), 0.01, higher_is_worse=False)
    'worse'
    >>> decide((0.02, 0.09), 0.01, higher_is_worse=True)
    'worse'
    >>> decide((-0.03, 0.05), 0.01, higher_is_worse=True)
    'inconclusive'
    >>> decide(None, 0.01, higher_is_worse=True)
    '–'
    """
    if interval is None:
        return NO_VERDICT
    lo, hi = interval
    if -margin <= lo and hi <= margin:
        return MATCHES
    if lo > 0:
        return WORSE if higher_is_worse else BETTER
    if hi < 0:
        return BETTER if higher_is_worse else WORSE
    return INCONCLUSIVE


def decide_paired_binary(b: int, c: int, mean_diff: float, margin: float, *, alpha: float,
                         higher_is_worse: bool = True) -> tuple[str, float]:
    """The ASR verdict from pooled discordant pairs; returns ``(verdict, p_value)``.

    ``b`` counts inputs where the method hits the target and retraining does not, ``c`` the
    reverse, summed over seeds.

    >>> decide_paired_binary(40, 2, 0.08, 0.02, alpha=0.01)[0]
    'worse'
    >>> decide_paired_binary(1, 2, -0.003, 0.02, alpha=0.01)[0]
    'matches'
    """
    p = mcnemar_exact_p(int(b), int(c))
    if p < alpha:
        up = b > c
        return (WORSE if up == higher_is_worse else BETTER), p
    return (MATCHES if abs(mean_diff) <= margin else INCONCLUSIVE), p


def margin_of(retrain: Sequence[float], noise_floor: Sequence[float], floor: float) -> float:
    """``max(floor, mean |noise_floor_s - retrain_s|)`` over seeds with both values.

    >>> round(margin_of([0.90, 0.92], [0.86, 0.92], 0.01), 9)
    0.02
    """
    gaps = [abs(b - a) for a, b in zip(retrain, noise_floor, strict=True)
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    return max(floor, float(np.mean(gaps))) if gaps else floor
