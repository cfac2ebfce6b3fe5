"""The run's plots: method bars, fidelity against speed-up, and the training curve.

matplotlib is imported lazily, inside the plotting functions, so importing this module
stays light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedunlearn.evaluation.schema import Role
from fedunlearn.evaluation.summary import FRESH_KINDS, fresh_kind
from fedunlearn.reporting.tables import (
    NOISE_FLOOR_LABEL,
    _by_role,
    _first_request,
    _metric,
    _settings,
    _value,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# --- plots -----------------------------------------------------------------------------------

DPI = 120

_SETTING_STYLE = {"federated": ("tab:blue", "o"), "centralized": ("tab:orange", "s")}

_BAR_PANELS = (
    ("test_accuracy", "Test accuracy", "accuracy on test data (fraction)"),
    ("forget_accuracy", "Accuracy on the forgotten data", "accuracy on forgotten data (fraction)"),
    ("backdoor_asr", "Backdoor attack success rate", "triggered inputs hitting target (fraction)"),
    ("mia_loss_auc_clean", "MIA (loss attack), clean forgotten data",
     "MIA AUC (0.5 = chance)"),
)


# a panel's figure when a row lacks it (runs without a backdoor have no clean/triggered split)
_FALLBACK = {"mia_loss_auc_clean": "mia_loss_auc"}


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
    import io

    from fedunlearn.reporting.files import _write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    _write_bytes(Path(path), buffer.getvalue())


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
        chance on the MIA panel; a panel no row measured says "not measured". In a
        multi-seed run each bar is the mean over seeds with its 95 % half-interval as an
        error bar.
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
    used = [key if _metric(r, key) is not None or key not in _FALLBACK else _FALLBACK[key]
            for r in rows]
    values = [_metric(r, k) for r, k in zip(rows, used)]
    if all(v is None for v in values):
        _note(ax, "not measured")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    x = list(range(len(rows)))
    spread = [(r.get("spread") or {}).get(k) for r, k in zip(rows, used)]
    errors = [0.0 if e is None or v is None else e for v, e in zip(values, spread)]
    bars = ax.bar(x, [0.0 if v is None else v for v in values],
                  color=[_style(r["setting"])[0] for r in rows],
                  yerr=errors if any(errors) else None, capsize=3, ecolor="black")
    ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values],
                 padding=2, fontsize=8, rotation=90 if len(rows) > 8 else 0)
    rotate = len(rows) > 4 or any(len(r["method"]) > 10 for r in rows)
    ax.set_xticks(x, [r["method"] for r in rows], rotation=35 if rotate else 0,
                  ha="right" if rotate else "center", rotation_mode="anchor")
    ax.set_ylim(0.0, 1.2)
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.grid(axis="y", alpha=0.3)
    for setting, ref in _by_role(rows, Role.REFERENCE).items():
        v = _metric(ref, key)
        if v is not None:
            ax.axhline(v, ls="--", lw=1.2, color=_style(setting)[0])
    if key.startswith("mia_"):
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
        One labelled point per method row (log axes: methods whose KL differs by orders of
        magnitude stay apart), a marker per setting, and per setting a dashed line at its
        noise floor (KL between two retrainings) inside a band of the floor's 95 % interval
        over seeds (multi-seed runs).
    """
    clients, rows = _first_request(results)
    fig = _figure(10.5, 6.0)
    ax = fig.subplots()
    points = _fidelity_points(rows)
    floor_rows = _by_role(rows, Role.NOISE_FLOOR)
    floors = {s: v for s, r in floor_rows.items() if (v := _metric(r, "kl_forget")) is not None}
    spreads = {s: float(h) for s, r in floor_rows.items()
               if (h := (r.get("spread") or {}).get("kl_forget")) is not None}
    _scatter_methods(ax, points)
    _noise_floor_lines(ax, floors, spreads)
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
        if r["role"] == Role.METHOD and x is not None and x > 0 and y is not None:
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


def _noise_floor_lines(ax: Axes, floors: dict[str, float],
                       spreads: dict[str, float] | None = None) -> None:
    for setting, v in floors.items():
        label = NOISE_FLOOR_LABEL if len(floors) == 1 else f"{NOISE_FLOOR_LABEL}, {setting}"
        colour = _style(setting)[0]
        ax.axhline(v, ls="--", lw=1.2, color=colour, label=label)
        if spreads and setting in spreads and v > 0:
            low = max(v - spreads[setting], v / 100)  # the log axis cannot show 0 or below
            ax.axhspan(low, v + spreads[setting], color=colour, alpha=0.12, lw=0,
                       label=f"{label}: 95 % interval over seeds")
        ax.text(0.01, v, label, transform=ax.get_yaxis_transform(), va="bottom", fontsize=8,
                color=colour)


def _fidelity_axes(ax: Axes, points: list[tuple[dict[str, Any], float, float]],
                   floors: dict[str, float]) -> None:
    from matplotlib.ticker import FuncFormatter

    xs = [x for _, x, _ in points] + [1.0]
    ys = [y for _, _, y in points if y > 0] + [v for v in floors.values() if v > 0]
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 2, max(xs) * 2)
    if ys:
        ax.set_yscale("log")
        ax.set_ylim(min(ys) / 3, max(ys) * 3)
    else:
        ax.set_ylim(0.0, 1.0)
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


def replay_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of the first seed and first request whose ``details`` carry replay diagnostics."""
    rows = results.get("unlearning") or []
    if not rows:
        return []
    first_seed = (results.get("seeds") or [rows[0].get("seed", 0)])[0]
    first_request = rows[0].get("request")
    return [r for r in rows if r.get("seed", first_seed) == first_seed
            and r.get("request") == first_request and (r.get("details") or {}).get("replay")]


def plot_replay_trajectory(results: Mapping[str, Any], path: Path) -> Figure:
    """History-replay methods round by round, against the original training (first seed).

    Parameters
    ----------
    results : mapping
        A run's ``results.json``; reads ``training.rounds`` and the ``details.replay`` of
        history-replay rows (per replayed round: ``test_accuracy``, ``ratio`` =
        ‖stored update‖ / ‖fresh update‖, ``cosine``), the fresh update being what the row's
        ``details.replay_summary.fresh_kind`` says: FedEraser's calibration update, or
        FedRecover's exact update (:func:`~fedunlearn.evaluation.summary.fresh_kind`).
    path : Path
        Where the PNG goes (120 dpi).

    Returns
    -------
    matplotlib.figure.Figure
        Left: test accuracy of the reconstructed model per replayed round, the original
        training curve, and retraining's final accuracy (dashed). Right: the ratio (log scale)
        and cosine per round of the stored update against the fresh one, labelled per method
        with what the fresh update is.
    """
    rows = replay_rows(results)
    kinds = {k for r in rows if (k := fresh_kind(r)) is not None}
    fig = _figure(12.0, 4.8)
    acc_ax, ratio_ax = fig.subplots(1, 2)
    train = (results.get("training") or {}).get("rounds") or []
    acc_ax.plot([r.get("round") for r in train],
                [math.nan if (v := _value(r.get("test_accuracy"))) is None else v for r in train],
                color="black", lw=1.5, label="original training")
    retrain = next((r for r in (results.get("unlearning") or []) if r.get("role") == Role.REFERENCE
                    and r.get("setting", "federated") == "federated"), None)
    if retrain is not None and (v := _value((retrain.get("metrics") or {})
                                           .get("test_accuracy"))) is not None:
        acc_ax.axhline(v, ls="--", color="tab:green", label=f"retraining, final ({v:.3f})")
    cos_ax = ratio_ax.twinx()
    for i, r in enumerate(rows):
        steps = r["details"]["replay"]
        x = [s.get("round") for s in steps]
        colour = f"C{i % 10}"

        def series(key: str, steps: list[dict[str, Any]] = steps) -> list[float]:
            return [math.nan if (v := _value(s.get(key))) is None else v for s in steps]

        acc_ax.plot(x, series("test_accuracy"), color=colour, marker="o", ms=3,
                    label=f"{r['method']} replay")
        kind = fresh_kind(r)
        if kind is None:  # no fresh step (FedAccum): nothing to compare on the right
            continue
        word = FRESH_KINDS[kind]
        ratio_ax.plot(x, series("ratio"), color=colour, marker="o", ms=3,
                      label=f"{r['method']} ‖stored‖/‖{word}‖")
        # markers too: FedRecover has a fresh step only in its exact rounds, often isolated
        cos_ax.plot(x, series("cosine"), color=colour, ls=":", marker="x", ms=4,
                    label=f"{r['method']} cos(stored, {word})")
    acc_ax.set_ylim(0.0, 1.05)
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("test accuracy (fraction)")
    acc_ax.set_title("Replay against the original training")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, loc="lower right")
    if any(v is not None and math.isfinite(float(v)) and float(v) > 0  # log: a positive one
           for line in ratio_ax.get_lines() for v in line.get_ydata()):
        ratio_ax.set_yscale("log")
    ratio_ax.axhline(1.0, color="gray", lw=0.8)
    ratio_ax.set_xlabel("round")
    word = FRESH_KINDS[next(iter(kinds))] if len(kinds) == 1 else "fresh"
    ratio_ax.set_ylabel(f"stored / {word} update norm (log)")
    cos_ax.set_ylim(-1.05, 1.05)
    cos_ax.set_ylabel(f"cosine(stored, {word}) (dotted)")
    ratio_ax.set_title({"calibration": "How far calibration stretches the fresh step",
                        "exact": "Stored updates against the exact ones"}.get(
                           word, "Stored update against the fresh one (legend: which)"))
    if not rows:
        _note(acc_ax, "no history-replay method in this run")
    elif not kinds:
        _note(ratio_ax, "no fresh step to compare (stored updates replayed as they are)")
    handles = ratio_ax.get_legend_handles_labels()
    extra = cos_ax.get_legend_handles_labels()
    if handles[0] or extra[0]:
        ratio_ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="best")
    _save(fig, path)
    return fig
