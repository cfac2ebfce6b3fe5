"""The summary of a run over seeds: per request and method, every metric and cost figure as
mean, standard deviation and 95 % interval, and the verdicts against retraining.

Input are the comparison rows of ``results.json`` (``results["unlearning"]``), each carrying
its ``seed``; rows of the same request, setting and method over seeds form one summary entry.
The decision rule lives in :mod:`fedunlearn.evaluation.verdicts`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedunlearn.evaluation.schema import Role, request_key
from fedunlearn.evaluation.verdicts import (
    ALPHA,
    CRITERIA,
    NO_VERDICT,
    Criterion,
    decide,
    margin_of,
    t_interval,
)

COST_FIGURES: tuple[str, ...] = (
    "wall_s", "speedup_vs_retrain", "client_epochs", "rounds", "messages_sent",
    "bytes_exchanged", "sample_epochs", "server_epochs")
"""Cost fields of a row summarised like the metrics."""

MCNEMAR_KEY = "backdoor_asr_vs_retrain_p"
"""Metric holding one seed's exact McNemar p-value of the method's triggered inputs against
retraining's (a per-seed diagnostic; never the verdict)."""

Key = tuple[tuple[tuple[int, ...], str], str, str]


def _number(x: Any) -> float | None:
    if x is None or isinstance(x, bool) or not isinstance(x, int | float | np.number):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def describe(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, standard deviation (``ddof = 1``; 0 for one value), 95 % t-interval and count of
    the finite values; ``None`` entries are skipped.

    >>> d = describe([1.0, 2.0, 3.0, None])
    >>> d["mean"], d["std"], d["n"], [round(x, 3) for x in d["ci"]]
    (2.0, 1.0, 3, [-0.484, 4.484])
    """
    v = [x for x in (_number(x) for x in values) if x is not None]
    if not v:
        return {"mean": None, "std": None, "ci": None, "n": 0}
    ci = t_interval(v)
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "ci": list(ci) if ci else None, "n": len(v)}


def _key(row: Mapping[str, Any]) -> Key:
    return request_key(row), str(row["setting"]), str(row["method"])


def _by_seed(rows: Iterable[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    return {int(r.get("seed", 0)): r for r in rows}


def _metric(row: Mapping[str, Any] | None, key: str) -> float | None:
    return None if row is None else _number((row.get("metrics") or {}).get(key))


def summarize(rows: Sequence[Mapping[str, Any]], *, alpha: float = ALPHA,
              looks: int = 1) -> list[dict[str, Any]]:
    """One summary entry per (request, setting, method), in the rows' first-seen order.

    Parameters
    ----------
    rows : sequence of mapping
        ``results["unlearning"]``: rows with ``request``, ``setting``, ``method``, ``role``,
        ``seed``, ``metrics`` and the cost fields.
    alpha : float
        Level of the verdict's tests (:func:`~fedunlearn.evaluation.verdicts.decide`).
    looks : int
        A sequential run's planned looks: each verdict is made at ``alpha / looks``
        (:func:`~fedunlearn.evaluation.verdicts.sequential_alpha`); 1 for a fixed set of seeds.

    Returns
    -------
    list of dict
        ``request``, ``setting``, ``method``, ``role``, ``seeds``, ``metrics`` and ``costs``
        (each figure: :func:`describe`), ``verdicts`` (per criterion of
        :data:`~fedunlearn.evaluation.verdicts.CRITERIA`, for method rows) and ``notes``.
    """
    groups: dict[Key, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    role_rows: dict[tuple[tuple[tuple[int, ...], str], str, str],
                    dict[int, Mapping[str, Any]]] = {}
    for (request, setting, _), members in groups.items():
        for role in (Role.ORIGINAL, Role.REFERENCE, Role.NOISE_FLOOR):
            chosen = [r for r in members if r.get("role") == role]
            if chosen:
                role_rows.setdefault((request, setting, role), {}).update(_by_seed(chosen))
    out = []
    for (request, setting, method), members in groups.items():
        seeds = sorted({int(r.get("seed", 0)) for r in members})
        metric_keys = list(dict.fromkeys(k for r in members for k in (r.get("metrics") or {})))
        entry: dict[str, Any] = {
            "request": list(request[0]), "setting": setting, "method": method,
            "role": members[0].get("role"), "seeds": seeds,
            "metrics": {k: describe([_metric(r, k) for r in members]) for k in metric_keys
                        if any(_metric(r, k) is not None for r in members)},
            "costs": {k: describe([_number(r.get(k)) for r in members]) for k in COST_FIGURES},
            "verdicts": {}, "notes": sorted({n for r in members for n in r.get("notes") or []}),
        }
        if request[1]:  # a sample or class request: what it removes
            entry.update(granularity=members[0].get("granularity"), removes=request[1])
        if entry["role"] == Role.METHOD:
            ref = role_rows.get((request, setting, Role.REFERENCE), {})
            floor = role_rows.get((request, setting, Role.NOISE_FLOOR), {})
            original = role_rows.get((request, setting, Role.ORIGINAL), {})
            mine = _by_seed(members)
            judged = {c: judge(c, mine, ref, floor, alpha=alpha / looks, original=original)
                      for c in CRITERIA}
            entry["verdicts"] = {c.name: v for c, v in judged.items()
                                 if not (c.granular and v.get("reason") == "not measured")}
            for v in entry["verdicts"].values():
                v.update(alpha=alpha, looks=looks)
            untaken = [v["note"] for v in entry["verdicts"].values() if v.get("note")]
            for note in (*untaken, replay_note(mine, ref), recovery_note(mine)):
                if note:
                    entry["notes"].append(note)
        out.append(entry)
    return out


FAR_BELOW = 0.05
"""A history replay whose test accuracy ends more than this below retraining's (mean over
seeds) is flagged, with the diagnostics that explain it."""

FRESH_KINDS: dict[str, str] = {"calibration": "calibration", "exact": "exact"}
"""What a replay's fresh step can be (``details.replay_summary.fresh_kind``), and the word the
notes and plot labels use for it. FedEraser's ``ratio`` is
‖stored‖ / ‖calibration update‖ (the factor it stretches the fresh step by); FedRecover's is
‖stored‖ / ‖exact update‖ in its rounds whose updates were all exact (how far the recovered
run's updates moved from the original run's), which it does not apply to anything."""


def fresh_kind(row: Mapping[str, Any]) -> str | None:
    """What the replay diagnostics of ``row`` compare the stored update with: a key of
    :data:`FRESH_KINDS`, or ``None`` (no fresh step, or no replay).

    Rows written before ``fresh_kind`` existed came only from FedEraser (ratios) and FedAccum
    (none), so a summary with a ratio and no kind reads as ``"calibration"``.

    >>> fresh_kind({"details": {"replay_summary": {"mean_ratio": 2.0}}})
    'calibration'
    >>> fresh_kind({"details": {"replay_summary": {"mean_ratio": 1.1, "fresh_kind": "exact"}}})
    'exact'
    >>> fresh_kind({"details": {"replay_summary": {"mean_ratio": None}}}) is None
    True
    """
    summary = (row.get("details") or {}).get("replay_summary") or {}
    kind = summary.get("fresh_kind")
    if kind in FRESH_KINDS:
        return str(kind)
    return "calibration" if _number(summary.get("mean_ratio")) is not None else None


def _exact_replay_parts(estimated: list[float], total: list[int], abnormal: list[float],
                        ratios: list[float], cosines: list[float]) -> list[str]:
    """The clauses of :func:`replay_note` for a replay against exact updates (FedRecover)."""
    parts = []
    if estimated:
        parts.append(f"{np.mean(estimated):.0f} of {np.mean(total):.0f} rounds estimated, "
                     f"{np.mean(abnormal):.0f} with abnormal estimates replaced")
    if ratios:
        parts.append(f"in the rounds with exact updates only, the stored updates are "
                     f"{np.mean(ratios):.1f}× the exact updates’ length"
                     + (f", cosine {np.mean(cosines):.2f} to them" if cosines else ""))
    return parts


def recovery_words(recovery: Mapping[str, Any]) -> str | None:
    """How a watched repair ended, in words, from a row's ``details.recovery`` (``None`` for
    a fixed number of rounds; :mod:`fedunlearn.unlearning.federated.finetune`). The accuracy is shown
    beside the target it was compared with: when evaluators did not answer, the target of the
    evaluators that did.

    >>> recovery_words({"recovered": False, "rounds": 40, "accuracy": 0.951,
    ...                    "target_accuracy": 0.989})
    'repair not recovered: stopped at its cap of 40 rounds (remaining clients 0.951, target 0.989)'
    >>> recovery_words({"recovered": True, "rounds": 1, "accuracy": 0.99,
    ...                    "target_accuracy": 0.989})
    'repaired in 1 round (remaining clients 0.990, target 0.989)'
    >>> recovery_words({"recovered": True, "rounds": 2, "accuracy": 0.97, "evaluators": [1, 2],
    ...                 "target_accuracy": 0.99, "compared": 1, "compared_target": 0.96,
    ...                 "unanswered": 1})
    'repaired in 2 rounds (remaining clients 0.970 on 1 of 2 evaluators, target 0.960; 1 evaluation unanswered)'
    >>> recovery_words({"recovered": False, "rounds": 3, "accuracy": None, "evaluators": [1],
    ...                 "target_accuracy": 0.99, "compared": 0, "unanswered": 3})
    'repair not recovered: stopped at its cap of 3 rounds (no evaluator answered both before the repair and in its last round; 3 evaluations unanswered)'
    >>> recovery_words({"recovered": True, "rounds": 1, "accuracy": 0.9, "evaluators": [1, 2],
    ...                 "target_accuracy": 0.95, "unanswered": 1})  # written before "compared"
    'repaired in 1 round (remaining clients 0.900; 1 evaluation unanswered)'
    """
    if not recovery:
        return None
    n = int(recovery.get("rounds") or 0)
    rounds = f"{n} round{'s' if n != 1 else ''}"
    accuracy = recovery.get("accuracy")
    evaluators = len(recovery.get("evaluators") or ())
    missed = int(recovery.get("unanswered") or 0)
    # rows written before "compared" existed: with evaluations missing, which target the
    # accuracy was compared with is unknown, so none is printed
    compared = recovery.get("compared", evaluators if not missed else None)
    target = (recovery.get("compared_target") if compared != evaluators
              else recovery.get("target_accuracy"))
    figures = []
    if isinstance(accuracy, int | float):
        part = (f" on {compared} of {evaluators} evaluators"
                if compared not in (evaluators, None) else "")
        figures.append(f"remaining clients {accuracy:.3f}{part}")
        if isinstance(target, int | float):
            figures.append(f"target {target:.3f}")
    elif n:
        figures.append("no evaluator answered both before the repair and in its last round")
    said = [", ".join(figures)] if figures else []
    if missed:
        said.append(f"{missed} evaluation{'s' if missed != 1 else ''} unanswered")
    tail = f" ({'; '.join(said)})" if said else ""
    if recovery.get("recovered"):
        return f"repaired in {rounds}{tail}"
    return f"repair not recovered: stopped at its cap of {rounds}{tail}"


def recovery_note(method: Mapping[int, Mapping[str, Any]]) -> str | None:
    """A note when a repair (PGA's post-training, NoT's fine-tuning) reached its cap of rounds
    in some seed before the remaining clients' accuracy was back.

    >>> row = {"details": {"recovery": {"recovered": False, "rounds": 40, "accuracy": 0.951,
    ...                                 "target_accuracy": 0.989}}}
    >>> recovery_note({1: row, 2: {"details": {"recovery": {"recovered": True}}}})
    'seed 1: repair not recovered: stopped at its cap of 40 rounds (remaining clients 0.951, target 0.989)'
    """
    parts = [f"seed {s}: {recovery_words(rec)}" for s, row in sorted(method.items())
             if (rec := (row.get("details") or {}).get("recovery")) and not rec.get("recovered")]
    return "; ".join(parts) or None


def replay_note(method: Mapping[int, Mapping[str, Any]],
                reference: Mapping[int, Mapping[str, Any]]) -> str | None:
    """Why a history replay ended far below retraining, from its replay diagnostics.

    The figures are means over seeds of each row's ``details.replay_summary``: ``mean_ratio``
    is ‖stored update‖ / ‖fresh update‖ and ``mean_cosine`` the cosine between the two, the
    fresh update being what ``fresh_kind`` says (:data:`FRESH_KINDS`). For FedEraser it is the
    calibration update, and the ratio the factor by which FedEraser stretches each calibrated
    step; for FedRecover the exact update from the recovered model, in the rounds whose
    updates were all exact, and the note adds how many rounds were estimated (``details``).

    >>> row = {"metrics": {"test_accuracy": 0.30}, "details": {"replay_summary":
    ...        {"mean_ratio": 3.1, "mean_cosine": 0.42, "calibrated_rounds": 9}}}
    >>> replay_note({0: row}, {0: {"metrics": {"test_accuracy": 0.86}}})
    'replay ends 0.56 below retraining (test accuracy 0.30 vs 0.86): calibrated steps are 3.1× the calibration’s own length, cosine 0.42 to the stored update'
    """
    gaps, ratios, cosines, accs, refs = [], [], [], [], []
    kinds: set[str | None] = set()
    estimated, abnormal, total = [], [], []
    for s, row in method.items():
        summary = (row.get("details") or {}).get("replay_summary")
        acc, ref = _metric(row, "test_accuracy"), _metric(reference.get(s), "test_accuracy")
        if not summary or acc is None or ref is None:
            continue
        gaps.append(ref - acc)
        accs.append(acc)
        refs.append(ref)
        kinds.add(fresh_kind(row))
        if (ratio := _number(summary.get("mean_ratio"))) is not None:
            ratios.append(ratio)
        if (cos := _number(summary.get("mean_cosine"))) is not None:
            cosines.append(cos)
        details = row.get("details") or {}
        if (n := _number(details.get("rounds_estimated"))) is not None:
            estimated.append(n)
            total.append(len(details.get("round_modes") or {}))
            abnormal.append(_number(details.get("rounds_abnormal")) or 0.0)
    if not gaps or float(np.mean(gaps)) <= FAR_BELOW:
        return None
    text = (f"replay ends {np.mean(gaps):.2f} below retraining (test accuracy "
            f"{np.mean(accs):.2f} vs {np.mean(refs):.2f})")
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind == "exact":
        if parts := _exact_replay_parts(estimated, total, abnormal, ratios, cosines):
            text += ": " + "; ".join(parts)
    elif ratios:
        text += (f": calibrated steps are {np.mean(ratios):.1f}× the calibration’s own length"
                 + (f", cosine {np.mean(cosines):.2f} to the stored update" if cosines else ""))
    else:
        text += ": no calibration (stored updates replayed as they are)"
    return text


def backdoor_gap(original: Mapping[int, Mapping[str, Any]],
                 reference: Mapping[int, Mapping[str, Any]], key: str = "backdoor_asr"
                 ) -> tuple[float, float, float] | None:
    """``(mean gap, original's mean, retraining's mean)`` of ``key`` over the seeds where both
    the original model and retraining have it; ``None`` without such a seed.

    >>> backdoor_gap({0: {"metrics": {"backdoor_asr": 0.9}}},
    ...              {0: {"metrics": {"backdoor_asr": 0.1}}})
    (0.8, 0.9, 0.1)
    """
    pairs = [(o, r) for s in sorted(set(original) & set(reference))
             if (o := _metric(original[s], key)) is not None
             and (r := _metric(reference[s], key)) is not None]
    if not pairs:
        return None
    o, r = (float(np.mean(x)) for x in zip(*pairs, strict=True))
    return round(o - r, 12), o, r


def judge(c: Criterion, method: Mapping[int, Mapping[str, Any]],
          reference: Mapping[int, Mapping[str, Any]],
          noise_floor: Mapping[int, Mapping[str, Any]], *, alpha: float = ALPHA,
          original: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The verdict of one criterion from rows keyed by seed (see
    :mod:`fedunlearn.evaluation.verdicts`): per-seed paired differences, the margin from the
    noise floor, :func:`~fedunlearn.evaluation.verdicts.decide`. A backdoor criterion whose
    original model shows no backdoor gets ``–`` and a ``note``."""
    key = next((k for k in c.keys if any(_metric(r, k) is not None for r in method.values())),
               None)
    seeds = sorted(set(method) & set(reference))
    if key is None or not seeds:
        return {"verdict": NO_VERDICT, "key": key, "n": 0, "reason": "not measured"}
    if c.vs_noise_floor:
        seeds = [s for s in seeds if _metric(noise_floor.get(s), key) is not None]
        base = {s: _metric(noise_floor[s], key) for s in seeds}
        floor_values = [v for v in base.values() if v is not None]
        margin = max(c.floor, float(np.mean(floor_values))) if floor_values else c.floor
    else:
        base = {s: _metric(reference[s], key) for s in seeds}
        margin = margin_of([base[s] for s in seeds if s in noise_floor],
                           [_metric(noise_floor[s], key) for s in seeds if s in noise_floor],
                           c.floor)
    diffs = [m - b for s in seeds
             if (m := _metric(method[s], key)) is not None and (b := base[s]) is not None]
    if not diffs:
        return {"verdict": NO_VERDICT, "key": key, "n": 0, "reason": "no paired values"}
    if c.needs_backdoor:
        gap = backdoor_gap(original or {}, reference, key)
        if gap is None or not gap[0] > margin:
            said = ("the original model was not measured" if gap is None else
                    f"the original model's {key} {gap[1]:.3f} is not above retraining's "
                    f"{gap[2]:.3f} by more than the margin {margin:.3f}")
            return {"verdict": NO_VERDICT, "key": key, "n": len(diffs),
                    "diff": float(np.mean(diffs)), "margin": margin,
                    "reason": "the backdoor never took",
                    "note": f"no {c.name} verdict: the backdoor never took ({said})"}
    out = decide(diffs, margin, direction=c.direction, alpha=alpha)
    out["key"] = key
    per_seed = {str(s): p for s in seeds if (p := _metric(method[s], MCNEMAR_KEY)) is not None}
    if c.needs_backdoor and per_seed:
        out["mcnemar_p_per_seed"] = per_seed  # a diagnostic of fixed models, not the verdict
    return out
