"""BatchNorm state in federated training, the history store and the history methods.

The rule (docs/models.md, "BatchNorm buffers"): float buffers (running mean and variance) are averaged by
FedAvg and stored as updates like weights, so ``M_{t+1} = M_t + Σ_k w_k U_k`` holds for them;
integer buffers (``num_batches_tracked``) are not aggregated, every global model keeps ``M_1``'s
value and dtype; FedEraser takes the running statistics from the calibration training as they
are and calibrates the parameters only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.config.tree import load_config
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.engine.port import ClientResult
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.params import Params, is_float
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.unlearning.base import UnlearningContext
from fedunlearn.unlearning.federated.calibration import calibrate
from fedunlearn.unlearning.federated.federaser import FedAccum, FedEraser

BN = ['model.name="resnet20"', 'model.params={norm="batch"}', "data.num_clients=3",
      "training.rounds=3", "training.batch_size=32"]


@dataclass
class Trained:
    cfg: object
    setup: object
    fed: InProcessFederation
    store: HistoryStore
    final: Params


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory) -> Trained:
    cfg = small_config(*BN)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(tmp_path_factory.mktemp("bn") / "h")
    run = train_federation(fed, setup, store, progress=False)
    return Trained(cfg, setup, fed, store, run.final)


def models_by_round(store: HistoryStore) -> list[Params]:
    return [store.global_model(t) for t in store.rounds()] + [store.final_model()]


def test_history_identity_holds_for_every_state_entry(bn_run):
    store = bn_run.store
    models = models_by_round(store)
    keys = list(models[0])
    stats = [k for k in keys if k.endswith(("running_mean", "running_var"))]
    counters = [k for k in keys if k.endswith("num_batches_tracked")]
    assert len(stats) == 38 and len(counters) == 19
    for t, (before, after) in enumerate(itertools.pairwise(models), start=1):
        rec = store.round_record(t)
        updates = {k: store.update(t, k) for k in rec.participants}
        for key in keys:
            if is_float(before[key]):
                expected = before[key].astype(np.float64) + sum(
                    w * updates[k][key].astype(np.float64)
                    for k, w in zip(rec.participants, rec.weights, strict=True))
                scale = max(1.0, float(np.max(np.abs(expected))))
                assert np.max(np.abs(after[key] - expected)) <= 1e-5 * scale, (t, key)
            else:  # integer buffers: no update, the value and dtype of M_t (hence of M_1)
                assert all(key not in u for u in updates.values())
                assert after[key].dtype == np.int64 and after[key] == before[key] == 0
        # the buffers did move: the identity is not vacuous for them
        assert any(np.abs(updates[k][key]).max() > 1e-3 for k in updates for key in stats)
    assert not np.allclose(models[-1]["norm.running_var"], 1.0)
    assert store.replayable()


def test_clients_count_batches_but_the_global_counter_is_not_averaged(bn_run):
    start = bn_run.store.global_model(2)
    got = bn_run.fed.train_clients(start, [0], epochs=1, server_round=2, tag=0)[0].model
    batches = -(-len(bn_run.setup.data.clients[0]) // 32)
    assert got["norm.num_batches_tracked"] == batches  # the client's own count ...
    assert bn_run.final["norm.num_batches_tracked"] == 0  # ... never reaches the global model
    assert bn_run.final["norm.num_batches_tracked"].dtype == np.int64


def test_fedaccum_without_removal_rebuilds_every_entry_of_the_final_model(bn_run):
    ctx = UnlearningContext(
        cfg=bn_run.cfg, targets=(), removed=frozenset(), model=bn_run.final,
        initial=bn_run.setup.initial, history=bn_run.store, federation=bn_run.fed,
        data=bn_run.setup.data, build_model=bn_run.setup.build_model, seed=1)
    rebuilt = FedAccum(track_accuracy=False).unlearn(ctx).model
    final = bn_run.store.final_model()
    assert list(rebuilt) == list(final)
    for key, v in final.items():
        assert rebuilt[key].dtype == v.dtype
        assert np.max(np.abs(rebuilt[key].astype(np.float64) - v)) <= 1e-4, key


def test_federaser_on_a_batchnorm_model_keeps_valid_statistics(bn_run):
    ctx = UnlearningContext(
        cfg=bn_run.cfg, targets=(0,), removed=frozenset({0}), model=bn_run.final,
        initial=bn_run.setup.initial, history=bn_run.store, federation=bn_run.fed,
        data=bn_run.setup.data, build_model=bn_run.setup.build_model, seed=1)
    model = FedEraser(track_accuracy=False).unlearn(ctx).model
    for key, v in model.items():
        assert np.isfinite(v).all(), key
        if key.endswith("running_var"):
            assert (v >= 0).all(), key
        if key.endswith("num_batches_tracked"):
            assert v.dtype == np.int64 and v == 0


# ---------------------------------------------------------------- FedEraser by hand
def _m(weight, var) -> Params:
    return {"bn.weight": np.array(weight, np.float32), "bn.running_var": np.array(var, np.float32)}


# Clients 0, 1, 2 with 2, 3, 1 examples (weights 1/3, 1/2, 1/6); client 0 is removed, so 1 and
# 2 weigh 3/4 and 1/4. After round 1 (stored updates, kept as they are) the rebuilt model is
# weight (1, 1), running_var (1.2, 1.2). Round 2, calibrated:
#   client 1: U_weight (3, 4), ‖·‖ 5;   Û_weight (1, 0), ‖·‖ 1  -> (5, 0);   Û_var (-.5, -.5)
#   client 2: U_weight (0, 2), ‖·‖ 2;   Û_weight (0, -4), ‖·‖ 4 -> (0, -2);  Û_var (-.5, 0)
# weight = (1, 1) + .75 (5, 0) + .25 (0, -2) = (4.75, 0.5);
# running_var = (1.2, 1.2) + .75 (-.5, -.5) + .25 (-.5, 0) = (0.7, 0.825), the FedAvg mean of
# the statistics the clients measured. Calibrating the variance too (norms over both arrays)
# would stretch client 1's -0.5 by 5.05 / 1.22 and make the variance negative.
ROUNDS = {1: {0: _m([9, 9], [9, 9]), 1: _m([0, 0], [0.2, 0.2]), 2: _m([0, 0], [0.2, 0.2])},
          2: {0: _m([9, 9], [9, 9]), 1: _m([3, 4], [0.5, 0.5]), 2: _m([0, 2], [0, 0])}}
FRESH = {1: _m([1, 0], [-0.5, -0.5]), 2: _m([0, -4], [-0.5, 0])}
WEIGHTS = (1 / 3, 1 / 2, 1 / 6)


@dataclass
class FreshFederation:
    num_clients: int = 3
    messages_sent: int = 0
    bytes_exchanged: int = 0

    def fedavg(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("FedEraser runs no FedAvg")

    def train_clients(self, model: Params, clients, *, epochs: float, server_round: int,
                      tag: int) -> dict[int, ClientResult]:
        assert tuple(clients) == (1, 2) and server_round == 2
        return {k: ClientResult({**model, **{n: model[n] + d for n, d in FRESH[k].items()}}, 1)
                for k in clients}


def test_federaser_takes_running_statistics_fresh_and_calibrates_parameters(tmp_path: Path):
    initial = {**_m([1, 1], [1, 1]), "bn.num_batches_tracked": np.array(0, np.int64)}
    store = HistoryStore.create(tmp_path / "h")
    model = dict(initial)
    for t, updates in ROUNDS.items():
        store.record_round(t, global_model=model, participants=[0, 1, 2],
                           num_examples=[2, 3, 1], weights=list(WEIGHTS), updates=updates)
        model = {**model, **{k: (model[k] + sum(w * updates[c][k] for c, w in
                                                 enumerate(WEIGHTS))).astype(np.float32)
                             for k in ("bn.weight", "bn.running_var")}}
    store.record_final(model)
    ctx = UnlearningContext(
        cfg=load_config(None, ["training.local_epochs=2"]), targets=(0,),
        removed=frozenset({0}), model=store.final_model(), initial=initial, history=store,
        federation=FreshFederation(), data=None,  # type: ignore[arg-type]
        build_model=lambda: pytest.fail("no model is built"), seed=3)
    result = FedEraser(track_accuracy=False).unlearn(ctx)
    out = result.model
    assert np.allclose(out["bn.weight"], [4.75, 0.5], atol=1e-6)
    assert np.allclose(out["bn.running_var"], [0.7, 0.825], atol=1e-6)
    assert out["bn.num_batches_tracked"].dtype == np.int64 and out["bn.num_batches_tracked"] == 0
    # the diagnostics use the same norms: weights only (client ratios 5 and 0.5)
    assert result.details["replay"][1]["ratio"] == pytest.approx(0.75 * 5 + 0.25 * 0.5)


def test_calibrate_leaves_named_arrays_uncalibrated():
    stored, fresh = _m([3, 4], [0.5, 0.5]), _m([1, 0], [-0.5, -0.5])
    out = calibrate(stored, fresh, uncalibrated={"bn.running_var"})
    assert out["bn.weight"].tolist() == [5.0, 0.0] and out["bn.running_var"].tolist() == [-.5, -.5]
    both = calibrate(stored, fresh)  # all arrays in one norm: the variance is stretched
    assert both["bn.running_var"][0] < -2.0


def test_a_flower_message_keeps_every_entry_shape_and_dtype(bn_run):
    """Through Flower a model travels as an ArrayRecord; ``num_batches_tracked`` is 0-d and
    came back 1-d (``np.ascontiguousarray``), so every model trained through Flower differed in
    shape from the network's, and an answer built on one was refused as a misfit."""
    from fedunlearn.engine.messages import from_record, to_record

    back = from_record(to_record(bn_run.final))
    assert [(k, v.shape, v.dtype) for k, v in back.items()] == \
        [(k, v.shape, v.dtype) for k, v in bn_run.final.items()]
    assert back["norm.num_batches_tracked"].shape == ()


SHRINK = '''
from fedunlearn.unlearning import UNLEARNERS, Cost, UnlearningResult


@UNLEARNERS.register("shrink")
class Shrink:
    """Plain NumPy arithmetic, in reverse order: a 0-d entry comes back a NumPy scalar."""

    setting = "federated"

    def check(self):
        pass

    def unlearn(self, ctx):
        return UnlearningResult(model={k: (v * 0.9).astype(v.dtype)
                                       for k, v in reversed(list(ctx.model.items()))},
                                cost=Cost())
'''


def test_an_answer_of_numpy_scalars_in_another_order_is_the_network_it_stands_for(
        bn_run, tmp_path, monkeypatch):
    """Oracle: the same arithmetic by hand, as 0-d arrays in the network's order; the row's
    hash is of that model, and its distance to retraining is measured (it was None when the
    order differed, and the scalar was refused as not an array)."""
    from fedunlearn.history.lineage import LineageLog, params_hash
    from fedunlearn.run.serving import serve_requests

    (tmp_path / "shrink_ext.py").write_text(SHRINK)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_config(*BN, "experiment.extensions=[\"shrink_ext\"]", "unlearning.requests=[[1]]",
                       "unlearning.methods=[\"retrain\", \"shrink\"]", "unlearning.purge=false",
                       "verification.noise_floor=false", "verification.mia_shadows=0")
    prepare(cfg)
    served = serve_requests(cfg, data=bn_run.setup.data, trained=bn_run.final,
                            initial=bn_run.setup.initial, store=bn_run.store,
                            federation=bn_run.fed, lineage=LineageLog(tmp_path),
                            build_model=bn_run.setup.build_model,
                            predictor=bn_run.setup.predictor(), stream=None)
    row = next(r for r in served.rows if r.method == "shrink")
    expected = {k: np.asarray((v * 0.9).astype(v.dtype)) for k, v in bn_run.final.items()}
    assert row.model_hash == params_hash(expected)
    assert row.metrics["param_distance"] is not None and row.metrics["param_distance"] > 0
