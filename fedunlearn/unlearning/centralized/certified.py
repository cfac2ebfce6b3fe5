"""Certified removal for L2-regularised logistic regression: the math, in float64 NumPy/SciPy.

Guo, Goldstein, Hannun and van der Maaten, "Certified Data Removal from Machine Learning
Models", ICML 2020. A linear model is trained with *loss perturbation*

    L(w; D) = sum_{i in D} l(w^T x_i, y_i) + (lam |D| / 2) ||w||^2 + b^T w,   b ~ N(0, sigma^2 I),

with the logistic loss l(z, y) = log(1 + exp(-y z)), y in {-1, +1}, and inputs scaled to
``||x|| <= 1``. Removing a set M of m points from the n points of the current objective takes
one Newton step on the remaining objective from the current weights w:

    Delta  = m lam w + sum_{j in M} grad l(w^T x_j, y_j)
    H      = sum_{i not in M} hess l(w^T x_i, y_i) + lam (n - m) I
    w^-    = w + H^{-1} Delta                      (Cholesky solve, never an explicit inverse)

Conventions (decided here, used everywhere in this module):

* **The regulariser follows the data.** ``lam`` is a per-sample weight: an objective over n
  points has regulariser ``lam n / 2 ||w||^2``; after removing m points it is
  ``lam (n - m) / 2 ||w||^2``. The noise ``b`` is the same before and after a removal (it only
  changes when the model is retrained from scratch). With these, ``grad L^-(w) = grad L(w) -
  Delta``, so from an exact optimum (``grad L(w*) = 0``) ``grad L^-(w*) = -Delta`` and ``w^-`` is
  exactly one Newton step on ``L^-``.
* **Successive removals.** Each call works on the objective as it currently stands: ``n`` is the
  number of points still in the training set *before* this removal and ``m`` the number removed
  by *this* call. ``w`` is the previous (approximate) solution, not a fresh optimum, and the
  gradient residual it carries is kept (``Delta`` is not recomputed from the full remaining
  gradient), so residuals add up: after k removals ``||grad L_k(w_k)|| <= r_0 + sum of the k
  per-step bounds``, with r_0 the (negligible) optimiser residual of the last exact fit. This is
  why the running budget beta sums the per-step data-dependent bounds (Guo et al.).

Gradient residual bounds reported for a removal (gamma = 1/4 bounds the Lipschitz constant of
``l''`` for the logistic loss; X^- holds the remaining rows, ``||.||_2`` is the spectral norm):

* data-dependent: ``gamma ||X^-||_2 ||H^{-1} Delta|| ||X^- H^{-1} Delta||``;
* worst case, for m points removed at once: ``4 gamma m^2 C^2 / (lam^2 (n - m))``
  with C = 1 (``||x|| <= 1`` gives ``|l'| ||x|| <= 1``). Its proof uses ``lam ||w|| <= C``, which
  holds at the unperturbed optimum but can fail slightly with the noise term (``lam ||w*|| <= C
  + ||b|| / n``); to keep the number a valid bound we use ``C_bar = max(C, lam ||w||)`` in place
  of C, which equals C in every usual case.
* the true residual ``||grad L^-(w^-)||``, computed directly, ``b^T w`` term included.

Certification (loss perturbation): with ``c = sqrt(2 ln(1.5 / delta))`` (i.e. ``delta =
1.5 exp(-c^2 / 2)``), a model whose accumulated gradient residual stays below ``eps' = sigma
epsilon / c`` is (epsilon, delta)-certified; once the running sum beta of data-dependent bounds
would exceed it, retrain from scratch with fresh noise and reset beta.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController

# SciPy and threadpoolctl are imported where they are used, so that importing the methods
# (fedunlearn.unlearning) does not load SciPy.

GAMMA = 0.25
"""Lipschitz constant used for the logistic loss' second derivative (Guo et al.)."""
C_GRAD = 1.0
"""Bound C on ``||grad l(w^T x, y)||`` for inputs with ``||x|| <= 1``."""
ABS_TOL = 1e-12
"""Target of :func:`train_logistic`: ``||grad L(w*)|| <= ABS_TOL * n``."""
WARM_TOL = 1e-6
"""Gradient tolerance (times n) of the L-BFGS-B warm start that Newton iterations polish."""


SMALL_PROBLEM = 5e7
"""Problems with ``n d^2`` below this run single-threaded BLAS (thread start-up dominates)."""


@contextlib.contextmanager
def _blas_threads_for(n: int, d: int) -> Iterator[None]:
    """Single-threaded BLAS for small problems (many small products, where OpenBLAS threads
    cost far more than they save, badly so on a loaded machine); unchanged otherwise."""
    if n * d * d <= SMALL_PROBLEM:
        with _controller().limit(limits=1, user_api="blas"):
            yield
    else:
        yield


@functools.cache
def _controller() -> ThreadpoolController:
    """One scan of the loaded BLAS libraries per process."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


# --------------------------------------------------------------------------- the loss

def logistic_loss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Element-wise ``l(z, y) = log(1 + exp(-y z))`` for labels in {-1, +1}, computed stably.

    >>> float(logistic_loss(np.array([0.0]), np.array([1.0]))[0]) == float(np.log(2.0))
    True
    """
    return np.logaddexp(0.0, -y * z)


def logistic_dloss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Element-wise ``dl/dz = -y sigmoid(-y z)``; the gradient in w is ``dl/dz * x``."""
    from scipy.special import expit

    return -y * expit(-y * z)


def logistic_d2loss(z: np.ndarray) -> np.ndarray:
    """Element-wise ``d2l/dz2 = sigmoid(z) sigmoid(-z)`` (independent of y since y^2 = 1)."""
    from scipy.special import expit

    return expit(z) * expit(-z)


# --------------------------------------------------------------------------- the objective

def objective(w: np.ndarray, X: np.ndarray, y: np.ndarray, lam: float,
              b: np.ndarray | None = None) -> float:
    """``L(w) = sum_i l(w^T x_i, y_i) + (lam n / 2) ||w||^2 + b^T w`` with ``n = len(X)``."""
    n = X.shape[0]
    value = float(np.sum(logistic_loss(X @ w, y))) + 0.5 * lam * n * float(w @ w)
    return value + (float(b @ w) if b is not None else 0.0)


def gradient(w: np.ndarray, X: np.ndarray, y: np.ndarray, lam: float,
             b: np.ndarray | None = None) -> np.ndarray:
    """``grad L(w) = X^T l'(Xw, y) + lam n w + b`` with ``n = len(X)``."""
    g = X.T @ logistic_dloss(X @ w, y) + lam * X.shape[0] * w
    return g + b if b is not None else g


def hessian(w: np.ndarray, X: np.ndarray, lam: float) -> np.ndarray:
    """``hess L(w) = X^T diag(l''(Xw)) X + lam n I`` with ``n = len(X)`` (b does not enter)."""
    from scipy.linalg import blas

    a = X * np.sqrt(logistic_d2loss(X @ w))[:, None]
    upper = blas.dsyrk(1.0, a, trans=1)  # A^T A, upper triangle only: half a GEMM's work
    H = np.triu(upper) + np.triu(upper, 1).T
    H[np.diag_indices_from(H)] += lam * X.shape[0]
    return H


def spectral_norm(X: np.ndarray) -> float:
    """``||X||_2``, the largest singular value, from the top eigenvalue of ``X^T X``."""
    from scipy.linalg import eigvalsh

    if X.size == 0:
        return 0.0
    gram = X.T @ X if X.shape[0] >= X.shape[1] else X @ X.T
    k = gram.shape[0]
    top = eigvalsh(gram, subset_by_index=[k - 1, k - 1])
    return float(math.sqrt(max(float(top[0]), 0.0)))


def _check_problem(X: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"need X of shape (n, d) and y of shape (n,), got {X.shape}, {y.shape}")
    if not np.all(np.abs(y) == 1.0):
        raise ValueError("binary labels must be -1 or +1")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    return X, y


# --------------------------------------------------------------------------- training

def train_logistic(X: np.ndarray, y: np.ndarray, lam: float, b: np.ndarray | None = None, *,
                   w0: np.ndarray | None = None, max_newton: int = 50) -> np.ndarray:
    """Minimise ``L(w) = sum_i l(w^T x_i, y_i) + (lam n / 2) ||w||^2 + b^T w`` to high precision.

    L-BFGS-B (``scipy.optimize.minimize``, gradient tolerance ``WARM_TOL * n``) brings w near
    the optimum; exact Newton iterations (Cholesky-solved, step halved until the gradient norm
    decreases) then polish it until ``||grad L(w)|| <= ABS_TOL * n`` or no further progress is
    possible in float64. Since L is ``lam n``-strongly convex, the optimum is unique.

    Parameters
    ----------
    X : np.ndarray
        Inputs, shape ``(n, d)`` (rows of norm <= 1 for the removal bounds to hold).
    y : np.ndarray
        Labels in {-1, +1}, shape ``(n,)``.
    lam : float
        Per-sample L2 weight; the regulariser is ``lam n / 2 ||w||^2``.
    b : np.ndarray, optional
        Loss-perturbation vector, shape ``(d,)`` (default: none).
    w0 : np.ndarray, optional
        Starting point (default zeros).
    max_newton : int, optional
        Cap on polishing Newton iterations (default 50).

    Returns
    -------
    np.ndarray
        The minimiser ``w*``, shape ``(d,)``.
    """
    X, y = _check_problem(X, y, lam)
    n, d = X.shape
    b = None if b is None else np.asarray(b, dtype=np.float64)
    w = np.zeros(d) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    if n == 0:
        raise ValueError("cannot train on an empty set")

    with _blas_threads_for(n, d):
        return _minimise(X, y, lam, b, w, max_newton, warm=w0 is not None)


def _minimise(X: np.ndarray, y: np.ndarray, lam: float, b: np.ndarray | None, w: np.ndarray,
              max_newton: int, warm: bool = False) -> np.ndarray:
    """L-BFGS-B warm start, then Newton polishing (see :func:`train_logistic`).

    From a caller's warm start (``warm``) Newton runs first, and L-BFGS-B only if Newton does
    not reach the warm-start tolerance (the minimiser is unique, so the answer is the same).
    """
    if warm:
        w, gnorm = _newton_polish(X, y, lam, b, w, max_newton)
        if gnorm <= WARM_TOL * X.shape[0]:
            return w
    w = _lbfgs(X, y, lam, b, w)
    return _newton_polish(X, y, lam, b, w, max_newton)[0]


def _lbfgs(X: np.ndarray, y: np.ndarray, lam: float, b: np.ndarray | None,
           w: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        return objective(v, X, y, lam, b), gradient(v, X, y, lam, b)

    res = minimize(fun, w, jac=True, method="L-BFGS-B",
                   options={"maxiter": 20_000, "gtol": WARM_TOL * X.shape[0], "ftol": 1e-12})
    return np.asarray(res.x)


def _newton_polish(X: np.ndarray, y: np.ndarray, lam: float, b: np.ndarray | None,
                   w: np.ndarray, max_newton: int) -> tuple[np.ndarray, float]:
    """Newton iterations (step halved until the gradient norm decreases) until
    ``||grad L|| <= ABS_TOL * n`` or float64 stops progress; returns ``(w, ||grad L(w)||)``."""
    from scipy.linalg import cho_factor, cho_solve

    target = ABS_TOL * X.shape[0]
    g = gradient(w, X, y, lam, b)
    gnorm = float(np.linalg.norm(g))
    for _ in range(max_newton):
        if gnorm <= target:
            break
        step = cho_solve(cho_factor(hessian(w, X, lam)), g)
        t = 1.0
        for _ in range(30):
            cand = w - t * step
            g_cand = gradient(cand, X, y, lam, b)
            if float(np.linalg.norm(g_cand)) < gnorm:
                break
            t *= 0.5
        else:
            break  # float64 floor reached
        w, g, gnorm = cand, g_cand, float(np.linalg.norm(g_cand))
    return w, gnorm


def _chord_all(X: np.ndarray, Y: np.ndarray, W: np.ndarray, lam: float, B: np.ndarray,
               factors: list[Any], max_steps: int = 100) -> np.ndarray:
    """Chord iterations for all one-vs-rest classes at once (a warm start for a retraining).

    Each step takes every class's gradient with two matrix products over all classes and
    solves with that class's fixed Hessian factor; a class stops when it is at ``ABS_TOL * n``
    or when a step fails to halve its gradient norm (the per-class Newton polish of
    :func:`train_logistic` finishes the job from there).
    """
    from scipy.linalg import cho_solve

    n = X.shape[0]
    target = ABS_TOL * n

    def grads(V: np.ndarray) -> np.ndarray:  # (K, d)
        return (X.T @ logistic_dloss(X @ V.T, Y)).T + lam * n * V + B

    with _blas_threads_for(n, X.shape[1]):
        W = W.copy()
        G = grads(W)
        norms = np.linalg.norm(G, axis=1)
        moving = np.ones(len(W), dtype=bool)
        for _ in range(max_steps):
            if not np.any((norms > target) & moving):
                break
            active = (norms > target) & moving
            cand = W.copy()
            cand[active] -= np.stack([cho_solve(factors[k], G[k]) for k in np.flatnonzero(active)])
            G_cand = grads(cand)
            norms_cand = np.linalg.norm(G_cand, axis=1)
            ok = active & (norms_cand <= 0.5 * norms)
            moving &= ok | ~active
            if not ok.any():
                break
            W[ok], G[ok], norms[ok] = cand[ok], G_cand[ok], norms_cand[ok]
    return W


# --------------------------------------------------------------------------- removal

def newton_removal(X: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float, n_total: int,
                   remove_mask: np.ndarray, *, b: np.ndarray | None = None,
                   x_spectral_norm: float | None = None, return_factor: bool = False) -> Any:
    """One Newton step removing the rows of ``remove_mask`` (Guo et al. 2020).

    ``Delta = m lam w + sum_{j in M} grad l(w^T x_j, y_j)``,
    ``H = sum_{i not in M} hess l(w^T x_i, y_i) + lam (n - m) I``, ``w^- = w + H^{-1} Delta``.
    This is one Newton step on ``L^-(w) = sum_{i not in M} l + lam (n - m) / 2 ||w||^2 + b^T w``
    from w: ``grad L^-(w) = grad L(w) - Delta``, which is ``-Delta`` at the exact optimum.

    Parameters
    ----------
    X, y : np.ndarray
        The ``n_total`` rows of the *current* objective (removed points included), labels in
        {-1, +1}.
    w : np.ndarray
        Current weights (the optimum, or the output of previous removals).
    lam : float
        Per-sample L2 weight.
    n_total : int
        Number of points in the current objective; its regulariser is ``lam n_total / 2
        ||w||^2`` and becomes ``lam (n_total - m) / 2 ||w||^2``. Must equal ``len(X)``.
    remove_mask : np.ndarray
        Boolean mask over the rows of X: the m points to remove.
    b : np.ndarray, optional
        The loss-perturbation vector of the model (unchanged by the removal); only the reported
        true residual depends on it.
    x_spectral_norm : float, optional
        ``||X^-||_2`` of the remaining rows, if the caller has it (computed otherwise).
    return_factor : bool, optional
        Also return the ``cho_factor`` of H (for a warm retraining, see :func:`train_logistic`).

    Returns
    -------
    w_new : np.ndarray
        The updated weights.
    info : dict
        ``data_dependent_bound``, ``worst_case_bound``, ``true_residual`` (``||grad L^-(w^-)||``,
        ``b^T w`` term included), ``removed`` (m) and ``remaining`` (n - m).
    """
    X, y = _check_problem(X, y, lam)
    w = np.asarray(w, dtype=np.float64)
    mask = np.asarray(remove_mask, dtype=bool)
    n = X.shape[0]
    if n_total != n:
        raise ValueError(f"n_total ({n_total}) must equal the number of rows of X ({n})")
    if mask.shape != (n,):
        raise ValueError(f"remove_mask must have shape ({n},), got {mask.shape}")
    m = int(mask.sum())
    if m >= n:
        raise ValueError(f"cannot remove all {n} points of the training set")
    with _blas_threads_for(n, X.shape[1]):
        w_new, info, factor = _newton_step(X, y, w, lam, mask, b, x_spectral_norm)
    return (w_new, info, factor) if return_factor else (w_new, info)


def _newton_step(X: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float, mask: np.ndarray,
                 b: np.ndarray | None,
                 x_spectral_norm: float | None) -> tuple[np.ndarray, dict[str, float], Any]:
    """The body of :func:`newton_removal` on validated inputs."""
    from scipy.linalg import cho_factor, cho_solve

    n, m = X.shape[0], int(mask.sum())
    keep = ~mask
    Xr, yr = X[keep], y[keep]
    if m == 0:
        resid = float(np.linalg.norm(gradient(w, Xr, yr, lam, b)))
        return w.copy(), {"data_dependent_bound": 0.0, "worst_case_bound": 0.0,
                          "true_residual": resid, "removed": 0, "remaining": n}, None
    Xm, ym = X[mask], y[mask]
    delta = m * lam * w + Xm.T @ logistic_dloss(Xm @ w, ym)
    H = hessian(w, Xr, lam)  # regulariser lam (n - m) since len(Xr) = n - m
    factor = cho_factor(H)
    step = cho_solve(factor, delta)
    w_new = w + step
    xnorm = spectral_norm(Xr) if x_spectral_norm is None else float(x_spectral_norm)
    data_bound = GAMMA * xnorm * float(np.linalg.norm(step)) * float(np.linalg.norm(Xr @ step))
    c_bar = max(C_GRAD, lam * float(np.linalg.norm(w)))
    worst = 4.0 * GAMMA * m**2 * c_bar**2 / (lam**2 * (n - m))
    resid = float(np.linalg.norm(gradient(w_new, Xr, yr, lam, b)))
    return w_new, {"data_dependent_bound": data_bound, "worst_case_bound": worst,
                   "true_residual": resid, "removed": m, "remaining": n - m}, factor


def certification_budget(sigma: float, epsilon: float, delta: float) -> float:
    """``eps' = sigma epsilon / c`` with ``c = sqrt(2 ln(1.5 / delta))`` (Guo et al. 2020).

    >>> round(certification_budget(1.0, 1.0, 1.5 * math.exp(-2.0)), 12)
    0.5
    """
    return sigma * epsilon / math.sqrt(2.0 * math.log(1.5 / delta))


# --------------------------------------------------------------------------- input scaling

def add_bias(X: np.ndarray) -> np.ndarray:
    """``X`` with a constant 1 column appended (the bias of the linear model)."""
    X = np.asarray(X, dtype=np.float64)
    return np.hstack([X, np.ones((X.shape[0], 1))])


def clip_rows(X: np.ndarray, max_norm: float = 1.0) -> np.ndarray:
    """Rows rescaled to norm at most ``max_norm`` (rows already inside are unchanged)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms / max_norm, 1.0)


# --------------------------------------------------------------------------- multiclass

@dataclass(frozen=True)
class LinearOvR:
    """A frozen one-vs-rest linear predictor: ``W`` (K x d, bias column last) and the scale.

    ``predict_proba`` scores ``sigmoid(w_k^T x~)`` per class on the scaled, bias-augmented input
    ``x~`` and normalises them to sum 1 per row.
    """

    W: np.ndarray
    scale: float

    def features(self, X: np.ndarray) -> np.ndarray:
        """``clip_rows(add_bias(X) / scale)``: bias-augmented rows of norm <= 1."""
        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        return clip_rows(add_bias(X) / self.scale)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Per-class sigmoid scores normalised per row, shape ``(N, K)``, float64."""
        from scipy.special import logsumexp

        z = self.features(X) @ self.W.T
        log_s = -np.logaddexp(0.0, -z)  # log sigmoid, stable
        return np.exp(log_s - logsumexp(log_s, axis=1, keepdims=True))


def check_certified_params(*, lam: float, sigma: float, epsilon: float, delta: float) -> None:
    """Raise ``ValueError`` naming the first of ``λ > 0``, ``σ > 0``, ``ε > 0``,
    ``0 < δ < 1`` that fails."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@dataclass(eq=False)
class OvRCertified:
    """K one-vs-rest certified logistic models with loss perturbation and a removal budget.

    The model has a bias: a constant 1 feature is appended to every input, then rows are
    divided by the largest augmented row norm seen at fit time and clipped to norm <= 1 (the
    bias is regularised like every other weight, as in Guo et al.). The scale is fixed at
    :meth:`fit` and reused by every later removal and retraining. Strictly, a scale computed
    from the data depends on the points later removed; use a data-independent bound on the
    input norm when the preprocessing must be covered by the certificate too.

    Each class k has its own noise ``b_k ~ N(0, sigma^2 I)``, drawn as ``B = rng.normal(0,
    sigma, (K, d))`` from ``np.random.default_rng(seed)`` (each retraining draws the next B from
    the same generator) and its own running budget ``beta_k``. Every class model is
    (epsilon, delta)-certified; the K-class model as a whole is (K epsilon, K delta)-certified
    by composition, so pass epsilon / K and delta / K to certify the whole at (epsilon, delta).

    Parameters
    ----------
    lam : float
        Per-sample L2 weight (default 1e-3).
    sigma : float
        Standard deviation of the loss-perturbation noise (default 1.0).
    epsilon, delta : float
        Certification parameters (defaults 1.0 and 1e-4).
    seed : int
        Seed of the noise generator (default 0).
    """

    lam: float = 1e-3
    sigma: float = 1.0
    epsilon: float = 1.0
    delta: float = 1e-4
    seed: int = 0
    W_: np.ndarray = field(init=False, repr=False)
    B_: np.ndarray = field(init=False, repr=False)
    beta_: np.ndarray = field(init=False, repr=False)
    mask_: np.ndarray = field(init=False, repr=False)
    scale_: float = field(init=False, repr=False)
    X_: np.ndarray = field(init=False, repr=False)
    y_: np.ndarray = field(init=False, repr=False)
    num_classes_: int = field(init=False, repr=False)
    rng_: np.random.Generator = field(init=False, repr=False)
    retrainings_: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_certified_params(lam=self.lam, sigma=self.sigma, epsilon=self.epsilon,
                               delta=self.delta)

    @property
    def budget(self) -> float:
        """``eps' = sigma epsilon / c``, the gradient-residual budget of each class model."""
        return certification_budget(self.sigma, self.epsilon, self.delta)

    def scale_rows(self, X: np.ndarray) -> np.ndarray:
        """Flatten, append the bias feature, divide by the fit-time scale, clip to norm <= 1."""
        return self.frozen().features(X)

    def frozen(self) -> LinearOvR:
        """A frozen copy of the current predictor (later removals do not change it)."""
        return LinearOvR(W=self.W_.copy(), scale=self.scale_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Per-class sigmoid scores normalised to sum 1 per row."""
        return self.frozen().predict_proba(X)

    def _labels(self, k: int, keep: np.ndarray) -> np.ndarray:
        return np.where(self.y_[keep] == k, 1.0, -1.0)

    def _train_all(self, warm: bool = False, factors: list[Any] | None = None) -> None:
        """Draw fresh noise and fit every class on the current training rows; reset beta.

        ``warm`` starts the solver from the current weights (the optimum is unique, so only
        the time changes)."""
        d = self.X_.shape[1]
        self.B_ = self.rng_.normal(0.0, self.sigma, size=(self.num_classes_, d))
        Xc = self.X_[self.mask_]
        start = self.W_ if warm else np.zeros((self.num_classes_, d))
        if warm and factors:
            start = _chord_all(Xc, self._signs(self.mask_), start, self.lam, self.B_, factors)
        self.W_ = np.stack([train_logistic(Xc, self._labels(k, self.mask_), self.lam, self.B_[k],
                                           w0=start[k] if warm else None)
                            for k in range(self.num_classes_)])
        self.beta_ = np.zeros(self.num_classes_)

    def _signs(self, keep: np.ndarray) -> np.ndarray:
        """One-vs-rest labels of every class at once, shape ``(n_kept, K)``."""
        return np.where(self.y_[keep][:, None] == np.arange(self.num_classes_), 1.0, -1.0)

    def fit(self, X: np.ndarray, y: np.ndarray, num_classes: int | None = None) -> OvRCertified:
        """Fit K one-vs-rest models on ``(X, y)`` with integer labels ``0..K-1``; returns self."""
        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        y = np.asarray(y, dtype=np.int64)
        if len(X) != len(y) or len(X) == 0:
            raise ValueError(f"need matching, non-empty X and y, got {len(X)} and {len(y)} rows")
        self.num_classes_ = int(num_classes if num_classes is not None else y.max() + 1)
        if y.min() < 0 or y.max() >= self.num_classes_:
            raise ValueError(f"labels must lie in 0..{self.num_classes_ - 1}")
        augmented = add_bias(X)
        self.scale_ = float(np.max(np.linalg.norm(augmented, axis=1)))
        self.X_ = clip_rows(augmented / self.scale_)
        self.y_ = y
        self.mask_ = np.ones(len(X), dtype=bool)
        self.rng_ = np.random.default_rng(self.seed)
        self.retrainings_ = 0
        self._train_all()
        return self

    def residuals(self) -> np.ndarray:
        """``||grad L_k(w_k)||`` of every class on the current training rows (b_k included)."""
        Xc = self.X_[self.mask_]
        return np.array([float(np.linalg.norm(gradient(self.W_[k], Xc, self._labels(k, self.mask_),
                                                        self.lam, self.B_[k])))
                         for k in range(self.num_classes_)])

    def remove(self, rows: np.ndarray) -> dict[str, Any]:
        """Remove training rows (boolean mask or indices into the rows given to :meth:`fit`).

        Applies :func:`newton_removal` to every class, adds each class' data-dependent bound to
        its ``beta_k``; when ``max_k beta_k`` exceeds the budget, retrains every class from
        scratch on the remaining rows with fresh noise and resets beta.

        Returns
        -------
        dict
            ``data_dependent_bound``, ``worst_case_bound`` and ``true_residual`` (max over
            classes; the residual is that of the returned model, i.e. of the retrained one when
            it retrained), ``budget_used`` (max_k beta_k after the call), ``budget`` (eps'),
            ``retrained`` (bool), ``reason`` (why, or None), ``removed_samples`` (m),
            ``remaining`` (n - m), ``newton_step_s`` (wall time of the Newton steps and bounds)
            and, when it retrained, ``retrain_s``.
        """
        rows = np.asarray(rows)
        n_fit = len(self.mask_)
        if rows.dtype == bool:
            if rows.shape != (n_fit,):
                raise ValueError(f"a boolean mask must have shape ({n_fit},), got {rows.shape}")
            new = rows.copy()
        else:
            idx = rows.astype(np.int64).ravel()
            if idx.size and (idx.min() < 0 or idx.max() >= n_fit):
                raise ValueError(f"row indices must lie in 0..{n_fit - 1}")
            new = np.zeros(n_fit, dtype=bool)
            new[idx] = True
        if np.any(new & ~self.mask_):
            raise ValueError("some rows were already removed")
        cur = self.mask_
        Xc = self.X_[cur]
        sub = new[cur]
        m = int(sub.sum())
        info: dict[str, Any] = {"data_dependent_bound": 0.0, "worst_case_bound": 0.0,
                                "budget": self.budget, "retrained": False, "reason": None,
                                "removed_samples": m, "remaining": int(cur.sum()) - m}
        if m == 0:
            info["true_residual"] = float(self.residuals().max())
            info["budget_used"] = float(self.beta_.max())
            return info
        t0 = time.perf_counter()
        xnorm = spectral_norm(Xc[~sub])
        steps = [newton_removal(Xc, self._labels(k, cur), self.W_[k], self.lam, len(Xc), sub,
                                b=self.B_[k], x_spectral_norm=xnorm, return_factor=True)
                 for k in range(self.num_classes_)]
        info["newton_step_s"] = time.perf_counter() - t0
        self.W_ = np.stack([w for w, _, _ in steps])
        self.mask_ = cur & ~new
        bounds = np.array([s["data_dependent_bound"] for _, s, _ in steps])
        self.beta_ = self.beta_ + bounds
        info["data_dependent_bound"] = float(bounds.max())
        info["worst_case_bound"] = float(max(s["worst_case_bound"] for _, s, _ in steps))
        info["true_residual"] = float(max(s["true_residual"] for _, s, _ in steps))
        used = float(self.beta_.max())
        if used > info["budget"]:
            info["retrained"] = True
            info["reason"] = (f"accumulated data-dependent bound {used:.3g} of class "
                              f"{int(self.beta_.argmax())} exceeds the budget "
                              f"{info['budget']:.3g}; retrained with fresh noise")
            self.retrainings_ += 1
            t0 = time.perf_counter()
            self._train_all(warm=True, factors=[f for _, _, f in steps])
            info["retrain_s"] = time.perf_counter() - t0
            info["true_residual"] = float(self.residuals().max())
        info["budget_used"] = float(self.beta_.max())
        return info
