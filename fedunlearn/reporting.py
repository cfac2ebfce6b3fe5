"""The only module that writes result files, tables, plots and reports.

matplotlib is imported lazily, inside the plotting functions, so importing this module
stays light.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fedunlearn.config import Config
from fedunlearn.federation.port import TrainingRun
from fedunlearn.provenance import git_commit, versions

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def stamp(cfg: Config) -> dict[str, Any]:
    """The provenance block every result file starts with."""
    return {"config": cfg.to_dict(), "seed": cfg.seed, "versions": versions(),
            "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def training_block(run: TrainingRun, *, engine: str, history_bytes: int) -> dict[str, Any]:
    """The ``training`` section of ``results.json``."""
    return {"engine": engine,
            "rounds": [dataclasses.asdict(r) for r in run.rounds],
            "final_test_accuracy": run.rounds[-1].test_accuracy if run.rounds else math.nan,
            "wall_s": run.wall_s, "messages_sent": run.messages_sent,
            "bytes_exchanged": run.bytes_exchanged,
            "client_epochs": run.client_epochs, "history_bytes": history_bytes}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    _write_text(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def read_results(run_dir: Path) -> dict[str, Any]:
    """Load ``RUN_DIR/results.json``; a missing or unreadable file is a one-line ConfigError."""
    from fedunlearn.config import ConfigError

    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no results.json in '{run_dir}'; pass a run directory written by "
                          "`fedunlearn run` or `fedunlearn compare`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{path}' is not readable JSON ({exc}); the run's results are "
                          "damaged - rerun the experiment") from None
    if not isinstance(results, dict) or "training" not in results:
        raise ConfigError(f"'{path}' has no 'training' section; it was not written by "
                          "fedunlearn")
    return results


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def training_summary(results: dict[str, Any], out: Path) -> str:
    """A few lines telling what the run did and where its files are."""
    tr = results["training"]
    rounds = tr["rounds"]
    lines = [
        f"experiment     {results['config']['experiment']['name']} (seed {results['seed']})",
        (f"engine         {tr['engine']}  ({len(rounds)} rounds, {tr['messages_sent']} "
         f"messages, {tr['wall_s']:.1f}s)"),
        f"test accuracy  {tr['final_test_accuracy']:.4f}",
        f"history        {tr['history_bytes'] / 1e6:.2f} MB in {out / 'history'}",
        f"results        {out / 'results.json'}",
    ]
    return "\n".join(lines)


# --- the removal comparison: rows ------------------------------------------------------------

METRIC_KEYS: tuple[str, ...] = (
    "test_accuracy", "retain_accuracy", "forget_accuracy", "backdoor_asr", "backdoor_p_value",
    "backdoor_trigger_active", "acc_err", "acc_dis", "param_distance", "kl_forget", "kl_test",
    "pred_diff_forget", "pred_diff_test", "mia_loss_auc", "mia_loss_tpr_at_1fpr",
    "mia_lira_auc", "mia_lira_tpr_at_1fpr")
"""Metric keys of a comparison row, in the column order of ``metrics.csv``."""

COST_KEYS: tuple[str, ...] = (
    "wall_s", "speedup_vs_retrain", "client_epochs", "rounds", "messages_sent",
    "bytes_exchanged", "sample_epochs", "server_epochs")
"""Cost keys of a comparison row, in the column order of ``metrics.csv``."""

CSV_COLUMNS: tuple[str, ...] = ("request", "setting", "role", "method", *METRIC_KEYS, *COST_KEYS)
"""The header of ``metrics.csv``."""

ROLES: tuple[str, ...] = ("original", "reference", "noise_floor", "method")
SETTINGS: tuple[str, ...] = ("federated", "centralized")
MISSING = "–"
NOISE_FLOOR_LABEL = "noise floor (2nd retrain)"
DPI = 120


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
    if method == "original":
        return "original"
    if method in ("retrain", "central_retrain"):
        return "reference"
    if method.endswith("retrain_seed2"):
        return "noise_floor"
    return "method"


def _request_clients(request: Any) -> list[int]:
    if request is None:
        return []
    if isinstance(request, (list, tuple)):
        return [int(c) for c in request]
    return [int(request)]


def request_label(clients: Sequence[int]) -> str:
    """``"0"`` or ``"0+3"``: the clients a request forgets."""
    return "+".join(str(c) for c in clients) or MISSING


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
    requests = _unique(tuple(r["request"]) for r in norm)
    settings = _settings(norm)
    return sorted(norm, key=lambda r: (requests.index(tuple(r["request"])),
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
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["request"]), []).append(r)
    return [(list(k), v) for k, v in groups.items()]


def _first_request(results: Mapping[str, Any]) -> tuple[list[int], list[dict[str, Any]]]:
    groups = _request_groups(ordered_rows(results.get("unlearning") or []))
    return groups[0] if groups else ([], [])


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
    flag = row["metrics"].get("backdoor_trigger_active")
    return flag if isinstance(flag, bool) else None


def trigger_verdict(row: Mapping[str, Any]) -> str:
    """``"active (p=3e-41)"``, ``"not active (p=0.98)"`` or ``"–"`` for a normalized row."""
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


def _metric_column(header: str, key: str, spec: str) -> _Column:
    return _Column(header, lambda r: _fmt(r["metrics"].get(key), spec))


def _cost_column(header: str, key: str, fmt: Callable[[Any], str]) -> _Column:
    return _Column(header, lambda r: fmt(r.get(key)))


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
    cols = [_Column("request", lambda r: request_label(r["request"]), False),
            _Column("setting", lambda r: r["setting"], False),
            _Column("method", lambda r: r["method"], False),
            _metric_column("test", "test_accuracy", ".3f"),
            _metric_column("forget", "forget_accuracy", ".3f")]
    if backdoor:
        cols += [_metric_column("ASR", "backdoor_asr", ".3f"),
                 _Column("trigger", lambda r: trigger[_trigger_flag(r)], False)]
    return cols + [_metric_column("MIA-AUC", "mia_loss_auc", ".3f"),
                   _metric_column("LiRA-AUC", "mia_lira_auc", ".3f"),
                   _metric_column("KL-forget", "kl_forget", ".3g"),
                   _cost_column("wall s", "wall_s", lambda x: _fmt(x, ".2f")),
                   _cost_column("speedup", "speedup_vs_retrain", lambda x: _fmt_speedup(x, "-")),
                   _cost_column("client-epochs", "client_epochs", lambda x: _fmt(x, ".1f")),
                   _cost_column("msgs", "messages_sent", _fmt_int)]


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The removal comparison as a fixed-width text table for the terminal.

    Parameters
    ----------
    rows : list of dict
        ``results["unlearning"]``; rows of old run files (no ``setting``, ``role`` or newer
        metrics) render too, missing values as ``–``.

    Returns
    -------
    str
        One line per row, grouped by request then setting. The ASR and trigger columns appear
        only when some row measured the backdoor.
    """
    norm = ordered_rows(rows)
    return _fixed_width(_terminal_columns(_has_backdoor(norm)), norm)


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
    flat: dict[str, Any] = {"request": request_label(row["request"]), "setting": row["setting"],
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


def _write_text(path: Path, text: str) -> None:
    """Write text atomically (temp file, then rename), with ``\\n`` line endings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; result files are meant to be shared
    os.replace(tmp, path)


# --- plots -----------------------------------------------------------------------------------

_SETTING_STYLE = {"federated": ("tab:blue", "o"), "centralized": ("tab:orange", "s")}

_BAR_PANELS = (
    ("test_accuracy", "Test accuracy", "accuracy on test data (fraction)"),
    ("forget_accuracy", "Accuracy on the forgotten data", "accuracy on forgotten data (fraction)"),
    ("backdoor_asr", "Backdoor attack success rate", "triggered inputs hitting target (fraction)"),
    ("mia_loss_auc", "Membership inference (loss attack)", "MIA AUC (0.5 = chance)"),
)


def _style(setting: str) -> tuple[str, str]:
    """Colour and marker of a setting."""
    return _SETTING_STYLE.get(setting, ("tab:gray", "^"))


def _figure(width: float, height: float) -> Figure:
    """A pyplot-free Figure on the Agg backend (matplotlib is imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)


def _note(ax: Axes, text: str) -> None:
    """Grey text in the middle of an axes that has nothing to show."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12,
            color="gray")


def _request_title(clients: list[int]) -> str:
    return f"request 0: forget clients {clients}" if clients else "no removal request"


def plot_method_bars(results: Mapping[str, Any], path: Path) -> Figure:
    """Bars of every model of the first request: accuracies, backdoor ASR, MIA AUC.

    Parameters
    ----------
    results : mapping
        A run's ``results.json``.
    path : Path
        Where the PNG goes (120 dpi).

    Returns
    -------
    matplotlib.figure.Figure
        2×2 panels; a dashed line marks the retrained model of each setting, a dotted line
        chance on the MIA panel; a panel no row measured says "not measured".
    """
    clients, rows = _first_request(results)
    fig = _figure(max(10.0, 4.0 + 0.9 * len(rows)), 8.5)
    for ax, (key, title, ylabel) in zip(fig.subplots(2, 2).ravel(), _BAR_PANELS):
        _bar_panel(ax, rows, key, title=title, ylabel=ylabel)
    fig.suptitle(f"Removal methods compared — {_request_title(clients)}")
    fig.legend(handles=_bar_legend(rows), loc="outside lower center", ncols=4, frameon=False)
    _save(fig, path)
    return fig


def _bar_panel(ax: Axes, rows: list[dict[str, Any]], key: str, *, title: str,
               ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("method")
    ax.set_ylabel(ylabel)
    values = [_metric(r, key) for r in rows]
    if all(v is None for v in values):
        _note(ax, "not measured")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    x = list(range(len(rows)))
    bars = ax.bar(x, [0.0 if v is None else v for v in values],
                  color=[_style(r["setting"])[0] for r in rows])
    ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values],
                 padding=2, fontsize=8, rotation=90 if len(rows) > 8 else 0)
    rotate = len(rows) > 4 or any(len(r["method"]) > 10 for r in rows)
    ax.set_xticks(x, [r["method"] for r in rows], rotation=35 if rotate else 0,
                  ha="right" if rotate else "center", rotation_mode="anchor")
    ax.set_ylim(0.0, 1.2)
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.grid(axis="y", alpha=0.3)
    for setting, ref in _by_role(rows, "reference").items():
        v = _metric(ref, key)
        if v is not None:
            ax.axhline(v, ls="--", lw=1.2, color=_style(setting)[0])
    if key == "mia_loss_auc":
        ax.axhline(0.5, ls=":", lw=1.2, color="black")


def _bar_legend(rows: list[dict[str, Any]]) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    settings = _settings(rows) or ["federated"]
    handles: list[Any] = [Patch(color=_style(s)[0], label=f"{s} setting") for s in settings]
    return handles + [Line2D([], [], ls="--", color="dimgray",
                             label="retrained model (reference) of the same setting"),
                      Line2D([], [], ls=":", color="black", label="chance (MIA AUC 0.5)")]


def plot_fidelity_speedup(results: Mapping[str, Any], path: Path) -> Figure:
    """Speed-up over retraining against KL to the retrained model, for the first request.

    Parameters
    ----------
    results : mapping
        A run's ``results.json``.
    path : Path
        Where the PNG goes (120 dpi).

    Returns
    -------
    matplotlib.figure.Figure
        One labelled point per method row (log x axis), a marker per setting, and a dashed
        line per setting at its noise floor (KL between two retrainings).
    """
    clients, rows = _first_request(results)
    fig = _figure(10.5, 6.0)
    ax = fig.subplots()
    points = _fidelity_points(rows)
    floors = {s: v for s, r in _by_role(rows, "noise_floor").items()
              if (v := _metric(r, "kl_forget")) is not None}
    _scatter_methods(ax, points)
    _noise_floor_lines(ax, floors)
    ax.axvline(1.0, ls=":", lw=1.0, color="gray", label="as fast as retraining (1×)")
    _fidelity_axes(ax, points, floors)
    if not points:
        _note(ax, "no method has both a speed-up and a KL on forgotten data")
    ax.set_title(f"Fidelity vs speed — {_request_title(clients)}\n"
                 "(lower = closer to retraining, further right = faster)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    _save(fig, path)
    return fig


def _fidelity_points(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float, float]]:
    out = []
    for r in rows:
        x, y = _value(r.get("speedup_vs_retrain")), _metric(r, "kl_forget")
        if r["role"] == "method" and x is not None and x > 0 and y is not None:
            out.append((r, x, y))
    return out


def _scatter_methods(ax: Axes, points: list[tuple[dict[str, Any], float, float]]) -> None:
    for setting in _settings([p[0] for p in points]):
        mine = [(x, y) for r, x, y in points if r["setting"] == setting]
        colour, marker = _style(setting)
        ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=60, color=colour,
                   marker=marker, zorder=3, label=f"{setting} method")
    for r, x, y in points:
        ax.annotate(r["method"], (x, y), xytext=(6, 4), textcoords="offset points", fontsize=9)


def _noise_floor_lines(ax: Axes, floors: dict[str, float]) -> None:
    for setting, v in floors.items():
        label = NOISE_FLOOR_LABEL if len(floors) == 1 else f"{NOISE_FLOOR_LABEL}, {setting}"
        colour = _style(setting)[0]
        ax.axhline(v, ls="--", lw=1.2, color=colour, label=label)
        ax.text(0.01, v, label, transform=ax.get_yaxis_transform(), va="bottom", fontsize=8,
                color=colour)


def _fidelity_axes(ax: Axes, points: list[tuple[dict[str, Any], float, float]],
                   floors: dict[str, float]) -> None:
    from matplotlib.ticker import FuncFormatter

    xs = [x for _, x, _ in points] + [1.0]
    top = max([y for _, _, y in points] + list(floors.values()) + [0.0])
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.set_ylim(0.0, top * 1.2 if top > 0 else 1.0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("speed-up over retraining (×)")
    ax.set_ylabel("KL to retrained model on forgotten data (nats)")


def plot_training_curve(results: Mapping[str, Any], path: Path) -> Figure:
    """Test accuracy (left axis) and test loss (right axis) per training round.

    Parameters
    ----------
    results : mapping
        A run's ``results.json``; reads ``training.rounds``.
    path : Path
        Where the PNG goes (120 dpi).

    Returns
    -------
    matplotlib.figure.Figure
    """
    rounds = (results.get("training") or {}).get("rounds") or []
    x = [r.get("round", i + 1) for i, r in enumerate(rounds)]
    acc = [_value(r.get("test_accuracy")) for r in rounds]
    loss = [_value(r.get("test_loss")) for r in rounds]
    fig = _figure(8.0, 4.5)
    ax = fig.subplots()
    right = ax.twinx()
    marker = "o" if len(x) <= 30 else None
    lines = ax.plot(x, [math.nan if v is None else v for v in acc], color="tab:blue",
                    marker=marker, ms=3, label="test accuracy")
    lines += right.plot(x, [math.nan if v is None else v for v in loss], color="tab:red",
                        ls="--", marker=marker, ms=3, label="test loss")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("round")
    right.set_xlabel("round")
    ax.set_ylabel("test accuracy (fraction)", color="tab:blue")
    right.set_ylabel("test loss (cross-entropy, nats)", color="tab:red")
    fig.suptitle("Federated training: test accuracy and loss per round")
    ax.grid(alpha=0.3)
    ax.legend(handles=lines, loc="center right")
    if not rounds:
        _note(ax, "no rounds recorded")
    _save(fig, path)
    return fig


# --- report.md -------------------------------------------------------------------------------

_GUIDE = """## How to read this report

- **The goal is the retrained model's values, not zero.** Retraining without the forgotten
  clients (`retrain`, or `central_retrain` in the centralized setting) is the reference: a good
  method matches its accuracy on the forgotten data, its backdoor ASR and its MIA AUC. Accuracy
  on forgotten data need not fall to zero: the retrained model keeps what the other clients
  teach about it. An MIA AUC near 0.5 means the attack cannot tell forgotten data from unseen
  data.
- **Distances** (parameter L2, KL divergence, prediction difference) are measured to the
  retrained model of the same setting. The *noise floor (2nd retrain)* is the distance between
  two retrainings with different seeds: a method at or below it is indistinguishable from
  retraining.
- **Trigger verdict**: a one-sided binomial test of the triggered predictions that hit the
  target class against chance 1/K (K classes) at α = 0.01; *active* means the backdoor still
  works.
- **AccErr / AccDis**: symmetric absolute percentage error (%) of the test / forgotten-data
  accuracy against the retrained model's.
- **Cost**: speed-up is the retraining's wall time over the method's, in the same setting;
  client-epochs, rounds, messages and bytes count the federation's work, sample-epochs and
  server-epochs the work done on pooled or server-side data."""


def report_markdown(results: Mapping[str, Any]) -> str:
    """The text of ``report.md``: deterministic, a function of ``results`` only.

    Parameters
    ----------
    results : mapping
        A run's ``results.json``.

    Returns
    -------
    str
        Markdown with provenance, training summary, per-request comparison, distance and
        cost tables, a reading guide and links to ``plots/*.png``.
    """
    rows = ordered_rows(results.get("unlearning") or [])
    show_setting = any(r["setting"] != "federated" for r in rows)
    backdoor = _has_backdoor(rows)
    parts = [_md_header(results), _md_training(results)]
    for i, (clients, group) in enumerate(_request_groups(rows)):
        parts.append(_md_request(i, clients, group, show_setting=show_setting,
                                 backdoor=backdoor))
    parts += [_GUIDE, _md_plots(bool(rows))]
    return "\n\n".join(parts) + "\n"


def _md_header(results: Mapping[str, Any]) -> str:
    name = ((results.get("config") or {}).get("experiment") or {}).get("name", "unnamed")
    engine = (results.get("training") or {}).get("engine", MISSING)
    versions = ", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items())
    provenance = (f"seed {results.get('seed', MISSING)} · git commit "
                  f"`{results.get('git_commit', MISSING)}` · created "
                  f"{results.get('created', MISSING)} · engine {engine} · "
                  f"versions: {versions or MISSING}")
    return f"# Federated unlearning report: {name}\n\n{provenance}"


def _md_training(results: Mapping[str, Any]) -> str:
    tr = results.get("training") or {}
    items = [("rounds", str(len(tr.get("rounds") or []))),
             ("final test accuracy", _fmt(tr.get("final_test_accuracy"), ".4f")),
             ("wall time", f"{_fmt(tr.get('wall_s'), '.1f')} s"),
             ("messages sent", _fmt_int(tr.get("messages_sent"))),
             ("client-epochs", _fmt(tr.get("client_epochs"), ".1f")),
             ("bytes exchanged", _fmt_bytes(tr.get("bytes_exchanged"))),
             ("history on disk", _fmt_bytes(tr.get("history_bytes")))]
    if "history_bytes_after_purge" in results:
        items.append(("history after purge", _fmt_bytes(results["history_bytes_after_purge"])))
    lines = ["## Training", ""] + [f"- {k}: {v}" for k, v in items]
    for p in results.get("purges") or []:
        lines.append(f"- purge after request {p.get('request', MISSING)} (clients "
                     f"{p.get('clients', MISSING)}): freed {_fmt_bytes(p.get('bytes_freed'))}, "
                     f"{_fmt_int(p.get('files_removed'))} files removed")
    return "\n".join(lines)


def _md_request(index: int, clients: list[int], rows: list[dict[str, Any]], *,
                show_setting: bool, backdoor: bool) -> str:
    refs = ", ".join(f"`{r['method']}`" for r in _by_role(rows, "reference").values())
    return "\n\n".join([
        f"## Request {index}: forget clients {clients}",
        "### Comparison",
        _md_table(_comparison_columns(rows, show_setting, backdoor), rows),
        "### Distance to the retrained model",
        f"Distances to the retrained model of the same setting ({refs or MISSING}).",
        _md_distances(rows, show_setting),
        "### Cost",
        _md_table(_cost_columns(show_setting), [r for r in rows if r["role"] != "original"]),
    ])


def _vs_reference(row: dict[str, Any], refs: dict[str, dict[str, Any]], key: str) -> str:
    """``"0.81 (retrain 0.52)"``: a value next to its setting's reference value."""
    v = _metric(row, key)
    if v is None:
        return MISSING
    ref = refs.get(row["setting"])
    rv = _metric(ref, key)
    if ref is None or ref is row or rv is None:
        return f"{v:.2f}"
    return f"{v:.2f} ({ref['method']} {rv:.2f})"


def _comparison_columns(rows: list[dict[str, Any]], show_setting: bool,
                        backdoor: bool) -> list[_Column]:
    refs = _by_role(rows, "reference")
    cols = _lead_columns(show_setting) + [
        _metric_column("test acc", "test_accuracy", ".3f"),
        _metric_column("forgotten acc", "forget_accuracy", ".3f"),
        _metric_column("retain acc", "retain_accuracy", ".3f")]
    if backdoor:
        cols += [_metric_column("ASR", "backdoor_asr", ".3f"),
                 _Column("trigger", trigger_verdict, False)]
    return cols + [
        _Column("MIA AUC (loss)", lambda r: _vs_reference(r, refs, "mia_loss_auc")),
        _Column("MIA AUC (LiRA)", lambda r: _vs_reference(r, refs, "mia_lira_auc")),
        _metric_column("TPR@1%FPR (loss)", "mia_loss_tpr_at_1fpr", ".3f"),
        _metric_column("TPR@1%FPR (LiRA)", "mia_lira_tpr_at_1fpr", ".3f"),
        _metric_column("AccErr (%)", "acc_err", ".2f"),
        _metric_column("AccDis (%)", "acc_dis", ".2f")]


_DISTANCES = (("param L2", "param_distance"), ("KL forget (nats)", "kl_forget"),
              ("KL test (nats)", "kl_test"), ("pred-diff forget", "pred_diff_forget"),
              ("pred-diff test", "pred_diff_test"))


def _md_distances(rows: list[dict[str, Any]], show_setting: bool) -> str:
    """Original and method rows, each setting closed by its noise-floor line."""
    lines: list[dict[str, Any]] = []
    for setting in _settings(rows):
        mine = [r for r in rows if r["setting"] == setting]
        lines += [r for r in mine if r["role"] in ("original", "method")]
        floor = _by_role(mine, "noise_floor").get(setting)
        if floor is not None:
            lines.append({**floor, "method": NOISE_FLOOR_LABEL})
    cols = _lead_columns(show_setting) + [_metric_column(h, k, ".4g") for h, k in _DISTANCES]
    table = _md_table(cols, lines)
    if not any(r["role"] == "noise_floor" for r in rows):
        table += "\n\nNo noise floor: the second retraining was not run."
    return table


def _cost_columns(show_setting: bool) -> list[_Column]:
    return _lead_columns(show_setting) + [
        _cost_column("wall (s)", "wall_s", lambda x: _fmt(x, ".2f")),
        _cost_column("speed-up", "speedup_vs_retrain", _fmt_speedup),
        _cost_column("client-epochs", "client_epochs", lambda x: _fmt(x, ".1f")),
        _cost_column("rounds", "rounds", _fmt_int),
        _cost_column("messages", "messages_sent", _fmt_int),
        _cost_column("bytes exchanged", "bytes_exchanged", _fmt_bytes),
        _cost_column("sample-epochs", "sample_epochs", lambda x: _fmt(x, ".1f")),
        _cost_column("server-epochs", "server_epochs", lambda x: _fmt(x, ".1f"))]


def _md_plots(has_rows: bool) -> str:
    lines = ["## Plots", ""]
    if has_rows:
        lines += ["![Methods compared on the first request](plots/methods.png)", "",
                  "![Fidelity against speed-up](plots/fidelity_speedup.png)", ""]
    lines.append("![Training curve](plots/training_curve.png)")
    return "\n".join(lines)


# --- everything ------------------------------------------------------------------------------

def write_report(run_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.csv`` and ``plots/*.png`` into ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        The run's output directory.
    results : dict
        Its ``results.json``.

    Returns
    -------
    dict of str to Path
        Keys ``report``, ``metrics``, ``training_curve``, and — when there are unlearning
        rows — ``methods`` and ``fidelity_speedup``.
    """
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    paths = {"report": run_dir / "report.md", "metrics": run_dir / "metrics.csv"}
    if results.get("unlearning"):
        paths["methods"] = plots / "methods.png"
        paths["fidelity_speedup"] = plots / "fidelity_speedup.png"
        plot_method_bars(results, paths["methods"])
        plot_fidelity_speedup(results, paths["fidelity_speedup"])
    paths["training_curve"] = plots / "training_curve.png"
    plot_training_curve(results, paths["training_curve"])
    write_metrics_csv(paths["metrics"], results)
    _write_text(paths["report"], report_markdown(results))
    return paths
