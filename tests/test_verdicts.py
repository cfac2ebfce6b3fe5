"""Verdicts against retraining and the summary over seeds, against hand-computed values."""

from __future__ import annotations

import doctest
import math
from typing import Any

import pytest

from fedunlearn.evaluation import summary as summary_module
from fedunlearn.evaluation import verdicts as verdicts_module
from fedunlearn.evaluation.metrics import mcnemar_exact_p as mcnemar_p
from fedunlearn.evaluation.summary import describe, summarize
from fedunlearn.evaluation.verdicts import decide, margin_of, t_interval
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


def test_decision_rule_equivalence_first() -> None:
    # inside the margin although on one side of 0: an equivalence, not a difference
    assert decide((0.001, 0.004), 0.01, higher_is_worse=True) == "matches"
    assert decide((0.02, 0.05), 0.01, higher_is_worse=True) == "worse"
    assert decide((0.02, 0.05), 0.01, higher_is_worse=False) == "better"
    assert decide((-0.05, 0.05), 0.01, higher_is_worse=False) == "inconclusive"


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


def test_backdoor_verdict_is_against_retraining_not_chance() -> None:
    """ASR 0.087 against retraining's 0.003 on 300 triggered inputs: not 'active' against
    chance 1/10, yet clearly worse than retraining (McNemar on the same inputs)."""
    rows = [_row(0, "retrain", "reference", backdoor_asr=0.003, backdoor_trigger_active=False),
            _row(0, "retrain_seed2", "noise_floor", backdoor_asr=0.0),
            _row(0, "leaky", "method", backdoor_asr=0.087, backdoor_trigger_active=False,
                 backdoor_discordant=[26, 1])]
    (entry,) = [e for e in summarize(rows) if e["method"] == "leaky"]
    v = entry["verdicts"]["asr"]
    assert v["verdict"] == "worse"
    assert v["p_value"] == pytest.approx(mcnemar_p(26, 1))
    assert v["diff"] == pytest.approx(0.084)
    # a method at retraining's level matches
    rows[2] = _row(0, "good", "method", backdoor_asr=0.003, backdoor_discordant=[1, 1])
    (entry,) = [e for e in summarize(rows) if e["method"] == "good"]
    assert entry["verdicts"]["asr"]["verdict"] == "matches"


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
    assert v["verdict"] == "matches"
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
    assert v["verdict"] == "worse"


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
