"""``report.md`` and ``write_report``, which writes every file of a run's report."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedunlearn.evaluation.schema import Role
from fedunlearn.reporting.files import _write_text
from fedunlearn.reporting.plots import (
    plot_fidelity_speedup,
    plot_method_bars,
    plot_replay_trajectory,
    plot_training_curve,
    replay_rows,
)
from fedunlearn.reporting.tables import (
    MISSING,
    NOISE_FLOOR_LABEL,
    _by_role,
    _Column,
    _cost_column,
    _fmt,
    _fmt_bytes,
    _fmt_int,
    _fmt_speedup,
    _has_backdoor,
    _lead_columns,
    _md_table,
    _metric,
    _metric_column,
    _request_groups,
    _settings,
    _verdict_columns,
    display_rows,
    rule_of,
    trigger_verdict,
    verification_line,
    write_metrics_csv,
)

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
    rows = display_rows(results)
    show_setting = any(r["setting"] != "federated" for r in rows)
    backdoor = _has_backdoor(rows)
    parts = [_md_header(results), _md_training(results), _md_seeds(results)]
    for i, (clients, group) in enumerate(_request_groups(rows)):
        parts.append(_md_request(i, clients, group, show_setting=show_setting,
                                 backdoor=backdoor, verification=verification_line(results, i)))
    parts += [_GUIDE, _md_plots(bool(rows), bool(replay_rows(results)))]
    return "\n\n".join(p for p in parts if p) + "\n"


def _md_seeds(results: Mapping[str, Any]) -> str:
    seeds = results.get("seeds") or []
    if len(seeds) < 2:
        return ""
    return (f"## Seeds\n\nThis run repeated the whole experiment for seeds {seeds}. Every "
            "figure below is the mean over seeds `±` the half-width of its 95 % t-interval; "
            "`results.json` keeps every seed's rows (`unlearning`, each with its `seed`) and "
            "the summary (`summary`). The training section shows the first seed.")


def _md_verdicts(rows: list[dict[str, Any]]) -> str:
    judged = [r for r in rows if r.get("verdicts")]
    if not judged:
        return ""
    parts = ["### Verdicts against retraining", _md_table(_verdict_columns(False, judged), judged),
             rule_of(judged) + " (docs/algorithms.md, \"Verdicts against "
             "retraining\")."]
    notes = [f"- **{r['method']}**: {n}" for r in judged for n in r.get("notes") or []]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(notes))
    return "\n\n".join(parts)


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
                show_setting: bool, backdoor: bool, verification: str | None = None) -> str:
    refs = ", ".join(f"`{r['method']}`" for r in _by_role(rows, Role.REFERENCE).values())
    return "\n\n".join([
        f"## Request {index}: forget "
        + (f"{rows[0]['removes']} ({rows[0].get('granularity')} level)"
           if rows and rows[0].get("removes") else f"clients {clients}"),
        "### Comparison",
        _md_table(_comparison_columns(rows, show_setting, backdoor), rows),
        *([v] if (v := _md_verdicts(rows)) else []),
        "### Distance to the retrained model",
        f"Distances to the retrained model of the same setting ({refs or MISSING}).",
        _md_distances(rows, show_setting),
        "### Cost",
        _md_table(_cost_columns(show_setting), [r for r in rows if r["role"] != Role.ORIGINAL]),
        *([(f"Cost of this verification: {verification}. The verification's samples are "
            "bounded by `[verification]` `max_members`, `max_population` and "
            "`shadow_samples`, and the shadows' epochs by `shadow_budget` (a fraction of "
            "retraining's sample-epochs).")] if verification else []),
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
    refs = _by_role(rows, Role.REFERENCE)
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
        lines += [r for r in mine if r["role"] in (Role.ORIGINAL, Role.METHOD)]
        floor = _by_role(mine, Role.NOISE_FLOOR).get(setting)
        if floor is not None:
            lines.append({**floor, "method": NOISE_FLOOR_LABEL})
        lines += [{**r, "method": f"{r['method']} (independent, context)"} for r in mine
                  if r["role"] == Role.CONTEXT]
    cols = _lead_columns(show_setting) + [_metric_column(h, k, ".4g") for h, k in _DISTANCES]
    table = _md_table(cols, lines)
    if not any(r["role"] == Role.NOISE_FLOOR for r in rows):
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


def _md_plots(has_rows: bool, has_replay: bool = False) -> str:
    lines = ["## Plots", ""]
    if has_rows:
        lines += ["![Methods compared on the first request](plots/methods.png)", "",
                  "![Fidelity against speed-up](plots/fidelity_speedup.png)", ""]
    if has_replay:
        lines += [("![History replay against the original training (first seed)]"
                   "(plots/replay.png)"), ""]
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
    if replay_rows(results):
        paths["replay"] = plots / "replay.png"
        plot_replay_trajectory(results, paths["replay"])
    paths["training_curve"] = plots / "training_curve.png"
    plot_training_curve(results, paths["training_curve"])
    write_metrics_csv(paths["metrics"], results)
    _write_text(paths["report"], report_markdown(results))
    return paths
