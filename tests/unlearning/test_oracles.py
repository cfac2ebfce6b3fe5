"""Oracle tests: each compares a method with an independent oracle (a model trained directly on
exactly the retained data, or a value computed by hand in NumPy), never with the same code path
run twice. Each guards against one plausible bug, named in its docstring; every one was seen to
fail with that bug planted by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from fedunlearn.config.tree import Config, load_config
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.engine.port import ClientResult, TrainingRun
from fedunlearn.evaluation.metrics import kl_divergence
from fedunlearn.history.store import HistoryStore
from fedunlearn.models import build_model, reinitialise
from fedunlearn.models.params import Params, get_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import LocalTraining, train
from fedunlearn.run.pipeline import Setup, prepare, train_federation
from fedunlearn.unlearning.base import UnlearningContext
from fedunlearn.unlearning.centralized import sisa as sisa_module
from fedunlearn.unlearning.centralized.sisa import SisaEnsemble
from fedunlearn.unlearning.federated.distillation import Distillation, distillation_loss
from fedunlearn.unlearning.federated.federaser import FedAccum, FedEraser

TARGET = 0


def max_diff(a: Params, b: Params) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


# ------------------------------------------------------------------------ KL by hand
# Asymmetric pairs: KL(p || q) != KL(q || p), so a reversed direction changes the value.
P = [[0.9, 0.1], [0.2, 0.8]]
Q = [[0.5, 0.5], [0.6, 0.4]]


def kl_by_hand(p: Sequence[float], q: Sequence[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_kl_hand_values_are_asymmetric():
    # 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064; 0.5 ln(5/9) + 0.5 ln 5 = 0.510826
    assert kl_by_hand(P[0], Q[0]) == pytest.approx(0.368064, abs=1e-6)
    assert kl_by_hand(Q[0], P[0]) == pytest.approx(0.510826, abs=1e-6)


def test_kl_divergence_metric_takes_the_reference_first():
    """Catches kl_divergence(p_ref, p) computing KL(p || p_ref)."""
    expected = (kl_by_hand(P[0], Q[0]) + kl_by_hand(P[1], Q[1])) / 2
    assert kl_divergence(np.array(P), np.array(Q)) == pytest.approx(expected, rel=1e-9)
    reversed_ = (kl_by_hand(Q[0], P[0]) + kl_by_hand(Q[1], P[1])) / 2
    assert abs(expected - reversed_) > 0.05  # the check above can tell the two apart


def test_distillation_loss_is_kl_teacher_to_student_times_t_squared():
    """Catches distillation_loss computing KL(p_student || p_teacher)."""
    temperature = 2.0
    # logits = T · ln p, so softmax(logits / T) = p exactly
    teacher = torch.tensor(P, dtype=torch.float64).log() * temperature
    student = torch.tensor(Q, dtype=torch.float64).log() * temperature
    loss = float(distillation_loss(student, teacher, temperature))
    expected = (kl_by_hand(P[0], Q[0]) + kl_by_hand(P[1], Q[1])) / 2 * temperature ** 2
    assert loss == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------ SISA
N_SISA = 120
SISA_SPEC = LocalTraining(batch_size=16, learning_rate=0.1)
SHARDS, SLICES, EPOCHS, SISA_SEED = 2, 3, 2.0, 11


def mlp() -> torch.nn.Module:
    return build_model("mlp", (1, 8, 8), 10, seed=0)


@pytest.fixture(scope="module")
def sisa_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random inputs (every row distinct, so a row identifies its id) and a learnable label."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N_SISA, 1, 8, 8)).astype(np.float32)
    y = (x.reshape(N_SISA, -1)[:, :10].argmax(1)).astype(np.int64)
    return x, y, np.arange(N_SISA)


def sisa_oracle(x: np.ndarray, y: np.ndarray, slices: list[list[np.ndarray]]) -> list[Params]:
    """Each shard trained from scratch on exactly the given slices, following the schedule
    sisa.py documents: initial weights from ``derive_seed(seed, s)``; slice ``i`` trains on
    slices ``1..i`` (ids sorted) for ``2e / (R + 1)`` epochs with seed ``derive_seed(seed, s, i)``.
    """
    spec = LocalTraining(batch_size=SISA_SPEC.batch_size, learning_rate=SISA_SPEC.learning_rate,
                         epochs=2 * EPOCHS / (SLICES + 1))
    out = []
    for s, cut in enumerate(slices):
        model = reinitialise(mlp(), derive_seed(SISA_SEED, s))
        for i in range(1, SLICES + 1):
            ids = np.sort(np.concatenate(cut[:i]))  # ids are row positions here
            train(model, x[ids], y[ids], spec, seed=derive_seed(SISA_SEED, s, i))
        out.append(get_params(model))
    return out


def test_sisa_removal_equals_shards_trained_on_exactly_the_retained_ids(sisa_data, monkeypatch):
    """Catches shards that keep training on removed ids after remove()."""
    x, y, ids = sisa_data
    ens = SisaEnsemble(mlp, SISA_SPEC, shards=SHARDS, slices=SLICES, epochs=EPOCHS,
                       seed=SISA_SEED).fit(x, y, ids)
    # the layout as fitted (before any removal): shard -> slice -> ids
    layout = [[np.array(sorted(i for i, (s, r) in ens.assignment_.items() if (s, r) == (sh, sl)))
               for sl in range(1, SLICES + 1)] for sh in range(SHARDS)]
    assert sorted(np.concatenate([p for cut in layout for p in cut]).tolist()) == ids.tolist()
    # remove ids from slice 2 of shard 0 and slice 1 of shard 1
    gone = np.concatenate([layout[0][1][:3], layout[1][0][:2]])

    trained_rows: list[np.ndarray] = []
    real_train = sisa_module.train

    def recording_train(model, xs, ys, spec, **kw):
        trained_rows.append(xs.reshape(len(xs), -1).copy())
        return real_train(model, xs, ys, spec, **kw)

    monkeypatch.setattr(sisa_module, "train", recording_train)
    ens.remove(gone)
    monkeypatch.undo()

    # no removed id in any shard's training set: neither in its slices ...
    assert not np.isin(gone, ens.retained_ids()).any()
    for cut in ens.slices_:
        for part in cut:
            assert not np.isin(gone, part).any()
    # ... nor among the rows any shard was trained on while serving the removal
    assert trained_rows, "remove() trained nothing although two shards lost ids"
    removed_rows = x[gone].reshape(len(gone), -1)
    for rows in trained_rows:
        hit = (rows[:, None, :] == removed_rows[None, :, :]).all(axis=2).any()
        assert not hit, "a shard was retrained on a removed sample"

    retained = [[np.setdiff1d(part, gone) for part in cut] for cut in layout]
    oracle = sisa_oracle(x, y, retained)
    for s, (got, want) in enumerate(zip(ens.shard_params(), oracle, strict=True)):
        assert got is not None
        assert max_diff(got, want) <= 1e-6, f"shard {s} differs from its oracle"
    # the oracle is sensitive: the shards trained with the removed ids differ from it
    with_gone = sisa_oracle(x, y, layout)
    assert max_diff(with_gone[0], oracle[0]) > 1e-3 and max_diff(with_gone[1], oracle[1]) > 1e-3


# ------------------------------------------------------------------------ a federation with
# clients of clearly unequal sizes (Dirichlet split: 386, 166, 334, 372 samples)
FED = ["data.num_clients=4", "training.rounds=3", "training.local_epochs=1",
       "training.learning_rate=0.1", "data.partition=\"dirichlet\"", "data.alpha=0.5",
       "history.retention_interval=1"]


@dataclass
class Trained:
    cfg: Config
    setup: Setup
    store: HistoryStore
    run: TrainingRun

    def context(self, federation: object) -> UnlearningContext:
        return UnlearningContext(
            cfg=self.cfg, targets=(TARGET,), removed=frozenset({TARGET}), model=self.run.final,
            initial=self.setup.initial, history=self.store, federation=federation,
            data=self.setup.data, build_model=self.setup.build_model, seed=123)

    def remaining_weights(self, t: int) -> list[tuple[int, float]]:
        """Remaining participants of round t with n_k / Σ_{j ∈ S_t \\ u} n_j (from counts)."""
        rec = self.store.round_record(t)
        kept = [(k, n) for k, n in zip(rec.participants, rec.num_examples, strict=True)
                if k != TARGET]
        total = sum(n for _, n in kept)
        return [(k, n / total) for k, n in kept]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    cfg = load_config(None, FED)
    setup = prepare(cfg)
    sizes = [len(c) for c in setup.data.clients]
    remaining = [n for k, n in enumerate(sizes) if k != TARGET]
    assert max(remaining) >= 2 * min(remaining), f"client sizes not unequal enough: {sizes}"
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(tmp_path_factory.mktemp("oracle") / "h", retention_interval=1)
    run = train_federation(fed, setup, store, progress=False)
    assert all(store.round_record(t).participants == (0, 1, 2, 3) for t in store.rounds())
    return Trained(cfg, setup, store, run)


def as64(params: Params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def norm(params: Params) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64)))
                             for v in params.values())))


class Untouchable:
    """A federation that fails the test on any use."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the method used the federation ({name})")


def test_fedaccum_matches_a_hand_weighted_replay_with_unequal_clients(trained: Trained):
    """Catches an unweighted mean (or weights not renormalised over the remaining clients)."""
    expected = as64(trained.setup.initial)
    unweighted = as64(trained.setup.initial)
    for t in trained.store.rounds():
        pairs = trained.remaining_weights(t)
        for k, w in pairs:
            for name, u in trained.store.update(t, k).items():
                expected[name] += w * u
                unweighted[name] += u / len(pairs)
    assert max_diff(expected, unweighted) > 1e-3  # the sizes are unequal enough to tell
    result = FedAccum().unlearn(trained.context(Untouchable()))
    assert result.model is not None
    assert max_diff(result.model, expected) <= 1e-5


@dataclass
class KnownFederation:
    """A fake port: client k returns ``model + D(k, round)`` with ``D`` fixed random arrays."""

    schema: Params
    calls: list[tuple[int, tuple[int, ...], Params]] = field(default_factory=list)
    num_clients: int = 4
    messages_sent: int = 0
    bytes_exchanged: int = 0

    def direction(self, client: int, server_round: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([client, server_round])
        return {k: rng.normal(scale=0.01, size=v.shape) for k, v in self.schema.items()}

    def fedavg(self, *args: object, **kwargs: object) -> TrainingRun:
        raise AssertionError("unlearning must not run FedAvg")

    def train_clients(self, model: Params, clients: Sequence[int], *, epochs: float,
                      server_round: int, tag: int) -> dict[int, ClientResult]:
        self.calls.append((server_round, tuple(clients), {k: v.copy() for k, v in model.items()}))
        self.messages_sent += len(clients)
        return {c: ClientResult(
            model={k: (v + self.direction(c, server_round)[k]).astype(np.float32)
                   for k, v in model.items()}, num_examples=0) for c in clients}


def test_federaser_matches_a_hand_calibrated_weighted_replay(trained: Trained):
    """Catches an unweighted mean of the calibrated updates; the fake federation's known
    directions make the oracle exact: round 1 adds Σ w̃_k U_k, every later round
    Σ w̃_k ‖U_k‖ D_k / ‖D_k‖ with w̃_k = n_k / Σ_{remaining} n_j."""
    fake = KnownFederation(schema=trained.setup.initial)
    result = FedEraser(r=0.5).unlearn(trained.context(fake))
    assert [c[0] for c in fake.calls] == [2, 3]
    assert all(TARGET not in c[1] for c in fake.calls)

    expected = as64(trained.setup.initial)
    unweighted = as64(trained.setup.initial)
    for t in trained.store.rounds():
        pairs = trained.remaining_weights(t)
        step = {k: np.zeros_like(v) for k, v in expected.items()}
        flat = {k: np.zeros_like(v) for k, v in expected.items()}
        for k, w in pairs:
            stored = trained.store.update(t, k)
            if t == 1:
                upd = as64(stored)
            else:
                d = fake.direction(k, t)
                upd = {n: norm(stored) / norm(d) * d[n] for n in d}
            for n, u in upd.items():
                step[n] += w * u
                flat[n] += u / len(pairs)
        expected = {n: expected[n] + step[n] for n in expected}
        unweighted = {n: unweighted[n] + flat[n] for n in unweighted}
    assert max_diff(expected, unweighted) > 1e-3
    assert result.model is not None
    assert max_diff(result.model, expected) <= 1e-5


def target_sum_by_hand(trained: Trained) -> dict[str, np.ndarray]:
    """Σ_t w_u^t U_u^t from the stored per-round updates, w_u^t = n_u / Σ_{S_t} n_j."""
    total = {k: np.zeros(v.shape) for k, v in trained.setup.initial.items()}
    for t in trained.store.rounds():
        rec = trained.store.round_record(t)
        counts = dict(zip(rec.participants, rec.num_examples, strict=True))
        if TARGET in counts:
            w = counts[TARGET] / sum(counts.values())
            for name, u in trained.store.update(t, TARGET).items():
                total[name] += w * u
    return total


@pytest.mark.parametrize("epochs", [0, 1])
def test_distillation_starts_from_the_model_minus_the_targets_weighted_updates(
        trained: Trained, epochs: int):
    """Catches a distillation that skips the subtraction M' = M_F − Σ_t w_u^t U_u^t. With no
    distillation step (epochs 0), or with steps of size 0, the result is the student's start."""
    total = target_sum_by_hand(trained)
    expected = {k: np.asarray(v, np.float64) - total[k] for k, v in trained.run.final.items()}
    assert max_diff(expected, trained.run.final) > 1e-3  # the subtraction is visible
    result = Distillation(epochs=epochs, learning_rate=0.0).unlearn(trained.context(Untouchable()))
    assert result.model is not None
    assert max_diff(result.model, expected) <= 1e-5

