"""A run stopped while it serves its requests goes on from the next request (Flower + Ray).

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
from pathlib import Path
from typing import Any

import pytest
from conftest import small_config

from fedunlearn import interrupt
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

    resumed = run_experiment(cfg, out, quiet=True, resume=True)
    assert _answers(resumed) == _answers(reference)
    assert [(p["clients"], p["files_removed"], p["bytes_freed"]) for p in resumed["purges"]] \
        == [(p["clients"], p["files_removed"], p["bytes_freed"]) for p in reference["purges"]]
    assert not (out / SERVING_FILE).exists() and (out / SERVED_FILE).exists()

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
