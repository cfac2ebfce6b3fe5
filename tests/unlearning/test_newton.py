"""Certified removal (Guo et al., ICML 2020): the Newton step against exact retraining, the
gradient-residual bounds, the removal budget, and the ``newton`` method through the protocol."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import small_config
from scipy.special import expit
from sklearn.datasets import load_digits

from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning import UNLEARNERS, UnlearningContext
from fedunlearn.unlearning.centralized.certified import (
    OvRCertified,
    add_bias,
    certification_budget,
    clip_rows,
    gradient,
    hessian,
    newton_removal,
    objective,
    train_logistic,
)
from fedunlearn.unlearning.centralized.newton import NewtonRemoval

LAM = 1e-3
DIGITS = load_digits()


def scaled(x: np.ndarray) -> np.ndarray:
    """Bias-augmented digits rows of norm <= 1."""
    a = add_bias(x / 16.0)
    return clip_rows(a / np.max(np.linalg.norm(a, axis=1)))


def binary(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n digits, "3" against the rest, and a noise vector b ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(DIGITS.target))[:n]
    X = scaled(DIGITS.data[idx])
    y = np.where(DIGITS.target[idx] == 3, 1.0, -1.0)
    return X, y, rng.normal(0.0, 1.0, X.shape[1])


def direct_gradient(w: np.ndarray, X: np.ndarray, y: np.ndarray, b: np.ndarray) -> np.ndarray:
    """grad of sum log(1 + exp(-y w.x)) + lam n/2 |w|^2 + b.w, written out independently."""
    return X.T @ (-y * expit(-y * (X @ w))) + LAM * len(X) * w + b


def removal_mask(n: int, m: int, seed: int = 1) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=m, replace=False)] = True
    return mask


# --------------------------------------------------------------------------- pure math

def test_gradient_and_hessian_match_finite_differences():
    X, y, b = binary(60)
    w = np.random.default_rng(3).normal(0.0, 1.0, X.shape[1])
    h = 1e-6
    eye = np.eye(X.shape[1])
    num_g = np.array([(objective(w + h * e, X, y, LAM, b) - objective(w - h * e, X, y, LAM, b))
                      / (2 * h) for e in eye])
    num_h = np.stack([(gradient(w + h * e, X, y, LAM, b) - gradient(w - h * e, X, y, LAM, b))
                      / (2 * h) for e in eye])
    np.testing.assert_allclose(gradient(w, X, y, LAM, b), num_g, atol=1e-5)
    np.testing.assert_allclose(hessian(w, X, LAM), num_h, atol=1e-5)
    np.testing.assert_allclose(gradient(w, X, y, LAM, b), direct_gradient(w, X, y, b), atol=1e-12)


def test_training_reaches_the_optimum_and_removal_gradient_is_minus_delta():
    X, y, b = binary(400)
    n, m = len(X), 5
    w = train_logistic(X, y, LAM, b)
    assert np.linalg.norm(direct_gradient(w, X, y, b)) <= 1e-8 * n
    mask = removal_mask(n, m)
    delta = m * LAM * w + X[mask].T @ (-y[mask] * expit(-y[mask] * (X[mask] @ w)))
    # The remaining objective (n - m points, regulariser lam (n - m), same b) at w*.
    np.testing.assert_allclose(direct_gradient(w, X[~mask], y[~mask], b), -delta, atol=1e-9)


def test_retrained_optimum_has_zero_gradient_on_the_remaining_objective():
    X, y, b = binary(400)
    mask = removal_mask(len(X), 40)
    w_re = train_logistic(X[~mask], y[~mask], LAM, b)
    assert np.linalg.norm(direct_gradient(w_re, X[~mask], y[~mask], b)) <= 1e-8 * (~mask).sum()


@pytest.mark.parametrize("m", [5, 40])
def test_newton_step_is_ten_times_closer_to_retraining_and_bounds_are_ordered(m: int):
    X, y, b = binary(400)
    n = len(X)
    w = train_logistic(X, y, LAM, b)
    mask = removal_mask(n, m)
    w_new, info = newton_removal(X, y, w, LAM, n, mask, b=b)
    w_re = train_logistic(X[~mask], y[~mask], LAM, b)
    assert np.linalg.norm(w_new - w_re) <= 0.1 * np.linalg.norm(w - w_re)
    assert info["true_residual"] <= info["data_dependent_bound"] <= info["worst_case_bound"]
    assert info["worst_case_bound"] == pytest.approx(4 * 0.25 * m**2 / (LAM**2 * (n - m)))
    direct = direct_gradient(w_new, X[~mask], y[~mask], b)
    assert info["true_residual"] == pytest.approx(np.linalg.norm(direct), rel=1e-9)
    # The b^T w term is in: dropping it changes the residual by orders of magnitude.
    assert np.linalg.norm(direct - b) > 100 * info["true_residual"]
    assert (info["removed"], info["remaining"]) == (m, n - m)


def test_newton_removal_rejects_inconsistent_inputs():
    X, y, b = binary(50)
    w = np.zeros(X.shape[1])
    with pytest.raises(ValueError, match="n_total"):
        newton_removal(X, y, w, LAM, 49, removal_mask(50, 2), b=b)
    with pytest.raises(ValueError, match="all"):
        newton_removal(X, y, w, LAM, 50, np.ones(50, dtype=bool), b=b)


def test_budget_formula():
    c = np.sqrt(2 * np.log(1.5 / 1e-4))
    assert certification_budget(2.0, 0.5, 1e-4) == pytest.approx(2.0 * 0.5 / c)


# --------------------------------------------------------------------------- one-vs-rest

@pytest.fixture(scope="module")
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(0).permutation(len(DIGITS.target))
    train, test = perm[:1400], perm[1400:]
    x = DIGITS.data / 16.0
    return x[train], DIGITS.target[train], x[test], DIGITS.target[test]


def test_ovr_is_accurate_and_each_class_is_close_to_retraining(digits_split):
    x_tr, y_tr, x_te, y_te = digits_split
    model = OvRCertified(lam=LAM, sigma=1.0, epsilon=1e6, seed=5).fit(x_tr, y_tr)
    p = model.predict_proba(x_te)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert np.mean(p.argmax(axis=1) == y_te) >= 0.9
    W0 = model.W_.copy()
    info = model.remove(np.arange(20))
    assert not info["retrained"] and info["removed_samples"] == 20
    assert info["true_residual"] <= info["data_dependent_bound"] <= info["worst_case_bound"]
    keep = model.mask_
    assert keep.sum() == 1380 and not keep[:20].any()
    for k in range(10):
        labels = np.where(y_tr[keep] == k, 1.0, -1.0)
        w_re = train_logistic(model.X_[keep], labels, LAM, model.B_[k])
        assert np.linalg.norm(model.W_[k] - w_re) <= 0.1 * np.linalg.norm(W0[k] - w_re)
    assert np.mean(model.predict_proba(x_te).argmax(axis=1) == y_te) >= 0.9


def test_ovr_scaling_keeps_rows_inside_the_unit_ball(digits_split):
    x_tr, y_tr, _, _ = digits_split
    model = OvRCertified(seed=0).fit(x_tr[:200], y_tr[:200])
    assert np.linalg.norm(model.X_, axis=1).max() <= 1.0 + 1e-12
    assert np.linalg.norm(model.scale_rows(3 * x_tr[:5]), axis=1).max() <= 1.0 + 1e-12


def test_budget_accumulates_over_successive_removals(digits_split):
    x_tr, y_tr, _, _ = digits_split
    model = OvRCertified(lam=LAM, sigma=1.0, epsilon=1e6, seed=2).fit(x_tr[:300], y_tr[:300])
    first = model.remove(np.array([0, 1, 2]))
    beta_after_first = model.beta_.copy()
    second = model.remove(np.arange(300) == 7)
    assert not first["retrained"] and not second["retrained"]
    assert second["budget_used"] == pytest.approx(model.beta_.max())
    assert np.all(model.beta_ >= beta_after_first)
    # Residuals add up across removals; beta bounds their sum (r_0 of the fit is ~1e-13).
    assert np.all(model.residuals() <= model.beta_ + 1e-8)
    with pytest.raises(ValueError, match="already removed"):
        model.remove(np.array([1]))


def test_exceeding_the_budget_retrains_with_fresh_noise(digits_split):
    x_tr, y_tr, _, _ = digits_split
    sigma, seed = 1e-6, 11
    model = OvRCertified(lam=LAM, sigma=sigma, seed=seed).fit(x_tr[:300], y_tr[:300])
    rng = np.random.default_rng(seed)
    b_first = rng.normal(0.0, sigma, size=(10, model.X_.shape[1]))
    b_second = rng.normal(0.0, sigma, size=(10, model.X_.shape[1]))
    np.testing.assert_array_equal(model.B_, b_first)
    info = model.remove(np.arange(10))
    assert info["retrained"] and "exceeds the budget" in info["reason"]
    assert info["data_dependent_bound"] > info["budget"]
    assert info["budget_used"] == 0.0 and np.all(model.beta_ == 0.0)
    np.testing.assert_array_equal(model.B_, b_second)
    keep = np.arange(300) >= 10
    for k in range(10):
        labels = np.where(y_tr[:300][keep] == k, 1.0, -1.0)
        fresh = train_logistic(model.X_[keep], labels, LAM, b_second[k])
        np.testing.assert_allclose(model.W_[k], fresh, atol=1e-10)
    assert info["true_residual"] <= 1e-8 * 290


# --------------------------------------------------------------------------- the protocol

@pytest.fixture(scope="module")
def setup():
    return prepare(small_config())


def context(setup, targets: tuple[int, ...] = (), removed: frozenset[int] = frozenset(),
            cfg=None) -> UnlearningContext:
    return UnlearningContext(cfg=cfg or setup.cfg, targets=targets, removed=removed,
                             model=setup.initial, initial=setup.initial, history=None,
                             federation=None, data=setup.data, build_model=setup.build_model,
                             seed=7)


def test_registered_method_fits_and_unlearns_a_client(setup):
    assert UNLEARNERS.get("newton") is NewtonRemoval
    assert NewtonRemoval.setting == "centralized"
    method = UNLEARNERS.get("newton")()
    assert method.fit(context(setup)) is method
    x_test = setup.data.test.x
    original = method.predict_proba_original(x_test)
    np.testing.assert_allclose(original.sum(axis=1), 1.0)
    assert np.mean(original.argmax(axis=1) == setup.data.test.y) >= 0.85
    result = method.unlearn(context(setup, (0,), frozenset({0})))
    d = result.details
    assert result.model is None
    for key in ("data_dependent_bound", "worst_case_bound", "true_residual", "budget_used",
                "budget", "retrained", "removed_samples", "features"):
        assert key in d
    assert d["removed_samples"] == len(setup.data.clients[0]) and d["features"] == "raw"
    assert d["data_dependent_bound"] <= d["worst_case_bound"]
    remaining = sum(len(c) for c in setup.data.clients[1:])
    assert result.cost.sample_epochs == (remaining if d["retrained"] else 0)
    p = result.predict_proba(x_test)
    assert p.shape == (len(x_test), setup.data.num_classes)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    # Original predictions are frozen; the returned predictor is frozen too.
    np.testing.assert_array_equal(method.predict_proba_original(x_test), original)
    again = method.unlearn(context(setup, (0,), frozenset({0})))
    assert again.details["removed_samples"] == 0
    np.testing.assert_array_equal(result.predict_proba(x_test), p)


def test_penultimate_features_on_the_mlp(setup):
    method = NewtonRemoval(features="penultimate", extractor_epochs=5).fit(context(setup))
    assert method.model_.W_.shape == (setup.data.num_classes, 64 + 1)
    result = method.unlearn(context(setup, (1,), frozenset({1})))
    assert result.details["features"] == "penultimate"
    np.testing.assert_allclose(result.predict_proba(setup.data.test.x).sum(axis=1), 1.0)


def test_invalid_parameters_raise(setup):
    with pytest.raises(ValueError, match="features"):
        NewtonRemoval(features="pixels").check()
    for bad in ({"lam": 0.0}, {"sigma": -1.0}, {"epsilon": 0.0}, {"delta": 1.0},
                {"extractor_epochs": 0.0}):
        with pytest.raises(ValueError):
            NewtonRemoval(**bad).check()
    logistic_cfg = dataclasses.replace(
        setup.cfg, model=dataclasses.replace(setup.cfg.model, name="logistic"))
    with pytest.raises(ValueError, match="mlp"):
        NewtonRemoval(features="penultimate").fit(context(setup, cfg=logistic_cfg))
