"""Real 28x28 images (mnist_5k, offline): FedEraser where it is expected to match retraining.

With r = 1 and every round retained (Δt = 1), each calibration trains exactly as long as the
original round did, so FedEraser's replay should land where retraining does (measured on the
20-client scenario: within ±0.015 test accuracy over three seeds). Oracle: retraining without
the client, in the same in-process federation.

Client 0 plants a backdoor, so a replay that keeps the target's updates is caught (seen: attack
success 0.57 against retraining's 0.08). A replay that skips the calibration lands in the same
bands here (r = 1, Δt = 1); ``tests/unlearning/test_oracles.py`` catches it against a hand recomputation.
"""

from __future__ import annotations

from pathlib import Path

from fedunlearn.config.tree import load_config
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.evaluation.metrics import accuracy, attack_success_rate, kl_divergence
from fedunlearn.history.store import HistoryStore
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.unlearning import UNLEARNERS, UnlearningContext

CFG = ["data.source=\"mnist_5k\"", "model.name=\"cnn\"", "data.num_clients=5",
       "data.partition=\"iid\"", "training.rounds=3", "training.local_epochs=2",
       "training.batch_size=16", "training.learning_rate=0.05", "training.momentum=0.9",
       "history.retention_interval=1", "unlearning.requests=[[0]]",
       "backdoor.clients=[0]", "backdoor.fraction=0.8", "backdoor.target_class=0",
       "backdoor.trigger_size=3"]


def test_federaser_r1_matches_retraining_on_mnist_5k(tmp_path: Path) -> None:
    cfg = load_config(None, CFG)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(tmp_path / "h", retention_interval=1)
    run = train_federation(fed, setup, store, progress=False)
    ctx = UnlearningContext(cfg=cfg, targets=(0,), removed=frozenset({0}), model=run.final,
                            initial=setup.initial, history=store, federation=fed,
                            data=setup.data, build_model=setup.build_model, seed=7)
    retrained = UNLEARNERS.get("retrain")().unlearn(ctx).model
    erased = UNLEARNERS.get("federaser")(r=1.0).unlearn(ctx)
    predict = setup.predictor()
    test = setup.data.test
    p_ret, p_fe = predict(retrained)(test.x), predict(erased.model)(test.x)
    acc_ret, acc_fe = accuracy(p_ret, test.y), accuracy(p_fe, test.y)
    assert acc_ret >= 0.8, f"retraining itself only reached {acc_ret:.3f}"
    assert abs(acc_fe - acc_ret) <= 0.03, (acc_fe, acc_ret)
    triggered = setup.data.triggered_test
    asr = {name: attack_success_rate(predict(model)(triggered.x), 0)
           for name, model in [("original", run.final), ("retrain", retrained),
                               ("federaser", erased.model)]}
    assert asr["original"] >= asr["retrain"] + 0.3, asr  # the backdoor was learned
    assert asr["federaser"] <= asr["retrain"] + 0.1, asr
    # the calibration kept the stored length and roughly the stored direction
    summary = erased.details["replay_summary"]
    assert 0.7 <= summary["mean_ratio"] <= 1.4
    assert summary["mean_cosine"] > 0.5
    # and its predictions are about as far from retraining's as a second retraining's are
    floor = kl_divergence(p_ret, predict(UNLEARNERS.get("retrain")(variant=1)
                                         .unlearn(ctx).model)(test.x))
    # measured: accuracy 0.872 retrain / 0.890 FedEraser, KL 0.092 against a floor of 0.188
    assert kl_divergence(p_ret, p_fe) <= 3 * floor
