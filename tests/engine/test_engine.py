"""The federation engine: real Flower + Ray simulations, history completeness, determinism,
and the in-process port doing identical work.

The Flower runs are module-scoped fixtures so the suite starts Ray only a few times.
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
from conftest import max_abs_diff, small_config

from fedunlearn.engine.aggregation import apply_update
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.store import HistoryStore
from fedunlearn.run.pipeline import prepare, run_experiment, train_federation

FLOWER_CFG = ["data.num_clients=4", "training.rounds=3", "training.sample_fraction=0.75",
              "training.local_epochs=3",
              "training.evaluate_fraction=0.5"]


def replay(store: HistoryStore) -> dict[str, np.ndarray]:
    """Initial model plus the aggregation-weighted sum of every stored update."""
    model = store.global_model(1)
    for t in store.rounds():
        rec = store.round_record(t)
        for k, w in zip(rec.participants, rec.weights, strict=True):
            model = apply_update(model, store.update(t, k), scale=w)
    return model


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    """One run through Flower + Ray (a second engine run is not needed to check determinism:
    the Flower run must equal the in-process twin bit for bit, and the twin is run twice)."""
    cfg = small_config(*FLOWER_CFG)
    outs = [tmp_path_factory.mktemp("flower") / "run"]
    results = [run_experiment(cfg, out, quiet=True) for out in outs]
    return cfg, outs, results


def _twin(cfg, where):
    """The in-process federation doing the same work as the Flower run of ``cfg``."""
    setup = prepare(cfg)
    store = HistoryStore.create(where)
    run = train_federation(InProcessFederation(cfg, setup.evaluator()), setup, store,
                           progress=False)
    return run, store


@pytest.mark.flower
def test_flower_run_writes_results_and_history(flower_runs):
    _, outs, _ = flower_runs
    results = json.loads((outs[0] / "results.json").read_text())
    tr = results["training"]
    assert tr["engine"] == "flower-ray"
    assert [r["round"] for r in tr["rounds"]] == [1, 2, 3]
    assert all(len(r["participants"]) == 3 for r in tr["rounds"])  # 0.75 of 4 clients
    assert all(r["wall_s"] > 0 for r in tr["rounds"])
    assert 0.5 < tr["final_test_accuracy"] <= 1.0
    assert tr["history_bytes"] == HistoryStore.open(outs[0] / "history").bytes_used() > 0
    assert results["seed"] == 0 and results["config"]["data"]["num_clients"] == 4
    assert {"fedunlearn", "flwr", "ray", "torch"} <= set(results["versions"])
    assert results["git_commit"]
    # 3 train messages per round + 2 evaluate messages per round (fraction 0.5 of 4)
    assert tr["messages_sent"] == 3 * 3 + 3 * 2


@pytest.mark.flower
def test_flower_history_is_complete(flower_runs):
    _, outs, _ = flower_runs
    store = HistoryStore.open(outs[0] / "history")
    assert max_abs_diff(replay(store), store.final_model()) <= 1e-5
    via_sums = store.global_model(1)
    for k in store.clients():
        via_sums = apply_update(via_sums, store.running_sum(k))
    assert max_abs_diff(via_sums, store.final_model()) <= 1e-5


@pytest.mark.flower
def test_same_config_and_seed_give_identical_models(flower_runs, tmp_path):
    """Flower run, in-process twin, twin again: one model, bit for bit (so a second Flower
    run of the same config and seed must give it too)."""
    cfg, outs, results = flower_runs
    flower = HistoryStore.open(outs[0] / "history").final_model()
    (a, _), (b, _) = _twin(cfg, tmp_path / "a"), _twin(cfg, tmp_path / "b")
    assert max_abs_diff(a.final, b.final) == 0.0
    assert max_abs_diff(flower, a.final) == 0.0
    assert results[0]["training"]["final_test_accuracy"] == a.rounds[-1].test_accuracy


@pytest.mark.flower
def test_in_process_port_does_the_same_work_as_flower(flower_runs, tmp_path):
    cfg, outs, _ = flower_runs
    run, store = _twin(cfg, tmp_path / "h")
    flower = HistoryStore.open(outs[0] / "history")
    assert max_abs_diff(run.final, flower.final_model()) == 0.0
    assert [store.participants(t) for t in store.rounds()] == \
        [flower.participants(t) for t in flower.rounds()]


def test_history_complete_with_float16_and_retention(tmp_path):
    cfg = small_config("history.retention_interval=2", "history.dtype=\"float16\"")
    setup = prepare(cfg)
    store = HistoryStore.create(tmp_path / "h", retention_interval=2, update_dtype="float16")
    run = train_federation(InProcessFederation(cfg, setup.evaluator()), setup, store,
                           progress=False)
    retained = [t for t in store.rounds() if store.round_record(t).updates_retained]
    assert retained == [1, 3]
    model = store.global_model(1)
    for k in store.clients():  # running sums are kept every round, in float32
        model = apply_update(model, store.running_sum(k))
    assert max_abs_diff(model, run.final) <= 1e-5


EXTENSION = textwrap.dedent('''
    """A user's module: a train step and a strategy, registered by name."""
    import torch.nn.functional as F
    from flwr.serverapp.strategy import FedAvg

    from fedunlearn.engine.strategy import STRATEGIES
    from fedunlearn.models.training import TRAIN_STEPS

    CALLS = {"aggregate": 0}


    @TRAIN_STEPS.register("anchored")
    def anchored(model, x, y, ctx, mu=100.0):
        """Cross-entropy plus a strong pull towards the global model."""
        pull = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), ctx.global_params))
        return F.cross_entropy(model(x), y) + 0.5 * mu * pull


    class CountingFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            CALLS["aggregate"] += 1
            return super().aggregate_train(server_round, replies)


    @STRATEGIES.register("counting")
    def counting(evaluate_fraction=0.0, **params):
        return CountingFedAvg(fraction_train=1.0, fraction_evaluate=evaluate_fraction,
                              min_train_nodes=1, min_available_nodes=1, **params)
''')


@pytest.mark.flower
def test_user_train_step_and_strategy_through_flower(tmp_path, monkeypatch):
    (tmp_path / "my_extension.py").write_text(EXTENSION)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["experiment.extensions=[\"my_extension\"]", "training.strategy=\"counting\""]
    cfg = small_config(*base, "training.step=\"anchored\"", "training.step_params={mu=5.0}")
    results = run_experiment(cfg, tmp_path / "run", quiet=True)
    assert sys.modules["my_extension"].CALLS["aggregate"] == 3
    assert results["config"]["training"]["step"] == "anchored"
    # The anchored step must have run inside the Flower clients: updates shrink strongly
    # compared with the same strategy and plain cross-entropy (in-process, identical work).
    anchored = HistoryStore.open(tmp_path / "run" / "history")
    plain_cfg = small_config()
    setup = prepare(plain_cfg)
    plain = HistoryStore.create(tmp_path / "plain")
    train_federation(InProcessFederation(plain_cfg, setup.evaluator()), setup, plain,
                     progress=False)

    def norm(store: HistoryStore) -> float:
        return float(np.sqrt(sum(np.sum(v ** 2) for v in store.update(1, 0).values())))

    assert norm(anchored) < 0.5 * norm(plain)
