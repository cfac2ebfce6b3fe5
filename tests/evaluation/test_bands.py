"""Band tests against retraining: FedEraser and distillation forget a backdoored client.

Setup (``CONFIG``): the training of ``simulations/backdoor_digits.toml``: scikit-learn digits,
10 IID clients, client 0 stamps a 2x2 trigger on 80 % of its samples and relabels them to
class 0; MLP, 40 FedAvg rounds of 4 local epochs (momentum SGD 0.5, learning rate 0.3, batch
16), updates retained every Δt = 2 rounds. The federation is the in-process one; the methods
run with their registered defaults (FedEraser ``r = 0.5``, model-scope norms; distillation
``T = 2``, 20 epochs, SGD 0.05). The file takes about 25 s of CPU (40 s wall on two busy cores).

The oracle is federated retraining without client 0 (``retrain``, variant 0); its noise floor is
a second retraining with other seeds (``Retrain(variant=1)``, as ``service.py`` builds
``retrain_seed2``). Bands, per method:

- backdoor ASR on ``data.triggered_test`` <= retrain's ASR + 0.05;
- test accuracy >= retrain's test accuracy - 0.03;
- ``KL(p_retrain ‖ p_method)`` on the forgotten data (client 0's training data, as trained on)
  <= ``C`` · ``KL(p_retrain ‖ p_retrain_seed2)``, with ``C = 3``. ``C`` was fixed once, from the
  first measurement (5 clients, 10 rounds: distillation sat at 1.6 times the floor), and not
  changed after; the floor itself varied from 0.02 to 0.16 over the configs measured.

Measured on this config (seed 0, request seed 123; 359 test inputs, 126 forgotten samples):

=============  =====  ========  ===================
model          ASR    test acc  KL forget (x floor)
=============  =====  ========  ===================
original       0.957  0.969     9.03
retrain        0.003  0.972     0
retrain_seed2  0.003  0.972     0.0220 (floor)
FedEraser      0.003  0.958     0.0326 (1.5x)
distillation   0.003  0.958     0.0606 (2.75x)
=============  =====  ========  ===================

With 2 local epochs instead of 4, FedEraser ended at 0.9415 test accuracy against retraining's
0.972, one test input below its band (FedEraser matches retraining only once the later updates
have become small; see docs/algorithms.md, "FedEraser"). Distillation's KL sits close to its band here.

Each band test was seen to fail with a method broken by hand in a copy of the repository; the
docstrings of the tests say which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedunlearn.config.tree import Config, load_config
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.evaluation.metrics import accuracy, attack_success_rate, kl_divergence
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.params import Params
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.unlearning import UNLEARNERS
from fedunlearn.unlearning.base import UnlearningContext
from fedunlearn.unlearning.federated.retrain import Retrain

TARGET = 0
CONFIG = ["data.source=\"digits\"", "data.num_clients=10", "data.partition=\"iid\"",
          "data.test_fraction=0.2", "data.server_fraction=0.1",
          f"backdoor.clients=[{TARGET}]", "backdoor.fraction=0.8", "backdoor.target_class=0",
          "backdoor.trigger_size=2", "model.name=\"mlp\"",
          "training.rounds=40", "training.local_epochs=4", "training.batch_size=16",
          "training.learning_rate=0.3", "training.momentum=0.5",
          "history.retention_interval=2"]

METHODS = ("federaser", "distillation")
ASR_SLACK = 0.05
ACCURACY_SLACK = 0.03
KL_FACTOR = 3.0  # C: fixed once from one measurement, see the module docstring
MIN_ORIGINAL_ASR = 0.5


@dataclass(frozen=True)
class Figures:
    """One model's predictions on the three splits the bands look at."""

    test: np.ndarray
    triggered: np.ndarray
    forget: np.ndarray


@dataclass(frozen=True)
class Measured:
    """Every model of the request, measured once."""

    cfg: Config
    test_y: np.ndarray
    models: dict[str, Figures]

    def asr(self, name: str) -> float:
        return attack_success_rate(self.models[name].triggered, self.cfg.backdoor.target_class)

    def test_accuracy(self, name: str) -> float:
        return accuracy(self.models[name].test, self.test_y)

    def kl_forget(self, name: str) -> float:
        """``KL(p_retrain ‖ p_name)`` averaged over the forgotten data."""
        return kl_divergence(self.models["retrain"].forget, self.models[name].forget)

    def table(self) -> str:
        """All figures on one line each (for failure messages)."""
        return "; ".join(f"{n}: asr={self.asr(n):.3f} acc={self.test_accuracy(n):.3f} "
                         f"kl_forget={self.kl_forget(n):.4f}" for n in self.models)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Measured:
    """Train once, serve the request with every model, predict once per model."""
    cfg = load_config(None, CONFIG)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    path: Path = tmp_path_factory.mktemp("bands") / "history"
    store = HistoryStore.create(path, retention_interval=cfg.history.retention_interval)
    run = train_federation(fed, setup, store, progress=False)
    ctx = UnlearningContext(
        cfg=cfg, targets=(TARGET,), removed=frozenset({TARGET}), model=run.final,
        initial=setup.initial, history=store, federation=fed, data=setup.data,
        build_model=setup.build_model, seed=123)
    assert UNLEARNERS.get("retrain") is Retrain
    params: dict[str, Params] = {"original": run.final,
                                 "retrain": Retrain().unlearn(ctx).model,
                                 "retrain_seed2": Retrain(variant=1).unlearn(ctx).model}
    for name in METHODS:
        params[name] = UNLEARNERS.get(name)().unlearn(ctx).model
    data = setup.data
    assert data.triggered_test is not None
    forget = data.clients[TARGET]
    predictor: Callable[[Params], Callable[[np.ndarray], np.ndarray]] = setup.predictor()
    models: dict[str, Figures] = {}
    for name, p in params.items():
        predict = predictor(p)
        models[name] = Figures(test=np.asarray(predict(data.test.x)),
                               triggered=np.asarray(predict(data.triggered_test.x)),
                               forget=np.asarray(predict(forget.x)))
    return Measured(cfg, np.asarray(data.test.y), models)


# ------------------------------------------------------------------------ the setup is meaningful
def test_original_model_learned_the_trigger_and_retraining_did_not(measured: Measured):
    """Without a working backdoor the ASR band would pass for a method that does nothing."""
    assert measured.asr("original") >= MIN_ORIGINAL_ASR, measured.table()
    assert measured.asr("original") - measured.asr("retrain") >= 10 * ASR_SLACK, measured.table()
    assert measured.asr("retrain_seed2") <= measured.asr("retrain") + ASR_SLACK, measured.table()


def test_noise_floor_is_a_different_model_at_a_small_distance(measured: Measured):
    """A zero floor would make the KL band unpassable; a floor as far as the original model
    would make it unfailable."""
    floor = measured.kl_forget("retrain_seed2")
    assert floor > 0.0, measured.table()
    assert KL_FACTOR * floor < measured.kl_forget("original"), measured.table()


# ------------------------------------------------------------------------ bands
@pytest.mark.parametrize("method", METHODS)
def test_backdoor_success_within_band_of_retraining(measured: Measured, method: str):
    """ASR <= retrain ASR + 0.05.

    Seen to fail with distillation's subtraction skipped (ASR 0.96: the teacher's backdoor
    stays) and with its loss negated. FedEraser's broken calibrations (skipped, sign flipped)
    pass it: their ruined models do not predict the target class either.
    """
    limit = measured.asr("retrain") + ASR_SLACK
    assert measured.asr(method) <= limit, (
        f"{method} ASR {measured.asr(method):.3f} > {limit:.3f}; {measured.table()}")


@pytest.mark.parametrize("method", METHODS)
def test_test_accuracy_within_band_of_retraining(measured: Measured, method: str):
    """Test accuracy >= retrain test accuracy - 0.03.

    Seen to fail with FedEraser's calibration skipped (0.41, as FedAccum) or its sign flipped
    (0.10), and with distillation's loss negated (0.10) or zeroed (0.54). A distillation loss
    in the wrong direction or without the temperature passes it (0.955, 0.947).
    """
    limit = measured.test_accuracy("retrain") - ACCURACY_SLACK
    assert measured.test_accuracy(method) >= limit, (
        f"{method} test accuracy {measured.test_accuracy(method):.3f} < {limit:.3f}; "
        f"{measured.table()}")


@pytest.mark.parametrize("method", METHODS)
def test_output_divergence_on_forgotten_data_within_noise_floor_band(measured: Measured,
                                                                    method: str):
    """KL(p_retrain ‖ p_method) on the forgotten data <= C · KL(p_retrain ‖ p_retrain_seed2).

    Seen to fail for every mutation tried: FedEraser's calibration skipped or its sign flipped
    (KL 3.8, 25.9), distillation's subtraction skipped, and its loss reversed to
    KL(student ‖ teacher) (0.29), without the temperature (0.20), negated (NaN fails too) or
    zeroed (10.9); the band is 0.066.
    """
    limit = KL_FACTOR * measured.kl_forget("retrain_seed2")
    assert measured.kl_forget(method) <= limit, (
        f"{method} KL on the forgotten data {measured.kl_forget(method):.4f} > {limit:.4f} "
        f"(C = {KL_FACTOR}); {measured.table()}")
