"""The run report: report.md, metrics.csv and plots written from a hand-built results dict."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import pytest

from fedunlearn.reporting import (
    CSV_COLUMNS,
    comparison_table,
    metrics_table_rows,
    plot_fidelity_speedup,
    plot_method_bars,
    plot_training_curve,
    write_metrics_csv,
    write_report,
)

FEDERATED_METHODS = ["original", "retrain", "retrain_seed2", "federaser", "fedaccum",
                     "distillation", "legacy_method"]
CENTRAL_METHODS = ["central_retrain", "central_retrain_seed2", "sisa"]


def metrics(test: float, forget: float, *, asr: float | None = None,
            active: bool | None = None, p: float | None = None, mia: float | None = None,
            lira: float | None = None, kl: float | None = None) -> dict[str, Any]:
    """A full metrics dict; distances derive from ``kl`` so that each row differs."""
    out: dict[str, Any] = {
        "test_accuracy": test, "retain_accuracy": min(1.0, test + 0.02),
        "forget_accuracy": forget, "backdoor_asr": asr, "backdoor_p_value": p,
        "backdoor_trigger_active": active, "mia_loss_auc": mia,
        "mia_loss_tpr_at_1fpr": None if mia is None else mia / 10,
        "mia_lira_auc": lira, "mia_lira_tpr_at_1fpr": None if lira is None else lira / 8}
    if kl is not None:
        out.update({"acc_err": abs(test - 0.95) * 50, "acc_dis": abs(forget - 0.3) * 40,
                    "param_distance": 10 * kl, "kl_forget": kl, "kl_test": kl / 3,
                    "pred_diff_forget": kl / 2, "pred_diff_test": kl / 5})
    return out


def row(method: str, role: str, m: dict[str, Any], *, request: list[int] | None = None,
        setting: str = "federated", wall: float = 1.0, speedup: float | None = None,
        epochs: float = 0.0) -> dict[str, Any]:
    return {"request": request or [0], "method": method, "setting": setting, "role": role,
            "wall_s": wall, "speedup_vs_retrain": speedup, "client_epochs": epochs,
            "rounds": 4, "messages_sent": 36, "bytes_exchanged": 1_234_567,
            "sample_epochs": 0.0, "server_epochs": 0.0, "model_hash": "ab12", "details": {},
            "metrics": m}


def old_style_row() -> dict[str, Any]:
    """A row as early run files wrote it: no setting, role, bytes or newer metrics."""
    return {"request": [0], "method": "legacy_method", "wall_s": 2.0,
            "speedup_vs_retrain": 4.4, "client_epochs": 12.0, "rounds": 2, "messages_sent": 18,
            "metrics": {"test_accuracy": 0.9, "retain_accuracy": 0.95,
                        "forget_accuracy": 0.4, "backdoor_asr": 0.1},
            "model_hash": "cd34", "details": {}}


def federated_rows(request: list[int]) -> list[dict[str, Any]]:
    return [
        row("original", "original", metrics(0.96, 0.97, asr=0.94, active=True, p=3e-41,
                                            mia=0.81, lira=0.77, kl=0.9), request=request),
        row("retrain", "reference", metrics(0.95, 0.30, asr=0.01, active=False, p=0.98,
                                            mia=0.52, lira=0.51), request=request, wall=8.8,
            speedup=1.0, epochs=1440.0),
        row("retrain_seed2", "noise_floor", metrics(0.95, 0.31, asr=0.01, active=False,
                                                    p=0.97, mia=0.53, lira=0.5, kl=0.02),
            request=request, wall=8.7, speedup=1.01, epochs=1440.0),
        row("federaser", "method", metrics(0.94, 0.33, asr=0.02, active=False, p=0.9,
                                           mia=0.55, lira=0.52, kl=0.05),
            request=request, wall=3.4, speedup=2.6, epochs=342.0),
        row("fedaccum", "method", metrics(math.nan, 0.1, asr=None, active=None, p=None,
                                          mia=math.nan, lira=None, kl=None),
            request=request, wall=0.3, speedup=29.0),
        row("distillation", "method", metrics(0.93, 0.35, asr=0.3, active=True, p=1e-5,
                                              mia=0.6, lira=0.58, kl=0.3),
            request=request, wall=0.2, speedup=44.0),
    ]


def central_rows(request: list[int]) -> list[dict[str, Any]]:
    return [
        row("original", "original", metrics(0.97, 0.98, asr=0.9, active=True, p=1e-30,
                                            mia=0.8, lira=0.75, kl=1.1),
            request=request, setting="centralized"),
        row("central_retrain", "reference", metrics(0.96, 0.3, asr=0.0, active=False, p=1.0,
                                                    mia=0.5, lira=0.5),
            request=request, setting="centralized", wall=5.0, speedup=1.0),
        row("central_retrain_seed2", "noise_floor",
            metrics(0.96, 0.3, asr=0.0, active=False, p=1.0, mia=0.5, lira=0.5, kl=0.01),
            request=request, setting="centralized", wall=5.1, speedup=0.98),
        row("sisa", "method", metrics(0.95, 0.32, asr=0.01, active=False, p=0.99, mia=0.51,
                                      lira=0.5, kl=0.04),
            request=request, setting="centralized", wall=0.5, speedup=10.0),
    ]


def training(rounds: int = 12) -> dict[str, Any]:
    return {"engine": "flower-ray",
            "rounds": [{"round": r, "participants": [0, 1, 2],
                        "test_accuracy": 1 - 0.5 / r, "test_loss": 1.2 / r, "wall_s": 0.2}
                       for r in range(1, rounds + 1)],
            "final_test_accuracy": 1 - 0.5 / rounds, "wall_s": 7.3, "messages_sent": 400,
            "client_epochs": 1600.0, "history_bytes": 12_950_000, "bytes_exchanged": 123_456}


@pytest.fixture
def results() -> dict[str, Any]:
    """One federated request, a NaN/None-ridden method and an old-style row."""
    return {"config": {"experiment": {"name": "unit_report"}}, "seed": 0,
            "versions": {"fedunlearn": "0.1.0", "flwr": "1.41.0", "ray": "2.55.1",
                         "torch": "2.13.0"},
            "git_commit": "abc123def456", "created": "2026-11-23T12:00:00Z",
            "training": training(),
            "unlearning": [*federated_rows([0]), old_style_row()],
            "purges": [{"request": 0, "clients": [0], "bytes_freed": 1_200_000,
                        "files_removed": 40}],
            "history_bytes_after_purge": 11_750_000}


@pytest.fixture
def central_results(results: dict[str, Any]) -> dict[str, Any]:
    """Two requests, each with federated and centralized rows."""
    out = copy.deepcopy(results)
    out["unlearning"] = [*federated_rows([0]), *central_rows([0]), old_style_row(),
                         *central_rows([1, 3]), *federated_rows([1, 3])]
    out["purges"].append({"request": 1, "clients": [1, 3], "bytes_freed": 2_000_000,
                          "files_removed": 80})
    return out


def assert_labelled(fig: Any) -> None:
    """Every visible axes has x/y labels where its axis shows, and a title (or suptitle)."""
    suptitle = fig.get_suptitle()
    assert fig.axes
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        assert suptitle or ax.get_title()
        if ax.xaxis.get_visible():
            assert ax.get_xlabel()
        if ax.yaxis.get_visible():
            assert ax.get_ylabel()


def test_report_files_exist(tmp_path: Path, results: dict[str, Any]) -> None:
    paths = write_report(tmp_path, results)
    assert set(paths) == {"report", "metrics", "methods", "fidelity_speedup", "training_curve"}
    assert paths["report"] == tmp_path / "report.md"
    assert paths["methods"] == tmp_path / "plots" / "methods.png"
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def test_report_text(tmp_path: Path, results: dict[str, Any]) -> None:
    text = write_report(tmp_path, results)["report"].read_text(encoding="utf-8")
    for method in FEDERATED_METHODS:
        assert f"| {method} |" in text
    for needle in ("# Federated unlearning report: unit_report", "abc123def456",
                   "2026-11-23T12:00:00Z", "flower-ray", "Request 0: forget clients [0]",
                   "not active (p=", "active (p=3e-41)", "noise floor (2nd retrain)",
                   "0.81 (retrain 0.52)", "1.2 MB", "11.8 MB", "How to read this report",
                   "](plots/methods.png)", "](plots/fidelity_speedup.png)",
                   "](plots/training_curve.png)"):
        assert needle in text, needle
    assert "| setting |" not in text  # federated only
    assert "nan" not in text.lower().replace("scan", "")


def test_report_is_deterministic(tmp_path: Path, results: dict[str, Any]) -> None:
    first = write_report(tmp_path / "a", results)
    again = write_report(tmp_path / "a", results)
    other = write_report(tmp_path / "b", copy.deepcopy(results))
    for key in ("report", "metrics"):
        assert first[key].read_bytes() == again[key].read_bytes() == other[key].read_bytes()


def test_metrics_csv(tmp_path: Path, central_results: dict[str, Any]) -> None:
    path = tmp_path / "metrics.csv"
    write_metrics_csv(path, central_results)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(central_results["unlearning"]) + 1
    assert lines[0] == ",".join(CSV_COLUMNS)
    with path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert {r["request"] for r in table} == {"0", "1+3"}
    assert {r["setting"] for r in table} == {"federated", "centralized"}
    fedaccum = next(r for r in table if r["method"] == "fedaccum")
    assert fedaccum["test_accuracy"] == "" and fedaccum["mia_loss_auc"] == ""
    legacy = next(r for r in table if r["method"] == "legacy_method")
    assert (legacy["setting"], legacy["role"], legacy["bytes_exchanged"]) == \
        ("federated", "method", "")
    retrain = next(r for r in table if r["method"] == "retrain")
    assert retrain["role"] == "reference" and float(retrain["wall_s"]) == 8.8


def test_metrics_table_rows_are_flat(results: dict[str, Any]) -> None:
    rows = metrics_table_rows(results)
    assert [r["method"] for r in rows] == FEDERATED_METHODS
    assert all(tuple(r) == CSV_COLUMNS for r in rows)
    assert rows[0]["request"] == "0" and rows[0]["role"] == "original"


def test_pngs_open(tmp_path: Path, central_results: dict[str, Any]) -> None:
    from matplotlib.image import imread

    paths = write_report(tmp_path, central_results)
    for key in ("methods", "fidelity_speedup", "training_curve"):
        image = imread(paths[key])
        assert image.ndim == 3 and image.shape[2] in (3, 4)
        assert image.shape[0] > 200 and image.shape[1] > 200


@pytest.mark.parametrize("fixture", ["results", "central_results"])
def test_figures_are_labelled(tmp_path: Path, fixture: str,
                              request: pytest.FixtureRequest) -> None:
    res = request.getfixturevalue(fixture)
    for plot in (plot_method_bars, plot_fidelity_speedup, plot_training_curve):
        path = tmp_path / f"{plot.__name__}.png"
        fig = plot(res, path)
        assert path.is_file()
        assert_labelled(fig)


def test_unmeasured_panel_says_so(tmp_path: Path, results: dict[str, Any]) -> None:
    for r in results["unlearning"]:
        r["metrics"].pop("backdoor_asr", None)
    fig = plot_method_bars(results, tmp_path / "m.png")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "not measured" in texts
    assert_labelled(fig)


def test_centralized_rows_get_a_setting_column(tmp_path: Path,
                                               central_results: dict[str, Any]) -> None:
    text = write_report(tmp_path, central_results)["report"].read_text(encoding="utf-8")
    assert "Request 0: forget clients [0]" in text
    assert "Request 1: forget clients [1, 3]" in text
    assert text.count("| setting | method |") == 6  # 3 tables x 2 requests
    for method in [*FEDERATED_METHODS, *CENTRAL_METHODS]:
        assert method in text
    assert "0.80 (central_retrain 0.50)" in text
    assert "| centralized | noise floor (2nd retrain) |" in text
    assert "| federated | noise floor (2nd retrain) |" in text


def test_training_only_run(tmp_path: Path, results: dict[str, Any]) -> None:
    for key in ("unlearning", "purges", "history_bytes_after_purge"):
        results.pop(key)
    paths = write_report(tmp_path, results)
    assert set(paths) == {"report", "metrics", "training_curve"}
    assert not (tmp_path / "plots" / "methods.png").exists()
    text = paths["report"].read_text(encoding="utf-8")
    assert "## Training" in text and "Request" not in text
    assert "plots/methods.png" not in text
    assert paths["metrics"].read_text(encoding="utf-8").splitlines() == [",".join(CSV_COLUMNS)]


def test_comparison_table_renders_old_style_rows() -> None:
    old = [{"request": [0], "method": "original", "wall_s": 0.0, "speedup_vs_retrain": None,
            "client_epochs": 0.0, "rounds": 0, "messages_sent": 0,
            "metrics": {"test_accuracy": 0.97, "retain_accuracy": 1.0,
                        "forget_accuracy": 0.98, "backdoor_asr": 0.94}},
           {"request": [0], "method": "retrain", "wall_s": 8.8, "speedup_vs_retrain": 1.0,
            "client_epochs": 1440.0, "rounds": 40, "messages_sent": 360,
            "metrics": {"test_accuracy": 0.97, "forget_accuracy": 0.27}},
           old_style_row()]
    lines = comparison_table(old).splitlines()
    assert len(lines) == 2 + len(old)
    assert lines[0].split()[:3] == ["request", "setting", "method"]
    assert "ASR" in lines[0] and "LiRA clean" in lines[0]
    assert lines[2].split()[:3] == ["0", "federated", "original"]
    assert "-" in lines[2].split() and "–" in lines[2].split()
    assert "1.0x" in lines[3] and "4.4x" in lines[4]


def test_comparison_table_groups_requests_and_settings(central_results: dict[str, Any]) -> None:
    lines = comparison_table(central_results["unlearning"]).splitlines()[2:]
    keys = [tuple(line.split()[:2]) for line in lines]
    assert keys == sorted(keys, key=lambda k: (k[0] != "0", k[1] != "federated"))
    assert "active" in lines[0] and "no" in lines[1].split()


def test_the_schema_is_defined_once() -> None:
    """Rows, roles and keys come from fedunlearn.evaluation.schema; the report modules re-export them."""
    from dataclasses import fields

    from fedunlearn.evaluation import schema, verify
    from fedunlearn.reporting import tables
    from fedunlearn.run import serving as service

    assert service.Row is schema.Row and tables.METRIC_KEYS is schema.METRIC_KEYS
    assert verify.MIA_KEYS is schema.MIA_KEYS and tables.ROLES == tuple(schema.Role)
    row_fields = [f.name for f in fields(schema.Row)]
    # every cost column of metrics.csv is a field of a row, every metric key is unique
    assert set(schema.COST_KEYS) <= set(row_fields)
    assert len(set(schema.METRIC_KEYS)) == len(schema.METRIC_KEYS)


def _with_replay(results: dict[str, Any], kinds: dict[str, str | None]) -> dict[str, Any]:
    """``results`` with replay diagnostics on the named methods (``fresh_kind`` per method;
    ``None`` leaves the key out, as run files written before it did)."""
    out = copy.deepcopy(results)
    for r in out["unlearning"]:
        if r["method"] in kinds:
            summary: dict[str, Any] = {"mean_ratio": 2.0, "mean_cosine": 0.5}
            if kinds[r["method"]] is not None:
                summary["fresh_kind"] = kinds[r["method"]]
            r["details"] = {"replay": [{"round": t, "ratio": 2.0, "cosine": 0.5,
                                        "test_accuracy": 0.8} for t in (1, 2, 3)],
                            "replay_summary": summary}
    return out


def _replay_texts(tmp_path: Path, results: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    from fedunlearn.reporting import plot_replay_trajectory

    fig = plot_replay_trajectory(results, tmp_path / "replay.png")
    assert (tmp_path / "replay.png").is_file()
    ratio_ax, cos_ax = fig.axes[1], fig.axes[2]
    legend = ratio_ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()] if legend else []
    return ratio_ax.get_ylabel(), cos_ax.get_ylabel(), ratio_ax.get_title(), labels


def test_replay_plot_says_what_each_method_compares(tmp_path: Path,
                                                    results: dict[str, Any]) -> None:
    """FedEraser's ratio is against its calibration update, FedRecover's (here played by the
    distillation row) against the exact update: the legend names each, the axes name the
    common "fresh" update when both are on one plot."""
    both = _with_replay(results, {"federaser": "calibration", "distillation": "exact"})
    ylabel, cos_label, title, labels = _replay_texts(tmp_path, both)
    assert ylabel == "stored / fresh update norm (log)"
    assert cos_label == "cosine(stored, fresh) (dotted)"
    assert "calibration stretches" not in title
    assert {"federaser ‖stored‖/‖calibration‖", "distillation ‖stored‖/‖exact‖",
            "federaser cos(stored, calibration)", "distillation cos(stored, exact)"} <= set(labels)


@pytest.mark.parametrize(("kind", "word", "title"), [
    ("exact", "exact", "Stored updates against the exact ones"),
    ("calibration", "calibration", "How far calibration stretches the fresh step"),
    (None, "calibration", "How far calibration stretches the fresh step")])
def test_replay_plot_of_one_kind(tmp_path: Path, results: dict[str, Any], kind: str | None,
                                 word: str, title: str) -> None:
    ylabel, cos_label, got_title, labels = _replay_texts(
        tmp_path, _with_replay(results, {"federaser": kind}))
    assert ylabel == f"stored / {word} update norm (log)"
    assert cos_label == f"cosine(stored, {word}) (dotted)"
    assert got_title == title
    assert f"federaser ‖stored‖/‖{word}‖" in labels


def test_replay_plot_leaves_methods_without_a_fresh_step_off_the_right(
        tmp_path: Path, results: dict[str, Any]) -> None:
    """FedAccum replays stored updates: no ratio to plot, so no legend entry on the right,
    and a run with only such replays says so there."""
    from fedunlearn.reporting import plot_replay_trajectory

    both = _with_replay(results, {"federaser": "calibration", "fedaccum": None})
    for r in both["unlearning"]:
        if r["method"] == "fedaccum":
            r["details"]["replay_summary"]["mean_ratio"] = None
            for step in r["details"]["replay"]:
                step["ratio"] = step["cosine"] = None
    _, _, _, labels = _replay_texts(tmp_path, both)
    assert not [x for x in labels if x.startswith("fedaccum")]
    assert "federaser ‖stored‖/‖calibration‖" in labels
    only = copy.deepcopy(both)
    only["unlearning"] = [r for r in only["unlearning"] if r["method"] != "federaser"]
    fig = plot_replay_trajectory(only, tmp_path / "only.png")
    notes = [t.get_text() for t in fig.axes[1].texts]
    assert notes == ["no fresh step to compare (stored updates replayed as they are)"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][-1] == "fedaccum replay"
