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

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import small_config

from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.lineage import LineageLog, client_lineage, params_hash
from fedunlearn.history.store import HistoryStore
from fedunlearn.run import interrupt
from fedunlearn.run import pipeline as runner_module
from fedunlearn.run import resume as resume_module
from fedunlearn.run.pipeline import prepare, run_experiment, train_federation
from fedunlearn.run.resume import (
    SERVED_FILE,
    SERVING_FILE,
    TRAINING_FILE,
    ResumeError,
    farewell,
    write_run_file,
    write_serving,
    write_state,
)
from fedunlearn.unlearning.federated.federaser import FedEraser
from fedunlearn.unlearning.federated.fedrecover import FedRecover

# distillation goes on from the model it left after request 0, and FedRecover replays the
# trajectory it recovered for request 0, so a resumption that lost either gives another answer
# to request 1 (FedEraser and retraining start afresh)
EXTRA = ("unlearning.requests=[[0],[1]]",
         'unlearning.methods=["retrain","federaser","fedrecover","distillation"]',
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
             json.dumps(r["metrics"], sort_keys=True),
             (r.get("details") or {}).get("replayed_from")) for r in results["unlearning"]]


def test_a_run_stopped_while_serving_goes_on_from_the_next_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming while serving, on the in-process twin of the engine (Flower is not the subject
    here: tests/run/test_resume.py resumes through Flower, and the twin gives the same rows,
    tests/run/test_crash_resume.py)."""
    from crash_harness import in_process_engine

    monkeypatch.setattr(runner_module, "run_engine", in_process_engine)
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
        def killed(self: Any, event: Any) -> None:
            raise interrupt.Interrupted("SIGKILL")
        m.setattr(resume_module.ResumeJournal, "purged", killed)
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
        ("retrain", True), ("retrain", False), ("federaser", False), ("fedrecover", False),
        ("distillation", False)]


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


def _stopped_after_request_0(out: Path, *extra: str) -> Any:
    """A run directory as a stop in request 1 leaves it, built without an engine: trained in
    process (the Flower twin), request 0 answered (its saved state) and purged at the
    config's level. Returns the config."""
    cfg = small_config(*EXTRA, *extra)
    setup = prepare(cfg)
    write_run_file(out, cfg.to_dict(), "run")
    store = HistoryStore.create(out / "history",
                                retention_interval=cfg.history.retention_interval)
    run = train_federation(InProcessFederation(cfg, setup.evaluator()), setup, store,
                           progress=False)
    write_state(out / TRAINING_FILE, {"rounds": len(run.rounds)})
    store.purge_clients([0], level=cfg.history.purge)
    rows = [{"seed": cfg.seed, "request": [0], "setting": "federated", "method": m}
            for m in ("original", "retrain")]
    write_serving(out, {"next_request": 1, "pending_purge": False, "before_purge": None,
                        "rows": rows, "verification": [], "purges": [{"clients": [0]}]},
                  {"retrain": run.final})
    LineageLog(out).append("request", request=0, clients=[0])
    return cfg


@pytest.mark.parametrize(("extra", "why"), [
    (('history.purge="strict"',), "strict purge"),
    (('unlearning.methods=["retrain","fedrecover"]', 'history.purge="updates"'),
     "fedrecover carries what it recovered")])
def test_a_stop_that_cannot_be_resumed_says_so_and_resume_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...],
        why: str) -> None:
    """Two stops after request 0's purge are final: under a strict purge (the trained model
    the remaining requests are measured against is gone), and with a method that carries
    state into the next request but cannot save it (FedRecover without its state_arrays:
    resuming would answer request 1 from the original history). The last line says so
    instead of "resume", and ``resume`` refuses in one line before writing anything
    (run.json, the lineage)."""
    if "fedrecover" in why:
        monkeypatch.setattr(FedRecover, "capabilities",
                            dataclasses.replace(FedRecover.capabilities, saves_state=False))
        monkeypatch.delattr(FedRecover, "state_arrays")
        monkeypatch.delattr(FedRecover, "load_state")
    out = tmp_path / "run"
    cfg = _stopped_after_request_0(out, *extra)
    assert why in farewell(out) and "cannot be resumed" in farewell(out)
    assert "fedunlearn resume" not in farewell(out)
    def files() -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes()
                for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    with pytest.raises(ResumeError, match=why):
        run_experiment(cfg, out, quiet=True, resume=True)
    assert files() == before  # not one file written, finished or swept


def test_a_trained_run_with_nothing_left_to_serve_resumes_without_an_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after training with no request to serve, a run resumes to the same results
    without starting an engine (one was started for nothing: about 10 s of Ray and Flower)."""
    from crash_harness import in_process_engine

    monkeypatch.setattr(runner_module, "run_engine", in_process_engine)
    cfg = small_config("unlearning.requests=[]")
    reference = run_experiment(cfg, tmp_path / "reference", quiet=True)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        def stop(*args: Any, **kwargs: Any) -> None:
            raise interrupt.Interrupted("SIGINT")
        m.setattr(runner_module, "_centralized", stop)
        with pytest.raises(interrupt.Interrupted):
            run_experiment(cfg, out, quiet=True)
    assert not (out / "results.json").exists()

    def no_engine(*args: Any, **kwargs: Any) -> None:
        pytest.fail("nothing was left for the engine, yet it was started")

    monkeypatch.setattr(runner_module, "run_engine", no_engine)
    resumed = run_experiment(cfg, out, quiet=True, resume=True)
    assert resumed["training"]["final_test_accuracy"] == reference["training"]["final_test_accuracy"]
    final = [params_hash(HistoryStore.open(where / "history").final_model())
             for where in (out, tmp_path / "reference")]
    assert final[0] == final[1]


def test_a_run_stopped_between_sample_and_class_requests_resumes_to_the_same_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests below the client level survive a stop while serving: resumed, every answer
    (and the purges of the clients the samples came from) equals an uninterrupted run's."""
    from crash_harness import in_process_engine

    from fedunlearn.unlearning.federated.negation import NoT

    monkeypatch.setattr(runner_module, "run_engine", in_process_engine)
    cfg = small_config("unlearning.requests=[{client = 1, fraction = 0.3}, {label = 2}]",
                       'unlearning.methods=["retrain","not"]', 'history.purge="updates"',
                       "verification.mia_shadows=0", "verification.noise_floor=false")
    reference = run_experiment(cfg, tmp_path / "reference", quiet=True)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        real = NoT.unlearn

        def unlearn(self: Any, ctx: Any) -> Any:
            if ctx.request == 1:
                interrupt.STOP.set()  # the repair's first exchange honours it
            return real(self, ctx)

        m.setattr(NoT, "unlearn", unlearn)
        with pytest.raises(interrupt.Interrupted):
            run_experiment(cfg, out, quiet=True)
    assert json.loads((out / SERVING_FILE).read_text())["next_request"] == 1
    resumed = run_experiment(cfg, out, quiet=True, resume=True)
    assert _answers(resumed) == _answers(reference)
    assert [r["removes"] for r in resumed["unlearning"] if r["method"] == "retrain"] == [
        "samples of client 1 (fraction 0.3)", "class 2"]
    assert [p["clients"] for p in resumed["purges"]] == [p["clients"]
                                                        for p in reference["purges"]]
