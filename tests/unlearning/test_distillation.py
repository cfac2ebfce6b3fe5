"""Knowledge-distillation unlearning: exact subtraction, no client contact, the repair moves
the student towards the teacher, and on a backdoored run the trigger is forgotten."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedunlearn.config.tree import Config, load_config
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.engine.aggregation import l2_norm
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.store import HistoryStore
from fedunlearn.models import build_model
from fedunlearn.models.params import Params, set_params
from fedunlearn.models.training import predict_proba
from fedunlearn.run.pipeline import Setup, prepare, train_federation
from fedunlearn.unlearning.base import UNLEARNERS, UnlearningContext
from fedunlearn.unlearning.federated.distillation import Distillation

# Momentum and five local epochs make the planted backdoor stick (trained ASR 0.94 measured);
# without them this small federation learns too slowly to show one. Only round 1's updates are
# retained: distillation reads the running sums only.
BACKDOOR = ["data.num_clients=10", "training.rounds=10", "training.local_epochs=5",
            "training.learning_rate=0.1", "training.momentum=0.9", "backdoor.clients=[0]",
            "backdoor.fraction=0.8", "backdoor.trigger_size=3", "history.retention_interval=10"]


class Untouchable:
    """A federation that fails the test on any use."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"distillation used the federation ({name})")


@dataclass
class Backdoored:
    cfg: Config
    setup: Setup
    fed: InProcessFederation
    store: HistoryStore
    final: Params

    def build(self) -> torch.nn.Module:
        c = self.cfg
        return build_model(c.model.name, self.setup.data.input_shape,
                           self.setup.data.num_classes, seed=c.seed, **c.model.params)

    def context(self, seed: int = 123, **changes: object) -> UnlearningContext:
        ctx = UnlearningContext(
            cfg=self.cfg, targets=(0,), removed=frozenset({0}), model=self.final,
            initial=self.setup.initial, history=self.store, federation=Untouchable(),
            data=self.setup.data, build_model=self.build, seed=seed)
        return dataclasses.replace(ctx, **changes)

    def accuracy(self, params: Params) -> float:
        return self.setup.evaluator()(params)["accuracy"]

    def asr(self, params: Params) -> float:
        """Share of triggered non-target test inputs classified as the target class."""
        model = self.build()
        set_params(model, params)
        triggered = self.setup.data.triggered_test
        assert triggered is not None
        pred = predict_proba(model, triggered.x).argmax(1)
        return float(np.mean(pred == self.cfg.backdoor.target_class))

    def probabilities(self, params: Params, x: np.ndarray) -> np.ndarray:
        model = self.build()
        set_params(model, params)
        return predict_proba(model, x)


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory: pytest.TempPathFactory) -> Backdoored:
    cfg = load_config(None, BACKDOOR)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(tmp_path_factory.mktemp("kd") / "h", retention_interval=10)
    run = train_federation(fed, setup, store, progress=False)
    return Backdoored(cfg, setup, fed, store, run.final)


@pytest.fixture(scope="module")
def distilled(backdoored: Backdoored) -> Params:
    model = Distillation().unlearn(backdoored.context()).model
    assert model is not None
    return model


def max_diff(a: Params, b: Params) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


def test_registered_by_name():
    assert UNLEARNERS.get("distillation") is Distillation
    assert Distillation.setting == "federated"


def test_subtraction_alone_removes_the_targets_running_sum(backdoored: Backdoored):
    before = {k: v.copy() for k, v in backdoored.final.items()}
    result = Distillation(epochs=0).unlearn(backdoored.context())
    total = backdoored.store.running_sum(0)
    expected = {k: v.astype(np.float64) - total[k] for k, v in backdoored.final.items()}
    assert result.model is not None
    assert max_diff(result.model, expected) <= 1e-6
    assert result.details["subtracted_norm"] == pytest.approx(l2_norm(total))
    assert max_diff(backdoored.final, before) == 0.0


def test_no_client_is_contacted(backdoored: Backdoored):
    result = Distillation(epochs=2).unlearn(backdoored.context())  # Untouchable federation
    assert result.cost.messages_sent == 0
    assert result.cost.client_epochs == 0 and result.cost.rounds == 0
    assert result.cost.server_epochs == 2
    assert result.details["epochs"] == 2 and result.details["temperature"] == 2.0


def test_distillation_moves_the_student_towards_the_teacher(backdoored: Backdoored,
                                                            distilled: Params):
    x = backdoored.setup.data.server.x
    teacher = backdoored.probabilities(backdoored.final, x)

    def mean_kl(params: Params) -> float:
        student = np.clip(backdoored.probabilities(params, x), 1e-12, None)
        return float(np.mean(np.sum(teacher * (np.log(np.clip(teacher, 1e-12, None))
                                               - np.log(student)), axis=1)))

    subtracted = Distillation(epochs=0).unlearn(backdoored.context()).model
    assert subtracted is not None
    # Measured: 4.70 after the subtraction, 0.012 after distillation (0.052 for retraining).
    assert mean_kl(distilled) < 0.05 * mean_kl(subtracted)


def test_backdoor_is_forgotten_and_accuracy_kept(backdoored: Backdoored, distilled: Params):
    retrained = backdoored.fed.fedavg(backdoored.setup.initial, exclude=frozenset({0})).final
    trained_asr, trained_acc = backdoored.asr(backdoored.final), backdoored.accuracy(
        backdoored.final)
    # Measured: trained ASR 0.94 / acc 0.92; retrained 0.003 / 0.92; distilled 0.006 / 0.92;
    # the subtraction alone 0.00 / 0.45.
    assert trained_asr >= 0.8
    assert backdoored.asr(distilled) <= min(0.1, backdoored.asr(retrained) + 0.1)
    assert backdoored.accuracy(distilled) >= trained_acc - 0.05
    assert backdoored.accuracy(distilled) >= backdoored.accuracy(retrained) - 0.05


def test_seeded_and_blind_to_server_labels(backdoored: Backdoored, distilled: Params):
    server = backdoored.setup.data.server
    scrambled = ArrayDataset(server.x, (server.y + 1) % server.num_classes, server.num_classes,
                             server.name)
    data = dataclasses.replace(backdoored.setup.data, server=scrambled)
    again = Distillation().unlearn(backdoored.context(data=data)).model
    other = Distillation().unlearn(backdoored.context(seed=7)).model
    assert again is not None and other is not None
    assert max_diff(again, distilled) == 0.0
    assert max_diff(other, distilled) > 0.0


def test_empty_server_split_is_refused(backdoored: Backdoored):
    empty = dataclasses.replace(backdoored.setup.data.server, x=backdoored.setup.data.server.x[:0],
                                y=backdoored.setup.data.server.y[:0])
    data = dataclasses.replace(backdoored.setup.data, server=empty)
    with pytest.raises(ValueError, match=r"data\.server_fraction > 0"):
        Distillation().unlearn(backdoored.context(data=data))
