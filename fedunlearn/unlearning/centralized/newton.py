"""Certified removal by one Newton step (centralized setting).

Guo, Goldstein, Hannun and van der Maaten, "Certified Data Removal from Machine Learning
Models", ICML 2020. All clients' data is pooled at one site and a one-vs-rest L2-regularised
logistic model with loss perturbation is fitted on it (:class:`~.certified.OvRCertified`);
removing a client's rows is one Newton step per class, with the gradient-residual bounds of the
paper reported and a running budget that triggers a retraining with fresh noise when exhausted.
The (ε, δ) certificate holds for each of the K one-vs-rest classifiers; by basic composition the
K-class model is (Kε, Kδ)-certified (``details.certified_whole_model``).

Features are either the flattened raw inputs (``features = "raw"``) or the penultimate layer of
the experiment's MLP (``"penultimate"``), trained on the server split with its labels: the
public-data role of Guo et al. The extractor never sees client data, so it is a fixed
preprocessing and the certificate covers the whole pipeline. The math lives in
:mod:`fedunlearn.unlearning.centralized.certified`; this module only orchestrates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.config.tree import Config
from fedunlearn.data.removal import pooled_ids
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import local_training, train
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    Capabilities,
    CentralizedUnlearner,
    Cost,
    Setting,
    UnlearningContext,
    UnlearningResult,
)
from fedunlearn.unlearning.centralized.certified import (
    LinearOvR,
    OvRCertified,
    check_certified_params,
)

FEATURES = ("raw", "penultimate")
SEED_TAG = 0x6E77


def _raw_features(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def _network_features(extractor: torch.nn.Module,
                      batch_size: int = 2048) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> extractor(x)`` as float64 NumPy, in eval mode, without gradients."""
    extractor.eval()

    @torch.no_grad()
    def features(x: np.ndarray) -> np.ndarray:
        xs = np.asarray(x, dtype=np.float32)
        out = [extractor(torch.from_numpy(xs[i:i + batch_size])).double().numpy()
               for i in range(0, len(xs), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0))

    return features


def _compose(features: Callable[[np.ndarray], np.ndarray],
             head: LinearOvR) -> Callable[[np.ndarray], np.ndarray]:
    def predict_proba(x: np.ndarray) -> np.ndarray:
        return head.predict_proba(features(x))
    return predict_proba


@UNLEARNERS.register("newton")
class NewtonRemoval(CentralizedUnlearner):
    """Certified removal with a Newton step on a loss-perturbed linear model (Guo et al. 2020).

    Parameters
    ----------
    lam : float
        Per-sample L2 weight; the regulariser is ``lam n / 2 ||w||^2`` over the n points still
        in the training set (default 1e-3).
    sigma : float
        Standard deviation of the loss-perturbation noise b (default 1.0).
    epsilon, delta : float
        Certification parameters of each one-vs-rest model (defaults 1.0 and 1e-4); the budget
        of accumulated gradient residual is ``sigma epsilon / sqrt(2 ln(1.5 / delta))``.
    features : str
        ``"raw"`` (flattened inputs, default) or ``"penultimate"`` (the MLP without its last
        layer, trained on the server split; needs ``model.name = "mlp"``).
    extractor_epochs : float
        Epochs of extractor training on the server split (default 20; ``"penultimate"`` only).

    Notes
    -----
    The Newton step is built for removing few points. A whole client is a large share of the
    pooled data (e.g. a quarter with four clients); its data-dependent bound then far exceeds
    the budget and the request is served by retraining with fresh noise, which ``details``
    (``retrained``, ``retrain_reason``) and ``Cost.sample_epochs`` report. Raising ``sigma``
    enlarges the budget but, at a few thousand samples, the noise ``b`` then dominates the
    ``lam n`` regulariser and costs accuracy.
    """

    setting: ClassVar[Setting] = "centralized"
    capabilities: ClassVar[Capabilities] = Capabilities(
        checks_config=True, granularities=frozenset(GRANULARITIES))
    """Not exact: (ε, δ)-certified, not equal to retraining."""

    def __init__(self, lam: float = 1e-3, sigma: float = 1.0, epsilon: float = 1.0,
                 delta: float = 1e-4, features: str = "raw",
                 extractor_epochs: float = 20.0) -> None:
        self.lam = lam
        self.sigma = sigma
        self.epsilon = epsilon
        self.delta = delta
        self.features = features
        self.extractor_epochs = extractor_epochs

    def check(self) -> None:
        check_certified_params(lam=self.lam, sigma=self.sigma, epsilon=self.epsilon,
                               delta=self.delta)
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}, "
                             f"got {self.features!r}")
        if not self.extractor_epochs > 0:
            raise ValueError(f"extractor_epochs must be > 0, got {self.extractor_epochs}")

    def check_config(self, cfg: Config) -> None:
        """The penultimate features are the experiment's MLP's: refuse another network before
        any work."""
        if self.features == "penultimate" and cfg.model.name != "mlp":
            raise ValueError(f"newton's features = 'penultimate' needs model.name = 'mlp', got "
                             f"{cfg.model.name!r}; use features = 'raw' with this model")

    def _feature_map(self, ctx: UnlearningContext, seed: int) -> Callable[[np.ndarray], np.ndarray]:
        if self.features == "raw":
            return _raw_features
        self.check_config(ctx.cfg)  # (run before any work too; here for direct callers)
        server = ctx.data.server
        if len(server) == 0:
            raise ValueError("features='penultimate' trains its extractor on the server split, "
                             "which is empty; raise data.server_fraction")
        model = ctx.build_model()
        train(model, server.x, server.y, local_training(ctx.cfg, self.extractor_epochs),
              seed=derive_seed(seed, 1))
        return _network_features(model[:-1])

    def fit(self, ctx: UnlearningContext) -> NewtonRemoval:
        """Pool every client's data (in client order), extract features, fit the OvR model."""
        seed = derive_seed(ctx.cfg.seed, SEED_TAG)
        self.feature_map_ = self._feature_map(ctx, seed)
        pooled = ctx.data.pooled()
        x, y = pooled.x, pooled.y
        self.owners_ = ctx.data.owners()
        self.model_ = OvRCertified(lam=self.lam, sigma=self.sigma, epsilon=self.epsilon,
                                   delta=self.delta, seed=seed)
        self.model_.fit(self.feature_map_(x), y, num_classes=ctx.data.num_classes)
        self.original_ = self.model_.frozen()
        self.removed_: set[int] = set()
        self.original_params_ = None  # a linear model on features, not the network
        return self

    def predict_proba_original(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of the model as fitted (before any removal)."""
        return self.original_.predict_proba(self.feature_map_(x))

    def unlearn(self, ctx: UnlearningContext) -> UnlearningResult:
        """Remove the request's rows (a client's, some of a client's, a class's) with one
        Newton step per class."""
        if not hasattr(self, "model_"):
            raise RuntimeError("NewtonRemoval.unlearn called before fit(ctx)")
        if ctx.removal is not None:  # what this request removes, as positions in the pool
            rows = np.zeros(len(self.owners_), dtype=bool)
            rows[pooled_ids(ctx.data, ctx.removal.forget)] = True
            fresh = sorted(set(ctx.targets) - self.removed_) \
                if ctx.removal.request.granularity == "client" else []
        else:
            fresh = sorted(set(ctx.targets) - self.removed_)
            rows = np.isin(self.owners_, fresh)
        info = self.model_.remove(rows)
        self.removed_ |= set(fresh)
        details: dict[str, Any] = {key: info[key] for key in (
            "data_dependent_bound", "worst_case_bound", "true_residual", "budget_used",
            "budget", "retrained", "removed_samples")}
        details["features"] = self.features
        # (epsilon, delta) hold per one-vs-rest classifier; the K-class model composes K of them
        k = ctx.data.num_classes
        details["certified_per_classifier"] = [self.epsilon, self.delta]
        details["certified_whole_model"] = [k * self.epsilon, k * self.delta]
        details["newton_step_s"] = info.get("newton_step_s", 0.0)
        if info["reason"] is not None:
            details["retrain_reason"] = info["reason"]
            details["retrain_s"] = info["retrain_s"]
        cost = Cost(sample_epochs=float(info["remaining"]) if info["retrained"] else 0.0)
        return UnlearningResult(model=None,
                                predict_proba=_compose(self.feature_map_, self.model_.frozen()),
                                cost=cost, details=details)
