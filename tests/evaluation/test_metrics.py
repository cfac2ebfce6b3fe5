"""Verification metrics and membership inference, pinned to hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedunlearn.evaluation.metrics import (
    backdoor_test,
    binomial_p_value,
    kl_divergence,
    mcnemar_exact_p,
    paired_backdoor_test,
    param_distance,
    prediction_difference,
    sape,
)
from fedunlearn.evaluation.mia import (
    bootstrap_auc_interval,
    bootstrap_counts,
    calibrated_lira_attack,
    calibrated_lira_scores,
    lira_attack,
    lira_offline_scores,
    logit_confidence,
    loss_attack,
    per_example_loss,
    population_calibration,
    roc_auc,
    summarize_attack,
    tpr_at_fpr,
    weighted_aucs,
)
from fedunlearn.evaluation.shadow import shadow_logit_confidences
from fedunlearn.models import build_model
from fedunlearn.models.training import LocalTraining, predict_proba, train


def _random_proba(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    p = rng.random((n, c)) + 0.01
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- kl_divergence

def test_kl_divergence_pinned_in_both_directions():
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.25, 0.75]])
    # KL(p‖q) = 0.5*ln(0.5/0.25) + 0.5*ln(0.5/0.75) = 0.5*ln(4/3) = 0.1438410362
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert kl_divergence(p, q) == pytest.approx(0.1438410362, abs=1e-10)
    # KL(q‖p) = 0.25*ln(0.25/0.5) + 0.75*ln(0.75/0.5) = -0.1732867951 + 0.3040988 = 0.1308120
    assert kl_divergence(q, p) == pytest.approx(0.1308120, abs=1e-7)
    # The first argument is the reference: the two directions differ.
    assert kl_divergence(p, q) != pytest.approx(kl_divergence(q, p), abs=1e-3)


def test_kl_divergence_is_a_mean_over_rows():
    p = np.array([[0.5, 0.5], [0.3, 0.7]])
    q = np.array([[0.25, 0.75], [0.3, 0.7]])
    # Row 1 as above (0.5*ln(4/3)), row 2 identical (0): mean = 0.25*ln(4/3) = 0.0719205181
    assert kl_divergence(p, q) == pytest.approx(0.25 * math.log(4 / 3), abs=1e-12)


def test_kl_divergence_zero_reference_terms_and_eps_clipping():
    # p_ref = [1, 0]: the 0 term contributes 0, so KL = 1*ln(1/0.5) = ln 2 = 0.6931471806
    assert kl_divergence(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])) == pytest.approx(
        math.log(2), abs=1e-12)
    # p = [1, 0] is clipped to [1, 1e-12]:
    # KL = 0.5*ln(0.5/1) + 0.5*(ln 0.5 - ln 1e-12) = ln 0.5 + 6*ln 10 = 13.1223633774
    got = kl_divergence(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))
    assert got == pytest.approx(math.log(0.5) + 6 * math.log(10), abs=1e-9)
    assert math.isnan(kl_divergence(np.zeros((0, 3)), np.zeros((0, 3))))


def test_kl_divergence_properties():
    rng = np.random.default_rng(0)
    p, q = _random_proba(rng, 20, 5), _random_proba(rng, 20, 5)
    assert kl_divergence(p, p) == 0.0  # ln p - ln p is exactly 0
    assert kl_divergence(p, q) > 0.0  # Gibbs' inequality, p != q


# --------------------------------------------------------------------- prediction_difference

def test_prediction_difference_pinned():
    a = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    b = np.array([[0.0, 1.0, 0.0], [0.5, 0.3, 0.1]])
    # Row 1: ||(1, -1, 0)|| = sqrt 2; row 2: ||(-0.3, 0, 0.4)|| = 0.5
    # Mean = (1.4142135624 + 0.5) / 2 = 0.9571067812
    assert prediction_difference(a, b) == pytest.approx((math.sqrt(2) + 0.5) / 2, abs=1e-12)
    assert math.isnan(prediction_difference(np.zeros((0, 2)), np.zeros((0, 2))))


def test_prediction_difference_properties():
    rng = np.random.default_rng(1)
    a, b = _random_proba(rng, 10, 4), _random_proba(rng, 10, 4)
    assert prediction_difference(a, a) == 0.0
    assert prediction_difference(a, b) == prediction_difference(b, a)  # |a-b| == |b-a| exactly


# --------------------------------------------------------------------------- param_distance

def test_param_distance_pinned_and_skips_integer_arrays():
    a = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([0.5]),
         "n": np.array([7], np.int64)}
    b = {"w": np.array([[1.0, 2.0], [3.0, 0.0]], np.float32), "b": np.array([-0.5]),
         "n": np.array([100], np.int64)}
    # (4-0)^2 + (0.5-(-0.5))^2 = 16 + 1 = 17 (the int64 counter is skipped): sqrt 17 = 4.1231056
    assert param_distance(a, b) == pytest.approx(math.sqrt(17), abs=1e-12)


def test_param_distance_computes_in_float64():
    # The squared difference (2e20)^2 = 4e40 overflows float32 (max ~3.4e38); float64 gives 2e20.
    a = {"w": np.array([1e20], np.float32)}
    b = {"w": np.array([-1e20], np.float32)}
    assert param_distance(a, b) == pytest.approx(2e20, rel=1e-6)


def test_param_distance_properties():
    rng = np.random.default_rng(2)
    a = {"x": rng.normal(size=(3, 4)), "y": rng.normal(size=5)}
    b = {"x": rng.normal(size=(3, 4)), "y": rng.normal(size=5)}
    assert param_distance(a, a) == 0.0
    assert param_distance(a, b) == param_distance(b, a)


def test_param_distance_rejects_mismatches():
    with pytest.raises(ValueError, match="key sets differ"):
        param_distance({"w": np.zeros(2)}, {"v": np.zeros(2)})
    with pytest.raises(ValueError, match="shape of 'w' differs"):
        param_distance({"w": np.zeros(2)}, {"w": np.zeros(3)})


# ---------------------------------------------------------------------------------- sape

def test_sape_acc_err_pinned():
    # AccErr between accuracies 0.9 and 0.6: |0.9-0.6| / (0.9+0.6) * 100 = 0.3/1.5*100 = 20
    assert sape(0.9, 0.6) == pytest.approx(20.0, abs=1e-12)


# ----------------------------------------------------------------- binomial / backdoor test

def test_binomial_p_value_pinned():
    # P(X >= 3 | Bin(3, 0.5)) = 0.5^3 = 0.125
    assert binomial_p_value(3, 3, 0.5) == pytest.approx(0.125, abs=1e-12)
    # P(X >= 0) = 1
    assert binomial_p_value(0, 10, 0.3) == pytest.approx(1.0, abs=1e-12)
    # P(X >= 2 | Bin(3, 0.5)) = (C(3,2) + C(3,3)) / 8 = 4/8 = 0.5
    assert binomial_p_value(2, 3, 0.5) == pytest.approx(0.5, abs=1e-12)
    # P(X >= 2 | Bin(4, 0.1)) = 1 - 0.9^4 - 4*0.1*0.9^3 = 1 - 0.6561 - 0.2916 = 0.0523
    assert binomial_p_value(2, 4, 0.1) == pytest.approx(0.0523, abs=1e-12)


def test_binomial_p_value_is_monotone_in_successes():
    p = [binomial_p_value(k, 20, 0.2) for k in range(21)]
    assert all(x >= y for x, y in itertools.pairwise(p))
    assert p[20] == pytest.approx(0.2 ** 20, rel=1e-9)  # P(X >= n) = p0^n


def test_backdoor_test_decisions():
    # 90 of 100 at chance 1/10: p ~ C(100,90)*0.1^90*0.9^10 ~ 6e-78
    active = backdoor_test(0.9, 100, 10)
    assert set(active) == {"backdoor_p_value", "backdoor_trigger_active"}
    assert active["backdoor_trigger_active"] is True
    assert active["backdoor_p_value"] < 1e-50
    # 5 of 100 at chance 1/10: p = P(X >= 5) ~ 0.976
    inactive = backdoor_test(0.05, 100, 10)
    assert inactive["backdoor_trigger_active"] is False
    assert inactive["backdoor_p_value"] > 0.5
    # 3 of 3 at chance 1/2: p = 0.125, active at alpha = 0.2, not at alpha = 0.1
    assert backdoor_test(1.0, 3, 2, alpha=0.2) == {"backdoor_p_value": pytest.approx(0.125),
                                                    "backdoor_trigger_active": True}
    assert backdoor_test(1.0, 3, 2, alpha=0.1)["backdoor_trigger_active"] is False


# ------------------------------------------------------------------------ per_example_loss

def test_per_example_loss_pinned():
    proba = np.array([[0.5, 0.5], [0.1, 0.9], [1.0, 0.0]])
    y = np.array([0, 1, 1])
    # [-ln 0.5, -ln 0.9, -ln 1e-12] = [0.6931471806, 0.1053605157, 27.6310211159]
    np.testing.assert_allclose(per_example_loss(proba, y),
                               [0.6931471806, 0.1053605157, 27.6310211159], atol=1e-9)


# ------------------------------------------------------------------------------- roc_auc

def test_roc_auc_pinned():
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    # Pairs (member, non-member): (3,2)=1, (3,1)=1, (1,2)=0, (1,1)=tie=0.5 -> 2.5/4 = 0.625
    assert roc_auc(np.array([3.0, 1.0]), np.array([2.0, 1.0])) == pytest.approx(0.625)
    assert math.isnan(roc_auc(np.array([]), np.array([1.0])))
    assert math.isnan(roc_auc(np.array([1.0]), np.array([])))


def test_roc_auc_swapping_groups_complements():
    rng = np.random.default_rng(3)
    m, n = rng.normal(0.5, 1, 30).round(1), rng.normal(0, 1, 40).round(1)  # rounding makes ties
    assert roc_auc(m, n) + roc_auc(n, m) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------- tpr_at_fpr

def _nonmembers_100() -> np.ndarray:
    return np.array([4.5, 1.0] + [0.0] * 98)


def test_tpr_at_fpr_pinned():
    members = np.array([5.0, 4.0, 3.0, 2.0])
    non = _nonmembers_100()
    # fpr = 0.01 with 100 non-members: at most 1 may be flagged (4.5); the threshold must stay
    # above the 2nd largest (1.0) -> members > 1.0: all 4 -> TPR = 1.0
    assert tpr_at_fpr(members, non, 0.01) == 1.0
    # fpr = 0: no non-member flagged, threshold above 4.5 -> members > 4.5: {5} -> 1/4 = 0.25
    assert tpr_at_fpr(members, non, 0.0) == 0.25
    # A member tied with the highest non-member cannot be flagged at fpr = 0: {5} -> 0.25
    assert tpr_at_fpr(np.array([5.0, 4.5, 3.0, 2.0]), non, 0.0) == 0.25
    # fpr = 1: everything may be flagged -> 1.0
    assert tpr_at_fpr(members, non, 1.0) == 1.0
    assert math.isnan(tpr_at_fpr(np.array([]), non))
    assert math.isnan(tpr_at_fpr(members, np.array([])))


def test_tpr_at_fpr_is_robust_to_rounding_of_fpr_times_n():
    # 0.29 * 100 = 28.999999999999996 in floating point, yet 29/100 <= 0.29, so 29 non-members
    # (99, ..., 71) may be flagged and the threshold sits just above 70: member 70.5 is caught.
    non = np.arange(100.0)[::-1]
    assert tpr_at_fpr(np.array([70.5]), non, 0.29) == 1.0
    assert tpr_at_fpr(np.array([70.5]), non, 0.28) == 0.0


def _tpr_at_fpr_brute_force(members: np.ndarray, non: np.ndarray, fpr: float) -> float:
    best = 0.0
    for t in [*np.unique(np.concatenate([members, non])), np.inf]:
        if np.mean(non >= t) <= fpr:
            best = max(best, float(np.mean(members >= t)))
    return best


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.5])
def test_tpr_at_fpr_matches_its_definition(fpr):
    rng = np.random.default_rng(4)
    members = rng.normal(0.5, 1, 50).round(1)
    non = rng.normal(0, 1, 100).round(1)
    assert tpr_at_fpr(members, non, fpr) == _tpr_at_fpr_brute_force(members, non, fpr)


# ------------------------------------------------------------------------ logit_confidence

def test_logit_confidence_pinned():
    proba = np.array([[0.5, 0.5], [0.2, 0.8], [0.0, 1.0], [1.0, 0.0]])
    y = np.array([0, 1, 1, 1])
    # [ln(0.5/0.5), ln(0.8/0.2), ln((1-1e-6)/1e-6), ln(1e-6/(1-1e-6))]
    # = [0, ln 4, ln 999999, -ln 999999] = [0, 1.3862943611, 13.8155095579, -13.8155095579]
    np.testing.assert_allclose(logit_confidence(proba, y),
                               [0.0, 1.3862943611, 13.8155095579, -13.8155095579], atol=1e-9)


# ------------------------------------------------------------------------------ loss attack

def test_loss_attack_pinned():
    pm = np.array([[0.9, 0.1], [0.4, 0.6]])  # p_y = 0.9, 0.6
    pn = np.array([[0.7, 0.3], [0.8, 0.2]])  # p_y = 0.7, 0.2
    ym, yn = np.array([0, 1]), np.array([0, 1])
    # score = -loss = ln p_y is increasing in p_y; pairs: (.9,.7)=1, (.9,.2)=1, (.6,.7)=0,
    # (.6,.2)=1 -> AUC 3/4. TPR at 1% FPR with 2 non-members: none may be flagged, threshold above
    # ln 0.7 -> only the 0.9 member -> 1/2.
    assert loss_attack(pm, ym, pn, yn) == {"mia_loss_auc": pytest.approx(0.75),
                                           "mia_loss_tpr_at_1fpr": 0.5}


# ------------------------------------------------------------------------------------ LiRA

def test_lira_offline_scores_pinned():
    shadow = np.array([[0.0, 1.0, 3.0],
                       [2.0, 3.0, 3.0]])
    target = np.array([2.0, 1.0, 4.0])
    # mu = [1, 2, 3]; residuals [[-1, -1, 0], [1, 1, 0]]; sigma^2 = 4/6 -> sigma = 0.8164965809
    # scores = [(2-1), (1-2), (4-3)] / sigma = [1.2247448714, -1.2247448714, 1.2247448714]
    # (query 3 has zero per-query spread: the global sigma keeps it finite)
    np.testing.assert_allclose(lira_offline_scores(target, shadow),
                               [1.2247448714, -1.2247448714, 1.2247448714], atol=1e-9)


def test_lira_offline_scores_min_std_floor():
    # All shadows agree: sigma = max(1e-3, 0) = 1e-3 -> scores [(1-1)/1e-3, (2-1)/1e-3] = [0, 1000]
    shadow = np.ones((2, 2))
    np.testing.assert_allclose(lira_offline_scores(np.array([1.0, 2.0]), shadow), [0.0, 1000.0])
    with pytest.raises(ValueError, match="shadow_phi must have shape"):
        lira_offline_scores(np.zeros(3), np.zeros((2, 2)))


def test_lira_offline_scores_are_scale_invariant():
    # Scaling every phi by a power of two is exact in floating point, so the scores are equal.
    rng = np.random.default_rng(5)
    target, shadow = rng.normal(size=7), rng.normal(size=(4, 7))
    np.testing.assert_array_equal(lira_offline_scores(4 * target, 4 * shadow),
                                  lira_offline_scores(target, shadow))


def test_lira_attack_pools_sigma_over_both_groups():
    # The pinned example above with queries 1-2 as members and query 3 as non-member. Pooled sigma
    # gives scores [1.22, -1.22 | 1.22]: pairs (1.22 vs 1.22) = 0.5, (-1.22 vs 1.22) = 0 -> AUC
    # 0.25. TPR at 1% FPR: no non-member may be flagged, no member is > 1.22 -> 0.
    # (Separate sigmas would give members [1, -1] vs non-member (4-3)/1e-3 = 1000 -> AUC 0.)
    shadow = np.array([[0.0, 1.0, 3.0],
                       [2.0, 3.0, 3.0]])
    out = lira_attack(np.array([2.0, 1.0]), np.array([4.0]), shadow[:, :2], shadow[:, 2:])
    assert out == {"mia_lira_auc": pytest.approx(0.25), "mia_lira_tpr_at_1fpr": 0.0}


# ----------------------------------------------------------------------- shadow models

def _digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images / 16).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def test_shadow_lira_is_deterministic_and_beats_chance_on_digits():
    x, y = _digits()
    perm = np.random.default_rng(0).permutation(len(y))
    a, b, pool = perm[:200], perm[200:400], perm[400:800]  # members, non-members, shadow pool
    spec = LocalTraining(epochs=5, batch_size=8, learning_rate=0.01, optimizer="adam")

    def new_model() -> torch.nn.Module:
        return build_model("mlp", (1, 8, 8), 10, seed=0)

    queries = np.concatenate([a, b])
    rng_state = torch.random.get_rng_state()
    phi_shadow = shadow_logit_confidences(new_model, spec, x[pool], y[pool], x[queries],
                                          y[queries], num_shadows=2, seed=0)
    again = shadow_logit_confidences(new_model, spec, x[pool], y[pool], x[queries], y[queries],
                                     num_shadows=2, seed=0)
    assert phi_shadow.shape == (2, len(queries))
    np.testing.assert_array_equal(phi_shadow, again)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert not np.array_equal(phi_shadow[0], phi_shadow[1])  # different halves / inits

    target = new_model()
    train(target, x[a], y[a], spec, seed=7)
    phi = logit_confidence(predict_proba(target, x[queries]), y[queries])
    out = lira_attack(phi[:200], phi[200:], phi_shadow[:, :200], phi_shadow[:, 200:])
    assert set(out) == {"mia_lira_auc", "mia_lira_tpr_at_1fpr"}
    assert out["mia_lira_auc"] > 0.5


def test_population_calibration_pinned():
    # polyfit of t = [1, 3.5, 5] on mu = [0, 1, 2]: a = 2, c = mean(t) - 2 * mean(mu) = 7/6;
    # residuals [-1/6, 1/3, -1/6] -> std = sqrt((1/36 + 1/9 + 1/36) / 3) = sqrt(1/18)
    a, c, s = population_calibration(np.array([1.0, 3.5, 5.0]),
                                     np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]))
    assert a == pytest.approx(2.0) and c == pytest.approx(7 / 6)
    assert s == pytest.approx(np.sqrt(1 / 18))
    # too few population points: identity map and the shadows' pooled spread
    assert population_calibration(np.array([1.0]), np.array([[0.0], [2.0]])) == (1.0, 0.0, 1.0)


def test_calibrated_lira_pinned_and_scale_invariant():
    pop_t, pop_s = np.array([1.0, 3.5, 5.0]), np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    # member: phi 4 where the calibrated prediction is 2 * 1 + 7/6 -> score (4 - 19/6)/s > 0;
    # non-member: phi 3 -> score < 0; AUC 1
    out = calibrated_lira_attack(np.array([4.0]), np.array([3.0]), np.array([[1.0], [1.0]]),
                                 np.array([[1.0], [1.0]]), pop_t, pop_s)
    assert out["mia_lira_auc"] == 1.0
    # A target that is merely less confident everywhere (phi halved) is not made a member of
    # the examples the shadows find hard: calibration removes the scale, plain LiRA does not.
    rng = np.random.default_rng(0)
    mu_m, mu_n, mu_p = rng.normal(-8, 1, 50), rng.normal(8, 1, 50), rng.normal(0, 8, 200)
    shadows = [np.stack([mu + rng.normal(0, 0.5, mu.size) for _ in range(4)])
               for mu in (mu_m, mu_n, mu_p)]
    target = [0.5 * mu + rng.normal(0, 0.5, mu.size) for mu in (mu_m, mu_n, mu_p)]
    plain = lira_attack(target[0], target[1], shadows[0], shadows[1])["mia_lira_auc"]
    calib = calibrated_lira_attack(target[0], target[1], shadows[0], shadows[1], target[2],
                                   shadows[2])["mia_lira_auc"]
    assert plain > 0.95          # the artefact: every hard example looks like a member
    assert abs(calib - 0.5) < 0.15


def test_calibrated_lira_scores_pinned():
    # population fit (see above): a = 2, c = 7/6, s = sqrt(1/18); mu = [1, 0]
    # scores = ([4, 1] - [2 + 7/6, 7/6]) / sqrt(1/18) = [5/6, -1/6] * sqrt(18)
    pop_t, pop_s = np.array([1.0, 3.5, 5.0]), np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    scores = calibrated_lira_scores(np.array([4.0, 1.0]), np.array([[1.0, 0.0], [1.0, 0.0]]),
                                    pop_t, pop_s)
    np.testing.assert_allclose(scores, np.array([5 / 6, -1 / 6]) * math.sqrt(18), atol=1e-9)


# ------------------------------------------------------------- bootstrap AUC intervals

def test_weighted_aucs_pinned():
    # counts [1, 1] / [1, 1]: plain AUC of [3, 1] vs [2, 1] = (1 + 1 + 0 + 0.5) / 4 = 0.625;
    # member 3 twice: (2 * (1 + 1)) / (2 * 2) = 1; member 1 three times against non-member 2
    # once and 1 twice: 3 * 2 ties count 0.5 each, 3 of 3 * 3 = 9 pairs -> 1/3
    aucs = weighted_aucs(np.array([3.0, 1.0]), np.array([2.0, 1.0]),
                         np.array([[1, 1], [2, 0], [0, 3]]), np.array([[1, 1], [1, 1], [1, 2]]))
    np.testing.assert_allclose(aucs, [0.625, 1.0, 1 / 3])


def test_weighted_aucs_match_roc_auc_on_the_repeated_samples():
    # the slow, obviously correct twin: materialise every resample and call roc_auc
    rng = np.random.default_rng(4)
    members = rng.integers(0, 6, 13).astype(float)  # few distinct values: many ties
    nonmembers = rng.integers(0, 6, 9).astype(float)
    wm, wn = bootstrap_counts(13, 50, rng), bootstrap_counts(9, 50, rng)
    slow = [roc_auc(np.repeat(members, a), np.repeat(nonmembers, b)) for a, b in zip(wm, wn)]
    np.testing.assert_allclose(weighted_aucs(members, nonmembers, wm, wn), slow, atol=1e-12)


def test_bootstrap_counts_are_draws_with_replacement():
    counts = bootstrap_counts(5, 2000, np.random.default_rng(1))
    assert counts.shape == (2000, 5) and (counts.sum(axis=1) == 5).all()
    # each item is drawn Binomial(5, 1/5) times: mean 1, P(count = 0) = 0.8^5 = 0.32768
    assert counts.mean() == pytest.approx(1.0)
    assert (counts == 0).mean() == pytest.approx(0.32768, abs=0.02)


def test_bootstrap_interval_contains_the_auc_and_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 1600):
        members, nonmembers = rng.normal(0.5, 1, n), rng.normal(0.0, 1, n)
        lo, hi = bootstrap_auc_interval(members, nonmembers, resamples=300, seed=0)
        assert lo < roc_auc(members, nonmembers) < hi
        widths.append(hi - lo)
    # the standard error falls like 1/sqrt(n): 40x the samples, about sqrt(40) = 6.3x narrower
    assert 3 < widths[0] / widths[1] < 12
    # true AUC Phi(0.5 / sqrt(2)) = 0.638 lies in the large-sample interval
    assert lo < 0.638 < hi


def test_bootstrap_interval_is_seeded_and_degenerates_cleanly():
    rng = np.random.default_rng(2)
    m, n = rng.normal(size=30), rng.normal(size=20)
    assert bootstrap_auc_interval(m, n, seed=3) == bootstrap_auc_interval(m, n, seed=3)
    assert bootstrap_auc_interval(m, n, seed=3) != bootstrap_auc_interval(m, n, seed=4)
    # all scores tied: every resample has AUC 0.5
    assert bootstrap_auc_interval(np.ones(5), np.ones(7)) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_auc_interval(np.ones(3), np.zeros(0)))
    with pytest.raises(ValueError, match="level"):
        bootstrap_auc_interval(m, n, level=1.5)


def test_summarize_attack_pinned():
    # AUC 0.625 (see test_roc_auc_pinned); 2 non-members allow no false positive: only the
    # member 3 lies above the top non-member 2 -> TPR 1/2
    s = summarize_attack(np.array([3.0, 1.0]), np.array([2.0, 1.0]), resamples=50, seed=0)
    assert (s.auc, s.tpr_at_1fpr, s.members, s.nonmembers) == (0.625, 0.5, 2, 2)
    assert 0.0 <= s.auc_ci[0] <= s.auc <= s.auc_ci[1] <= 1.0


# ------------------------------------------------------------------ McNemar on the ASR

def test_mcnemar_exact_p_pinned():
    # 8 discordant pairs all one way: 2 * 0.5^8
    assert mcnemar_exact_p(8, 0) == pytest.approx(2 * 0.5 ** 8) == pytest.approx(0.0078125)
    # b = 5 of 6: P(X <= 1) + P(X >= 5) for Binomial(6, 1/2) = (1 + 6 + 6 + 1) / 64
    assert mcnemar_exact_p(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(1, 5) == mcnemar_exact_p(5, 1)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 2)


def test_paired_backdoor_test_counts_discordant_pairs():
    hit, miss = [0.1, 0.9], [0.9, 0.1]  # target class 1
    # inputs: both hit, method only (x3), reference only, both miss -> b = 3, c = 1
    method = np.array([hit, hit, hit, hit, miss, miss])
    ref = np.array([hit, miss, miss, miss, hit, miss])
    out = paired_backdoor_test(method, ref, 1)
    # p = P(X <= 1) + P(X >= 3) for Binomial(4, 1/2) = (1 + 4 + 4 + 1) / 16
    assert out == {"backdoor_asr_vs_retrain_p": pytest.approx(10 / 16),
                   "backdoor_discordant": [3, 1]}
    assert paired_backdoor_test(method, method, 1) == {"backdoor_asr_vs_retrain_p": 1.0,
                                                        "backdoor_discordant": [0, 0]}
    with pytest.raises(ValueError, match="same triggered inputs"):
        paired_backdoor_test(method, ref[:3], 1)


def test_kl_is_never_negative_from_rounding():
    """Float32 softmax rows that do not sum exactly to 1 gave KL ≈ -1e-8, printed in the
    table as a (meaningless) negative divergence; each row's KL is floored at 0, and a real
    divergence is unchanged."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    q = (p * np.float32(1 + 1e-7)).astype(np.float32)  # the same rows, rounded differently
    assert kl_divergence(p, q) == 0.0
    assert kl_divergence(np.array([[0.5, 0.5]]), np.array([[0.25, 0.75]])) == pytest.approx(
        0.5 * np.log(2) + 0.5 * np.log(0.5 / 0.75))
