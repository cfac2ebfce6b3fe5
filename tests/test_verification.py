"""The verification suite on a served request: every row carries every metric, distances are
measured against the setting's retraining, and the noise floor is a second retraining."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.evaluation.verify import RequestVerifier
from fedunlearn.experiment import prepare, train_federation
from fedunlearn.federation.inprocess import InProcessFederation
from fedunlearn.history import HistoryStore
from fedunlearn.lineage import LineageLog
from fedunlearn.unlearning.service import serve_requests

CFG = ["data.num_clients=5", "training.rounds=6", "training.local_epochs=2",
       "training.learning_rate=0.2", "training.momentum=0.5", "history.retention_interval=2",
       "backdoor.clients=[0]", "backdoor.fraction=0.8", "unlearning.requests=[[0]]",
       "unlearning.methods=[\"retrain\", \"fedaccum\", \"distillation\"]",
       "verification.mia_shadows=2", "verification.shadow_epochs=5"]

ALL = {"test_accuracy", "retain_accuracy", "forget_accuracy", "backdoor_asr",
       "backdoor_p_value", "backdoor_trigger_active", "mia_loss_auc", "mia_loss_tpr_at_1fpr",
       "mia_lira_auc", "mia_lira_tpr_at_1fpr", "acc_err", "acc_dis", "param_distance",
       "kl_forget", "kl_test", "pred_diff_forget", "pred_diff_test"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = small_config(*CFG)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    path = tmp_path_factory.mktemp("v")
    store = HistoryStore.create(path / "history", retention_interval=2)
    run = train_federation(fed, setup, store, progress=False)
    out = serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                         store=store, federation=fed, lineage=LineageLog(path),
                         build_model=setup.build_model, predictor=setup.predictor(),
                         stream=None)
    return cfg, setup, fed, {r.method: r for r in out.rows}


def test_every_row_carries_every_metric(served):
    _, _, _, rows = served
    assert list(rows) == ["original", "retrain", "retrain_seed2", "fedaccum", "distillation"]
    assert [r.role for r in rows.values()] == ["original", "reference", "noise_floor", "method",
                                               "method"]
    for row in rows.values():
        assert set(row.metrics) == ALL, row.method
        assert row.setting == "federated"


def test_distances_are_to_retraining_and_the_noise_floor_is_a_second_retraining(served):
    _, _, _, rows = served
    ref = rows["retrain"].metrics
    for key in ("param_distance", "kl_forget", "kl_test", "pred_diff_forget", "pred_diff_test",
                "acc_err", "acc_dis"):
        assert ref[key] == 0.0, key
    floor = rows["retrain_seed2"].metrics
    assert floor["param_distance"] > 0.1 and floor["kl_test"] > 0
    assert rows["retrain_seed2"].model_hash != rows["retrain"].model_hash
    # the original model is further from retraining on the forgotten data than the floor
    assert rows["original"].metrics["kl_forget"] > floor["kl_forget"]


def test_backdoor_decision_and_membership_follow_the_data(served):
    _, _, _, rows = served
    orig, ret = rows["original"].metrics, rows["retrain"].metrics
    assert orig["backdoor_asr"] > 0.5 and orig["backdoor_trigger_active"] is True
    assert orig["backdoor_p_value"] < 1e-6
    assert ret["backdoor_trigger_active"] is False and ret["backdoor_p_value"] > 0.01
    # the forgotten (backdoored) samples are members of the original, not of the retraining
    assert orig["mia_loss_auc"] > ret["mia_loss_auc"] + 0.1
    assert orig["mia_lira_auc"] > ret["mia_lira_auc"] + 0.1


def test_cost_counts_bytes_exchanged(served):
    _, setup, _, rows = served
    model_bytes = sum(v.nbytes for v in setup.initial.values())
    r = rows["retrain"]
    # every retraining message carries the model down and a model back up
    assert r.bytes_exchanged == 2 * model_bytes * r.messages_sent
    assert rows["distillation"].bytes_exchanged == 0 and rows["distillation"].messages_sent == 0
    assert rows["distillation"].server_epochs > 0


def test_verifier_samples_balanced_members_and_nonmembers(served):
    _, setup, _, _ = served
    v = RequestVerifier(setup.data, targets=(0,), removed={0}, target_class=0, seed=3)
    assert len(v.member_idx) == len(v.nonmember_idx) == min(len(setup.data.clients[0]),
                                                            len(setup.data.test))
    again = RequestVerifier(setup.data, targets=(0,), removed={0}, target_class=0, seed=3)
    assert np.array_equal(v.nonmember_idx, again.nonmember_idx)
