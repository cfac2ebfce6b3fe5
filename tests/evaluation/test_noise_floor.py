"""The noise floor shares what the methods share with retraining (the initial model and each
round's participants) and draws fresh client-side randomness; the independent retraining
(``variant``) redraws everything. Checked on the in-process twin by recording every round's
participants, starting model and client seed tag."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.lineage import params_hash
from fedunlearn.history.store import HistoryStore
from fedunlearn.run.checks import build_methods
from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning.base import UnlearningContext
from fedunlearn.unlearning.federated.retrain import Retrain
from tests.conftest import small_config


class Recording(InProcessFederation):
    """The in-process twin, recording what every round's clients were asked to do."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[int, tuple[int, ...], str, int]] = []

    def _train(self, model: Any, pids: Any, *, epochs: float, server_round: int, tag: int,
               **kw: Any) -> Any:
        self.calls.append((server_round, tuple(pids), params_hash(model), tag))
        return super()._train(model, pids, epochs=epochs, server_round=server_round, tag=tag,
                              **kw)


def _serve(method: Retrain, tmp_path: Any) -> tuple[list[tuple[int, tuple[int, ...], str, int]],
                                                     str]:
    cfg = small_config("data.num_clients=6", "training.sample_fraction=0.5",
                       "training.rounds=4")
    setup = prepare(cfg)
    fed = Recording(cfg, setup.evaluator())
    store = HistoryStore.create(tmp_path / f"h{len(list(tmp_path.iterdir()))}",
                                retention_interval=1)
    ctx = UnlearningContext(cfg=cfg, targets=(0,), removed=frozenset({0}), model=setup.initial,
                            initial=setup.initial, history=store, federation=fed,
                            data=setup.data, build_model=setup.build_model, seed=1)
    result = method.unlearn(ctx)
    return fed.calls, params_hash(result.model)


def test_noise_floor_shares_initial_model_and_participants_not_client_streams(tmp_path):
    ref, ref_hash = _serve(Retrain(), tmp_path)
    floor, floor_hash = _serve(Retrain(stream=1), tmp_path)
    independent, _ = _serve(Retrain(variant=1), tmp_path)
    assert [c[:2] for c in floor] == [c[:2] for c in ref]  # same rounds, same participants
    assert floor[0][2] == ref[0][2]  # same initial model
    assert {c[3] for c in ref} == {0}  # retraining replays the training's client streams
    assert len({c[3] for c in floor}) == 1 and floor[0][3] != 0  # fresh streams of its own
    assert floor_hash != ref_hash  # ... which change the model
    # the independent retraining redraws the initial model and the participants
    assert independent[0][2] != ref[0][2]
    assert [c[1] for c in independent] != [c[1] for c in ref]


def test_the_configured_noise_floor_is_the_coupled_one() -> None:
    cfg = small_config("unlearning.requests=[[0]]", 'unlearning.methods=["retrain"]')
    (ref, floor) = build_methods(cfg)
    assert floor.role == "noise_floor" and floor.name == "retrain_seed2"
    assert (floor.method.variant, floor.method.stream) == (0, 1)
    assert np.isfinite(ref.method.stream) and ref.method.stream == 0


def test_the_independent_retraining_is_opt_in_context() -> None:
    cfg = small_config("unlearning.requests=[[0]]", 'unlearning.methods=["retrain"]',
                       "verification.independent_retrain=true")
    methods = {m.name: m for m in build_methods(cfg)}
    independent = methods["retrain_independent"]
    assert independent.role == "context" and independent.method.variant == 1
    assert "retrain_independent" not in {m.name for m in build_methods(
        small_config("unlearning.requests=[[0]]", 'unlearning.methods=["retrain"]'))}
