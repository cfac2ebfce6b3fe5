"""Verification and distillation that scale: bounded, seeded, reported samples whose estimates
agree with the full computation within sampling error, shadows trained once per seed, and a
distillation step budget that bounds the optimizer steps (counted)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import small_config

from fedunlearn.data.federated import build_federated_data
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.evaluation import shadow as shadow_module
from fedunlearn.evaluation.mia import roc_auc
from fedunlearn.evaluation.shadow import ShadowModels, shadow_sample, shadow_sample_size
from fedunlearn.evaluation.verify import RequestVerifier
from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.training import OPTIMIZERS, local_training
from fedunlearn.reporting import report_markdown, verification_line, verification_summary
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.run.serving import serve_requests
from fedunlearn.run.verification import verification_block
from fedunlearn.unlearning.base import UnlearningContext
from fedunlearn.unlearning.federated.distillation import Distillation

FIVE = ["data.num_clients=5"]


@pytest.fixture(scope="module")
def data():
    return build_federated_data(small_config(*FIVE))


# ------------------------------------------------------------ bounded, seeded, reported

def test_members_and_population_are_bounded_seeded_and_reported(data):
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=5,
                        max_members=20, max_population=30)
    assert len(v.member_idx) == len(v.nonmember_idx) == 20
    assert len(v.population_idx) == 30
    assert v.sizes == {"members": 20, "members_available": len(data.clients[0]),
                       "nonmembers": 20, "population": 30,
                       "population_available": len(data.test) - 20,
                       "shadow_pool": len(data.pooled(exclude={0})), "test": len(data.test),
                       "retain": len(data.pooled(exclude={0}))}
    # members, non-members and population are distinct positions of their splits
    assert len(set(v.member_idx)) == 20
    assert not set(v.nonmember_idx) & set(v.population_idx)
    again = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=5,
                            max_members=20, max_population=30)
    for a, b in ((v.member_idx, again.member_idx), (v.nonmember_idx, again.nonmember_idx),
                 (v.population_idx, again.population_idx)):
        np.testing.assert_array_equal(a, b)
    other = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=6,
                            max_members=20, max_population=30)
    assert not np.array_equal(v.member_idx, other.member_idx)
    # a cap that does not bind leaves the draws of an uncapped verifier unchanged
    free = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=5)
    loose = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=5,
                            max_members=10**6, max_population=10**6)
    for a, b in ((free.member_idx, loose.member_idx), (free.nonmember_idx, loose.nonmember_idx),
                 (free.population_idx, loose.population_idx)):
        np.testing.assert_array_equal(a, b)


def test_the_metrics_count_the_bounded_members(data):
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=5,
                        max_members=20, max_population=30, resamples=20)
    m = v.basic(v.outputs(lambda x: np.full((len(x), data.num_classes), 0.1)))
    assert m["mia_members"] == m["mia_nonmembers"] == 20


def _scored_model(data, member_shift: float, seed: int = 0):
    """A 'model' whose probability of the true class is sigmoid(s): s ~ N(shift, 1) on client
    0's samples (the members) and N(0, 1) on the test split. The loss attack's AUC is then the
    AUC of s, Φ(shift / √2) in the population."""
    rng = np.random.default_rng(seed)
    table = {}
    for split, shift in ((data.test, 0.0), (data.clients[0], member_shift)):
        for row, y, s in zip(split.x, split.y, rng.normal(shift, 1.0, len(split))):
            table[row.tobytes()] = (int(y), float(s))
    c = data.num_classes

    def predict(x: np.ndarray) -> np.ndarray:
        p = np.full((len(x), c), 1.0 / c)
        for i, row in enumerate(x):
            hit = table.get(row.tobytes())
            if hit is not None:
                y, s = hit
                p_y = 1.0 / (1.0 + math.exp(-s))
                p[i] = (1.0 - p_y) / (c - 1)
                p[i, y] = p_y
        return p
    return predict


def _hanley_mcneil_se(auc: float, n_m: int, n_n: int) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n_m - 1) * (q1 - auc * auc)
                      + (n_n - 1) * (q2 - auc * auc)) / (n_m * n_n))


def test_subsampled_auc_agrees_with_the_full_computation_within_sampling_error(data):
    """Oracle: scores with a known distribution. The full computation (every member the data
    allow) and 40 seeded subsamples of 30 members: the subsample AUCs centre on the full AUC
    (within 3 standard errors of their mean) and spread as the Hanley-McNeil standard error of
    30 + 30 scores predicts (within a factor 1.6); the bootstrap intervals are about as wide
    as 1.96 of those errors."""
    predict = _scored_model(data, member_shift=1.0)
    full = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=0,
                           resamples=20)
    n_full = len(full.member_idx)
    assert n_full > 100
    full_auc = full.basic(full.outputs(predict))["mia_loss_auc"]
    assert full_auc == pytest.approx(0.5 * math.erfc(-1.0 / 2), abs=0.06)  # Φ(1/√2) = 0.760
    aucs, widths = [], []
    for seed in range(40):
        v = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=seed,
                            max_members=30, max_population=50, resamples=100)
        m = v.basic(v.outputs(predict))
        assert m["mia_members"] == 30
        aucs.append(m["mia_loss_auc"])
        widths.append(m["mia_loss_auc_ci"][1] - m["mia_loss_auc_ci"][0])
    se = _hanley_mcneil_se(full_auc, 30, 30)
    assert abs(np.mean(aucs) - full_auc) < 3 * se / math.sqrt(len(aucs))
    assert se / 1.6 < np.std(aucs) < 1.6 * se
    assert 2 * 1.96 * se / 1.6 < np.median(widths) < 2 * 1.96 * se * 1.6


def test_roc_auc_of_the_subsample_is_the_auc_of_the_drawn_members(data):
    """The scores behind the subsampled AUC are exactly the drawn members' and non-members'
    (no other sample leaks in)."""
    predict = _scored_model(data, member_shift=1.0)
    v = RequestVerifier(data, targets=(0,), removed={0}, target_class=None, seed=3,
                        max_members=25, resamples=20)
    out = v.outputs(predict)
    member_p = predict(data.clients[0].x[v.member_idx])[np.arange(25), v.member_y]
    non_p = predict(data.test.x[v.nonmember_idx])[np.arange(25), v.nonmember_y]
    assert v.basic(out)["mia_loss_auc"] == pytest.approx(roc_auc(np.log(member_p),
                                                                 np.log(non_p)))


# ------------------------------------------------------------------------ shadow models

def test_shadow_sample_is_bounded_seeded_and_the_old_half_without_a_cap():
    assert shadow_sample_size(1000, 30) == 30 and shadow_sample_size(41, 30) == 20
    a = shadow_sample(1000, 0, seed=7, max_samples=30)
    assert len(a) == 30 and len(set(a)) == 30 and a.max() < 1000
    np.testing.assert_array_equal(a, shadow_sample(1000, 0, seed=7, max_samples=30))
    assert not np.array_equal(a, shadow_sample(1000, 1, seed=7, max_samples=30))
    half = shadow_sample(1000, 0, seed=7)
    assert len(half) == 500
    np.testing.assert_array_equal(half, shadow_sample(1000, 0, seed=7, max_samples=500))


def test_shadows_train_on_the_bounded_sample_once_per_pool(data, monkeypatch):
    cfg = small_config(*FIVE)
    setup = prepare(cfg)
    sizes: list[int] = []
    real_train = shadow_module.train

    def spy(model, x, y, spec, *, seed):
        sizes.append(len(x))
        return real_train(model, x, y, spec, seed=seed)

    monkeypatch.setattr(shadow_module, "train", spy)
    bank = ShadowModels(setup.build_model, local_training(cfg, 1.0), num_shadows=3, seed=1,
                        max_samples=40)
    pool = data.pooled(exclude={0})
    q = data.test
    phi = bank(pool.x, pool.y, q.x[:9], q.y[:9])
    assert phi.shape == (3, 9) and sizes == [40, 40, 40] and bank.train_samples_ == 40
    # the same pool again (another request, another method): no training, same models
    np.testing.assert_array_equal(bank(pool.x, pool.y, q.x[:9], q.y[:9]), phi)
    assert bank.fits_ == 1 and len(sizes) == 3
    other = data.pooled(exclude={0, 1})
    bank(other.x, other.y, q.x[:9], q.y[:9])
    assert bank.fits_ == 2 and len(sizes) == 6


# --------------------------------------------------------------- through the service

TWO_REQUESTS = [*FIVE, "training.rounds=2", "unlearning.requests=[[0], [3]]",
                "unlearning.methods=[\"retrain\", \"distillation\"]",
                "verification.noise_floor=false", "verification.mia_shadows=2",
                "verification.shadow_epochs=2", "verification.shadow_samples=40",
                "verification.max_members=15", "verification.max_population=25",
                "verification.shadow_budget=0.05"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = small_config(*TWO_REQUESTS)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    path = tmp_path_factory.mktemp("vs")
    store = HistoryStore.create(path / "history", retention_interval=1)
    run = train_federation(fed, setup, store, progress=False)
    out = serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                         store=store, federation=fed, lineage=LineageLog(path),
                         build_model=setup.build_model, predictor=setup.predictor(),
                         stream=None, settings=("federated",))
    return cfg, setup, out


def test_verification_cost_and_sizes_are_reported_per_request(served):
    _cfg, setup, out = served
    v = out.verification
    assert [e["request"] for e in v] == [0, 1] and [e["clients"] for e in v] == [[0], [3]]
    pool = len(setup.data.pooled(exclude={0, 3}))  # clients outside every request
    for e in v:
        assert e["sizes"]["members"] == e["sizes"]["nonmembers"] == 15
        assert e["sizes"]["population"] == 25 and e["sizes"]["shadow_pool"] == pool
        assert e["shadows"] == 2 and e["shadow_train_samples"] == 40
        # the shadows' epochs are cut to 5 % of the retraining's sample-epochs (hand-computed:
        # 2 rounds x local epochs x every sample of the clients outside every request)
        retraining = 2 * _cfg.training.local_epochs * pool
        assert e["shadow_epochs"] == pytest.approx(0.05 * retraining / (2 * 40))
        assert 0 < e["shadow_epochs"] < 2
        assert e["shadow_threads"] == 1  # engine.num_cpus, as every client
        assert e["wall_s"] >= e["shadow_s"] >= 0
    # one set of shadows, trained for the first request, reused by the second
    assert [e["shadows_trained"] for e in v] == [True, False]
    assert v[0]["shadow_s"] > v[1]["shadow_s"]
    for row in out.rows:
        assert row.metrics["mia_members"] == 15 and row.metrics["mia_nonmembers"] == 15


def test_verification_block_line_and_report(served):
    cfg, _setup, out = served
    rows = [{"seed": 0, **r.__dict__} for r in out.rows]
    block = verification_block([{"seed": 0, **e} for e in out.verification], rows)
    assert block["total_s"] == pytest.approx(sum(e["wall_s"] for e in out.verification))
    assert block["retrain_s"] == pytest.approx(sum(r["wall_s"] for r in rows
                                                   if r["role"] == "reference"))
    results = {"config": cfg.to_dict(), "seed": 0, "seeds": [0],
               "training": {"rounds": [], "wall_s": 1.0}, "unlearning": rows,
               "summary": [], "verification": block}
    line = verification_line(results, 1)
    assert line is not None
    assert f"verification {out.verification[1]['wall_s']:.2f} s" in line
    assert "2 × 40 of" in line and "members 15 of" in line and "population 25 of" in line
    epochs = out.verification[1]["shadow_epochs"]
    assert f"samples × {epochs:.3g} epochs;" in line
    # two seeds whose shadows trained different epochs: the line gives both ends, not seed 0's
    two = {**results, "verification": {**block, "requests": [
        {**e, "seed": s, "shadow_epochs": x} for s, x in ((0, 7.473), (1, 7.59))
        for e in block["requests"]]}}
    assert "samples × 7.47–7.59 epochs;" in verification_line(two, 1)
    # seeds whose epochs print alike and whose shadows drew different sample counts
    alike = {**results, "verification": {**block, "requests": [
        {**e, "seed": s, "shadow_epochs": x, "shadow_train_samples": n}
        for s, x, n in ((0, 2.0018, 560), (1, 2.0, 577)) for e in block["requests"]]}}
    assert "2 × 560–577 of" in verification_line(alike, 1)
    assert "samples × 2 epochs;" in verification_line(alike, 1)
    one = {**results, "verification": {**block, "requests": [
        {**e, "shadow_epochs": 1.0} for e in block["requests"]]}}
    assert "samples × 1 epoch;" in verification_line(one, 1)
    assert verification_line(results, 7) is None
    assert verification_line({k: v for k, v in results.items() if k != "verification"},
                             0) is None
    assert "Cost of this verification: verification" in report_markdown(results)
    assert f"verification total {block['total_s']:.2f} s" in (verification_summary(results)
                                                               or "")


# ---------------------------------------------------------------- distillation budget

class _CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):  # type: ignore[override]
        _CountingSGD.steps += 1
        return super().step(closure)


if "counting_sgd" not in OPTIMIZERS:
    OPTIMIZERS.add("counting_sgd", _CountingSGD)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-round federation and its history (client 0's running sum is subtracted)."""
    cfg = small_config(*FIVE, "training.rounds=2")
    setup = prepare(cfg)
    store = HistoryStore.create(tmp_path_factory.mktemp("kd") / "history", retention_interval=2)
    run = train_federation(InProcessFederation(cfg, setup.evaluator()), setup, store,
                           progress=False)
    return setup, store, run.final


def _context(trained) -> UnlearningContext:
    setup, store, final = trained
    return UnlearningContext(cfg=setup.cfg, targets=(0,), removed=frozenset({0}), model=final,
                             initial=setup.initial, history=store, federation=None,
                             data=setup.data, build_model=setup.build_model, seed=11)


def test_max_steps_bounds_the_optimizer_steps(trained):
    setup = trained[0]
    n = len(setup.data.server.x)
    per_epoch = -(-n // 8)
    assert per_epoch * 3 > 7
    _CountingSGD.steps = 0
    result = Distillation(epochs=3, batch_size=8, optimizer="counting_sgd",
                          max_steps=7).unlearn(_context(trained))
    assert _CountingSGD.steps == 7 and result.details["steps"] == 7
    assert result.cost.server_epochs == pytest.approx(7 * 8 / n)
    _CountingSGD.steps = 0
    free = Distillation(epochs=3, batch_size=8, optimizer="counting_sgd",
                        max_steps=None).unlearn(_context(trained))
    assert _CountingSGD.steps == 3 * per_epoch == free.details["steps"]
    assert free.cost.server_epochs == pytest.approx(3.0)


def test_a_budget_that_does_not_bind_changes_nothing(trained):
    ctx = _context(trained)
    n = len(ctx.data.server.x)
    exact = 4 * -(-n // 8)
    a = Distillation(epochs=4, batch_size=8, max_steps=None).unlearn(ctx).model
    b = Distillation(epochs=4, batch_size=8, max_steps=exact).unlearn(ctx).model
    c = Distillation(epochs=4, batch_size=8, max_steps=exact - 1).unlearn(ctx).model
    assert a is not None and b is not None and c is not None
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_budget_is_refused(bad):
    with pytest.raises(ValueError, match="max_steps"):
        Distillation(max_steps=bad).check()


def test_capped_run_labels_its_batches_like_the_full_run(trained):
    """Under a binding cap the teacher labels each drawn batch instead of the whole split: one
    epoch run both ways (epochs=1 uncapped; epochs=2 capped at one epoch's steps, same seeded
    shuffle) gives the same student."""
    ctx = _context(trained)
    per_epoch = -(-len(ctx.data.server.x) // 8)
    full = Distillation(epochs=1, batch_size=8, max_steps=None).unlearn(ctx).model
    capped = Distillation(epochs=2, batch_size=8, max_steps=per_epoch).unlearn(ctx).model
    assert full is not None and capped is not None
    for k in full:
        np.testing.assert_allclose(capped[k], full[k], rtol=1e-5, atol=1e-6)


def test_shadows_run_with_their_thread_count_and_restore_the_callers(data, monkeypatch):
    cfg = small_config(*FIVE)
    setup = prepare(cfg)
    seen: list[int] = []
    real_train = shadow_module.train

    def spy(model, x, y, spec, *, seed):
        seen.append(torch.get_num_threads())
        return real_train(model, x, y, spec, seed=seed)

    monkeypatch.setattr(shadow_module, "train", spy)
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    bank = ShadowModels(setup.build_model, local_training(cfg, 1.0), num_shadows=2, seed=1,
                        max_samples=20, threads=want)
    pool = data.pooled(exclude={0})
    bank(pool.x, pool.y, data.test.x[:5], data.test.y[:5])
    assert seen == [want, want] and torch.get_num_threads() == before


def test_the_shadows_budget_is_what_retraining_trains(tmp_path):
    """Oracle: the participants the training stored in its history, round by round (retraining
    draws the same ones, minus the removed). With 6 clients at sample_fraction 0.25 a round
    takes max(1, round(1.5)) = 2 clients, not 1.5: the plain fraction would be off by a third."""
    from fedunlearn.run.verification import retraining_sample_epochs

    cfg = small_config("data.num_clients=6", "training.rounds=3", "training.local_epochs=2",
                       "training.sample_fraction=0.25", "unlearning.requests=[]")
    setup = prepare(cfg)
    store = HistoryStore.create(tmp_path / "history", retention_interval=1)
    train_federation(InProcessFederation(cfg, setup.evaluator()), setup, store, progress=False)
    sizes = [len(c) for c in setup.data.clients]
    for removed in (set(), {store.participants(1)[0]}):
        by_hand = 2 * sum(sizes[k] for t in store.rounds() for k in store.participants(t)
                          if k not in removed)
        assert retraining_sample_epochs(cfg, sizes, removed) == by_hand
    assert by_hand != pytest.approx(3 * 2 * 0.25 * sum(sizes[k] for k in range(6)
                                                       if k not in removed))
