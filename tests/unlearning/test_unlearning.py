"""Removal requests: the protocol every method implements, retraining as the reference, purge,
lineage, and the whole pipeline through Flower."""

from __future__ import annotations

import json

import pytest
from conftest import max_abs_diff, small_config

from fedunlearn.cli import main
from fedunlearn.config.tree import ConfigError
from fedunlearn.engine.inprocess import InProcessFederation, flower_average
from fedunlearn.engine.local import client_train
from fedunlearn.engine.messages import job_json
from fedunlearn.history.lineage import LineageLog, client_lineage, params_hash
from fedunlearn.history.store import HistoryStore
from fedunlearn.models.seeding import sample_participants
from fedunlearn.run.checks import RequestError, build_methods
from fedunlearn.run.pipeline import prepare, run_experiment, train_federation
from fedunlearn.run.serving import serve_requests
from fedunlearn.unlearning import UNLEARNERS, UnlearningContext

UNLEARN_CFG = ["data.num_clients=5", "training.rounds=4", "training.local_epochs=3",
               "training.learning_rate=0.2", "training.momentum=0.5",
               "history.retention_interval=2", "data.server_fraction=0.1"]


@pytest.fixture
def trained(trained_federation):
    """The session's trained federation (tests/conftest.py)."""
    return trained_federation


def context(trained, targets=(1,), federation=None) -> UnlearningContext:
    cfg, setup, fed, store, run = trained
    return UnlearningContext(cfg=cfg, targets=targets, removed=frozenset(targets),
                             model=run.final, initial=setup.initial, history=store,
                             federation=federation or fed, data=setup.data,
                             build_model=setup.build_model, seed=7)


def test_retrain_through_the_port_equals_fedavg_without_the_target(trained):
    cfg, setup, _, _, run = trained
    result = UNLEARNERS.get("retrain")().unlearn(context(trained, targets=(1,)))
    # an independent FedAvg loop over the original sampling minus client 1
    job, model = job_json(cfg), dict(setup.initial)
    for r in range(1, cfg.training.rounds + 1):
        pids = sample_participants(cfg.seed, r, 5, cfg.training.sample_fraction, {1})
        outs = [client_train(job, model, p, server_round=r) for p in pids]
        model = flower_average([o[0] for o in outs], [o[1] for o in outs])
    assert max_abs_diff(result.model, model) == 0.0
    assert max_abs_diff(result.model, run.final) > 1e-3  # and it is a different model


def test_requests_and_purge(trained, tmp_path):
    _, setup, fed, _, _ = trained
    cfg = small_config(*UNLEARN_CFG, "unlearning.requests=[[2], [3]]",
                       "unlearning.methods=[\"retrain\", \"fedaccum\"]",
                       "verification.noise_floor=false", "verification.mia_shadows=0")
    store = HistoryStore.create(tmp_path / "history", retention_interval=2)
    lineage = LineageLog(tmp_path)
    run = train_federation(fed, setup, store, progress=False, lineage=lineage)
    bytes_before = store.bytes_used()
    served = serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                            store=store, federation=fed, lineage=lineage,
                            build_model=setup.build_model, predictor=setup.predictor(),
                            stream=None)
    methods = [(r.request, r.method) for r in served.rows]
    assert methods == [([2], "original"), ([2], "retrain"), ([2], "fedaccum"),
                       ([3], "original"), ([3], "retrain"), ([3], "fedaccum")]
    retrain_rows = [r for r in served.rows if r.method == "retrain"]
    assert all(r.speedup_vs_retrain == pytest.approx(1.0) for r in retrain_rows)
    # nothing of clients 2 and 3 remains in the store, and it still verifies
    reopened = HistoryStore.open(store.path)
    for client in (2, 3):
        assert not list(store.path.rglob(f"*client_{client:05d}*"))
        assert f"client_{client:05d}" not in (store.path / "manifest.json").read_text()
        assert client not in reopened.clients()
    freed = sum(p["bytes_freed"] for p in served.purges)
    assert freed > 0 and freed == bytes_before - reopened.bytes_used()
    # the lineage log answers the user's question
    info = client_lineage(lineage.read(), 2)
    assert info["rounds"] == [t for t in reopened.rounds() if 2 in reopened.participants(t)]
    assert info["removal_request"]["request"] == 0
    assert info["purge"]["bytes_freed"] == served.purges[0]["bytes_freed"]
    assert {m["method"] for m in info["models_after_removal"]} >= {"retrain", "fedaccum"}
    assert any(m["kind"] == "trained" for m in info["models_trained_with_data"])
    # a second removal of a purged client is refused and changes nothing
    with pytest.raises(RequestError, match="never took part"):
        serve_requests(small_config(*UNLEARN_CFG, "unlearning.requests=[[2]]",
                                    "unlearning.methods=[\"retrain\"]"),
                       data=setup.data, trained=run.final, initial=setup.initial, store=store,
                       federation=fed, lineage=lineage, build_model=setup.build_model,
                       predictor=setup.predictor(), stream=None)
    assert store.bytes_used() == reopened.bytes_used()


def test_bad_method_names_and_params_fail_before_work():
    with pytest.raises(ConfigError, match="unknown unlearning method 'fedforget'; known: "):
        build_methods(small_config("unlearning.requests=[[0]]",
                                   "unlearning.methods=[\"fedforget\"]"))
    with pytest.raises(ConfigError, match=r"unknown parameters \['rr'\]; accepted: r"):
        build_methods(small_config("unlearning.requests=[[0]]",
                                   "unlearning.methods=[\"federaser\"]",
                                   "unlearning.params={federaser={rr=1}}"))


@pytest.mark.flower
def test_backdoor_removal_through_flower(tmp_path):
    extra = ["backdoor.clients=[0]", "backdoor.fraction=0.8", "unlearning.requests=[[0]]",
             "training.rounds=6", "data.num_clients=5", "history.retention_interval=2",
             "training.local_epochs=2", "verification.mia_shadows=2",
             "verification.shadow_epochs=5"]
    cfg = small_config(*extra)
    results = run_experiment(cfg, tmp_path / "run", quiet=True)
    rows = {r["method"]: r for r in results["unlearning"]}
    assert set(rows) == {"original", "retrain", "retrain_seed2", "federaser", "fedaccum",
                         "distillation"}
    for r in rows.values():
        assert {"test_accuracy", "forget_accuracy", "backdoor_asr", "backdoor_p_value",
                "mia_loss_auc", "mia_lira_auc", "kl_forget", "acc_err"} <= set(r["metrics"])
    assert rows["federaser"]["bytes_exchanged"] > 0
    # the report was written at the end of the run, and `fedunlearn report` regenerates it
    # from results.json alone, byte for byte
    report = (tmp_path / "run" / "report.md").read_bytes()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.md").read_bytes() == report
    assert (tmp_path / "run" / "plots" / "methods.png").stat().st_size > 10_000
    assert rows["distillation"]["messages_sent"] == 0
    assert rows["federaser"]["messages_sent"] > 0
    assert rows["retrain"]["speedup_vs_retrain"] == pytest.approx(1.0)
    # retraining through Flower is FedAvg without client 0, bit for bit
    setup = prepare(cfg)
    plain = InProcessFederation(cfg, setup.evaluator()).fedavg(setup.initial,
                                                               exclude=frozenset({0}))
    assert rows["retrain"]["model_hash"] == params_hash(plain.final)
    # purge: client 0 is gone from the store, which still verifies
    store = HistoryStore.open(tmp_path / "run" / "history")
    assert 0 not in store.clients()
    assert results["purges"][0]["bytes_freed"] > 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["unlearning"] == results["unlearning"]


USER_METHOD = '''
"""A user's removal method, registered from their own module."""
import numpy as np

from fedunlearn.unlearning import UNLEARNERS, Cost, UnlearningResult


@UNLEARNERS.register("subtract_only")
class SubtractOnly:
    """Subtract the targets' stored running sums, nothing else (no client work)."""

    setting = "federated"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def check(self):
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    def unlearn(self, ctx):
        model = {k: v.copy() for k, v in ctx.model.items()}
        for c in ctx.targets:
            for k, v in ctx.history.running_sum(c).items():
                if np.issubdtype(model[k].dtype, np.floating):
                    model[k] = (model[k] - self.scale * v).astype(model[k].dtype)
        return UnlearningResult(model=model, cost=Cost(), details={"scale": self.scale})
'''


def _user_method_config(tmp_path, monkeypatch, scale):
    """The config running USER_METHOD (written as the user's module ``my_unlearning``) with
    ``scale``, after checking it as `fedunlearn run` does (imports the extension, checks
    the names)."""
    (tmp_path / "my_unlearning.py").write_text(USER_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_config(*UNLEARN_CFG, "experiment.extensions=[\"my_unlearning\"]",
                       "unlearning.requests=[[1]]",
                       "unlearning.methods=[\"retrain\", \"subtract_only\"]",
                       f"unlearning.params={{subtract_only={{scale={scale}}}}}",
                       "verification.noise_floor=false", "verification.mia_shadows=0")
    prepare(cfg)
    return cfg


def test_user_method_from_own_module_lands_on_the_table(trained, tmp_path, monkeypatch):
    _, setup, fed, _, _ = trained
    cfg = _user_method_config(tmp_path, monkeypatch, 0.5)
    store = HistoryStore.create(tmp_path / "history", retention_interval=2)
    run = train_federation(fed, setup, store, progress=False)
    expected = {k: v.copy() for k, v in run.final.items()}
    for k, v in store.running_sum(1).items():
        expected[k] = (expected[k] - 0.5 * v).astype(expected[k].dtype)
    served = serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                            store=store, federation=fed, lineage=LineageLog(tmp_path),
                            build_model=setup.build_model, predictor=setup.predictor(),
                            stream=None)
    row = next(r for r in served.rows if r.method == "subtract_only")
    assert row.role == "method" and row.setting == "federated"
    assert row.details == {"scale": 0.5}
    assert row.model_hash == params_hash(expected)
    assert row.messages_sent == 0 and row.speedup_vs_retrain > 1.0
    assert {"test_accuracy", "kl_forget", "acc_err", "mia_loss_auc"} <= set(row.metrics)


@pytest.mark.parametrize(("scale", "what"), [(1e30, "predictions are NaN or Inf"),
                                             (1e45, "model holding NaN or Inf")])
def test_a_method_that_diverges_is_named_in_one_line_before_the_purge(
        trained, tmp_path, monkeypatch, scale, what):
    """A method whose model holds Inf (scale 1e45 overflows float32), or is finite but
    overflows the forward pass (1e30), stops the serving with one line naming it, before
    verification computes metrics on NaN and before the request's purge."""
    _, setup, fed, _, _ = trained
    cfg = _user_method_config(tmp_path, monkeypatch, scale)
    store = HistoryStore.create(tmp_path / "history", retention_interval=2)
    run = train_federation(fed, setup, store, progress=False)
    with pytest.raises(RequestError, match=f"'subtract_only' answered .*{what}.*"
                                           r"unlearning\.params\.subtract_only"):
        serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                       store=store, federation=fed, lineage=LineageLog(tmp_path),
                       build_model=setup.build_model, predictor=setup.predictor(), stream=None)
    assert store.purged() == [] and 1 in store.clients()


def test_lineage_names_only_the_clients_whose_data_shaped_each_answer(tmp_path):
    """With 30 % of 8 clients per round, some clients never train; no answer may be listed as
    trained with their data. Oracle: retraining reaches exactly the clients the seeded
    sampler draws without the target (an independent draw); FedEraser answers from the
    recorded training, so it holds every recorded participant but the target."""
    cfg = small_config("data.num_clients=8", "training.rounds=3", "training.sample_fraction=0.3")
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(tmp_path / "history")
    run = train_federation(fed, setup, store, progress=False)
    took_part = {c for t in store.rounds() for c in store.participants(t)}
    assert len(took_part) < 8  # the case under test: some clients never trained
    target = min(took_part)
    cfg = small_config("data.num_clients=8", "training.rounds=3", "training.sample_fraction=0.3",
                       f"unlearning.requests=[[{target}]]",
                       "unlearning.methods=[\"retrain\", \"federaser\"]",
                       "verification.noise_floor=false", "verification.mia_shadows=0")
    lineage = LineageLog(tmp_path)
    serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial, store=store,
                   federation=fed, lineage=lineage, build_model=setup.build_model,
                   predictor=setup.predictor(), stream=None)
    answers = {e["method"]: e["trained_with"] for e in lineage.read()
               if e["event"] == "model" and e["kind"] == "unlearned"}
    drawn = {c for r in range(1, 4)
             for c in sample_participants(cfg.seed, r, 8, 0.3, {target})}
    assert answers == {"retrain": sorted(drawn), "federaser": sorted(took_part - {target})}
    never = sorted(set(range(8)) - took_part - drawn)
    assert never  # a client no training and no retraining ever reached
    for c in never:
        assert client_lineage(lineage.read(), c)["models_trained_with_data"] == []


MISBEHAVING = '''
import numpy as np
import torch

from fedunlearn.unlearning import UNLEARNERS, Cost, UnlearningResult


class _Base:
    setting = "federated"

    def check(self):
        pass


@UNLEARNERS.register("u_edits")
class Edits(_Base):
    """Zeroes ctx.model and ctx.initial in place (a natural slip) and answers with them."""

    def unlearn(self, ctx):
        for params in (ctx.model, ctx.initial):
            for v in params.values():
                v *= 0
        return UnlearningResult(model=ctx.model, cost=Cost())


@UNLEARNERS.register("u_raises")
class Raises(_Base):
    def unlearn(self, ctx):
        raise KeyError("no such thing")


@UNLEARNERS.register("u_exits")
class Exits(_Base):
    def unlearn(self, ctx):
        import sys
        sys.exit(3)


@UNLEARNERS.register("u_missing")
class Missing(_Base):
    def unlearn(self, ctx):
        return UnlearningResult(model=dict(list(ctx.model.items())[1:]), cost=Cost())


@UNLEARNERS.register("u_float64")
class Float64(_Base):
    def unlearn(self, ctx):
        return UnlearningResult(model={k: v.astype(np.float64) for k, v in ctx.model.items()},
                                cost=Cost())


@UNLEARNERS.register("u_tensors")
class Tensors(_Base):
    def unlearn(self, ctx):
        return UnlearningResult(model={k: torch.from_numpy(v) for k, v in ctx.model.items()},
                                cost=Cost())
'''


def _misbehaving(tmp_path, monkeypatch, trained, methods):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "misbehaving.py").write_text(MISBEHAVING)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_config(*UNLEARN_CFG, "experiment.extensions=[\"misbehaving\"]",
                       "unlearning.requests=[[1]]", f"unlearning.methods={methods}",
                       "verification.noise_floor=false", "verification.mia_shadows=0")
    prepare(cfg)
    _, setup, fed, _, _ = trained
    store = HistoryStore.create(tmp_path / "history", retention_interval=2)
    run = train_federation(fed, setup, store, progress=False)
    return lambda: serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                                  store=store, federation=fed, lineage=LineageLog(tmp_path),
                                  build_model=setup.build_model, predictor=setup.predictor(),
                                  stream=None), run, store


def test_a_method_editing_its_inputs_in_place_changes_no_other_answer(trained, tmp_path,
                                                                      monkeypatch):
    """Oracle: the same rows without the editing method; the methods after it (retrain starts
    from ctx.initial, FedEraser from the history) and the original's row are unchanged."""
    serve, run, _ = _misbehaving(tmp_path / "a", monkeypatch, trained,
                                 '["retrain", "federaser"]')
    alone = {(r.method, r.role): r.model_hash for r in serve().rows}
    serve, run, _ = _misbehaving(tmp_path / "b", monkeypatch, trained,
                                 '["retrain", "u_edits", "federaser"]')
    final = {k: v.copy() for k, v in run.final.items()}
    rows = serve().rows
    assert {(r.method, r.role): r.model_hash for r in rows
            if r.method != "u_edits"} == alone
    assert max_abs_diff(final, run.final) == 0.0
    assert next(r for r in rows if r.method == "u_edits").metrics["test_accuracy"] < 0.5


@pytest.mark.parametrize(("method", "needle"), [
    ("u_raises", (r"'u_raises' failed on request 0: KeyError: 'no such thing' \(at "
                 r"misbehaving\.py:\d+ in unlearn\); fix it .*fedunlearn resume")),
    ("u_exits", (r"'u_exits' failed on request 0: SystemExit: 3 "
                r"\(at misbehaving\.py:\d+ in unlearn\)")),
    ("u_missing", (r"'u_missing' answered request 0 with a model that does not fit the "
                  r"experiment's network: missing \['1\.weight'\]")),
    ("u_float64", r"'u_float64' .* '1\.weight' is float64, the network's is float32"),
    ("u_tensors", r"'u_tensors' .* '1\.weight' is a Tensor, not a NumPy array"),
])
def test_a_user_method_that_fails_or_answers_a_misfit_is_one_line_before_the_purge(
        trained, tmp_path, monkeypatch, method, needle):
    serve, _, store = _misbehaving(tmp_path, monkeypatch, trained, f'["retrain", "{method}"]')
    with pytest.raises(RequestError, match=needle) as info:
        serve()
    assert "\n" not in str(info.value)
    assert store.purged() == [] and 1 in store.clients()


CHECKING = '''
import numpy as np
import torch

from fedunlearn.unlearning import UNLEARNERS, Capabilities, Cost, UnlearningResult


@UNLEARNERS.register("c_zeroes")
class Zeroes:
    """Its check_model zeroes the network it is shown."""

    setting = "federated"
    capabilities = Capabilities(checks_model=True)

    def check(self):
        pass

    def check_model(self, net):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0)

    def unlearn(self, ctx):
        return UnlearningResult(model=ctx.model, cost=Cost())


@UNLEARNERS.register("c_keyerror")
class KeyErr(Zeroes):
    capabilities = Capabilities(checks_config=True, checks_model=True)

    def check_model(self, net):
        pass

    def check_config(self, cfg):
        return cfg.unlearning.params["nothing"]


@UNLEARNERS.register("c_central")
class Central:
    setting = "centralized"
    capabilities = Capabilities(exact=False)

    def __init__(self, mode="fit"):
        self.mode = mode

    def check(self):
        pass

    def fit(self, ctx):
        if self.mode == "fit":
            raise RuntimeError("no pooled data here")
        self.original_params_ = None
        return self

    def predict_proba_original(self, x):
        return np.full((len(x), 10), 0.1)

    def unlearn(self, ctx):
        return UnlearningResult(predict_proba=lambda x: np.full((len(x), 3), 1 / 3), cost=Cost())
'''


def test_a_user_methods_checks_and_centralized_calls_fail_in_one_line(trained, tmp_path,
                                                                      monkeypatch):
    """check_model sees a copy of the network (the initial model stays the experiment's);
    check_config raising a KeyError, a centralized method's fit raising and its answer's
    probabilities of the wrong shape are each one line naming the method."""
    (tmp_path / "checking.py").write_text(CHECKING)
    monkeypatch.syspath_prepend(str(tmp_path))
    ext = ["experiment.extensions=[\"checking\"]", "unlearning.requests=[[1]]",
           "verification.noise_floor=false", "verification.mia_shadows=0"]
    plain = prepare(small_config(*UNLEARN_CFG, *ext))
    zeroed = prepare(small_config(*UNLEARN_CFG, *ext,
                                  "unlearning.methods=[\"retrain\", \"c_zeroes\"]"))
    assert max_abs_diff(plain.initial, zeroed.initial) == 0.0
    with pytest.raises(ConfigError, match=r"'c_keyerror': its check_config\(cfg\) failed: "
                                          r"KeyError: 'nothing' \(at checking\.py:\d+"):
        prepare(small_config(*UNLEARN_CFG, *ext,
                             "unlearning.methods=[\"retrain\", \"c_keyerror\"]"))
    _, setup, _fed, store, run = trained
    for mode, needle in (("fit", (r"'c_central' failed in fit\(ctx\) on the pooled data: "
                                 r"RuntimeError: no pooled data here \(at checking\.py.*; fix "
                                 r"it \(the federated requests are answered and kept: "
                                 r"`fedunlearn resume RUN_DIR` goes on with the centralized")),
                         ("shape", (r"'c_central' predicted probabilities of shape \(\d+, 3\) "
                                   r"for \d+ inputs, not \(\d+, 10\)"))):
        cfg = small_config(*UNLEARN_CFG, *ext, "unlearning.methods=[\"c_central\"]",
                           f"unlearning.params.c_central.mode=\"{mode}\"")
        with pytest.raises(RequestError, match=needle):
            serve_requests(cfg, data=setup.data, trained=run.final, initial=setup.initial,
                           store=store, federation=None, lineage=LineageLog(tmp_path),
                           build_model=setup.build_model, predictor=setup.predictor(),
                           stream=None, settings=("centralized",))
