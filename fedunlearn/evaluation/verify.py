"""Verify a removal: every model of one request measured on one fixed set of splits, next to
the reference (retraining of the same setting).

A :class:`RequestVerifier` is built once per request. It fixes the forget set (the targets'
training data, as they trained on it, backdoor included), the retain set (everyone not removed),
a held-out non-member sample of the test split of the same size as the member sample, the
rest of the test split as the population LiRA calibrates on, and — when shadow models are
enabled — the offline LiRA statistics of all those queries from shadow models trained on halves
of the retain set (so that no query is in any shadow; trained at the
first metric computation, after the removal methods ran). Then
:meth:`RequestVerifier.outputs` takes a model's predictions once and
:meth:`RequestVerifier.metrics` turns them into the metrics of ``results.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedunlearn.data.federated import FederatedData
from fedunlearn.evaluation.metrics import (
    accuracy,
    attack_success_rate,
    backdoor_test,
    kl_divergence,
    param_distance,
    prediction_difference,
    sape,
)
from fedunlearn.evaluation.mia import calibrated_lira_attack, logit_confidence, loss_attack

Predict = Callable[[np.ndarray], np.ndarray]
ShadowFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Outputs:
    """A model's class probabilities on every split a request is verified on."""

    test: np.ndarray
    retain: np.ndarray
    forget: np.ndarray
    members: np.ndarray
    nonmembers: np.ndarray
    triggered: np.ndarray | None


class RequestVerifier:
    """Metrics of every model answering one removal request.

    Parameters
    ----------
    data : FederatedData
    targets : collection of int
        The clients this request forgets (their training data is the forget set).
    removed : collection of int
        Every client removed so far; the retain set is everyone else's training data.
    target_class : int or None
        The backdoor's target class, when a backdoor is configured.
    alpha : float
        Level of the one-sided binomial test "the trigger still works".
    shadows : callable or None
        ``shadows(pool_x, pool_y, query_x, query_y)`` returns OUT shadow models' logit
        confidences, shape ``(n_shadows, n_queries)`` (see
        :func:`fedunlearn.evaluation.shadow.shadow_logit_confidences`); None disables LiRA.
    seed : int
        Draws the non-member (and, if the forget set is larger, the member) sample.
    shadow_phi : np.ndarray, optional
        The shadows' confidences computed earlier for the same request and seed (reused).
    """

    def __init__(self, data: FederatedData, *, targets: Collection[int],
                 removed: Collection[int], target_class: int | None, alpha: float = 0.01,
                 shadows: ShadowFn | None = None, seed: int = 0,
                 shadow_phi: np.ndarray | None = None) -> None:
        everyone = set(range(len(data.clients)))
        self.data = data
        self.forget = data.pooled(exclude=everyone - set(targets))
        self.retain = data.pooled(exclude=set(removed))
        self.target_class = target_class
        self.alpha = alpha
        rng = np.random.default_rng(seed)
        n = min(len(self.forget), len(data.test))
        self.member_idx = np.sort(rng.choice(len(self.forget), size=n, replace=False))
        self.nonmember_idx = np.sort(rng.choice(len(data.test), size=n, replace=False))
        self.member_y = self.forget.y[self.member_idx]
        self.nonmember_y = data.test.y[self.nonmember_idx]
        self.population_idx = np.setdiff1d(np.arange(len(data.test)), self.nonmember_idx)
        self._shadows = shadows
        self._shadow_phi = shadow_phi if shadows is not None else None

    @property
    def shadow_phi(self) -> np.ndarray | None:
        """OUT shadow models' logit confidences on the queries (trained on first use, so that
        shadow training never runs between the removal methods being timed)."""
        if self._shadows is not None and self._shadow_phi is None:
            test = self.data.test
            qx = np.concatenate([self.forget.x[self.member_idx], test.x[self.nonmember_idx],
                                 test.x[self.population_idx]])
            qy = np.concatenate([self.member_y, self.nonmember_y, test.y[self.population_idx]])
            self._shadow_phi = self._shadows(self.retain.x, self.retain.y, qx, qy)
        return self._shadow_phi

    def outputs(self, predict: Predict) -> Outputs:
        """Predict once on every split."""
        forget = predict(self.forget.x)
        test = predict(self.data.test.x)
        trig = self.data.triggered_test
        return Outputs(test=test, retain=predict(self.retain.x), forget=forget,
                       members=forget[self.member_idx], nonmembers=test[self.nonmember_idx],
                       triggered=predict(trig.x) if trig is not None and self.target_class
                       is not None else None)

    def basic(self, out: Outputs) -> dict[str, Any]:
        """Accuracies, backdoor ASR and its test, membership inference (no reference needed)."""
        m: dict[str, Any] = {"test_accuracy": accuracy(out.test, self.data.test.y),
                             "retain_accuracy": accuracy(out.retain, self.retain.y),
                             "forget_accuracy": accuracy(out.forget, self.forget.y)}
        if out.triggered is not None and self.target_class is not None:
            asr = attack_success_rate(out.triggered, self.target_class)
            m["backdoor_asr"] = asr
            m.update(backdoor_test(asr, len(out.triggered), self.data.num_classes,
                                   alpha=self.alpha))
        m.update(loss_attack(out.members, self.member_y, out.nonmembers, self.nonmember_y))
        phi = self.shadow_phi
        if phi is not None:
            n = len(self.member_idx)
            pop = self.population_idx
            m.update(calibrated_lira_attack(
                logit_confidence(out.members, self.member_y),
                logit_confidence(out.nonmembers, self.nonmember_y),
                phi[:, :n], phi[:, n:2 * n],
                logit_confidence(out.test[pop], self.data.test.y[pop]), phi[:, 2 * n:]))
        return m

    def metrics(self, out: Outputs, *, reference: Outputs | None = None,
                params: Mapping[str, np.ndarray] | None = None,
                reference_params: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """:meth:`basic` plus SAPE and distances to the reference (retraining)."""
        m = self.basic(out)
        if reference is None:
            return m
        ref = self.basic_accuracies(reference)
        m["acc_err"] = sape(m["test_accuracy"], ref["test_accuracy"])
        m["acc_dis"] = sape(m["forget_accuracy"], ref["forget_accuracy"])
        m["param_distance"] = _param_distance(params, reference_params)
        m["kl_forget"] = kl_divergence(reference.forget, out.forget)
        m["kl_test"] = kl_divergence(reference.test, out.test)
        m["pred_diff_forget"] = prediction_difference(reference.forget, out.forget)
        m["pred_diff_test"] = prediction_difference(reference.test, out.test)
        return m

    def basic_accuracies(self, out: Outputs) -> dict[str, float]:
        """Test and forget accuracy only (for SAPE against the reference)."""
        return {"test_accuracy": accuracy(out.test, self.data.test.y),
                "forget_accuracy": accuracy(out.forget, self.forget.y)}


def _param_distance(a: Mapping[str, np.ndarray] | None,
                    b: Mapping[str, np.ndarray] | None) -> float | None:
    """L2 distance when both models are networks of the same architecture, else None."""
    if a is None or b is None or list(a) != list(b):
        return None
    if any(np.shape(a[k]) != np.shape(b[k]) for k in a):
        return None
    return param_distance(a, b)

