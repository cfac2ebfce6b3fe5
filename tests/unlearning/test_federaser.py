"""FedEraser and FedAccum: the calibration math, oracles against FedAvg and against an
independent recomputation, and what the methods may and may not touch."""

from __future__ import annotations

import doctest
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from fedunlearn.cli import main
from fedunlearn.config.tree import Config, ConfigError, load_config
from fedunlearn.engine import inprocess, local
from fedunlearn.engine.inprocess import InProcessFederation, flower_average
from fedunlearn.engine.port import ClientResult, Federation, TrainingRun
from fedunlearn.engine.strategy import (
    STRATEGIES,
    declare_history_identity,
    keeps_history_identity,
)
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.params import Params
from fedunlearn.run import pipeline as runner
from fedunlearn.run.checks import check_replayable
from fedunlearn.run.pipeline import Setup, prepare, train_federation
from fedunlearn.unlearning.base import (
    UNLEARNERS,
    HistoryNotReplayable,
    UnlearningContext,
    capabilities_of,
)
from fedunlearn.unlearning.federated import calibration
from fedunlearn.unlearning.federated.calibration import calibrate, renormalised_weights
from fedunlearn.unlearning.federated.distillation import Distillation
from fedunlearn.unlearning.federated.federaser import FedAccum, FedEraser
from fedunlearn.unlearning.federated.fedrecover import FedRecover

# Two momentum-SGD epochs a round: after 6 rounds the model is far from its initial 12 %.
BASE = ["data.num_clients=5", "training.rounds=6", "training.local_epochs=2",
        "training.learning_rate=0.1", "training.momentum=0.9"]


@dataclass
class Trained:
    """A trained federation with its history."""

    cfg: Config
    setup: Setup
    fed: InProcessFederation
    store: HistoryStore
    run: TrainingRun

    def context(self, targets: Sequence[int] = (0,), federation: Federation | None = None,
                *, models: bool = True) -> UnlearningContext:
        """``models=False``: building a model fails the test (``track_accuracy=False``)."""
        return UnlearningContext(
            cfg=self.cfg, targets=tuple(targets), removed=frozenset(targets),
            model=self.run.final, initial=self.setup.initial, history=self.store,
            federation=federation or self.fed, data=self.setup.data,
            build_model=self.setup.build_model if models
            else lambda: pytest.fail("no model may be built without track_accuracy"), seed=123)


def train(path: Path, *overrides: str) -> Trained:
    cfg = load_config(None, [*BASE, *overrides])
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(path, retention_interval=cfg.history.retention_interval)
    run = train_federation(fed, setup, store, progress=False)
    return Trained(cfg, setup, fed, store, run)


@pytest.fixture(scope="module")
def every_round(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Every round's updates retained."""
    return train(tmp_path_factory.mktemp("h1") / "h", "history.retention_interval=1")


@pytest.fixture(scope="module")
def every_other(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Updates retained in rounds 1, 3, 5 (FedEraser's Δt = 2)."""
    return train(tmp_path_factory.mktemp("h2") / "h", "history.retention_interval=2")


@pytest.fixture(scope="module")
def one_per_round(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One client a round: participants 2, 0, 2, 0, 3, 4 in rounds 1..6."""
    return train(tmp_path_factory.mktemp("h3") / "h", "history.retention_interval=1",
                 "training.sample_fraction=0.2")


@dataclass
class Call:
    model: Params
    clients: tuple[int, ...]
    epochs: float
    server_round: int
    tag: int
    results: dict[int, ClientResult]


@dataclass
class RecordingFederation:
    """Wraps a federation and records every ``train_clients`` call (optionally forcing a tag)."""

    inner: InProcessFederation
    force_tag: int | None = None
    calls: list[Call] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return self.inner.num_clients

    @property
    def messages_sent(self) -> int:
        return self.inner.messages_sent

    def fedavg(self, *args: object, **kwargs: object) -> TrainingRun:
        raise AssertionError("unlearning must not run FedAvg")

    def train_clients(self, model: Params, clients: Sequence[int], *, epochs: float,
                      server_round: int, tag: int) -> dict[int, ClientResult]:
        used = tag if self.force_tag is None else self.force_tag
        results = self.inner.train_clients(model, clients, epochs=epochs,
                                           server_round=server_round, tag=used)
        self.calls.append(Call({k: v.copy() for k, v in model.items()}, tuple(clients), epochs,
                               server_round, tag, results))
        return results


def max_diff(a: Params, b: Params) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


def weighted(store: HistoryStore, t: int, removed: set[int]) -> list[tuple[int, float]]:
    """Remaining participants of round t with weights n_k / sum of remaining n (from counts)."""
    rec = store.round_record(t)
    pairs = zip(rec.participants, rec.num_examples, strict=True)
    kept = [(k, n) for k, n in pairs if k not in removed]
    total = sum(n for _, n in kept)
    return [(k, n / total) for k, n in kept]


# ------------------------------------------------------------------------ calibration math
def test_calibrate_model_scope_scales_fresh_direction_to_stored_norm():
    stored = {"a": np.array([0.0, 5.0], np.float32), "b": np.array([[0.0]], np.float32)}
    fresh = {"a": np.array([0.3, 0.0], np.float32), "b": np.array([[0.4]], np.float32)}
    out = calibrate(stored, fresh)  # ‖U‖ = 5, ‖Û‖ = 0.5: scale 10
    np.testing.assert_allclose(out["a"], [3.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [[4.0]], rtol=1e-6)
    assert all(v.dtype == np.float32 for v in out.values())


def test_calibrate_layer_scope_keeps_every_arrays_stored_norm():
    stored = {"a": np.array([0.0, 5.0]), "b": np.array([-2.0])}
    fresh = {"a": np.array([0.3, 0.4]), "b": np.array([0.1])}
    out = calibrate(stored, fresh, scope="layer")
    np.testing.assert_allclose(out["a"], [3.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [2.0], rtol=1e-6)
    # model scope: ‖U‖ = √29, ‖Û‖ = √0.26
    scale = np.sqrt(29 / 0.26)
    out = calibrate(stored, fresh, scope="model")
    np.testing.assert_allclose(out["a"], [0.3 * scale, 0.4 * scale], rtol=1e-6)


def test_calibrate_zero_fresh_gives_zero_and_ignores_integer_buffers():
    stored = {"a": np.array([1.0, 2.0]), "b": np.array([3.0])}
    fresh = {"a": np.zeros(2), "b": np.array([1.0]), "n": np.array(7, np.int64)}
    np.testing.assert_array_equal(calibrate(stored, fresh)["a"], [0.0, 0.0])
    layer = calibrate(stored, fresh, scope="layer")
    np.testing.assert_array_equal(layer["a"], [0.0, 0.0])
    np.testing.assert_allclose(layer["b"], [3.0])
    assert "n" not in layer
    assert calibrate({"a": np.ones(2)}, {"a": np.zeros(2)})["a"].tolist() == [0.0, 0.0]


def test_calibrate_rejects_unknown_scope_and_mismatched_updates():
    with pytest.raises(ValueError, match="model, layer"):
        calibrate({"a": np.ones(1)}, {"a": np.ones(1)}, scope="global")
    with pytest.raises(ValueError, match="different arrays"):
        calibrate({"a": np.ones(1)}, {"b": np.ones(1)})


def test_renormalised_weights():
    kept, w = renormalised_weights([1, 4, 7], [0.2, 0.3, 0.5], keep=lambda k: k != 7)
    assert kept == (1, 4)
    np.testing.assert_allclose(w, [0.4, 0.6])
    assert renormalised_weights([1], [1.0], keep=lambda k: False) == ((), ())
    with pytest.raises(ValueError, match="one weight per participant"):
        renormalised_weights([1, 2], [1.0], keep=lambda k: True)


def test_calibration_doctests():
    failed, attempted = doctest.testmod(calibration)
    assert attempted >= 4 and failed == 0


def test_registered_by_name():
    assert UNLEARNERS.get("federaser") is FedEraser
    assert UNLEARNERS.get("fedaccum") is FedAccum
    assert FedEraser.setting == FedAccum.setting == "federated"


# ------------------------------------------------------------------------ FedAccum
def test_fedaccum_without_removal_reproduces_fedavg(every_round: Trained):
    result = FedAccum().unlearn(every_round.context(targets=()))
    assert max_diff(result.model, every_round.run.final) <= 1e-5
    assert result.cost.messages_sent == 0 and result.cost.client_epochs == 0


def test_fedaccum_with_removal_sums_the_remaining_stored_updates(every_round: Trained):
    store = every_round.store
    expected = {k: v.astype(np.float64) for k, v in every_round.setup.initial.items()}
    for t in store.rounds():
        for k, w in weighted(store, t, {0}):
            for name, u in store.update(t, k).items():
                expected[name] += w * u
    fed = RecordingFederation(every_round.fed)
    result = FedAccum().unlearn(every_round.context(federation=fed))
    assert max_diff(result.model, expected) <= 1e-5
    assert fed.calls == [] and result.cost.messages_sent == 0
    assert result.details["retained_rounds"] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------ FedEraser
def test_federaser_contacts_only_remaining_clients_and_leaves_inputs_intact(
        every_other: Trained):
    t = every_other
    model_before = {k: v.copy() for k, v in t.run.final.items()}
    final_before = t.store.final_model()
    sent_before = t.fed.messages_sent
    fed = RecordingFederation(t.fed)

    result = FedEraser().unlearn(t.context(federation=fed))

    assert [c.server_round for c in fed.calls] == [3, 5]  # retained 1, 3, 5; 1 uncalibrated
    assert all(0 not in c.clients for c in fed.calls)
    assert all(c.clients == (1, 2, 3, 4) for c in fed.calls)
    assert all(c.epochs == 0.5 * t.cfg.training.local_epochs == 1.0 for c in fed.calls)
    assert len({c.tag for c in fed.calls}) == 1 and fed.calls[0].tag != 0
    assert result.cost.rounds == 2 and result.cost.messages_sent == 8
    assert result.cost.client_epochs == 8.0
    assert t.fed.messages_sent - sent_before == 8
    assert {k: v for k, v in result.details.items() if not k.startswith("replay")} == {
        "retained_rounds": [1, 3, 5], "calibrated_rounds": 2, "r": 0.5, "norm_scope": "model"}
    assert max_diff(t.run.final, model_before) == 0.0
    assert max_diff(t.store.final_model(), final_before) == 0.0
    assert all(np.isfinite(v).all() for v in result.model.values())
    # Measured: initial 0.12, FedAccum 0.38, FedEraser 0.63, trained 0.88, retrained 0.88.
    accuracy = t.setup.evaluator()(result.model)["accuracy"]
    assert 0.5 <= accuracy <= 0.95


def test_federaser_matches_an_independent_recomputation(every_other: Trained):
    """Per-client calibration of the stored update of the *same* round, weighted mean."""
    t = every_other
    fed = RecordingFederation(t.fed)
    result = FedEraser(r=0.5).unlearn(t.context(federation=fed))
    calls = {c.server_round: c for c in fed.calls}
    model = {k: v.astype(np.float64) for k, v in t.setup.initial.items()}
    for rnd in (1, 3, 5):
        step = {k: np.zeros_like(v) for k, v in model.items()}
        for k, w in weighted(t.store, rnd, {0}):
            stored = t.store.update(rnd, k)
            if rnd == 1:
                upd = stored
            else:
                call = calls[rnd]
                assert max_diff(call.model, model) <= 1e-5
                fresh = {n: call.results[k].model[n] - call.model[n] for n in stored}
                norm = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in fresh.values()))
                stored_norm = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64))
                                          for v in stored.values()))
                upd = {n: stored_norm / norm * v for n, v in fresh.items()}
            for n, u in upd.items():
                step[n] += w * u
        model = {n: model[n] + step[n] for n in model}
    assert max_diff(result.model, model) <= 1e-5


def test_federaser_with_training_seeds_and_full_ratio_replays_training(every_round: Trained):
    """No removal, r = 1 and training's shuffles: calibration is the identity, so the replay
    is FedAvg again; an off-by-one stored update or unweighted mean would break this."""
    fed = RecordingFederation(every_round.fed, force_tag=0)
    result = FedEraser(r=1.0).unlearn(every_round.context(targets=(), federation=fed))
    assert [c.server_round for c in fed.calls] == [2, 3, 4, 5, 6]
    assert max_diff(result.model, every_round.run.final) <= 1e-5


@pytest.mark.parametrize(("target", "calibrated"), [(0, [3, 5, 6]), (2, [2, 4, 5, 6])])
def test_federaser_skips_rounds_without_remaining_participants(one_per_round: Trained,
                                                               target: int,
                                                               calibrated: list[int]):
    t = one_per_round
    assert [t.store.participants(r) for r in t.store.rounds()] == [(2,), (0,), (2,), (0,),
                                                                  (3,), (4,)]
    fed = RecordingFederation(t.fed)
    result = FedEraser().unlearn(t.context(targets=(target,), federation=fed))
    # Without client 2, round 1 contributes nothing, so round 2 must be calibrated too.
    assert [c.server_round for c in fed.calls] == calibrated
    assert all(target not in c.clients for c in fed.calls)
    assert result.cost.rounds == result.details["calibrated_rounds"] == len(calibrated)


def test_norm_scope_layer_runs_and_differs(every_other: Trained):
    by_model = FedEraser(norm_scope="model").unlearn(every_other.context()).model
    by_layer = FedEraser(norm_scope="layer").unlearn(every_other.context()).model
    assert all(np.isfinite(v).all() for v in by_layer.values())
    assert max_diff(by_model, by_layer) > 1e-4


@pytest.mark.parametrize("kwargs", [{"r": 0.0}, {"norm_scope": "global"}])
def test_federaser_rejects_bad_hyperparameters_before_any_client_work(every_other: Trained,
                                                                      kwargs: dict):
    fed = RecordingFederation(every_other.fed)
    with pytest.raises(ValueError, match=r"r must be > 0|model, layer"):
        FedEraser(**kwargs).unlearn(every_other.context(federation=fed))
    assert fed.calls == []


# ------------------------------------------------------------------------ replay diagnostics
def test_calibration_stats_by_hand():
    stored = {"a": np.array([3.0, 0.0]), "b": np.array([4.0]), "n": np.array(3, np.int64)}
    fresh = {"a": np.array([1.0, 1.0]), "b": np.array([0.0]), "n": np.array(9, np.int64)}
    # ‖U‖ = 5, ‖Û‖ = √2, ⟨U, Û⟩ = 3
    whole = calibration.calibration_stats(stored, fresh)
    assert list(whole) == ["model"]
    assert whole["model"].stored_norm == pytest.approx(5.0)
    assert whole["model"].fresh_norm == pytest.approx(np.sqrt(2))
    assert whole["model"].ratio == pytest.approx(5 / np.sqrt(2))
    assert whole["model"].cosine == pytest.approx(3 / (5 * np.sqrt(2)))
    layer = calibration.calibration_stats(stored, fresh, scope="layer")
    assert list(layer) == ["a", "b"]
    assert layer["a"].ratio == pytest.approx(3 / np.sqrt(2))
    assert layer["a"].cosine == pytest.approx(1 / np.sqrt(2))
    assert (layer["b"].stored_norm, layer["b"].fresh_norm, layer["b"].ratio,
            layer["b"].cosine) == (4.0, 0.0, 0.0, 0.0)  # no fresh direction: calibrate gives 0
    # the ratio is the scale calibrate applies, in both scopes
    np.testing.assert_allclose(calibrate(stored, fresh)["a"], whole["model"].ratio * fresh["a"])
    np.testing.assert_allclose(calibrate(stored, fresh, scope="layer")["b"], [0.0])
    with pytest.raises(ValueError, match="model, layer"):
        calibration.calibration_stats(stored, fresh, scope="global")


def test_weighted_mean_stats_and_summary_by_hand():
    s = calibration.CalibrationStats
    mean = calibration.weighted_mean_stats([s(5.0, 1.0, 5.0, 0.6), s(2.0, 4.0, 0.5, -1.0)],
                                           [0.5, 0.5])
    assert mean == s(stored_norm=3.5, fresh_norm=2.5, ratio=2.75, cosine=pytest.approx(-0.2))
    assert calibration.weighted_mean_stats([s(1.0, 1.0, 1.0, 1.0), s(4.0, 2.0, 2.0, 0.0)],
                                           [3, 1]).ratio == 1.25  # weights are normalised
    with pytest.raises(ValueError, match="one weight per client"):
        calibration.weighted_mean_stats([s(1.0, 1.0, 1.0, 1.0)], [0.5, 0.5])
    rounds = [{"ratio": None, "cosine": None, "test_accuracy": 0.2},
              {"ratio": 3.0, "cosine": 0.1, "test_accuracy": 0.4},
              {"ratio": 1.0, "cosine": 0.5, "test_accuracy": None}]
    assert calibration.summarise_replay(rounds) == {
        "calibrated_rounds": 2, "mean_ratio": 2.0, "mean_cosine": pytest.approx(0.3),
        "final_test_accuracy": None}
    assert calibration.summarise_replay([]) == {"calibrated_rounds": 0, "mean_ratio": None,
                                                "mean_cosine": None, "final_test_accuracy": None}


def _params(a: Sequence[float], b: float) -> Params:
    return {"a": np.array(a, np.float32), "b": np.array([b], np.float32)}


# A two-round history by hand: clients 0, 1, 2 with 2, 3, 1 examples (weights 1/3, 1/2, 1/6);
# client 0 is removed, so 1 and 2 weigh 3/4 and 1/4. Round 2's stored updates and the fresh
# updates the fake federation returns:
#   client 1: U = (3, 0 | 4), ‖U‖ = 5;  Û = (1, 0 | 0), ‖Û‖ = 1; ratio 5,   cos 3/5
#   client 2: U = (0, 2 | 0), ‖U‖ = 2;  Û = (0, -4 | 0), ‖Û‖ = 4; ratio 0.5, cos -1
# weighted: stored 3.75 + 0.5 = 4.25, fresh 0.75 + 1 = 1.75, ratio 3.75 + 0.125 = 3.875,
# cosine 0.45 - 0.25 = 0.2. Per array (layer scope) "a": stored 2.25 + 0.5, fresh 1.75,
# ratio 2.25 + 0.125, cos 0.75 - 0.25; "b": stored 3, fresh 0, ratio 0, cos 0.
# Round 1 (uncalibrated): stored 0.75 * 1 + 0.25 * 2 = 1.25.
HAND_ROUNDS = {
    1: {0: _params([1.0, 1.0], 1.0), 1: _params([1.0, 0.0], 0.0), 2: _params([0.0, 2.0], 0.0)},
    2: {0: _params([9.0, 9.0], 9.0), 1: _params([3.0, 0.0], 4.0), 2: _params([0.0, 2.0], 0.0)},
}
HAND_FRESH = {1: _params([1.0, 0.0], 0.0), 2: _params([0.0, -4.0], 0.0)}
HAND_COUNTS = (2, 3, 1)
HAND_WEIGHTS = (1 / 3, 1 / 2, 1 / 6)


def hand_store(path: Path, momentum: float = 0.0) -> tuple[HistoryStore, Params]:
    """Record the hand history (``momentum`` > 0 adds a server-momentum-like term)."""
    initial = {**_params([0.5, -0.5], 0.25), "n": np.array(0, np.int64)}
    store = HistoryStore.create(path)
    model, velocity = dict(initial), None
    for t, updates in HAND_ROUNDS.items():
        store.record_round(t, global_model=model, participants=[0, 1, 2],
                           num_examples=list(HAND_COUNTS), weights=list(HAND_WEIGHTS),
                           updates=updates)
        step = {k: sum(w * updates[c][k] for c, w in enumerate(HAND_WEIGHTS)) for k in "ab"}
        if velocity is not None:
            step = {k: step[k] + momentum * velocity[k] for k in step}
        velocity = step
        model = {**model, **{k: (model[k] + step[k]).astype(np.float32) for k in step}}
    store.record_final(model)
    return store, initial


@dataclass
class KnownFederation:
    """Every client returns the model it got plus its known fresh update."""

    expected_model: Params
    num_clients: int = 3
    messages_sent: int = 0
    bytes_exchanged: int = 0

    def fedavg(self, *args: object, **kwargs: object) -> TrainingRun:
        raise AssertionError("unlearning must not run FedAvg")

    def train_clients(self, model: Params, clients: Sequence[int], *, epochs: float,
                      server_round: int, tag: int) -> dict[int, ClientResult]:
        assert server_round == 2 and tuple(clients) == (1, 2)
        assert max_diff({k: model[k] for k in "ab"}, self.expected_model) <= 1e-6
        self.messages_sent += len(clients)
        return {k: ClientResult({**model, **{n: model[n] + v for n, v in HAND_FRESH[k].items()}},
                                1) for k in clients}


def hand_context(store: HistoryStore, initial: Params,
                 federation: Federation | None = None) -> UnlearningContext:
    return UnlearningContext(
        cfg=load_config(None, ["training.local_epochs=2"]), targets=(0,), removed=frozenset({0}),
        model=store.final_model(), initial=initial, history=store,
        federation=federation or KnownFederation({}), data=None,  # type: ignore[arg-type]
        build_model=lambda: pytest.fail("no model may be built without track_accuracy"),
        seed=5)


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_replay_diagnostics_match_hand_computed_values(tmp_path: Path, scope: str):
    store, initial = hand_store(tmp_path / "h")
    assert store.replayable()
    after_round_1 = {"a": np.array([1.25, 0.0]), "b": np.array([0.25])}  # M_1 + (.75, .5 | 0)
    fed = KnownFederation(after_round_1)
    result = FedEraser(norm_scope=scope, track_accuracy=False).unlearn(
        hand_context(store, initial, fed))
    first, second = result.details["replay"]
    assert first == {"round": 1, "stored_norm": pytest.approx(1.25), "fresh_norm": None,
                     "ratio": None, "cosine": None, "test_accuracy": None}
    assert {k: second[k] for k in ("round", "stored_norm", "fresh_norm", "ratio", "cosine")} == {
        "round": 2, "stored_norm": pytest.approx(4.25), "fresh_norm": pytest.approx(1.75),
        "ratio": pytest.approx(3.875), "cosine": pytest.approx(0.2)}
    assert result.details["replay_summary"] == {
        "calibrated_rounds": 1, "mean_ratio": pytest.approx(3.875),
        "mean_cosine": pytest.approx(0.2), "final_test_accuracy": None, "accuracy_seconds": 0.0,
        "fresh_kind": "calibration"}
    if scope == "model":
        assert "layers" not in second
        # calibrated: 0.75 * 5 * (1, 0 | 0) + 0.25 * 0.5 * (0, -4 | 0) = (3.75, -0.5 | 0)
        np.testing.assert_allclose(result.model["a"], [5.0, -0.5], atol=1e-6)
    else:
        assert second["layers"] == {
            "a": {"stored_norm": pytest.approx(2.75), "fresh_norm": pytest.approx(1.75),
                  "ratio": pytest.approx(2.375), "cosine": pytest.approx(0.5)},
            "b": {"stored_norm": pytest.approx(3.0), "fresh_norm": 0.0, "ratio": 0.0,
                  "cosine": 0.0}}
    json.dumps(result.details, allow_nan=False)
    assert result.model["n"].dtype == np.int64
    accum = FedAccum(track_accuracy=False).unlearn(hand_context(store, initial))
    assert [r["stored_norm"] for r in accum.details["replay"]] == [pytest.approx(1.25),
                                                                   pytest.approx(4.25)]
    assert all(r["fresh_norm"] is r["ratio"] is r["cosine"] is None
               for r in accum.details["replay"])


def test_replay_diagnostics_on_a_trained_federation(every_other: Trained):
    t = every_other
    result = FedEraser().unlearn(t.context())
    replay = result.details["replay"]
    assert [r["round"] for r in replay] == [1, 3, 5]
    for entry in replay:  # stored norm, computed independently from the stored updates
        expected = sum(w * np.sqrt(sum(np.sum(np.square(v, dtype=np.float64))
                                       for v in t.store.update(entry["round"], k).values()))
                       for k, w in weighted(t.store, entry["round"], {0}))
        assert entry["stored_norm"] == pytest.approx(expected, rel=1e-6)
        assert 0.0 <= entry["test_accuracy"] <= 1.0
    assert replay[0]["fresh_norm"] is None
    for entry in replay[1:]:
        assert entry["fresh_norm"] > 0 and entry["ratio"] > 0 and -1 <= entry["cosine"] <= 1
    final = t.setup.evaluator()(result.model)["accuracy"]
    summary = result.details["replay_summary"]
    assert summary["final_test_accuracy"] == replay[-1]["test_accuracy"] == final
    assert summary["calibrated_rounds"] == 2 and summary["accuracy_seconds"] > 0
    text = json.dumps(result.details, allow_nan=False)
    assert json.loads(text)["replay"] == replay
    # without accuracy tracking no model is built and nothing else changes
    quiet = FedEraser(track_accuracy=False).unlearn(t.context(models=False))
    assert all(r["test_accuracy"] is None for r in quiet.details["replay"])
    assert max_diff(quiet.model, result.model) == 0.0


# ------------------------------------------------------------------------ replayability
def test_momentum_like_history_is_refused_before_any_work(tmp_path: Path):
    store, initial = hand_store(tmp_path / "h", momentum=0.9)
    assert not store.replayable() and store.identity_violations() == [2]
    fed = KnownFederation({})
    for method in (FedEraser(), FedAccum()):
        with pytest.raises(HistoryNotReplayable, match="cannot replay this history") as err:
            method.unlearn(hand_context(store, initial, fed))
        assert "\n" not in str(err.value) and "fedavg" in str(err.value)
    assert fed.messages_sent == 0
    assert all(capabilities_of(m).needs_replayable_history
               for m in (FedEraser, FedAccum, FedRecover, Distillation))


def test_in_process_training_with_server_momentum_is_flagged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A FedAvgM-like server step (learning rate 1.5 from round 2 on) through the real
    training path: the store flags every round after the first, FedEraser refuses."""
    state: dict[str, Params] = {}

    def overshoot(models: Sequence[Params], counts: Sequence[int]) -> Params:
        avg = flower_average(models, counts)
        prev = state.get("prev")
        out = avg if prev is None else {k: avg[k] + 0.5 * (avg[k] - prev[k]) for k in avg}
        state["prev"] = out
        return out

    monkeypatch.setattr(inprocess, "flower_average", overshoot)
    t = train(tmp_path / "h", "training.rounds=3", "history.retention_interval=1")
    assert t.store.identity_violations() == [2, 3]
    assert t.store.identity_deviation(1) <= 1e-6
    assert HistoryStore.open(t.store.path).identity_violations() == [2, 3]  # in the manifest
    fed = RecordingFederation(t.fed)
    with pytest.raises(HistoryNotReplayable,
                       match=r"after rounds 2, 3 \(relative deviation up to \S+ > 0.0001\)"):
        FedEraser().unlearn(t.context(federation=fed))
    assert fed.calls == []


def test_fedavg_training_keeps_the_identity(every_round: Trained):
    store = every_round.store
    assert store.replayable() and store.identity_violations() == []
    assert all(store.identity_deviation(t) <= 1e-6 for t in store.rounds())


def test_check_replayable_refuses_declared_breakers_only():
    momentum = ["training.strategy=\"fedavgm\"", "training.strategy_params={server_momentum=0.9}",
                "unlearning.requests=[[0]]"]
    with pytest.raises(ConfigError, match=r"'fedavgm'.*federaser, fedaccum, distillation "
                                          r"cannot replay it; use fedavg or fedprox"):
        check_replayable(load_config(None, momentum))
    # no history method, or no request: nothing to refuse
    check_replayable(load_config(None, [*momentum, "unlearning.methods=[\"retrain\"]"]))
    check_replayable(load_config(None, momentum[:2]))
    # fedunlearn's fedavgm defaults to server momentum 0.9: refused as it stands ...
    with pytest.raises(ConfigError, match=r"'fedavgm'"):
        check_replayable(load_config(None, ["training.strategy=\"fedavgm\"",
                                            "unlearning.requests=[[0]]"]))
    # ... while no momentum and server learning rate 1 is FedAvg
    check_replayable(load_config(None, ["training.strategy=\"fedavgm\"",
                                        "training.strategy_params={server_momentum=0.0}",
                                        "unlearning.requests=[[0]]"]))
    assert keeps_history_identity("fedavgm", {"server_learning_rate": 0.5}) is False
    assert keeps_history_identity("fedavg") is keeps_history_identity("fedprox") is True


def test_user_strategies_declare_or_are_checked_at_run_time(monkeypatch: pytest.MonkeyPatch):
    def make(evaluate_fraction: float = 0.0, **params: object) -> object:
        raise AssertionError("never built by the check")

    undeclared, breaker = make, declare_history_identity(False, "a trust-region step")(
        lambda evaluate_fraction=0.0, **params: None)
    monkeypatch.setitem(STRATEGIES._items, "mine_undeclared", undeclared)
    monkeypatch.setitem(STRATEGIES._items, "mine_breaks", breaker)
    assert keeps_history_identity("mine_undeclared") is None
    request = "unlearning.requests=[[0]]"
    check_replayable(load_config(None, ["training.strategy=\"mine_undeclared\"", request]))
    with pytest.raises(ConfigError, match=r"'mine_breaks' breaks the history identity "
                                          r"M_\{t\+1\} = M_t \+ Σ w U \(a trust-region step\)"):
        check_replayable(load_config(None, ["training.strategy=\"mine_breaks\"", request]))


def test_cli_refuses_a_momentum_strategy_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    def no_engine(*args: object, **kwargs: object) -> None:
        pytest.fail("the refusal must come before any engine or client start")

    monkeypatch.setattr(runner, "run_engine", no_engine)
    monkeypatch.setattr(local, "warm_up", no_engine)
    out = tmp_path / "run"
    code = main(["run", "simulations/quickstart.toml", "--set", "training.strategy=\"fedavgm\"",
                 "--set", "unlearning.requests=[[0]]",
                 "--set", "unlearning.methods=[\"retrain\", \"federaser\", \"distillation\"]",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("fedunlearn: error: config key 'training.strategy' = 'fedavgm'")
    assert "federaser, distillation cannot replay it" in err
    assert not out.exists()
