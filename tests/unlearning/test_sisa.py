"""SISA (Bourtoule et al., IEEE S&P 2021) and centralized retraining: exactness against an
ensemble trained without the removed points, checkpoint reuse, cost accounting, aggregation,
and both methods through the unlearning protocol."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_config
from sklearn.datasets import load_digits

from fedunlearn.models import build_model
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import LocalTraining, local_training, train
from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning import UNLEARNERS, UnlearningContext, UnlearningResult
from fedunlearn.unlearning.centralized.central_retrain import CentralRetrain
from fedunlearn.unlearning.centralized.sisa import (
    Sisa,
    SisaEnsemble,
    SisaRandom,
    aggregate_probabilities,
    assign_shards,
)

SPEC = LocalTraining(batch_size=32, learning_rate=0.1)
N = 480


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.data[:N] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, d.target[:N].astype(np.int64), np.arange(N)


def mlp():
    return build_model("mlp", (1, 8, 8), 10, seed=0)


def ensemble(shards: int = 3, slices: int = 3, epochs: float = 2.0, **kw) -> SisaEnsemble:
    return SisaEnsemble(mlp, SPEC, shards=shards, slices=slices, epochs=epochs, seed=11, **kw)


def assert_same_ensemble(a: SisaEnsemble, b: SisaEnsemble, x: np.ndarray) -> None:
    for pa, pb in zip(a.shard_params(), b.shard_params(), strict=True):
        assert (pa is None) == (pb is None)
        if pa is not None:
            assert list(pa) == list(pb)
            assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert np.array_equal(a.predict_proba(x), b.predict_proba(x))


# --- exactness ----------------------------------------------------------------------------


def test_removing_a_group_equals_training_without_it_and_retrains_one_shard(digits):
    x, y, ids = digits
    groups = ids // 80  # six "clients" of 80 samples, dealt to 3 shards
    a = ensemble().fit(x, y, ids, groups=groups)
    before = a.shard_params()
    gone = ids[groups == 2]
    shard = a.assignment_[int(gone[0])][0]
    assert {a.assignment_[int(i)][0] for i in gone} == {shard}  # a group lies in one shard
    stats = a.remove(gone)
    b = ensemble().fit(x, y, ids, groups=groups, exclude=gone)
    assert_same_ensemble(a, b, x)
    assert stats["shards_retrained"] == 1
    # the group is spread over every slice of its shard: all of its slices are retrained,
    # every slice of the other shards is taken from the store
    assert stats["slices_retrained"] == 3 and stats["slices_reused"] == 2 * 3
    after = a.shard_params()
    for s in range(3):
        assert (after[s] is before[s]) == (s != shard)
    assert not np.isin(gone, a.retained_ids()).any()
    with pytest.raises(ValueError, match="already removed"):
        a.remove(gone[:1])


def test_random_sharding_removal_is_exact_and_touches_only_the_shards_holding_the_ids(digits):
    x, y, ids = digits
    a = ensemble(shards=4, slices=2).fit(x, y, ids)
    by_shard = {s: [i for i in ids if a.assignment_[int(i)][0] == s] for s in range(4)}
    assert all(abs(len(v) - N / 4) <= 1 for v in by_shard.values())
    gone = np.array(by_shard[0][:2] + by_shard[2][5:7] + by_shard[3][-1:])
    expected = len({a.assignment_[int(i)][0] for i in gone})
    assert expected == 3
    before = a.shard_params()
    stats = a.remove(gone)
    assert stats["shards_retrained"] == expected
    assert stats["slices_reused"] >= (4 - expected) * 2
    assert a.shard_params()[1] is before[1]
    # the assignment depends on the ids, not on the order of the arrays
    perm = np.random.default_rng(0).permutation(N)
    b = ensemble(shards=4, slices=2).fit(x[perm], y[perm], ids[perm], exclude=gone)
    assert b.assignment_ == a.assignment_
    assert_same_ensemble(a, b, x)


def test_removing_unknown_ids_raises_one_line(digits):
    x, y, ids = digits
    e = ensemble(shards=1, slices=1, epochs=0.1).fit(x[:40], y[:40], ids[:40])
    with pytest.raises(ValueError, match=r"\[40, 99\]") as err:
        e.remove([3, 40, 99])
    assert "\n" not in str(err.value)
    assert len(e.retained_ids()) == 40  # nothing was removed


# --- checkpoint reuse and cost ------------------------------------------------------------


def test_removing_from_the_last_slice_retrains_one_slice(digits):
    x, y, ids = digits
    a = ensemble(shards=2, slices=3).fit(x, y, ids)
    last = [i for i in ids if a.assignment_[int(i)] == (1, 3)][:2]
    bytes_before = a.checkpoint_bytes()
    stats = a.remove(last)
    assert stats["shards_retrained"] == 1
    assert stats["slices_retrained"] == 1 and stats["slices_reused"] == 2 * 3 - 1
    assert a.checkpoint_bytes() == bytes_before  # the stale checkpoint was replaced


def test_slice_epochs_and_sample_epochs_accounting(digits):
    x, y, ids = digits
    e = ensemble(shards=1, slices=3, epochs=2.0).fit(x[:12], y[:12], ids[:12])
    assert e.slice_epochs_ == 2 * 2.0 / (3 + 1) == 1.0
    assert [len(p) for p in e.slices_[0]] == [4, 4, 4]
    # slice i trains on i·4 samples for e' = 1 epoch: 4 + 8 + 12 = 24 = 12 samples × 2 epochs
    assert e.fit_stats_["sample_epochs"] == 24.0 == 12 * 2.0
    second = int(e.slices_[0][1][0])
    stats = e.remove([second])
    # slices 2 and 3 retrain on 7 and 11 samples
    assert stats["sample_epochs"] == 7.0 + 11.0
    assert stats["slices_retrained"] == 2 and stats["slices_reused"] == 1
    assert ensemble(slices=4, epochs=1.0).slice_epochs_ == pytest.approx(0.4)


def test_checkpoints_on_disk_are_reused_by_a_new_ensemble(digits, tmp_path):
    x, y, ids = digits
    a = ensemble(shards=2, slices=2, epochs=1.0, checkpoint_dir=tmp_path).fit(x, y, ids)
    assert len(list(tmp_path.glob("*.npz"))) == 4
    b = ensemble(shards=2, slices=2, epochs=1.0, checkpoint_dir=tmp_path).fit(x, y, ids)
    assert b.fit_stats_["slices_retrained"] == 0 and b.fit_stats_["slices_reused"] == 4
    assert_same_ensemble(a, b, x)


# --- aggregation --------------------------------------------------------------------------


def test_vote_and_mean_aggregation_by_hand():
    p1 = np.array([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    p2 = np.array([[0.1, 0.9, 0.0], [0.1, 0.3, 0.6], [0.0, 0.4, 0.6]])
    vote = aggregate_probabilities([p1, p2], "vote")
    mean = aggregate_probabilities([p1, p2], "mean")
    # row 0: one vote each for classes 0 and 1 (tie → class 0); the mean prefers class 1
    assert vote[0].tolist() == [0.5, 0.5, 0.0] and vote[0].argmax() == 0
    assert np.allclose(mean[0], [0.35, 0.65, 0.0]) and mean[0].argmax() == 1
    # row 1: both vote class 2; row 2: p1's own tie goes to class 0, p2 votes class 2
    assert vote[1].tolist() == [0.0, 0.0, 1.0]
    assert vote[2].tolist() == [0.5, 0.0, 0.5]
    assert np.allclose(vote.sum(1), 1.0) and np.allclose(mean.sum(1), 1.0)
    with pytest.raises(ValueError, match="vote, mean"):
        aggregate_probabilities([p1], "median")


def test_empty_shards_keep_no_model_and_are_skipped(digits):
    x, y, ids = digits
    groups = (ids >= 40).astype(int)[:80]  # two groups, three shards: one shard stays empty
    assert sum(len(s) == 0 for s in assign_shards(ids[:80], 3, 11, groups)) == 1
    e = ensemble(shards=3, slices=2, epochs=0.5, aggregate="mean")
    e.fit(x[:80], y[:80], ids[:80], groups=groups)
    assert sum(p is None for p in e.shard_params()) == 1
    p = e.predict_proba(x[:10])
    assert p.shape == (10, 10) and np.allclose(p.sum(1), 1.0)
    stats = e.remove(ids[:40])  # empties a second shard
    assert stats["shards_retrained"] == 1 and stats["slices_retrained"] == 0
    assert sum(p is None for p in e.shard_params()) == 2
    assert np.allclose(e.predict_proba(x[:10]).sum(1), 1.0)


# --- through the protocol -----------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    return prepare(small_config())


def central_ctx(setup, targets=(), removed=frozenset()) -> UnlearningContext:
    return UnlearningContext(cfg=setup.cfg, targets=tuple(targets), removed=frozenset(removed),
                             model=setup.initial, initial=setup.initial, history=None,
                             federation=None, data=setup.data, build_model=setup.build_model,
                             seed=0)


def test_centralized_methods_are_registered():
    for name, cls in [("sisa", Sisa), ("sisa_random", SisaRandom),
                      ("central_retrain", CentralRetrain)]:
        assert UNLEARNERS.get(name) is cls
        assert cls.setting == "centralized" and hasattr(cls, "fit")
    assert SisaRandom().shard_by == "random" and Sisa().shard_by == "client"


@pytest.mark.parametrize("bad", [{"shards": 0}, {"slices": 1.5}, {"epochs": 0},
                                 {"shard_by": "label"}, {"aggregate": "median"},
                                 {"learning_rate": -1.0}])
def test_sisa_rejects_bad_params(bad):
    with pytest.raises(ValueError) as err:
        Sisa(**bad).check()
    assert "\n" not in str(err.value)
    if "shard_by" in bad:
        assert "client, random" in str(err.value)


def test_unknown_params_raise():
    with pytest.raises(TypeError):
        UNLEARNERS.get("sisa")(depth=3)
    with pytest.raises(TypeError):
        UNLEARNERS.get("central_retrain")(shards=3)
    with pytest.raises(ValueError):
        CentralRetrain(variant=-1).check()


def test_sisa_through_the_protocol(setup):
    data = setup.data
    sizes = [len(d) for d in data.clients]
    sisa = Sisa(shards=2, slices=2, epochs=1.0, learning_rate=0.2).fit(central_ctx(setup))
    x_test = data.test.x
    original = sisa.predict_proba_original(x_test)
    assert original.shape == (len(x_test), data.num_classes)
    first = sisa.unlearn(central_ctx(setup, (0,), {0}))
    assert isinstance(first, UnlearningResult)
    assert first.model is None and first.predict_proba is not None
    assert first.details["shards_retrained"] == 1  # four clients, each within one shard
    assert first.details["shards"] == 2 and first.details["slices"] == 2
    assert first.details["shard_by"] == "client" and first.details["checkpoint_bytes"] > 0
    assert 0 < first.cost.sample_epochs <= (sum(sizes) - sizes[0]) * 1.0
    retained = sisa.ensemble_.retained_ids()
    assert len(retained) == sum(sizes) - sizes[0] and retained.min() >= sizes[0]
    after_first = first.predict_proba(x_test)
    # the second request continues from the first; the first result stays frozen
    second = sisa.unlearn(central_ctx(setup, (1,), {0, 1}))
    assert len(sisa.ensemble_.retained_ids()) == sum(sizes[2:])
    assert np.array_equal(first.predict_proba(x_test), after_first)
    assert np.array_equal(sisa.predict_proba_original(x_test), original)
    assert np.allclose(second.predict_proba(x_test).sum(1), 1.0)
    with pytest.raises(ValueError, match="already removed"):
        sisa.unlearn(central_ctx(setup, (0,), {0, 1}))


def test_central_retrain_through_the_protocol(setup):
    cfg, data = setup.cfg, setup.data
    sizes = [len(d) for d in data.clients]
    method = CentralRetrain(epochs=1.0).fit(central_ctx(setup))
    assert method.original_samples_ == sum(sizes)
    p = method.predict_proba_original(data.test.x)
    assert p.shape == (len(data.test.x), data.num_classes)
    result = method.unlearn(central_ctx(setup, (0,), {0}))
    assert isinstance(result, UnlearningResult) and result.predict_proba is None
    assert list(result.model) == list(setup.initial)
    assert result.details["samples"] == sum(sizes) - sizes[0]
    assert result.cost.sample_epochs == (sum(sizes) - sizes[0]) * 1.0
    # oracle: plain training on the pooled data of clients 1..3 from the initial weights
    model = setup.build_model()
    pooled = data.pooled(exclude={0})
    train(model, pooled.x, pooled.y, local_training(cfg, 1.0),
          seed=derive_seed(cfg.seed, 0xCE17, 0))
    oracle = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert all(np.array_equal(result.model[k], oracle[k]) for k in oracle)
    # the next request retrains without every removed client; the original is unchanged
    second = method.unlearn(central_ctx(setup, (1,), {0, 1}))
    assert second.details["samples"] == sum(sizes[2:])
    assert np.array_equal(method.predict_proba_original(data.test.x), p)
    # another variant is another initialisation and shuffling
    other = CentralRetrain(epochs=1.0, variant=1).unlearn(central_ctx(setup, (0,), {0}))
    assert any(not np.array_equal(other.model[k], result.model[k]) for k in oracle)
