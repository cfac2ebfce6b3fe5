"""Verify a removal: every model of one request measured on one fixed set of splits, next to
the reference (retraining of the same setting).

A :class:`RequestVerifier` is built once per request. It fixes the forget set (the targets'
training data, as they trained on it, backdoor included), the retain set (everyone not removed),
the membership-inference queries and — when shadow models are enabled — the offline LiRA
statistics of all queries from shadow models trained on halves of the retain set (so that no
query is in any shadow; trained at the first metric computation, after the removal methods ran).
Then :meth:`RequestVerifier.outputs` takes a model's predictions once and
:meth:`RequestVerifier.metrics` turns them into the metrics of ``results.json``.

Membership queries. The members (a sample of the forget set) are split into **triggered**
samples (carrying the backdoor trigger and labelled with its target class, as the poisoned
client trained on them) and **clean** ones. Each split gets non-members from its own
distribution, drawn from the test split without overlap: clean test samples for the clean
members, and test samples with the trigger stamped and relabelled to the target class for the
triggered ones (one non-member per member). Otherwise the attack would re-measure the backdoor
(a triggered member has a low loss under the target label because of the trigger, not because
it was trained on). The test samples not drawn are the population calibrated LiRA fits its
scale on. Every attack is reported on each split and overall (all members against all
non-members), see :data:`MIA_KEYS`.

Bounded samples. Verification must not cost more than the retraining it judges, so the
members are at most ``max_members`` forget samples and the population at most
``max_population`` test samples, each drawn with the verifier's seeded RNG (the draws are the
same as without a cap when the cap does not bind), and the shadow models train on a bounded
sample of their pool (:mod:`fedunlearn.evaluation.shadow`). Accuracies, the backdoor test and
the distances use the full splits (one prediction per model). :attr:`RequestVerifier.sizes`
reports the sizes used beside the sizes available; with ``n`` members and ``n`` non-members an
AUC near 0.5 has a 95 % interval of about ``±1.96·sqrt((2n + 1) / (12 n²))`` (Hanley and
McNeil, 1982): ±0.025 at n = 1,000, ±0.083 at n = 90.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedunlearn.data.backdoor import Trigger
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.federated import FederatedData
from fedunlearn.evaluation.metrics import (
    accuracy,
    attack_success_rate,
    backdoor_test,
    kl_divergence,
    paired_backdoor_test,
    param_distance,
    prediction_difference,
    sape,
)
from fedunlearn.evaluation.mia import (
    AttackSummary,
    calibrated_lira_scores,
    lira_offline_scores,
    logit_confidence,
    per_example_loss,
    summarize_attack,
)
from fedunlearn.evaluation.schema import MIA_ATTACKS, MIA_KEYS, MIA_SPLITS, PAIRED_ASR_KEYS  # noqa: F401

Predict = Callable[[np.ndarray], np.ndarray]
ShadowFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

@dataclass(frozen=True)
class Outputs:
    """A model's class probabilities on every split a request is verified on.

    ``members`` and ``nonmembers`` are in the order of the verifier's ``member_idx`` and
    ``nonmember_idx`` (triggered non-members predicted on their stamped inputs).
    """

    test: np.ndarray
    retain: np.ndarray
    forget: np.ndarray
    members: np.ndarray
    nonmembers: np.ndarray
    triggered: np.ndarray | None
    kept: np.ndarray | None = None


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
        Draws the members (if the forget set is larger than the test split), the non-members
        and the bootstrap resamples.
    shadow_phi : np.ndarray, optional
        The shadows' confidences computed earlier for the same request and seed (reused).
    resamples : int
        Bootstrap resamples of every AUC interval (default 400).
    max_members : int or None
        At most this many members (default None: as many as the forget set and the test
        split allow).
    max_population : int or None
        At most this many population points for calibrated LiRA (default None: every test
        sample not drawn as a non-member).
    shadow_pool : ArrayDataset or None
        What the shadows are trained on (default the retain set); it must hold no query. The
        run passes the clients outside every request, so one set of shadows serves all.

    Attributes
    ----------
    member_idx : np.ndarray
        Sorted positions of the members in the forget set.
    member_triggered : np.ndarray
        Boolean per member: carries the trigger and the target label.
    nonmember_idx : np.ndarray
        Positions in the test split: the clean non-members (sorted), then the bases of the
        triggered non-members (sorted); ``len(nonmember_idx) == len(member_idx)``.
    nonmember_triggered : np.ndarray
        Boolean per non-member: stamped and relabelled to the target class.
    nonmember_x, nonmember_y : np.ndarray
        The non-members' inputs (stamped where triggered) and labels.
    population_idx : np.ndarray
        The remaining test positions, the population calibrated LiRA fits on.
    trigger : Trigger or None
        The backdoor's trigger, recovered from the test split and its triggered copy.
    shadow_seconds : float
        Wall time spent obtaining the shadows' confidences (0 when cached or disabled).
    """

    def __init__(self, data: FederatedData, *, targets: Collection[int],
                 removed: Collection[int], target_class: int | None, alpha: float = 0.01,
                 shadows: ShadowFn | None = None, seed: int = 0,
                 shadow_phi: np.ndarray | None = None, resamples: int = 400,
                 max_members: int | None = None, max_population: int | None = None,
                 shadow_pool: ArrayDataset | None = None, forget: ArrayDataset | None = None,
                 retain: ArrayDataset | None = None, removed_label: int | None = None,
                 kept: ArrayDataset | None = None, match_classes: bool = False) -> None:
        everyone = set(range(len(data.clients)))
        test = data.test
        self.data = data
        self.forget = forget if forget is not None else data.pooled(
            exclude=everyone - set(targets))
        self.retain = retain if retain is not None else data.pooled(exclude=set(removed))
        self.target_class = target_class
        self.removed_label = removed_label
        self.kept = kept
        self.alpha = alpha
        self.seed = seed
        self.resamples = resamples
        self.trigger = (Trigger.recover(test.x[test.y != target_class], data.triggered_test.x)
                        if target_class is not None and data.triggered_test is not None
                        else None)
        rng = np.random.default_rng(seed)
        # a class request's members are all of the class: its non-members are too (test
        # samples of the class), so the attack measures membership, not the class
        same = np.flatnonzero(test.y == removed_label) if removed_label is not None else None
        n = min(len(self.forget), len(test) if same is None else len(same))
        if max_members is not None:
            n = min(n, max_members)
        self.member_idx = np.sort(rng.choice(len(self.forget), size=n, replace=False))
        self.member_y = self.forget.y[self.member_idx]
        self.member_triggered = (
            self.trigger.carried_by(self.forget.x[self.member_idx])
            & (self.member_y == target_class) if self.trigger is not None
            else np.zeros(n, dtype=bool))
        n_triggered = int(self.member_triggered.sum())
        if same is not None:  # the class's test samples first (the non-members), then the others
            order = np.concatenate([rng.permutation(same), rng.permutation(
                np.setdiff1d(np.arange(len(test)), same))])
        elif match_classes:
            order = _class_matched(rng.permutation(len(test)), test.y,
                                   self.member_y[~self.member_triggered], n - n_triggered)
        else:
            order = rng.permutation(len(test))
        clean, bases = order[:n - n_triggered], order[n - n_triggered:n]
        self.nonmember_idx = np.concatenate([np.sort(clean), np.sort(bases)])
        self.nonmember_triggered = np.arange(n) >= n - n_triggered
        self.nonmember_x = test.x[self.nonmember_idx]
        self.nonmember_y = test.y[self.nonmember_idx].copy()
        if n_triggered:
            assert self.trigger is not None and target_class is not None
            self.nonmember_x[self.nonmember_triggered] = self.trigger.stamp(
                self.nonmember_x[self.nonmember_triggered])
            self.nonmember_y[self.nonmember_triggered] = target_class
        population = order[n:]
        if max_population is not None:
            population = population[:max_population]
        self.population_idx = np.sort(population)
        self.shadow_pool = self.retain if shadow_pool is None else shadow_pool
        self.shadow_seconds = 0.0
        self._shadows = shadows
        self._shadow_phi = shadow_phi if shadows is not None else None
        expected = 2 * n + len(self.population_idx)
        if self._shadow_phi is not None and np.shape(self._shadow_phi)[1:] != (expected,):
            raise ValueError(f"RequestVerifier: cached shadow_phi has shape "
                             f"{np.shape(self._shadow_phi)}, expected (n_shadows, {expected}) "
                             "for this request; drop the cache entry to recompute it")

    @property
    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Key suffix -> (member mask, non-member mask): overall, clean and (with a backdoor)
        triggered."""
        n = len(self.member_idx)
        out = {"": (np.ones(n, dtype=bool), np.ones(n, dtype=bool)),
               "_clean": (~self.member_triggered, ~self.nonmember_triggered)}
        if self.trigger is not None:
            out["_triggered"] = (self.member_triggered, self.nonmember_triggered)
        return out

    @property
    def shadow_phi(self) -> np.ndarray | None:
        """OUT shadow models' logit confidences on the queries (members, non-members,
        population; trained on first use, so that shadow training never runs between the
        removal methods being timed)."""
        if self._shadows is not None and self._shadow_phi is None:
            t0 = time.perf_counter()
            test = self.data.test
            qx = np.concatenate([self.forget.x[self.member_idx], self.nonmember_x,
                                 test.x[self.population_idx]])
            qy = np.concatenate([self.member_y, self.nonmember_y, test.y[self.population_idx]])
            self._shadow_phi = self._shadows(self.shadow_pool.x, self.shadow_pool.y, qx, qy)
            self.shadow_seconds += time.perf_counter() - t0
        return self._shadow_phi

    @property
    def sizes(self) -> dict[str, int]:
        """The sample sizes used by the membership attacks beside those available:
        ``members`` of ``members_available`` (the forget set), ``nonmembers``, ``population``
        of ``population_available`` (test samples not drawn as non-members),
        ``shadow_pool`` (samples the shadows may train on), ``test``, ``retain``."""
        n = len(self.member_idx)
        return {"members": n, "members_available": len(self.forget),
                "nonmembers": len(self.nonmember_idx), "population": len(self.population_idx),
                "population_available": len(self.data.test) - n,
                "shadow_pool": len(self.shadow_pool), "test": len(self.data.test),
                "retain": len(self.retain)}

    def outputs(self, predict: Predict) -> Outputs:
        """Predict once on every split."""
        forget = predict(self.forget.x)
        test = predict(self.data.test.x)
        nonmembers = test[self.nonmember_idx]
        if self.nonmember_triggered.any():
            nonmembers = nonmembers.copy()
            nonmembers[self.nonmember_triggered] = predict(
                self.nonmember_x[self.nonmember_triggered])
        trig = self.data.triggered_test
        return Outputs(test=test, retain=predict(self.retain.x), forget=forget,
                       members=forget[self.member_idx], nonmembers=nonmembers,
                       triggered=predict(trig.x) if trig is not None and self.target_class
                       is not None else None,
                       kept=predict(self.kept.x) if self.kept is not None else None)

    def basic(self, out: Outputs) -> dict[str, Any]:
        """Accuracies, backdoor ASR and its test, membership inference (no reference needed)."""
        m: dict[str, Any] = {"test_accuracy": accuracy(out.test, self.data.test.y),
                             "retain_accuracy": accuracy(out.retain, self.retain.y),
                             "forget_accuracy": accuracy(out.forget, self.forget.y)}
        if self.removed_label is not None:  # a class request: that class and the others
            y = self.data.test.y
            gone = y == self.removed_label
            m["removed_class_accuracy"] = accuracy(out.test[gone], y[gone])
            m["other_classes_accuracy"] = accuracy(out.test[~gone], y[~gone])
        if out.kept is not None and self.kept is not None:  # a sample request's clients
            m["kept_accuracy"] = accuracy(out.kept, self.kept.y)
        if out.triggered is not None and self.target_class is not None:
            asr = attack_success_rate(out.triggered, self.target_class)
            m["backdoor_asr"] = asr
            m.update(backdoor_test(asr, len(out.triggered), self.data.num_classes,
                                   alpha=self.alpha))
        m.update(self.membership(out))
        return m

    def membership(self, out: Outputs) -> dict[str, Any]:
        """Every attack on every split (the keys of :data:`MIA_KEYS`)."""
        scores = {"mia_loss": (-per_example_loss(out.members, self.member_y),
                               -per_example_loss(out.nonmembers, self.nonmember_y))}
        phi = self.shadow_phi
        if phi is not None:
            n = len(self.member_idx)
            target = np.concatenate([logit_confidence(out.members, self.member_y),
                                     logit_confidence(out.nonmembers, self.nonmember_y)])
            pop = self.population_idx
            calibrated = calibrated_lira_scores(
                target, phi[:, :2 * n], logit_confidence(out.test[pop], self.data.test.y[pop]),
                phi[:, 2 * n:])
            plain = lira_offline_scores(target, phi[:, :2 * n])  # sigma pooled over all queries
            scores["mia_lira"] = (calibrated[:n], calibrated[n:])
            scores["mia_lira_plain"] = (plain[:n], plain[n:])
        m: dict[str, Any] = {}
        for split, (in_m, in_n) in self.splits.items():
            for attack, (s_m, s_n) in scores.items():
                m.update(_keys(attack, split, summarize_attack(
                    s_m[in_m], s_n[in_n], member_strata=self.member_triggered[in_m],
                    nonmember_strata=self.nonmember_triggered[in_n], resamples=self.resamples,
                    seed=self.seed)))
            m[f"mia_members{split}"] = int(in_m.sum())
            m[f"mia_nonmembers{split}"] = int(in_n.sum())
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
        if (out.triggered is not None and reference.triggered is not None
                and self.target_class is not None):
            m.update(paired_backdoor_test(out.triggered, reference.triggered,
                                          self.target_class))
        return m

    def basic_accuracies(self, out: Outputs) -> dict[str, float]:
        """Test and forget accuracy only (for SAPE against the reference)."""
        return {"test_accuracy": accuracy(out.test, self.data.test.y),
                "forget_accuracy": accuracy(out.forget, self.forget.y)}


def _class_matched(perm: np.ndarray, y: np.ndarray, member_y: np.ndarray, k: int
                   ) -> np.ndarray:
    """``perm`` (test positions in a random order) reordered so that its first ``k`` hold, per
    class, as many samples as ``member_y`` (the clean members' labels), in ``perm``'s order;
    a class with too few test samples is made up from the others, in ``perm``'s order.

    >>> _class_matched(np.array([0, 1, 2, 3, 4]), np.array([0, 0, 1, 1, 2]),
    ...                np.array([1, 2]), 2).tolist()
    [2, 4, 0, 1, 3]
    """
    first = np.zeros(len(perm), dtype=bool)
    labels = y[perm]
    for c, count in zip(*np.unique(member_y, return_counts=True), strict=True):
        first[np.flatnonzero(labels == c)[:count]] = True
    short = k - int(first.sum())
    if short > 0:
        first[np.flatnonzero(~first)[:short]] = True
    return np.concatenate([perm[first], perm[~first]])


def _keys(attack: str, split: str, summary: AttackSummary) -> dict[str, Any]:
    return {f"{attack}_auc{split}": summary.auc,
            f"{attack}_auc{split}_ci": list(summary.auc_ci),
            f"{attack}_tpr_at_1fpr{split}": summary.tpr_at_1fpr}


def _param_distance(a: Mapping[str, np.ndarray] | None,
                    b: Mapping[str, np.ndarray] | None) -> float | None:
    """L2 distance when both models are networks of the same architecture, else None."""
    if a is None or b is None or list(a) != list(b):
        return None
    if any(np.shape(a[k]) != np.shape(b[k]) for k in a):
        return None
    return param_distance(a, b)

