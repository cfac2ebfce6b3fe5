"""Verdicts against retraining and the summary over seeds, against hand-computed values."""

from __future__ import annotations

import doctest
import math
from typing import Any

import numpy as np
import pytest

from fedunlearn.evaluation import summary as summary_module
from fedunlearn.evaluation import verdicts as verdicts_module
from fedunlearn.evaluation.metrics import mcnemar_exact_p as mcnemar_p
from fedunlearn.evaluation.summary import describe, summarize
from fedunlearn.evaluation.verdicts import (
    ACCURACY,
    TARGET,
    decide,
    margin_of,
    seeds_needed,
    t_interval,
)
from fedunlearn.reporting import comparison_table, verdict_table


@pytest.mark.parametrize("module", [verdicts_module, summary_module])
def test_doctests(module: Any) -> None:
    assert doctest.testmod(module).failed == 0


def test_t_interval_by_hand() -> None:
    # mean 0.02, sd 0.01, n 4: half = t_{0.975,3} * 0.01 / 2 = 3.182446 * 0.005
    lo, hi = t_interval([0.01, 0.02, 0.03, 0.02 + 0.0])  # sd of (0.01,0.02,0.03,0.02) = 0.008165
    sd = math.sqrt(((0.01 - 0.02) ** 2 + (0.03 - 0.02) ** 2) / 3)
    half = 3.182446305284263 * sd / 2
    assert lo == pytest.approx(0.02 - half, abs=1e-9)
    assert hi == pytest.approx(0.02 + half, abs=1e-9)
    assert t_interval([0.5]) is None


def _scipy_oracle(diffs: list[float], margin: float, alpha: float, accuracy: bool) -> str:
    """The rule written independently with SciPy's tests: TOST as two one-sided one-sample
    t-tests against ±margin, the difference as a two-sided one-sample t-test against 0."""
    from scipy import stats

    if len(diffs) < 2:
        return "–"
    lower = stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(diffs, margin, alternative="less").pvalue
    if max(lower, upper) < alpha:
        return "matches"
    if stats.ttest_1samp(diffs, 0.0).pvalue < alpha:
        up = float(np.mean(diffs)) > 0
        if accuracy:
            return "better" if up else "worse"
        return "differs (above)" if up else "differs (below)"
    return "inconclusive"


@pytest.mark.parametrize("diffs,margin,expected", [
    ([0.03, -0.03, 0.02], 0.02, "inconclusive"),  # the example: interval [-0.07, 0.09]
    ([0.01], 0.02, "–"),  # one seed
    ([0.004, -0.003, 0.001, 0.005, -0.004, 0.0, 0.002, -0.001, 0.003, -0.005], 0.02, "matches"),
    ([0.001, 0.003, 0.002], 0.01, "matches"),  # inside the margin though one side of 0
    ([0.05, 0.06, 0.04], 0.01, "differs (above)"),
    ([-0.05, -0.06, -0.04], 0.01, "differs (below)"),
    ([0.01, 0.015], 0.02, "inconclusive"),  # |mean| < δ but two seeds cannot show it
])
def test_decision_rule_against_scipy(diffs: list[float], margin: float, expected: str) -> None:
    assert decide(diffs, margin, direction=TARGET)["verdict"] == expected
    assert _scipy_oracle(diffs, margin, 0.05, accuracy=False) == expected


def test_decision_rule_random_cases_against_scipy() -> None:
    """400 random sets of differences, both directions, levels 0.05 and 0.01."""
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(400):
        n = int(rng.integers(2, 12))
        diffs = list(rng.normal(rng.normal(0, 0.02), rng.uniform(0.001, 0.03), n))
        margin = float(rng.uniform(0.005, 0.04))
        alpha = float(rng.choice([0.05, 0.01]))
        accuracy = bool(rng.integers(2))
        got = decide(diffs, margin, direction=ACCURACY if accuracy else TARGET, alpha=alpha)
        assert got["verdict"] == _scipy_oracle(diffs, margin, alpha, accuracy)
        seen.add(got["verdict"])
    assert len(seen) >= 5  # every branch was exercised


def test_tost_interval_and_resolution_by_hand() -> None:
    # d = (0.01, 0.02, 0.03): mean 0.02, sd 0.01, se 0.01/sqrt(3); t_{0.95,2} = 2.919986
    v = decide([0.01, 0.02, 0.03], 0.05, direction=TARGET)
    half = 2.919985580355516 * 0.01 / math.sqrt(3)
    assert v["tost_ci"] == pytest.approx([0.02 - half, 0.02 + half])
    assert v["resolution"] == pytest.approx(0.02 + half)
    assert v["verdict"] == "matches"  # 0.0369 < 0.05
    # at δ 0.03 TOST fails, and t = 0.02 / 0.00577 = 3.46 on 2 df (p = 0.074) does not reject
    assert decide([0.01, 0.02, 0.03], 0.03, direction=TARGET)["verdict"] == "inconclusive"


def test_seeds_needed_by_hand() -> None:
    # mean 0, sd 0.01, δ 0.02: n = 3 gives t_{0.95,2}·0.01/√3 = 0.0169 < 0.02 but
    # n = 2 gives 6.3138·0.01/√2 = 0.0446: 3 seeds
    assert seeds_needed(0.0, 0.01, 0.02) == 3
    # mean 0.01: room 0.01; n = 5: 2.1318·0.01/√5 = 0.00953 < 0.01, n = 4: 2.3534/2·0.01 = 0.0118
    assert seeds_needed(0.01, 0.01, 0.02) == 5
    assert seeds_needed(0.02, 0.01, 0.02) == math.inf
    v = decide([0.03, -0.03, 0.02], 0.02, direction=TARGET)
    assert v["seeds_needed"] == seeds_needed(v["diff"], v["sd"], 0.02)


def test_mcnemar_exact_by_hand() -> None:
    assert mcnemar_p(8, 0) == pytest.approx(2 * 0.5 ** 8)
    # b = 1, c = 4: P(X <= 1) for Binomial(5, 1/2) = 6/32, two-sided 12/32
    assert mcnemar_p(1, 4) == pytest.approx(12 / 32)


def test_margin_uses_retrain_gap_with_floor() -> None:
    assert margin_of([0.90, 0.92], [0.86, 0.90], 0.01) == pytest.approx(0.03)
    assert margin_of([0.90], [0.901], 0.01) == 0.01


def _row(seed: int, method: str, role: str, **metrics: Any) -> dict[str, Any]:
    return {"seed": seed, "request": [0], "setting": "federated", "method": method,
            "role": role, "metrics": metrics, "wall_s": 1.0 + seed, "speedup_vs_retrain": None,
            "client_epochs": 0.0, "rounds": 0, "messages_sent": 0, "bytes_exchanged": 0,
            "sample_epochs": 0.0, "server_epochs": 0.0}


def test_backdoor_verdict_is_over_seeds_not_pooled_inputs() -> None:
    """Per-input McNemar is a per-seed diagnostic: one seed whose 26 discordant inputs all go
    one way gives no verdict (the issue's second retraining 'worse' at p = 3e-8); three seeds
    are judged by their paired ASR differences, whatever their McNemar p-values."""
    rows = [_row(0, "original", "original", backdoor_asr=0.9),
            _row(0, "retrain", "reference", backdoor_asr=0.009),
            _row(0, "retrain_seed2", "noise_floor", backdoor_asr=0.038),
            _row(0, "leaky", "method", backdoor_asr=0.038,
                 backdoor_asr_vs_retrain_p=mcnemar_p(26, 0))]
    (entry,) = [e for e in summarize(rows) if e["method"] == "leaky"]
    v = entry["verdicts"]["asr"]
    assert v["verdict"] == "–"
    rows = []
    for s, (ref, floor, m, b) in enumerate([(0.003, 0.004, 0.087, 26), (0.002, 0.0, 0.06, 20),
                                            (0.005, 0.006, 0.12, 31)]):
        rows += [_row(s, "original", "original", backdoor_asr=0.8),
                 _row(s, "retrain", "reference", backdoor_asr=ref),
                 _row(s, "retrain_seed2", "noise_floor", backdoor_asr=floor),
                 _row(s, "leaky", "method", backdoor_asr=m,
                      backdoor_asr_vs_retrain_p=mcnemar_p(b, 1))]
    (entry,) = [e for e in summarize(rows) if e["method"] == "leaky"]
    v = entry["verdicts"]["asr"]
    diffs = [0.084, 0.058, 0.115]
    assert v["diff"] == pytest.approx(np.mean(diffs))
    assert v["verdict"] == _scipy_oracle(diffs, 0.02, 0.05, accuracy=False) == "differs (above)"
    # each seed's McNemar p from that seed's own discordant pairs, kept as a diagnostic
    assert v["mcnemar_p_per_seed"] == {"0": mcnemar_p(26, 1), "1": mcnemar_p(20, 1),
                                       "2": mcnemar_p(31, 1)}


def test_no_asr_verdict_when_the_backdoor_never_took() -> None:
    """The original model's ASR 0.001 against retraining's 0.009: there is nothing to forget,
    so a method 'worse' at +0.02 is not judged; the note says why."""
    rows = []
    for s in range(3):
        rows += [_row(s, "original", "original", backdoor_asr=0.001),
                 _row(s, "retrain", "reference", backdoor_asr=0.009),
                 _row(s, "retrain_seed2", "noise_floor", backdoor_asr=0.01),
                 _row(s, "m", "method", backdoor_asr=0.03 + 0.001 * s)]
    (entry,) = [e for e in summarize(rows) if e["method"] == "m"]
    assert entry["verdicts"]["asr"]["verdict"] == "–"
    assert any("backdoor never took" in n for n in entry["notes"])
    for r in rows:  # once the original carries it, the same differences are judged
        if r["role"] == "original":
            r["metrics"]["backdoor_asr"] = 0.9
    (entry,) = [e for e in summarize(rows) if e["method"] == "m"]
    assert entry["verdicts"]["asr"]["verdict"] == "differs (above)"


def test_a_second_retraining_is_never_judged_different_without_evidence() -> None:
    """The noise floor judged as a method against retraining: with one seed '–' everywhere;
    with seeds whose differences straddle 0, never worse/better/differs."""
    metrics = ("test_accuracy", "retain_accuracy", "forget_accuracy", "backdoor_asr",
               "mia_loss_auc_clean")
    rng = np.random.default_rng(3)
    for n in (1, 3, 10):
        rows = []
        for s in range(n):
            base = {k: float(rng.uniform(0.3, 0.9)) for k in metrics}
            base["backdoor_asr"] = 0.01
            other = {k: v + (0.01 if s % 2 else -0.01) for k, v in base.items()}
            rows += [_row(s, "original", "original", backdoor_asr=0.9),
                     _row(s, "retrain", "reference", **base),
                     _row(s, "retrain_seed2", "noise_floor", **other),
                     _row(s, "second", "method", **other)]
        (entry,) = [e for e in summarize(rows) if e["method"] == "second"]
        for name, v in entry["verdicts"].items():
            if n == 1:
                assert v["verdict"] == "–", name
            else:
                assert v["verdict"] in ("matches", "inconclusive", "–"), (n, name, v)


def test_summary_pairs_by_seed_and_describes_every_figure() -> None:
    # retrain test accuracy varies a lot by seed; the method tracks it 0.002 below: a paired
    # comparison must call that a match although the unpaired spreads overlap widely
    ref = {0: 0.80, 1: 0.90, 2: 0.85}
    floor = {0: 0.81, 1: 0.89, 2: 0.86}
    rows = []
    for s, value in ref.items():
        rows += [_row(s, "retrain", "reference", test_accuracy=value),
                 _row(s, "retrain_seed2", "noise_floor", test_accuracy=floor[s]),
                 _row(s, "m", "method", test_accuracy=value - 0.002 + 0.001 * (s - 1))]
    entries = {e["method"]: e for e in summarize(rows)}
    m = entries["m"]
    assert m["seeds"] == [0, 1, 2]
    assert m["metrics"]["test_accuracy"]["mean"] == pytest.approx(0.848)
    assert m["costs"]["wall_s"] == describe([1.0, 2.0, 3.0])
    v = m["verdicts"]["test"]
    assert v["diff"] == pytest.approx(-0.002)
    assert v["margin"] == pytest.approx(0.01)
    assert v["ci"] == pytest.approx(list(t_interval([-0.003, -0.002, -0.001])))
    assert v["verdict"] == _scipy_oracle([-0.003, -0.002, -0.001], 0.01, 0.05, True) == "matches"
    assert entries["retrain"]["verdicts"] == {}
    # the text tables show mean ± half-interval and the verdict words
    text = comparison_table(rows, summarize(rows))
    assert "0.848±" in text
    assert "matches -0.002±" in verdict_table(summarize(rows))


def test_one_seed_gives_no_interval_verdict() -> None:
    rows = [_row(0, "retrain", "reference", test_accuracy=0.9),
            _row(0, "m", "method", test_accuracy=0.5)]
    (m,) = [e for e in summarize(rows) if e["method"] == "m"]
    assert m["verdicts"]["test"]["verdict"] == "–"
    assert m["metrics"]["test_accuracy"]["ci"] is None


def test_kl_is_judged_against_the_noise_floor() -> None:
    rows = []
    for s, (floor, method) in enumerate([(0.03, 0.30), (0.02, 0.25), (0.04, 0.28)]):
        rows += [_row(s, "retrain", "reference", kl_forget=0.0),
                 _row(s, "retrain_seed2", "noise_floor", kl_forget=floor),
                 _row(s, "m", "method", kl_forget=method)]
    (m,) = [e for e in summarize(rows) if e["method"] == "m"]
    v = m["verdicts"]["kl"]
    assert v["diff"] == pytest.approx((0.27 + 0.23 + 0.24) / 3)
    assert v["margin"] == pytest.approx(0.03)
    assert v["verdict"] == "differs (above)"


def _replay_rows(kind: str | None, *, modes: dict[str, str] | None = None,
                 method: str = "m") -> list[dict[str, Any]]:
    """Two seeds: retraining at 0.90 / 0.94, the replay at 0.60 / 0.70 (mean gap 0.27);
    ratio 1.2 / 1.6 and cosine 0.5 / 0.7 (means 1.4 and 0.6)."""
    rows = []
    for s, (ref, acc, ratio, cos) in enumerate([(0.90, 0.60, 1.2, 0.5), (0.94, 0.70, 1.6, 0.7)]):
        summary: dict[str, Any] = {"mean_ratio": ratio, "mean_cosine": cos,
                                   "calibrated_rounds": 3}
        if kind is not None:
            summary["fresh_kind"] = kind
        row = _row(s, method, "method", test_accuracy=acc)
        row["details"] = {"replay": [{"round": 1}], "replay_summary": summary}
        if modes is not None:  # FedRecover's details: 40 rounds, 24 / 26 estimated, 5 / 7 fixed
            row["details"].update(round_modes=modes, rounds_estimated=24 + 2 * s,
                                  rounds_abnormal=5 + 2 * s)
        rows += [_row(s, "retrain", "reference", test_accuracy=ref), row]
    return rows


def _note(rows: list[dict[str, Any]], method: str = "m") -> list[str]:
    (entry,) = [e for e in summarize(rows) if e["method"] == method]
    return entry["notes"]


def test_replay_note_says_what_fedrecover_compares() -> None:
    """FedRecover's ratio and cosine compare the stored update with the exact one; its note
    must say so (with the rounds estimated), never FedEraser's "calibrated steps" wording."""
    modes = {str(t): "estimated" for t in range(1, 41)}
    (note,) = _note(_replay_rows("exact", modes=modes, method="fedrecover"), "fedrecover")
    assert note == ("replay ends 0.27 below retraining (test accuracy 0.65 vs 0.92): 25 of 40 "
                    "rounds estimated, 6 with abnormal estimates replaced; in the rounds with "
                    "exact updates only, the stored updates are 1.4× the exact updates’ "
                    "length, cosine 0.60 to them")
    assert "calibrat" not in note


@pytest.mark.parametrize("kind", ["calibration", None])
def test_replay_note_keeps_federasers_wording(kind: str | None) -> None:
    """FedEraser's rows (and rows written before ``fresh_kind`` existed) keep their note."""
    (note,) = _note(_replay_rows(kind))
    assert note == ("replay ends 0.27 below retraining (test accuracy 0.65 vs 0.92): "
                    "calibrated steps are 1.4× the calibration’s own length, cosine 0.60 to "
                    "the stored update")


def test_replay_note_without_fresh_steps_says_no_calibration() -> None:
    rows = _replay_rows(None)
    for r in rows:
        if r["role"] == "method":
            r["details"]["replay_summary"].update(mean_ratio=None, mean_cosine=None)
    assert _note(rows) == [("replay ends 0.27 below retraining (test accuracy 0.65 vs 0.92): "
                            "no calibration (stored updates replayed as they are)")]


def test_a_repair_that_reached_its_cap_is_a_note_in_the_verdict_table() -> None:
    """PGA's or NoT's repair that stopped at its cap before the remaining clients were back
    says so, per seed, beside the verdicts; a recovered repair and a fixed one say nothing."""
    rows = []
    for s, rec in enumerate([{"recovered": True, "rounds": 12, "accuracy": 0.99,
                              "target_accuracy": 0.989},
                             {"recovered": False, "rounds": 40, "accuracy": 0.9512,
                              "target_accuracy": 0.9891},
                             {}]):
        row = _row(s, "not", "method", test_accuracy=0.97)
        row["details"] = {"recovery": rec}
        rows += [_row(s, "retrain", "reference", test_accuracy=0.97), row]
    expected = ("seed 1: repair not recovered: stopped at its cap of 40 rounds (remaining "
                "clients 0.951, target 0.989)")
    assert _note(rows, "not") == [expected]
    assert f"note: not: {expected}" in verdict_table(summarize(rows))
    for r in rows:
        r.get("details", {}).pop("recovery", None)
    assert _note(rows, "not") == []


def test_sequential_run_stops_when_decided_and_spends_alpha_over_its_looks() -> None:
    """``experiment.seeds_until_decided``: undecided verdicts are the inconclusive ones, and
    every look is made at α / looks (Bonferroni spending over the planned looks)."""
    from types import SimpleNamespace

    from fedunlearn.run.pipeline import planned_looks, undecided
    from tests.conftest import small_config

    cfg = small_config("experiment.seeds=[0, 1]", "experiment.seeds_until_decided=6")
    assert planned_looks(cfg) == 5  # after the 2nd, 3rd, 4th, 5th and 6th seed
    assert planned_looks(small_config("experiment.seeds=[0, 1, 2]")) == 1

    def runs(diffs: list[float]) -> list[Any]:
        out = []
        for s, d in enumerate(diffs):
            out.append(SimpleNamespace(seed=s, rows=[
                _row(s, "retrain", "reference", test_accuracy=0.9),
                _row(s, "retrain_seed2", "noise_floor", test_accuracy=0.9),
                _row(s, "m", "method", test_accuracy=0.9 + d)]))
        return out

    assert undecided(runs([0.001]), cfg) == ["(fewer than two seeds)"]
    assert undecided(runs([0.001, -0.002]), cfg) == ["m: test"]
    # ten tight seeds: decided (matches) even at α / 5
    tight = [0.001, -0.001, 0.0005, -0.0005, 0.0, 0.001, -0.001, 0.0002, -0.0002, 0.0]
    assert undecided(runs(tight), cfg) == []
    # at α = 0.05 four seeds would already match, at 0.01 (α / 5) they do not
    four = [0.006, -0.004, 0.003, -0.003]
    assert decide(four, 0.01, direction=ACCURACY, alpha=0.05)["verdict"] == "matches"
    assert decide(four, 0.01, direction=ACCURACY, alpha=0.01)["verdict"] == "inconclusive"
    assert undecided(runs(four), cfg) == ["m: test"]


def test_class_and_kept_verdicts_appear_only_where_measured() -> None:
    """Below the client level the removed class, the other classes and what a client keeps
    are judged with the same rule; a client request's entries carry no such verdict, and the
    verdict table shows their columns only when some row has them."""
    from fedunlearn.evaluation.summary import summarize
    from fedunlearn.reporting.tables import verdict_table

    def row(seed: int, method: str, role: str, removes: str, **metrics: float) -> dict:
        return {"request": [], "removes": removes, "granularity": "class" if removes else
                "client", "seed": seed, "setting": "federated", "method": method, "role": role,
                "metrics": {"test_accuracy": 0.9, **metrics}}

    rows = []
    for seed in (0, 1, 2):
        for removes, extra in (("class 3", {"removed_class_accuracy": 0.0,
                                            "other_classes_accuracy": 0.95}), ("", {})):
            rows += [row(seed, "retrain", "reference", removes, **extra),
                     row(seed, "retrain_seed2", "noise_floor", removes, **extra),
                     row(seed, "m", "method", removes, **{k: v + 0.3 * (k.startswith("removed"))
                                                          for k, v in extra.items()})]
    entries = {e.get("removes", ""): e for e in summarize(rows)
               if e["method"] == "m"}
    assert {"class", "others"} <= set(entries["class 3"]["verdicts"])
    assert entries["class 3"]["verdicts"]["class"]["verdict"] == "differs (above)"
    assert "kept" not in entries["class 3"]["verdicts"]
    assert not {"class", "others", "kept"} & set(entries[""]["verdicts"])
    assert "removed class acc" in verdict_table(summarize(rows))
    client_only = [r for r in rows if not r["removes"]]
    assert "removed class acc" not in verdict_table(summarize(client_only))
