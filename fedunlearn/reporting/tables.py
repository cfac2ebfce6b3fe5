"""The removal comparison as rows and tables: ordering, formatting and ``metrics.csv``."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fedunlearn.evaluation.schema import (
    COST_KEYS,
    CSV_COLUMNS,
    METRIC_KEYS,
    NOISE_SUFFIX,
    REFERENCE,
    ROLES,
    SETTINGS,
    Role,
    request_key,
)
from fedunlearn.evaluation.verdicts import CRITERIA
from fedunlearn.reporting.files import _write_text

# --- the removal comparison: rows ------------------------------------------------------------

MISSING = "–"
NOISE_FLOOR_LABEL = "noise floor (2nd retrain)"


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of one comparison row with every key the reports read.

    Old run files lack ``setting`` and ``role``: the setting defaults to ``"federated"`` and
    the role is inferred from the method name (``original``, ``retrain`` / ``central_retrain``
    are the reference, ``*retrain_seed2`` the noise floor, anything else a method).

    Parameters
    ----------
    row : mapping
        One element of ``results["unlearning"]``.

    Returns
    -------
    dict
        The row with ``request`` as a list of client ids and ``metrics`` as a dict.
    """
    out = dict(row)
    out["method"] = str(row.get("method") or "?")
    out["request"] = _request_clients(row.get("request"))
    out["setting"] = str(row.get("setting") or "federated")
    out["role"] = str(row.get("role") or _infer_role(out["method"]))
    out["metrics"] = dict(row.get("metrics") or {})
    return out


def _infer_role(method: str) -> str:
    if method == Role.ORIGINAL:  # the original model's row is named after its role
        return Role.ORIGINAL
    if method in REFERENCE.values():
        return Role.REFERENCE
    if method in {ref + NOISE_SUFFIX for ref in REFERENCE.values()}:
        return Role.NOISE_FLOOR
    return Role.METHOD


def _request_clients(request: Any) -> list[int]:
    if request is None:
        return []
    if isinstance(request, (list, tuple)):
        return [int(c) for c in request]
    return [int(request)]


def request_label(clients: Sequence[int], removes: str = "") -> str:
    """``"0"`` or ``"0+3"``: the clients a request forgets; what a sample or class request
    removes (``removes``) when it has it."""
    return removes or "+".join(str(c) for c in clients) or MISSING


def row_label(row: Mapping[str, Any]) -> str:
    """:func:`request_label` of a row or summary entry."""
    return request_label(row.get("request") or [], str(row.get("removes") or ""))


def ordered_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalized rows grouped by request (first appearance), then setting, then role.

    Parameters
    ----------
    rows : iterable of mapping
        ``results["unlearning"]``.

    Returns
    -------
    list of dict
        Rows from :func:`normalize_row`; the sort is stable, so methods keep their order.
    """
    norm = [normalize_row(r) for r in rows]
    requests = _unique(request_key(r) for r in norm)
    settings = _settings(norm)
    return sorted(norm, key=lambda r: (requests.index(request_key(r)),
                                       settings.index(r["setting"]), _rank(ROLES, r["role"])))


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _rank(order: Sequence[str], item: str) -> int:
    return order.index(item) if item in order else len(order)


def _settings(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Settings present, federated first, then centralized, then any other by appearance."""
    seen = _unique(r["setting"] for r in rows)
    return sorted(seen, key=lambda s: (_rank(SETTINGS, s), seen.index(s)))


def _request_groups(rows: list[dict[str, Any]]) -> list[tuple[list[int], list[dict[str, Any]]]]:
    """``(clients, rows)`` per request, for rows already in :func:`ordered_rows` order."""
    groups: dict[tuple[tuple[int, ...], str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(request_key(r), []).append(r)
    return [(list(k[0]), v) for k, v in groups.items()]


def _first_request(results: Mapping[str, Any]) -> tuple[list[int], list[dict[str, Any]]]:
    groups = _request_groups(display_rows(results))
    return groups[0] if groups else ([], [])


def _multi_seed(summary: Sequence[Mapping[str, Any]] | None) -> bool:
    return bool(summary) and any(len(e.get("seeds") or []) > 1 for e in summary or [])


def display_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows the tables and plots show, in :func:`ordered_rows` order.

    A one-seed run shows its rows as they are (with the summary's verdicts attached); a
    multi-seed run shows one row per request and method built from ``results["summary"]``:
    every figure is the mean over seeds, ``spread[key]`` its 95 % half-interval, ``n`` the
    number of seeds, ``trigger_active`` how many seeds still had an active trigger.
    """
    summary = results.get("summary") or []
    if not _multi_seed(summary):
        verdicts = {_entry_key(e): e for e in summary}
        rows = ordered_rows(results.get("unlearning") or [])
        for r in rows:
            e = verdicts.get((request_key(r), r["setting"], r["method"]))
            if e is not None:
                r["verdicts"] = e.get("verdicts") or {}
                r["notes"] = e.get("notes") or r.get("notes") or []
        return rows
    return ordered_rows([_summary_row(e, results.get("unlearning") or []) for e in summary])


def _entry_key(e: Mapping[str, Any]) -> tuple[tuple[tuple[int, ...], str], str, str]:
    return request_key(e), str(e.get("setting")), str(e.get("method"))


def _summary_row(entry: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    def mean(block: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.get("mean") for k, v in block.items()}

    def half(block: Mapping[str, Any]) -> dict[str, float]:
        return {k: (v["ci"][1] - v["ci"][0]) / 2 for k, v in block.items() if v.get("ci")}

    metrics, costs = entry.get("metrics") or {}, entry.get("costs") or {}
    key = _entry_key(entry)
    flags = [(r.get("metrics") or {}).get("backdoor_trigger_active") for r in rows
             if _entry_key(r) == key]
    flags = [f for f in flags if isinstance(f, bool)]
    return {"request": list(entry.get("request") or []), "setting": entry.get("setting"),
            "granularity": entry.get("granularity") or "client",
            "removes": entry.get("removes") or "",
            "method": entry.get("method"), "role": entry.get("role"),
            "metrics": mean(metrics), **mean(costs), "spread": {**half(metrics), **half(costs)},
            "n": len(entry.get("seeds") or []), "verdicts": entry.get("verdicts") or {},
            "notes": entry.get("notes") or [],
            "trigger_active": (sum(flags), len(flags)) if flags else None}


def _by_role(rows: Iterable[dict[str, Any]], role: str) -> dict[str, dict[str, Any]]:
    """The first row of ``role`` per setting."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["role"] == role:
            out.setdefault(r["setting"], r)
    return out


# --- values and their formatting -------------------------------------------------------------

def _value(x: Any) -> float | None:
    """A finite number, or None for missing, null, NaN, infinite, boolean or non-numeric."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _metric(row: Mapping[str, Any] | None, key: str) -> float | None:
    return None if row is None else _value(row["metrics"].get(key))


def _fmt(x: Any, spec: str) -> str:
    v = _value(x)
    return MISSING if v is None else format(v, spec)


def _pm(row: Mapping[str, Any], key: str, text: str, spec: str) -> str:
    """``text`` followed by ``±half-interval`` when the row has one for ``key``."""
    h = _value((row.get("spread") or {}).get(key))
    return text if not h or text == MISSING else f"{text}±{format(h, spec)}"


def _fmt_int(x: Any) -> str:
    v = _value(x)
    return MISSING if v is None else str(round(v))


def _fmt_speedup(x: Any, missing: str = MISSING) -> str:
    v = _value(x)
    return missing if v is None or v <= 0 else f"{v:.1f}x"


def _fmt_bytes(x: Any) -> str:
    """Decimal units: ``"950 B"``, ``"1.2 MB"``."""
    v = _value(x)
    if v is None:
        return MISSING
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while abs(v) >= 1000 and i < len(units) - 1:
        v /= 1000
        i += 1
    return f"{int(v)} B" if i == 0 else f"{v:.1f} {units[i]}"


def _trigger_flag(row: Mapping[str, Any]) -> bool | None:
    seeds = row.get("trigger_active")
    if seeds is not None:
        return bool(seeds[0]) if seeds[0] in (0, seeds[1]) else None
    flag = row["metrics"].get("backdoor_trigger_active")
    return flag if isinstance(flag, bool) else None


def trigger_verdict(row: Mapping[str, Any]) -> str:
    """``"active (p=3e-41)"``, ``"not active (p=0.98)"`` or ``"–"`` for a normalized row;
    ``"active in 2/3 seeds"`` for a multi-seed summary row."""
    seeds = row.get("trigger_active")
    if seeds is not None:
        return f"active in {seeds[0]}/{seeds[1]} seeds"
    word = {True: "active", False: "not active", None: ""}[_trigger_flag(row)]
    p = _metric(row, "backdoor_p_value")
    if p is None:
        return word or MISSING
    return f"{word} (p={p:.2g})" if word else f"p={p:.2g}"


def _has_backdoor(rows: Iterable[Mapping[str, Any]]) -> bool:
    return any(_metric(r, "backdoor_asr") is not None or _trigger_flag(r) is not None
               for r in rows)


# --- tables ----------------------------------------------------------------------------------

class _Column(NamedTuple):
    header: str
    cell: Callable[[dict[str, Any]], str]
    numeric: bool = True


def _metric_column(header: str, key: str, spec: str, *fallback: str) -> _Column:
    """A metric's cell (``mean±half`` over seeds when known); ``fallback`` keys are read when
    ``key`` is absent (run files written before the key existed)."""
    def cell(r: dict[str, Any]) -> str:
        k = next((k for k in (key, *fallback) if r["metrics"].get(k) is not None), key)
        return _pm(r, k, _fmt(r["metrics"].get(k), spec), spec)
    return _Column(header, cell)


def _cost_column(header: str, key: str, fmt: Callable[[Any], str], spec: str = ".2f") -> _Column:
    return _Column(header, lambda r: _pm(r, key, fmt(r.get(key)), spec))


def _lead_columns(show_setting: bool) -> list[_Column]:
    cols = [_Column("setting", lambda r: r["setting"], False)] if show_setting else []
    return [*cols, _Column("method", lambda r: r["method"], False)]


def _fixed_width(columns: Sequence[_Column], rows: Sequence[dict[str, Any]]) -> str:
    cells = [[c.cell(r) for c in columns] for r in rows]
    widths = [max([len(c.header)] + [len(line[i]) for line in cells])
              for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if c.numeric else v.ljust(w)
                         for v, w, c in zip(values, widths, columns)).rstrip()

    head = line([c.header for c in columns])
    return "\n".join([head, "-" * len(head), *(line(v) for v in cells)])


def _terminal_columns(backdoor: bool) -> list[_Column]:
    trigger = {True: "active", False: "no", None: MISSING}

    def trig(r: dict[str, Any]) -> str:
        seeds = r.get("trigger_active")
        return f"{seeds[0]}/{seeds[1]}" if seeds is not None else trigger[_trigger_flag(r)]

    cols = [_Column("request", row_label, False),
            _Column("setting", lambda r: r["setting"], False),
            _Column("method", lambda r: r["method"], False),
            _metric_column("test", "test_accuracy", ".3f"),
            _metric_column("forget", "forget_accuracy", ".3f")]
    if backdoor:
        cols += [_metric_column("ASR", "backdoor_asr", ".3f"),
                 _Column("trigger", trig, False)]
    return cols + [_metric_column("MIA clean", "mia_loss_auc_clean", ".3f", "mia_loss_auc"),
                   _metric_column("LiRA clean", "mia_lira_auc_clean", ".3f", "mia_lira_auc"),
                   _metric_column("KL-forget", "kl_forget", ".3g"),
                   _cost_column("wall s", "wall_s", lambda x: _fmt(x, ".2f")),
                   _cost_column("speedup", "speedup_vs_retrain", lambda x: _fmt_speedup(x, "-")),
                   _cost_column("client-epochs", "client_epochs", lambda x: _fmt(x, ".1f")),
                   _cost_column("msgs", "messages_sent", _fmt_int)]


def comparison_table(rows: list[dict[str, Any]],
                     summary: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The removal comparison as a fixed-width text table for the terminal.

    Parameters
    ----------
    rows : list of dict
        ``results["unlearning"]``; rows of old run files (no ``setting``, ``role`` or newer
        metrics) render too, missing values as ``–``.
    summary : list of dict, optional
        ``results["summary"]``; with several seeds the table shows one line per method with
        ``mean±half-interval`` (95 %) and the number of seeds.

    Returns
    -------
    str
        One line per row, grouped by request then setting. The ASR and trigger columns appear
        only when some row measured the backdoor.
    """
    norm = display_rows({"unlearning": rows, "summary": summary or []})
    cols = _terminal_columns(_has_backdoor(norm))
    if _multi_seed(summary):
        cols.insert(3, _Column("seeds", lambda r: str(r.get("n", 1))))
    if granular(norm):
        cols.insert(1, GRANULARITY_COLUMN)
        at = next(i for i, c in enumerate(cols) if c.header == "forget") + 1
        present = [(h, k) for h, k in GRANULAR_COLUMNS
                   if any(k in (r.get("metrics") or {}) for r in norm)]
        cols[at:at] = [_metric_column(h, k, ".3f") for h, k in present]
    return _fixed_width(cols, norm)


GRANULAR_COLUMNS = (("class", "removed_class_accuracy"), ("others", "other_classes_accuracy"),
                    ("kept", "kept_accuracy"))
"""Columns of the terminal table below the client level (headers, metric keys)."""


GRANULARITY_COLUMN = _Column("granularity", lambda r: str(r.get("granularity") or "client"),
                             False)


def granular(rows: Iterable[Mapping[str, Any]]) -> bool:
    """Some row answers a sample or class request (the tables then show the granularity)."""
    return any((r.get("granularity") or "client") != "client" for r in rows)


# --- verdicts against retraining -------------------------------------------------------------

VERDICT_HEADERS: tuple[tuple[str, str, str], ...] = (
    ("test", "test acc", ".3f"), ("retain", "retain acc", ".3f"),
    ("forget", "forgotten acc", ".3f"), ("asr", "ASR", ".3f"), ("mia", "MIA AUC", ".3f"),
    ("kl", "KL-forget − floor", ".3g"), ("class", "removed class acc", ".3f"),
    ("others", "other classes acc", ".3f"), ("kept", "kept acc", ".3f"))
"""(criterion, column header, number format) of the verdict table, in column order."""


def verdict_rule(alpha: float = 0.05, looks: int | None = None) -> str:
    """The verdict rule in one line (``looks``: a sequential run's planned looks, each at
    ``alpha / looks``)."""
    level = (f"α = {alpha:g}" if not looks or looks == 1
             else f"α = {alpha:g} spent over {looks} looks, {alpha / looks:.3g} each")
    return (f"verdict: d = method − retraining of the same seed, over seeds ({level}); "
            "matches = TOST (the (1−2α) t-interval of d within ±δ, δ = retrain-vs-retrain "
            "gap, min 0.01 acc / 0.02 ASR, AUC); worse/better (test, retain) or differs "
            "above/below (forgotten, ASR, MIA, KL) = two-sided t-test rejects d = 0; else "
            "inconclusive, with res = smallest δ it decides and → n = seeds that would decide "
            "at δ; – with one seed; ± is the (1−α) half-interval")


def rule_of(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`verdict_rule` with the level and looks the verdicts of ``rows`` were made at."""
    made = [v for r in rows for v in (r.get("verdicts") or {}).values() if v.get("alpha")]
    return verdict_rule(made[0]["alpha"], made[0].get("looks")) if made else verdict_rule()


def verdict_cell(v: Mapping[str, Any] | None, spec: str) -> str:
    """``"matches -0.004±0.006 δ0.010"``, ``"inconclusive +0.007±0.080 δ0.020 res0.061 →12"``
    or ``"–"``."""
    if not v or v.get("diff") is None:
        return MISSING
    verdict = v.get("verdict", MISSING)
    text = f"{verdict} {format(v['diff'], '+' + spec)}"
    ci = v.get("ci")
    if ci:
        text += f"±{format((ci[1] - ci[0]) / 2, spec)}"
    if v.get("margin") is not None:
        text += f" δ{format(v['margin'], spec)}"
    if verdict == "inconclusive":
        if v.get("resolution") is not None:
            text += f" res{format(v['resolution'], spec)}"
        if "seeds_needed" in v:
            needed = v["seeds_needed"]
            text += " →∞" if needed is None else f" →{int(needed)}"
    return text


def _verdict_columns(show_request: bool = True,
                     rows: Sequence[Mapping[str, Any]] = ()) -> list[_Column]:
    """The verdict table's columns; the criteria measured only below the client level
    (``class``, ``others``, ``kept``) appear when some row of ``rows`` has them."""
    lead = [_Column("request", row_label, False)] if show_request else []
    lead += [_Column("setting", lambda r: r["setting"], False),
             _Column("method", lambda r: r["method"], False)]
    granular = {c.name for c in CRITERIA if c.granular}
    present = {k for r in rows for k in (r.get("verdicts") or {})}
    return lead + [_Column(h, lambda r, c=c, spec=spec: verdict_cell(
        (r.get("verdicts") or {}).get(c), spec), False) for c, h, spec in VERDICT_HEADERS
        if c not in granular or c in present]


def verdict_rows(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Method entries of the summary that carry verdicts, normalised for the tables."""
    return ordered_rows([dict(e) for e in summary if e.get("verdicts")])


def verdict_table(summary: Sequence[Mapping[str, Any]] | None) -> str:
    """The verdicts against retraining as a fixed-width text table, the rule, and notes."""
    rows = verdict_rows(summary or [])
    if not rows:
        return "verdicts       none (no method row beside a retraining)"
    lines = [_fixed_width(_verdict_columns(rows=rows), rows), rule_of(rows)]
    several = len({row_label(r) for r in rows}) > 1  # say which one

    def where(r: Mapping[str, Any]) -> str:
        return f"request {row_label(r)}, " if several else ""

    lines += [f"note: {where(r)}{r['method']}: {n}" for r in rows for n in r.get("notes") or []]
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(columns: Sequence[_Column], rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---:" if c.numeric else ":---" for c in columns) + "|"
    body = ["| " + " | ".join(_md_escape(c.cell(r)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


# --- metrics.csv -----------------------------------------------------------------------------

def metrics_table_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per comparison row, keys :data:`CSV_COLUMNS`.

    Parameters
    ----------
    results : mapping
        A run's ``results.json``.

    Returns
    -------
    list of dict
        ``request`` as ``"0"`` or ``"0+3"``; metrics and costs as stored (None when missing),
        in :func:`ordered_rows` order.
    """
    return [_flat_row(r) for r in ordered_rows(results.get("unlearning") or [])]


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {"request": row_label(row),
                            "granularity": row.get("granularity") or "client",
                            "seed": row.get("seed"), "setting": row["setting"],
                            "role": row["role"], "method": row["method"]}
    flat.update({k: row["metrics"].get(k) for k in METRIC_KEYS})
    flat.update({k: row.get(k) for k in COST_KEYS})
    return flat


def _csv_cell(value: Any) -> str:
    """Empty for missing or NaN; ``repr`` precision for floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_metrics_csv(path: Path, results: Mapping[str, Any]) -> None:
    """Write :func:`metrics_table_rows` to ``path`` (header only for a training-only run).

    Parameters
    ----------
    path : Path
        Where ``metrics.csv`` goes; written atomically.
    results : mapping
        A run's ``results.json``.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in metrics_table_rows(results):
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    _write_text(Path(path), buf.getvalue())


# --- the cost of verification ----------------------------------------------------------------

def _span(values: Iterable[Any], fmt: Callable[[float], str]) -> str:
    """The values as ``fmt`` writes them: one, or ``"low–high"`` when the seeds differ.

    >>> _span([560, 569, 577], _fmt_int), _span([2.0018, 2.0], lambda e: f"{e:.3g}")
    ('560–577', '2')
    """
    finite = sorted(v for x in values if (v := _value(x)) is not None)
    if not finite:
        return MISSING
    low, high = fmt(finite[0]), fmt(finite[-1])
    return low if low == high else f"{low}–{high}"


def epoch_count(epochs: float | str) -> str:
    """``"2.5 epochs"``, ``"1 epoch"``; a string is taken as already written (``"2–3"``).

    >>> epoch_count(1.0), epoch_count(0.1001), epoch_count(20), epoch_count("2–3")
    ('1 epoch', '0.1 epochs', '20 epochs', '2–3 epochs')
    """
    text = epochs if isinstance(epochs, str) else f"{epochs:.3g}"
    return f"{text} epoch{'' if text == '1' else 's'}"


def verification_line(results: Mapping[str, Any], request: int) -> str | None:
    """One line on what verifying request ``request`` cost, beside the retraining it judges.

    ``"verification 9.80 s vs retraining 35.20 s (shadows 7.10 s: 4 × 1000 of 89510 samples × 20
    epochs; members 90 of 90, non-members 90, population 2000 of 25510)"``; times summed over
    seeds and serving passes, sizes and epochs as ``low–high`` when the seeds differ. None when
    the run file has no ``verification`` block (older runs).
    """
    block = results.get("verification") or {}
    entries = [v for v in block.get("requests") or [] if v.get("request") == request]
    if not entries:
        return None
    groups = _request_groups(ordered_rows(results.get("unlearning") or []))  # request order
    rows = groups[request][1] if 0 <= request < len(groups) else []
    retrain = sum(_value(r.get("wall_s")) or 0.0 for r in rows if r["role"] == Role.REFERENCE)
    wall = sum(_value(v.get("wall_s")) or 0.0 for v in entries)
    shadow = sum(_value(v.get("shadow_s")) or 0.0 for v in entries)
    seeds = len({v.get("seed") for v in entries})
    text = f"verification {wall:.2f} s vs retraining {retrain:.2f} s"
    if seeds > 1:
        text += f" (over {seeds} seeds)"
    parts = []
    every = [v.get("sizes") or {} for v in entries]

    def size(key: str) -> str:
        return _span([z.get(key) for z in every], _fmt_int)

    if entries[0].get("shadows"):
        epochs = _span([v.get("shadow_epochs") for v in entries], lambda e: f"{e:.3g}")
        parts.append(f"shadows {shadow:.2f} s: {entries[0]['shadows']} × "
                     f"{_span([v.get('shadow_train_samples') for v in entries], _fmt_int)} of "
                     f"{size('shadow_pool')} samples"
                     + ("" if epochs == MISSING else f" × {epoch_count(epochs)}"))
    parts.append(f"members {size('members')} of {size('members_available')}, non-members "
                 f"{size('nonmembers')}, population {size('population')} of "
                 f"{size('population_available')}")
    return f"{text} ({'; '.join(parts)})"


def verification_summary(results: Mapping[str, Any]) -> str | None:
    """Every request's :func:`verification_line` and the total, for the terminal."""
    block = results.get("verification") or {}
    requests = sorted({v.get("request") for v in block.get("requests") or []})
    if not requests:
        return None
    lines = [f"request {i}: {line}" for i in requests
             if (line := verification_line(results, i)) is not None]
    lines.append(f"verification total {_fmt(block.get('total_s'), '.2f')} s, retraining total "
                 f"{_fmt(block.get('retrain_s'), '.2f')} s")
    return "\n".join(lines)
