"""A run stopped while it serves its requests goes on from the next request (Flower + Ray).

The stopped run is resumed twice: the first resumption is killed (simulated) right after
request 1's purge, before the state recording it was saved.

The run forgets client 0, then client 1, purging each at the ``"updates"`` level. A stop is
requested (as Ctrl-C does) while FedEraser serves the second request, after the first one was
answered and purged. Oracle: an uninterrupted run of the same config. The resumed run must
give the same rows (model hashes and metrics, every method and request) and the same purges,
and the lineage log must mark the interrupted attempt's models as discarded. Under a strict
purge the same stop leaves a run that cannot be resumed, and both the last line and
``resume`` say so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import small_config

from fedunlearn import interrupt
from fedunlearn import runner as runner_module
from fedunlearn.checkpoint import SERVED_FILE, SERVING_FILE, ResumeError
from fedunlearn.lineage import LineageLog, client_lineage
from fedunlearn.runner import farewell, run_experiment
from fedunlearn.unlearning.federaser import FedEraser

# distillation goes on from the model it left after request 0, so a resumption that lost
# that model gives another answer to request 1 (FedEraser and retraining start afresh)
EXTRA = ("unlearning.requests=[[0],[1]]",
         'unlearning.methods=["retrain","federaser","distillation"]',
         "unlearning.purge=true", "verification.mia_shadows=0",
         "verification.noise_floor=false")


def _stop_in_second_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Request a stop when FedEraser starts on request 1 (its first exchange honours it)."""
    real = FedEraser.unlearn

    def unlearn(self: FedEraser, ctx: Any) -> Any:
        if ctx.targets == (1,):
            interrupt.STOP.set()
        return real(self, ctx)

    monkeypatch.setattr(FedEraser, "unlearn", unlearn)


def _answers(results: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(r["request"], r["method"], r["model_hash"],
             json.dumps(r["metrics"], sort_keys=True)) for r in results["unlearning"]]


@pytest.mark.flower
def test_a_run_stopped_while_serving_goes_on_from_the_next_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_config(*EXTRA, 'history.purge="updates"')
    reference = run_experiment(cfg, tmp_path / "reference", quiet=True)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_in_second_request(m)
        with pytest.raises(interrupt.Interrupted):
            run_experiment(cfg, out, quiet=True)
    state = json.loads((out / SERVING_FILE).read_text())
    assert state["next_request"] == 1 and not state["pending_purge"]
    assert [p["clients"] for p in state["purges"]] == [[0]]
    assert not (out / SERVED_FILE).exists()
    assert "fedunlearn resume" in farewell(out)

    _damaged_copies_are_refused_untouched(cfg, out, tmp_path)
    # the resumption is killed in its turn, after request 1's purge but before the state that
    # records it was saved: the next resumption must record that purge with its real files
    # and bytes (it recorded 0 and 0), not redo it
    with monkeypatch.context() as m:
        def killed(self: Any, request: int, purge: Any) -> None:
            raise interrupt.Interrupted("SIGKILL")
        m.setattr(runner_module._Journal, "purged", killed)
        with pytest.raises(interrupt.Interrupted):
            run_experiment(cfg, out, quiet=True, resume=True)
    state = json.loads((out / SERVING_FILE).read_text())
    assert state["next_request"] == 2 and state["pending_purge"]
    resumed = run_experiment(cfg, out, quiet=True, resume=True)
    assert _answers(resumed) == _answers(reference)
    assert [(p["clients"], p["files_removed"], p["bytes_freed"]) for p in resumed["purges"]] \
        == [(p["clients"], p["files_removed"], p["bytes_freed"]) for p in reference["purges"]]
    assert all(p["files_removed"] > 0 and p["bytes_freed"] > 0 for p in resumed["purges"])
    assert not (out / SERVING_FILE).exists() and (out / SERVED_FILE).exists()
    purges = [e["clients"] for e in LineageLog(out).read() if e["event"] == "purge"]
    assert purges == [[0], [1]]

    events = LineageLog(out).read()
    assert {"request": 1, "setting": "federated"}.items() <= next(
        e for e in events if e["event"] == "resume").items()
    served = client_lineage(events, 1)["models_after_removal"]
    # the stop came before FedEraser answered: the first attempt left its retraining only
    assert [(m["method"], bool(m.get("discarded"))) for m in served] == [
        ("retrain", True), ("retrain", False), ("federaser", False), ("distillation", False)]


@pytest.mark.flower
def test_a_strict_purge_midway_makes_the_stop_final_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_config(*EXTRA, 'history.purge="strict"')
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_in_second_request(m)
        with pytest.raises(interrupt.Interrupted):
            run_experiment(cfg, out, quiet=True)
    assert "cannot be resumed" in farewell(out) and "fedunlearn resume" not in farewell(out)
    with pytest.raises(ResumeError, match="strict purge deleted the trained model"):
        run_experiment(cfg, out, quiet=True, resume=True)


def _damaged_copies_are_refused_untouched(cfg: Any, out: Path, tmp_path: Path) -> None:
    """An edited ``serving.json`` (valid JSON, wrong shape, or describing other requests) is
    one ResumeError before anything is written: ``run.json`` and the lineage log unchanged."""
    edits = {"not an object": [], "no checksum": {"next_request": 1},
             "drops a request": {"next_request": 2}, "negative": {"next_request": -1},
             "rows of another request": {"rows": []}, "rows not a list": {"rows": "x"}}
    for name, edit in edits.items():
        copy = tmp_path / f"damaged-{name.replace(' ', '-')}"
        shutil.copytree(out, copy)
        state = json.loads((copy / SERVING_FILE).read_text())
        changed = edit if isinstance(edit, list) else (
            {k: v for k, v in state.items() if k != "sha256"} if name == "no checksum"
            else {**state, **edit})
        (copy / SERVING_FILE).write_text(json.dumps(changed))
        before = {f: (copy / f).read_bytes() for f in ("run.json", "lineage.jsonl")}
        with pytest.raises(ResumeError, match="serving.json"):
            run_experiment(cfg, copy, quiet=True, resume=True)
        assert {f: (copy / f).read_bytes() for f in before} == before, name


@pytest.mark.flower
def test_a_method_that_carries_state_between_requests_makes_a_midway_stop_final(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FedRecover replays the trajectory it recovered for request 0 when it serves request 1,
    and keeps it in memory only: resuming midway would answer request 1 from the original
    history instead. The last line and ``resume`` say so, and ``resume`` changes nothing."""
    cfg = small_config(EXTRA[0], 'unlearning.methods=["retrain","fedrecover","federaser"]',
                       *EXTRA[2:], 'history.purge="updates"', "history.retention_interval=1")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_in_second_request(m)
        with pytest.raises(interrupt.Interrupted):
            run_experiment(cfg, out, quiet=True)
    assert "fedrecover carries what it recovered" in farewell(out)
    before = {f: (out / f).read_bytes() for f in ("run.json", "lineage.jsonl")}
    with pytest.raises(ResumeError, match="fedrecover carries what it recovered"):
        run_experiment(cfg, out, quiet=True, resume=True)
    assert {f: (out / f).read_bytes() for f in before} == before
