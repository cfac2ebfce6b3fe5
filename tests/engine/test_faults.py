"""Client faults as a policy: NaN replies, stalled clients, ``abort`` versus ``drop``.

A user train step (registered by an extension module, as users do) makes chosen clients fail:
it recognises a client by one of its training samples (``marks``) and then returns a NaN loss
(so the client's model becomes NaN) or sleeps. In-process runs check the policy against
independent oracles; two small Flower runs check the bounded wait on a stalled client.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import max_abs_diff, small_config

from fedunlearn.cli import main
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.engine.faults import ClientFailure, FaultPolicy, nonfinite
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.seeding import derive_seed
from fedunlearn.run.listeners import HistoryRecorder, LineageRecorder, Listeners
from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning.base import UnlearningContext
from fedunlearn.unlearning.federated.calibration import calibrate, renormalised_weights
from fedunlearn.unlearning.federated.federaser import _CALIBRATION_PURPOSE, FedEraser

EXTENSION = textwrap.dedent('''
    """Test extension: a train step that makes the clients holding a marked sample fail."""
    import os
    import time

    import torch
    import torch.nn.functional as F

    from fedunlearn.models.training import TRAIN_STEPS


    def _marked(x, marks):
        rows = x.reshape(len(x), -1)
        return any(bool(torch.all(rows == torch.tensor(m, dtype=rows.dtype), dim=1).any())
                   for m in marks)


    def _first_time(once):
        """True the first time any process asks for the marker file ``once``."""
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True


    @TRAIN_STEPS.register("faulty")
    def faulty(model, x, y, ctx, marks=(), fault="nan", stall_s=0.0, once=""):
        loss = F.cross_entropy(model(x), y)
        if not _marked(x, marks) or (once and not _first_time(once)):
            return loss
        if fault == "nan":
            return loss * float("nan")
        if fault == "raise":
            raise RuntimeError("disk on fire")
        if fault == "exit":
            import sys
            sys.exit("step quits")
        time.sleep(stall_s)
        open(once + ".done", "w").close()  # the stalled worker is free again
        return loss
''')

EXT = "faults_ext"


@pytest.fixture(autouse=True)
def extension(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extension module, importable here and in the Flower client processes."""
    where = tmp_path_factory.getbasetemp() / "faults_ext"
    where.mkdir(exist_ok=True)
    (where / f"{EXT}.py").write_text(EXTENSION)
    monkeypatch.syspath_prepend(str(where))


def faulty_config(*extra: str, clients: tuple[int, ...] = (2,), **step: object) -> Config:
    """Four clients, three rounds; the clients in ``clients`` fail as ``step`` says."""
    cfg = small_config(f"experiment.extensions=[\"{EXT}\"]", "training.step=\"faulty\"", *extra)
    setup = prepare(cfg)
    marks = [setup.data.clients[k].x[0].reshape(-1).tolist() for k in clients]
    return dataclasses.replace(cfg, training=dataclasses.replace(
        cfg.training, step_params={"marks": marks, **step}))


def in_process(cfg: Config, path: Path, **kw: object):
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(path / "history")
    lineage = LineageLog(path)
    run = fed.fedavg(setup.initial, listener=Listeners(HistoryRecorder(store),
                                                       LineageRecorder(lineage)), **kw)
    store.record_final(run.final)
    return run, store, lineage


# ------------------------------------------------------------------------------ in-process


def test_nan_client_aborts_naming_client_and_round(tmp_path):
    cfg = faulty_config()
    setup = prepare(cfg)
    store = HistoryStore.create(tmp_path / "h")
    with pytest.raises(ClientFailure) as err:
        InProcessFederation(cfg, setup.evaluator()).fedavg(setup.initial,
                                                           listener=HistoryRecorder(store))
    msg = str(err.value)
    assert msg.startswith("client 2 returned a model with NaN or Inf values") and "round 1" in msg
    assert "on_client_failure=\"drop\"" in msg and "\n" not in msg
    assert store.rounds() == []  # the NaN model was never stored


def test_nan_client_dropped_equals_training_without_it(tmp_path):
    run, store, lineage = in_process(faulty_config("engine.on_client_failure=\"drop\""),
                                     tmp_path)
    assert not nonfinite(run.final)
    assert all(2 not in store.participants(t) for t in store.rounds())
    assert [store.participants(t) for t in store.rounds()] == [(0, 1, 3)] * 3
    assert store.identity_violations() == [] and store.replayable()
    assert run.client_failures == [{"round": t, "client": 2, "reason": "non-finite",
                                    "stage": "train"} for t in (1, 2, 3)]
    logged = [e for e in lineage.read() if e["event"] == "round"]
    assert [e["failures"][0]["client"] for e in logged] == [2, 2, 2]
    assert all(e["participants"] == [0, 1, 3] for e in logged)
    # oracle: the same federation, trained by the plain step with client 2 excluded
    plain = small_config()
    setup = prepare(plain)
    oracle = InProcessFederation(plain, setup.evaluator()).fedavg(setup.initial,
                                                                 exclude=frozenset({2}))
    assert max_abs_diff(run.final, oracle.final) == 0.0


def test_retry_recovers_a_client_failing_once(tmp_path):
    once = str(tmp_path / "once")
    cfg = faulty_config("engine.client_retries=1", once=once)
    run, store, _ = in_process(cfg, tmp_path / "run")
    assert run.client_failures == [] and store.participants(1) == (0, 1, 2, 3)
    plain = small_config()
    setup = prepare(plain)
    oracle = InProcessFederation(plain, setup.evaluator()).fedavg(setup.initial)
    assert max_abs_diff(run.final, oracle.final) == 0.0  # the retry redid the same work


def test_client_error_and_round_without_survivors(tmp_path):
    cfg = faulty_config("engine.on_client_failure=\"drop\"", clients=(0, 1, 2, 3))
    with pytest.raises(ClientFailure, match=r"^every client of round 1 failed: client 0 "
                                            r"\(non-finite\), client 1"):
        in_process(cfg, tmp_path / "a")
    with pytest.raises(ClientFailure, match=r"^client 2 failed \(error: RuntimeError: disk on "
                                            r"fire \(at faults_ext\.py:\d+ in faulty\)\) in "
                                            r"round 1 \(training\); fix the code where it"):
        in_process(faulty_config(fault="raise"), tmp_path / "b")
    # sys.exit() in a client's step: the same one line (in Flower it killed the Ray actor)
    with pytest.raises(ClientFailure, match=r"^client 2 failed \(error: SystemExit: step quits "
                                            r"\(at faults_ext\.py:\d+ in faulty\)\) in round 1"):
        in_process(faulty_config(fault="exit"), tmp_path / "c")


def test_engine_keys_are_validated():
    with pytest.raises(ConfigError, match="engine.on_client_failure"):
        small_config("engine.on_client_failure=\"ignore\"")
    with pytest.raises(ConfigError, match="engine.client_timeout_s"):
        small_config("engine.client_timeout_s=0")
    with pytest.raises(ConfigError, match="engine.client_retries"):
        small_config("engine.client_retries=-1")


def test_policy_messages_are_one_line_with_advice():
    policy = FaultPolicy(timeout_s=2)
    with pytest.raises(ClientFailure) as err:
        policy.settle({3: "timeout", 1: "timeout"}, [0], server_round=4)
    assert str(err.value) == (
        "client 1 sent no reply within engine.client_timeout_s = 2 s in round 4 (training) "
        "(and 1 more client); raise engine.client_timeout_s, or set engine.client_retries, or "
        "set engine.on_client_failure=\"drop\" to go on without it")
    drop = FaultPolicy(on_failure="drop")
    assert [f.client for f in drop.settle({3: "timeout"}, [0], server_round=1)] == [3]
    assert drop.settle({3: "timeout"}, [], server_round=1, stage="evaluate")[0].stage \
        == "evaluate"


def test_flower_replies_are_screened_for_errors_nan_and_missing_nodes():
    from flwr.app import Error, Message, Metadata, MetricRecord, RecordDict

    from fedunlearn.engine.messages import to_record
    from fedunlearn.engine.strategy import screen_replies

    def reply(src: int, w: float | None) -> Message:
        md = Metadata(run_id=1, message_id="", src_node_id=src, dst_node_id=0,
                      reply_to_message_id="m", group_id="1", created_at=0.0, ttl=10.0,
                      message_type="train")
        if w is None:
            return Message(Error(code=0, reason="Traceback\n  ...\nValueError: boom\n"),
                           metadata=md)
        content = RecordDict({"arrays": to_record({"w": np.array([w, 1.0], np.float32)}),
                              "metrics": MetricRecord({"num-examples": 3})})
        return Message(content, metadata=md)

    replies = [reply(70, 0.5), reply(71, float("nan")), reply(72, float("inf")),
               reply(73, None), reply(99, 0.5)]  # 99: not one of ours; 74 never answered
    ok, failed = screen_replies(replies, {70: 0, 71: 1, 72: 2, 73: 3, 74: 4}, model=True)
    assert list(ok) == [0]
    assert failed == {1: "non-finite", 2: "non-finite", 3: "error: ValueError: boom",
                      4: "timeout"}


# ------------------------------------------------------------------------------ calibration


def _federaser(tmp_path: Path, calibrating: Config):
    """Train 3 clean rounds in-process, then FedEraser (remove 0) calibrating on a federation
    whose client 3 returns NaN."""
    clean = small_config()
    setup = prepare(clean)
    fed = InProcessFederation(clean, setup.evaluator())
    store = HistoryStore.create(tmp_path / "h")
    run = fed.fedavg(setup.initial, listener=HistoryRecorder(store))
    store.record_final(run.final)
    faulty = InProcessFederation(calibrating, setup.evaluator())
    ctx = UnlearningContext(cfg=clean, targets=(0,), removed=frozenset({0}), model=run.final,
                            initial=setup.initial, history=store, federation=faulty,
                            data=setup.data, build_model=setup.build_model, seed=7)
    return ctx, fed


def test_calibration_failure_aborts(tmp_path):
    ctx, _ = _federaser(tmp_path, faulty_config(clients=(3,)))
    with pytest.raises(ClientFailure, match=r"^client 3 returned a model with NaN .* round 2 "):
        FedEraser(r=1.0, track_accuracy=False).unlearn(ctx)


def test_calibration_failure_dropped_renormalises_the_round(tmp_path):
    cfg = faulty_config("engine.on_client_failure=\"drop\"", clients=(3,))
    ctx, clean_fed = _federaser(tmp_path, cfg)
    method = FedEraser(r=1.0, track_accuracy=False)
    result = method.unlearn(ctx)
    assert result.details["calibration_dropped"] == {"2": [3], "3": [3]}
    assert [e.get("dropped") for e in result.details["replay"]] == [None, [3], [3]]
    # oracle: round 1 as stored without 0; rounds 2, 3 calibrated by clients 1 and 2 only,
    # their weights renormalised over them (calibration models from the clean federation)
    h = ctx.history
    tag = derive_seed(ctx.seed, _CALIBRATION_PURPOSE) + 1
    model = {k: v.copy() for k, v in ctx.initial.items()}
    for t in h.rounds():
        rec = h.round_record(t)
        gone = {0} if t == 1 else {0, 3}
        clients, weights = renormalised_weights(rec.participants, rec.weights,
                                                keep=lambda k, gone=gone: k not in gone)
        updates = [h.update(t, k) for k in clients]
        if t > 1:
            fresh = clean_fed.train_clients(model, clients, epochs=1.0, server_round=t, tag=tag)
            updates = [calibrate(u, {n: fresh[k].model[n] - model[n] for n in model})
                       for k, u in zip(clients, updates, strict=True)]
        model = {n: model[n] + sum(w * u[n] for w, u in zip(weights, updates, strict=True))
                 for n in model}
    assert max_abs_diff(result.model, model) <= 1e-5


# ------------------------------------------------------------------------------ Flower

STALL_S = 4.0


def _wait_for_stall_end(marker: Path) -> None:
    """Wait until the stalled client's worker is free again, then re-arm the stall."""
    done = marker.with_name(marker.name + ".done")
    deadline = time.monotonic() + 3 * STALL_S
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    marker.unlink()
    done.unlink()


@pytest.mark.flower
def test_flower_stalled_client_abort_drop_and_retry(tmp_path):
    """One engine, three federations on its grid: client 1 stalls once for 4 s in round 1
    with client_timeout_s = 2. ``abort`` names it within the bounded time; ``drop`` trains
    round 1 without it; a retry recovers it (the re-sent request does not stall)."""
    from fedunlearn.engine.flower import FlowerFederation, run_on_flower

    marker = tmp_path / "stalled"
    cfg = faulty_config("data.num_clients=4", "training.rounds=2", "engine.client_timeout_s=2",
                        "engine.ray_num_cpus=0",  # two client processes: one of them stalls
                        clients=(1,), fault="stall", stall_s=STALL_S, once=str(marker))
    setup = prepare(cfg)

    def with_engine(**engine: object) -> Config:
        return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **engine))

    def train(fed: FlowerFederation, name: str) -> tuple[object, HistoryStore]:
        store = HistoryStore.create(tmp_path / name)
        run = fed.fedavg(setup.initial, listener=HistoryRecorder(store))
        store.record_final(run.final)
        return run, store

    def job(fed: FlowerFederation) -> dict[str, object]:
        out: dict[str, object] = {}
        t0 = time.perf_counter()
        with pytest.raises(ClientFailure) as err:
            train(fed, "abort")
        out["abort"] = (str(err.value), time.perf_counter() - t0)
        _wait_for_stall_end(marker)
        out["drop"] = train(FlowerFederation(fed.grid, with_engine(on_client_failure="drop"),
                                             setup.evaluator()), "drop")
        _wait_for_stall_end(marker)
        out["retry"] = train(FlowerFederation(fed.grid, with_engine(client_retries=1),
                                              setup.evaluator()), "retry")
        return out

    out = run_on_flower(cfg, job, setup.evaluator(), setup.data)
    message, seconds = out["abort"]
    assert message.startswith("client 1 sent no reply within engine.client_timeout_s = 2 s in "
                              "round 1 (training);") and "\n" not in message
    assert seconds < 2 + STALL_S  # the wait is bounded by client_timeout_s, not the stall
    assert not (tmp_path / "abort").joinpath("rounds").exists()

    run, store = out["drop"]
    assert run.client_failures == [{"round": 1, "client": 1, "reason": "timeout",
                                    "stage": "train"}]
    assert [store.participants(t) for t in store.rounds()] == [(0, 2, 3), (0, 1, 2, 3)]
    assert store.replayable() and not nonfinite(run.final)

    run, store = out["retry"]
    assert run.client_failures == []
    assert [store.participants(t) for t in store.rounds()] == [(0, 1, 2, 3)] * 2
    assert run.messages_sent == 4 + 1 + 4  # the retry is one more message


def test_cli_reports_client_failure_in_one_line(tmp_path, capsys, monkeypatch):
    """The CLI turns a ClientFailure raised anywhere in the run into one line and exit 2."""
    from fedunlearn.run import pipeline as runner

    def fail(*args: object, **kwargs: object) -> None:
        raise ClientFailure("client 1 sent no reply within engine.client_timeout_s = 2 s in "
                            "round 1 (training); raise engine.client_timeout_s")

    monkeypatch.setattr(runner, "run_experiment", fail)
    (tmp_path / "c.toml").write_text("[data]\nnum_clients = 4\n")
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("fedunlearn: error: client 1 sent no reply within "
                    "engine.client_timeout_s = 2 s in round 1 (training); raise "
                    "engine.client_timeout_s")]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_flowers_log_of_a_client_exception_is_dropped_unless_verbose():
    """The filter must match where the installed Flower logs a client's exception (the
    engine's ``worker`` and the Ray backend's ``process_message``, each with
    ``log(ERROR, ...)``); a record from anywhere else passes. If Flower moves those calls,
    the first assertion fails and the filter needs updating."""
    import inspect
    import logging

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedunlearn.engine import flower

    places = [vce_api.worker, raybackend.RayBackend.process_message]
    for fn in places:
        assert "log(ERROR" in inspect.getsource(fn).replace("\n", "").replace(" ", "")

    def record(code, level=logging.ERROR):
        return logging.LogRecord("flwr", level, code.co_filename, code.co_firstlineno,
                                 "boom", None, None, func=code.co_name)

    reported = flower._ClientErrorsReported()
    assert not any(reported.filter(record(fn.__code__)) for fn in places)
    assert reported.filter(record(flower.run_engine.__code__))  # anything else passes
    assert reported.filter(record(vce_api.run_api.__code__))
    logger = logging.getLogger("flwr")
    level, filters = logger.level, list(logger.filters)
    try:
        flower._quiet(False)
        assert flower._CLIENT_ERRORS in logger.filters
        flower._quiet(True)
        assert flower._CLIENT_ERRORS not in logger.filters
    finally:
        logger.setLevel(level)
        logger.filters[:] = filters
