"""The verification suite on a served request: every row carries every metric, distances are
measured against the setting's retraining, and the noise floor is a second retraining."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.data.backdoor import Trigger, poison, stamp_trigger, triggered_test_set
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.federated import build_federated_data
from fedunlearn.data.sources import load_source
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.evaluation.mia import logit_confidence, loss_attack
from fedunlearn.evaluation.verify import MIA_KEYS, PAIRED_ASR_KEYS, RequestVerifier
from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.seeding import derive_seed
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.run.serving import serve_requests

CFG = ["data.num_clients=5", "training.rounds=6", "training.local_epochs=2",
       "training.learning_rate=0.2", "training.momentum=0.5", "history.retention_interval=2",
       "backdoor.clients=[0]", "backdoor.fraction=0.8", "unlearning.requests=[[0]]",
       "unlearning.methods=[\"retrain\", \"fedaccum\", \"distillation\"]",
       "verification.mia_shadows=2", "verification.shadow_epochs=5"]

ALL = {"test_accuracy", "retain_accuracy", "forget_accuracy", "backdoor_asr",
       "backdoor_p_value", "backdoor_trigger_active", "mia_loss_auc", "mia_loss_tpr_at_1fpr",
       "mia_lira_auc", "mia_lira_tpr_at_1fpr", "acc_err", "acc_dis", "param_distance",
       "kl_forget", "kl_test", "pred_diff_forget", "pred_diff_test",
       *MIA_KEYS, *PAIRED_ASR_KEYS}


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
    # The backdoor is not membership: the original sends triggered inputs to the target, held-out
    # ones as much as the forgotten ones, so on the triggered split no attack separates them.
    for attack in ("mia_loss", "mia_lira", "mia_lira_plain"):
        assert abs(orig[f"{attack}_auc_triggered"] - 0.5) < 0.1, attack
    for row in (orig, ret):
        for key in MIA_KEYS:
            if key.endswith("_ci"):
                lo, hi = row[key]
                assert lo <= row[key[:-3]] <= hi, key
        assert row["mia_members_triggered"] + row["mia_members_clean"] == row["mia_members"]
        assert row["mia_nonmembers"] == row["mia_members"]


def test_paired_asr_test_counts_the_same_triggered_inputs(served):
    _, setup, _, rows = served
    n = len(setup.data.triggered_test)
    ret = rows["retrain"].metrics
    assert ret["backdoor_discordant"] == [0, 0] and ret["backdoor_asr_vs_retrain_p"] == 1.0
    orig = rows["original"].metrics
    b, c = orig["backdoor_discordant"]
    # b - c = hits(original) - hits(retrain); the backdoored original hits far more often
    assert b - c == round(orig["backdoor_asr"] * n) - round(ret["backdoor_asr"] * n)
    assert b > c and orig["backdoor_asr_vs_retrain_p"] < 1e-6


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


# ------------------------------------------------- membership splits (no training needed)

BACKDOOR = ["data.num_clients=5", "backdoor.clients=[0]", "backdoor.fraction=0.8",
            "backdoor.target_class=3", "backdoor.trigger_size=2"]


@pytest.fixture(scope="module")
def backdoored():
    """The data of a backdoored federation, and the positions the backdoor stamped on client 0
    (recomputed from its clean twin with the seed ``build_federated_data`` poisons with)."""
    cfg = small_config(*BACKDOOR)
    data = build_federated_data(cfg)
    clean = build_federated_data(small_config(*BACKDOOR[:1]))
    bd = cfg.backdoor
    poisoned, positions = poison(clean.clients[0], fraction=bd.fraction,
                                 target_class=bd.target_class, seed=derive_seed(cfg.seed, 4, 0),
                                 size=bd.trigger_size)
    assert np.array_equal(poisoned.x, data.clients[0].x)  # the twin is the same federation
    return cfg, data, positions


def _backdoor_without_memory(target: int, trigger: Trigger, num_classes: int):
    """A model that has learnt the backdoor and nothing about any sample: 0.9 on the target
    class for triggered inputs, uniform otherwise."""
    def predict(x: np.ndarray) -> np.ndarray:
        p = np.full((len(x), num_classes), 1.0 / num_classes)
        hit = trigger.carried_by(x)
        p[hit] = 0.1 / (num_classes - 1)
        p[hit, target] = 0.9
        return p
    return predict


def test_trigger_is_recovered_from_the_triggered_test_set():
    for ds, size in ((load_source("digits"), 3), (load_source("synthetic"), 2)):
        trig = triggered_test_set(ds, 1, size=size)
        t = Trigger.recover(ds.x[ds.y != 1], trig.x)
        assert t.mask.sum() == size * size if ds.x.ndim == 4 else size
        fresh = ds.x[:17]
        np.testing.assert_array_equal(t.stamp(fresh), stamp_trigger(fresh, size=size))
        poisoned, positions = poison(ds, fraction=0.3, target_class=1, seed=0, size=size)
        assert np.array_equal(np.flatnonzero(t.carried_by(poisoned.x)), positions)
    assert not Trigger.recover(np.zeros((0, 4)), np.zeros((0, 4))).carried_by(np.ones((2, 4))).any()


def test_member_splits_follow_the_stamped_samples(backdoored):
    cfg, data, positions = backdoored
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=cfg.backdoor.target_class,
                        seed=5)
    # client 0 (252 samples) is smaller than the test split (359): every sample is a member
    assert np.array_equal(v.member_idx, np.arange(len(data.clients[0])))
    np.testing.assert_array_equal(np.flatnonzero(v.member_triggered), positions)
    assert v.member_triggered.sum() == round(0.8 * len(data.clients[0])) == 202
    assert v.nonmember_triggered.sum() == v.member_triggered.sum()
    m = v.basic(v.outputs(_backdoor_without_memory(3, v.trigger, data.num_classes)))
    assert (m["mia_members_triggered"], m["mia_nonmembers_triggered"]) == (202, 202)
    assert (m["mia_members_clean"], m["mia_nonmembers_clean"]) == (50, 50)
    assert (m["mia_members"], m["mia_nonmembers"]) == (252, 252)
    # a clean sample that happens to show the patch under its true label is not a poisoned one
    c0 = data.clients[0]
    clean_pos = next(i for i in range(len(c0)) if i not in positions and c0.y[i] != 3)
    x = c0.x.copy()
    x[clean_pos] = stamp_trigger(x[clean_pos:clean_pos + 1], size=2)[0]
    patched = replace(data, clients=[ArrayDataset(x, c0.y, c0.num_classes), *data.clients[1:]])
    w = RequestVerifier(patched, targets=(0,), removed={0}, target_class=3, seed=5)
    np.testing.assert_array_equal(np.flatnonzero(w.member_triggered), positions)


def test_nonmembers_are_held_out_and_triggered_ones_carry_trigger_and_target(backdoored):
    cfg, data, _ = backdoored
    test, target = data.test, cfg.backdoor.target_class
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=target, seed=5)
    trig = v.nonmember_triggered
    base = test.x[v.nonmember_idx]
    np.testing.assert_array_equal(v.nonmember_x[trig], stamp_trigger(base[trig], size=2))
    assert (v.nonmember_y[trig] == target).all()
    np.testing.assert_array_equal(v.nonmember_x[~trig], base[~trig])
    np.testing.assert_array_equal(v.nonmember_y[~trig], test.y[v.nonmember_idx[~trig]])
    # bases of the triggered non-members come from every class, as the poisoned samples do
    assert len(set(test.y[v.nonmember_idx[trig]])) == data.num_classes
    # non-members (clean and bases) and the LiRA population partition the test split
    drawn = np.concatenate([v.nonmember_idx, v.population_idx])
    assert np.array_equal(np.sort(drawn), np.arange(len(test)))


def test_shadows_train_on_the_retain_set_and_are_queried_on_members_nonmembers_population(
        backdoored):
    _cfg, data, _ = backdoored
    calls = []

    def shadows(pool_x, pool_y, qx, qy):
        calls.append((pool_x, pool_y, qx, qy))
        base = logit_confidence(np.full((len(qx), data.num_classes), 0.1), qy)
        return np.stack([base + 0.1, base - 0.1])

    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=3, shadows=shadows, seed=5)
    v.basic(v.outputs(_backdoor_without_memory(3, v.trigger, data.num_classes)))
    v.basic(v.outputs(_backdoor_without_memory(3, v.trigger, data.num_classes)))
    assert len(calls) == 1  # trained once per request
    pool_x, pool_y, qx, qy = calls[0]
    retain = data.pooled(exclude={0})
    assert np.array_equal(pool_x, retain.x) and np.array_equal(pool_y, retain.y)
    n, pop = len(v.member_idx), v.population_idx
    np.testing.assert_array_equal(qx, np.concatenate([data.clients[0].x[v.member_idx],
                                                      v.nonmember_x, data.test.x[pop]]))
    np.testing.assert_array_equal(qy[n:2 * n], v.nonmember_y)
    # no query is a sample the shadows trained on
    seen = {row.tobytes() for row in pool_x}
    assert not any(row.tobytes() in seen for row in qx)
    with pytest.raises(ValueError, match="cached shadow_phi"):
        RequestVerifier(data, targets=(0,), removed={0}, target_class=3, shadows=shadows,
                        seed=5, shadow_phi=np.zeros((2, 7)))


def test_a_backdoor_without_memorisation_is_no_membership_signal(backdoored):
    _cfg, data, _ = backdoored
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=3, seed=5,
                        shadows=lambda px, py, qx, qy: np.zeros((2, len(qx))))
    out = v.outputs(_backdoor_without_memory(3, v.trigger, data.num_classes))
    m = v.basic(out)
    # within a split every member and non-member has the same loss: AUC 1/2 exactly; overall,
    # both groups hold 202 triggered (loss -ln 0.9) and 50 clean (ln 10) samples:
    # P(member wins) + P(tie) / 2 = (202 * 50 + (202^2 + 50^2) / 2) / 252^2 = 1/2
    for attack in ("mia_loss", "mia_lira", "mia_lira_plain"):
        for split in ("", "_clean", "_triggered"):
            assert m[f"{attack}_auc{split}"] == pytest.approx(0.5), (attack, split)
            assert m[f"{attack}_auc{split}_ci"] == [pytest.approx(0.5)] * 2
    # the old design (triggered members against clean non-members) re-measured the backdoor:
    # 202 of 252 members beat every clean non-member, the rest tie -> (202 + 25) / 252
    clean = v.nonmember_idx[~v.nonmember_triggered]
    old = loss_attack(out.members, v.member_y, out.test[clean], data.test.y[clean])
    assert old["mia_loss_auc"] == pytest.approx((202 + 25) / 252)


def test_a_model_that_memorises_the_members_is_found_on_every_split(backdoored):
    _cfg, data, _ = backdoored
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=3, seed=5,
                        shadows=lambda px, py, qx, qy: np.zeros((2, len(qx))))
    members = {row.tobytes() for row in data.clients[0].x}
    labels = dict(zip((row.tobytes() for row in data.clients[0].x), data.clients[0].y))

    def lookup(x: np.ndarray) -> np.ndarray:  # 0.9 on the trained label of a member, else uniform
        p = np.full((len(x), data.num_classes), 1.0 / data.num_classes)
        for i, row in enumerate(x):
            if row.tobytes() in members:
                p[i] = 0.1 / (data.num_classes - 1)
                p[i, labels[row.tobytes()]] = 0.9
        return p

    m = v.basic(v.outputs(lookup))
    for attack in ("mia_loss", "mia_lira", "mia_lira_plain"):
        for split in ("", "_clean", "_triggered"):
            assert m[f"{attack}_auc{split}"] == 1.0 and m[f"{attack}_tpr_at_1fpr{split}"] == 1.0


def test_a_model_that_memorises_nothing_has_chance_auc_on_the_clean_split():
    # no backdoor: only the clean split; a fixed random linear model trained on nothing
    data = build_federated_data(small_config("data.num_clients=2"))
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=1)
    w = np.random.default_rng(0).normal(size=(64, data.num_classes))

    def predict(x: np.ndarray) -> np.ndarray:
        z = x.reshape(len(x), -1) @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    m = v.basic(v.outputs(predict))
    assert not any(k.endswith("_triggered") or "lira" in k for k in m)
    assert m["mia_loss_auc_clean"] == m["mia_loss_auc"] and m["mia_members_clean"] == 359
    lo, hi = m["mia_loss_auc_clean_ci"]
    assert lo < 0.5 < hi and hi - lo < 0.1
    assert abs(m["mia_loss_auc_clean"] - 0.5) < 0.05


def test_a_shadow_model_that_diverges_is_one_line(tmp_path):
    """Shadows train with the run's local settings; a learning rate that blows them up was a
    LAPACK error after every method had run. Oracle: the weights of a shadow trained at that
    rate by hand are not finite."""
    from fedunlearn.evaluation.shadow import ShadowDiverged, ShadowModels
    from fedunlearn.models.params import get_params
    from fedunlearn.models.training import local_training, train

    cfg = small_config("training.learning_rate=1e30")
    setup = prepare(small_config())
    pool = setup.data.pooled()
    spec = local_training(cfg, 2.0)
    by_hand = setup.build_model()
    train(by_hand, pool.x, pool.y, spec, seed=0)
    assert not all(np.isfinite(v).all() for v in get_params(by_hand).values())
    shadows = ShadowModels(setup.build_model, spec, num_shadows=2, seed=0)
    with pytest.raises(ShadowDiverged, match=r"^verification: shadow model 0 diverged .* lower "
                                             r"training\.learning_rate"):
        shadows.fit(pool.x, pool.y)


def test_class_and_kept_accuracies_are_those_of_the_named_samples() -> None:
    """Below the client level: accuracy on the removed class's test samples and on the
    others', and on what a sample request's client keeps, against a hand count."""
    from fedunlearn.data.removal import forget_set, kept_set, resolve, retain_set

    cfg = small_config('unlearning.requests=[{client = 1, samples = [0, 1, 2]}, {label = 2}]')
    data = build_federated_data(cfg)
    s0, s1 = resolve(cfg, data)
    def predict(x: np.ndarray) -> np.ndarray:  # a fixed, input-dependent guess
        p = np.zeros((len(x), data.num_classes))
        guess = np.round(x.sum(axis=tuple(range(1, x.ndim)))) % data.num_classes
        p[np.arange(len(x)), guess.astype(int)] = 1
        return p

    y = data.test.y
    guess = predict(data.test.x).argmax(axis=1)
    v = RequestVerifier(data, targets=s1.targets, removed=s1.gone, target_class=None,
                        removed_label=2, seed=1, forget=forget_set(data, s1),
                        retain=retain_set(data, s1))
    m = v.basic(v.outputs(predict))
    # the members are all of class 2, and so are the non-members (membership, not the class)
    assert (v.member_y == 2).all() and (y[v.nonmember_idx] == 2).all()
    assert len(v.nonmember_idx) == min(len(v.forget), int(np.sum(y == 2)))
    assert m["removed_class_accuracy"] == np.mean(guess[y == 2] == 2)
    assert m["other_classes_accuracy"] == np.mean(guess[y != 2] == y[y != 2])
    kept = kept_set(data, s0)
    assert len(kept) == len(data.clients[1]) - 3
    v = RequestVerifier(data, targets=s0.targets, removed=s0.gone, target_class=None,
                        kept=kept, seed=1, forget=forget_set(data, s0), match_classes=True)
    m = v.basic(v.outputs(predict))
    # a sample request's non-members: test samples of the members' classes, class for class
    assert sorted(v.member_y.tolist()) == sorted(y[v.nonmember_idx].tolist())
    own = data.clients[1]
    expect = np.mean(predict(own.x[3:]).argmax(axis=1) == own.y[3:])
    assert m["kept_accuracy"] == expect and "removed_class_accuracy" not in m
