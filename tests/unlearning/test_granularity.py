"""Requests below the client level: retraining is exact against a federation trained from
scratch on the retained samples, and a method asked for a granularity it does not serve is
refused before any work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.config.requests import GRANULARITIES
from fedunlearn.config.tree import ConfigError
from fedunlearn.data.removal import resolve
from fedunlearn.engine import local
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.lineage import params_hash
from fedunlearn.history.store import HistoryStore
from fedunlearn.run.checks import build_methods, method_order
from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning.base import UNLEARNERS, UnlearningContext, capabilities_of, setting_of

BD = ["backdoor.clients=[1]", "backdoor.fraction=0.5", "data.num_clients=5",
      "data.partition=\"dirichlet\"", "training.rounds=3", "training.sample_fraction=0.8"]
REQUEST_OF = {"client": "[[2]]", "samples": '[{client = 1, samples = "backdoor"}]',
              "class": "[{label = 3}]"}


def _retrain(cfg, setup, tmp_path, request: int):
    """Retraining's answer to request ``request`` through the in-process twin."""
    steps = resolve(cfg, setup.data)
    step = steps[request]
    ctx = UnlearningContext(cfg=cfg, targets=step.targets, removed=step.gone,
                            model=setup.initial, initial=setup.initial,
                            history=HistoryStore.create(tmp_path / "h", retention_interval=1),
                            federation=InProcessFederation(cfg, setup.evaluator()),
                            data=setup.data, build_model=setup.build_model, seed=0,
                            request=request, removal=step)
    return UNLEARNERS.get("retrain")().unlearn(ctx).model, step


def _from_scratch(cfg, setup, step, monkeypatch):
    """The oracle: a federation whose clients only ever held what ``step`` leaves them (the
    removed clients out, every other client's data cut to its retained samples), trained
    from scratch with the same seeds through the in-process twin."""
    kept = []
    for c, d in enumerate(setup.data.clients):
        mask = step.removed.get(c)
        kept.append(d if mask is None else d.subset(np.flatnonzero(~mask)))
    plain_cfg = dataclasses.replace(cfg, unlearning=dataclasses.replace(cfg.unlearning,
                                                                      requests=[]))
    retained = dataclasses.replace(setup.data, clients=kept)
    monkeypatch.setattr(local, "runtime", lambda job: (plain_cfg, retained))
    fed = InProcessFederation(plain_cfg, setup.evaluator())
    return fed.fedavg(setup.initial, exclude=step.gone).final


@pytest.mark.parametrize("requests", [
    '[{client = 1, samples = "backdoor"}]',
    "[{client = 0, samples = [0, 3, 4, 9, 11]}]",
    "[{client = 2, fraction = 0.4}]",
    "[{label = 3}]",
    '[[4], {client = 1, samples = "backdoor"}, {label = 7}, {client = 0, fraction = 1.0}]',
])
def test_retraining_equals_a_federation_trained_on_the_retained_samples(
        requests, tmp_path, monkeypatch) -> None:
    cfg = small_config(*BD, f"unlearning.requests={requests}", 'unlearning.methods=["retrain"]')
    setup = prepare(cfg)
    last = len(cfg.requests) - 1
    answer, step = _retrain(cfg, setup, tmp_path, last)
    assert step.num_forgotten > 0
    oracle = _from_scratch(cfg, setup, step, monkeypatch)
    assert params_hash(answer) == params_hash(oracle)
    # and it is not the original federation's model: the samples made a difference
    monkeypatch.undo()
    full = InProcessFederation(cfg, setup.evaluator()).fedavg(setup.initial).final
    assert params_hash(full) != params_hash(answer)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", UNLEARNERS.names())
def test_a_method_is_refused_a_granularity_it_does_not_serve_before_any_work(
        name: str, granularity: str) -> None:
    """Every registered method against a request of every granularity: refused in one line
    naming the method and what it serves when it does not serve it; never refused for it
    when it does."""
    cfg = small_config(*BD, f"unlearning.requests={REQUEST_OF[granularity]}",
                       f'unlearning.methods=["{name}"]')
    serves = capabilities_of(UNLEARNERS.get(name)).granularities
    # the setting's reference (retrain / central_retrain) is checked too: judge the first
    # of the configured methods that does not serve it
    refused = [m for m in method_order(cfg)
               if granularity not in capabilities_of(UNLEARNERS.get(m)).granularities]
    if not refused:
        build_methods(cfg)  # no granularity refusal (other checks pass on this config)
        assert granularity in serves
        return
    with pytest.raises(ConfigError) as err:
        build_methods(cfg)
    message = str(err.value)
    first = refused[0]
    assert f"method '{first}' serves " in message and "\n" not in message, message
    assert f"leave '{first}' out of unlearning.methods" in message
    assert setting_of(UNLEARNERS.get(name)) in ("federated", "centralized")


def test_every_method_declares_what_it_serves() -> None:
    for name in UNLEARNERS.names():
        serves = capabilities_of(UNLEARNERS.get(name)).granularities
        assert serves and serves <= set(GRANULARITIES), name
    assert capabilities_of(UNLEARNERS.get("retrain")).granularities == set(GRANULARITIES)


@pytest.mark.flower
def test_through_flower_sample_and_class_retraining_is_the_in_process_one(tmp_path) -> None:
    """The clients of a Flower run leave out what the requests removed (the message's
    ``removed-through``): each retraining's model is the in-process twin's, bit for bit."""
    from fedunlearn.run.pipeline import run_experiment

    cfg = small_config(*BD, "unlearning.requests=[{client = 2, fraction = 0.5}, {label = 3}]",
                       'unlearning.methods=["retrain"]', "verification.mia_shadows=0",
                       "verification.noise_floor=false", "unlearning.purge=false")
    results = run_experiment(cfg, tmp_path / "run", quiet=True)
    setup = prepare(cfg)
    rows = [r for r in results["unlearning"] if r["method"] == "retrain"]  # in request order
    assert len(rows) == 2
    for request, row in enumerate(rows):
        twin, _ = _retrain(cfg, setup, tmp_path / f"twin{request}", request)
        assert row["model_hash"] == params_hash(twin)


def test_each_request_is_its_own_line_over_seeds_whatever_clients_it_touches(
        tmp_path, monkeypatch) -> None:
    """Two identical sample requests of one client and a class request (whose clients differ
    from seed to seed) summarise as three requests over both seeds, labelled by what they
    remove, with the granularity in its own column."""
    from crash_harness import in_process_engine

    from fedunlearn.reporting.tables import comparison_table
    from fedunlearn.run import pipeline

    monkeypatch.setattr(pipeline, "run_engine", in_process_engine)
    cfg = small_config(*BD, "experiment.seeds=[0, 1]", 'unlearning.methods=["retrain"]',
                       "unlearning.requests=[{client = 0, fraction = 0.3},"
                       " {client = 0, fraction = 0.3}, {label = 3}]",
                       "verification.mia_shadows=0", "unlearning.purge=false")
    results = pipeline.run_experiment(cfg, tmp_path / "run", quiet=True)
    references = [e for e in results["summary"] if e["method"] == "retrain"]
    assert [(e["removes"], e["granularity"], e["seeds"]) for e in references] == [
        ("samples of client 0 (fraction 0.3)", "samples", [0, 1]),
        ("samples of client 0 (fraction 0.3) #2", "samples", [0, 1]),
        ("class 3", "class", [0, 1])]
    table = comparison_table(results["unlearning"], results["summary"]).splitlines()
    assert table[0].split()[:2] == ["request", "granularity"]
    assert sum("class 3" in line and " class " in line for line in table) == 3


def test_a_sample_request_ascent_runs_on_the_samples_it_removes_and_judges_them() -> None:
    """PGA's client task below the client level: the ascent's data is what the request
    removes from that client (here the poisoned half), judged on those samples."""
    from fedunlearn.engine.local import client_work, runtime
    from fedunlearn.engine.messages import job_json

    cfg = small_config(*BD, 'unlearning.methods=["retrain", "pga"]',
                       'unlearning.requests=[{client = 1, samples = "backdoor"}]')
    setup = prepare(cfg)
    job = job_json(cfg)
    (step,) = resolve(*runtime(job))
    spec = {"radius": 1.0, "threshold": 0.0, "learning_rate": 0.01, "momentum": 0.0,
            "clip_norm": 5.0}
    _, n, stats = client_work(job, setup.initial, 1, server_round=1, tag=0, epochs=1.0,
                              task="ascent", task_params={**spec, "forget_of": 1.0})
    assert n == len(step.forget[1]) == stats["judged"] < len(setup.data.clients[1])
    _, whole, stats = client_work(job, setup.initial, 1, server_round=1, tag=0, epochs=1.0,
                                  task="ascent", task_params=spec)
    assert whole == len(setup.data.clients[1])  # a client request: the whole data


def test_a_client_request_after_its_samples_were_purged_is_refused_before_any_work() -> None:
    """The purge after a sample request deletes the client's stored updates: a later request
    for the whole client is refused at preparation (one line), allowed without purging."""
    requests = "unlearning.requests=[{client = 1, fraction = 0.2}, [1]]"
    with pytest.raises(ConfigError) as err:
        prepare(small_config(*BD, requests, 'unlearning.methods=["retrain"]'))
    assert "request 1 asks to remove client 1" in str(err.value)
    assert "set unlearning.purge=false" in str(err.value) and "\n" not in str(err.value)
    prepare(small_config(*BD, requests, 'unlearning.methods=["retrain"]',
                         "unlearning.purge=false"))
    prepare(small_config(*BD, "unlearning.requests=[[1], {client = 2, fraction = 0.2}]",
                         'unlearning.methods=["retrain"]'))


@pytest.mark.parametrize("level", ["strict", "updates"])
def test_pga_serves_a_client_request_after_a_purged_sample_request(level, tmp_path,
                                                                    monkeypatch) -> None:
    """The purge after a sample request deletes that client's updates (and, strict, the global
    models): PGA's later client request starts from its earlier answer instead of a stored
    round, as after a client request, and the run finishes."""
    from crash_harness import in_process_engine

    from fedunlearn.run import pipeline

    monkeypatch.setattr(pipeline, "run_engine", in_process_engine)
    cfg = small_config(*BD, "unlearning.requests=[{client = 3, samples = [1, 2]}, [4]]",
                       'unlearning.methods=["retrain", "pga", "not"]', f'history.purge="{level}"',
                       "verification.mia_shadows=0")
    results = pipeline.run_experiment(cfg, tmp_path / "run", quiet=True)
    pga = [r for r in results["unlearning"] if r["method"] == "pga"]
    assert len(pga) == 2
    assert pga[1]["details"]["reference"].startswith("the model the request starts from")


def test_the_lineage_answers_for_a_client_at_every_request_that_took_its_data(
        tmp_path, monkeypatch) -> None:
    """``fedunlearn lineage --client``: each sample or class request that removed some of the
    client's data, with what served it and its purge, by count and hash, never positions."""
    from crash_harness import in_process_engine

    from fedunlearn.history.lineage import LineageLog, client_lineage, format_client_lineage
    from fedunlearn.run import pipeline

    monkeypatch.setattr(pipeline, "run_engine", in_process_engine)
    cfg = small_config(*BD, "unlearning.requests=[{client = 1, samples = [3, 5, 8]},"
                       " {client = 1, fraction = 0.2}, {label = 2}]",
                       'unlearning.methods=["retrain"]', "verification.mia_shadows=0",
                       "verification.noise_floor=false", 'history.purge="updates"')
    pipeline.run_experiment(cfg, tmp_path / "run", quiet=True)
    events = LineageLog(tmp_path / "run").read()
    info = client_lineage(events, 1)
    assert [r["request"] for r in info["requests"]] == [0, 1, 2]
    assert [r["granularity"] for r in info["requests"]] == ["samples", "samples", "class"]
    assert info["requests"][0]["samples"] == 3
    assert all(r["served_by"] and r["purge"] is not None for r in info["requests"])
    text = format_client_lineage(info)
    assert "request 0" in text and "samples of client 1: 3 samples" in text
    assert "class 2:" in text
    raw = (tmp_path / "run" / "lineage.jsonl").read_text()
    assert "[3, 5, 8]" not in raw and "3, 5, 8" not in raw
