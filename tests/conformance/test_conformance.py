"""One conformance suite over every registered removal method (scikit-learn's
``parametrize_with_checks`` habit): built-in federated and centralized methods, and a user's
method registered from an extension module (``tests/conformance_ext.py``).

Each method must implement its setting's written protocol (:mod:`fedunlearn.unlearning.base`),
implement exactly the hooks of the capabilities it declares (``Capabilities``), store its
hyperparameters unchanged in the constructor, validate them in ``check()``, and serve a request
on a small trained federation without modifying its inputs. A method lacking part of the
protocol, or whose hooks and declared capabilities disagree, fails here with a message naming
what is missing (the capability, for a capability), and the runner refuses it before any work
with the same words (tested below).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import max_abs_diff, small_config

from fedunlearn.config.extensions import load_extensions
from fedunlearn.config.tree import ConfigError
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.store import HistoryStore
from fedunlearn.run.checks import build_methods
from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning import UNLEARNERS, UnlearningContext, UnlearningResult
from fedunlearn.unlearning.base import (
    HOOKS,
    REQUIRED,
    Capabilities,
    FederatedUnlearner,
    call_check_config,
    call_check_model,
    can_resume,
    capabilities_of,
    capability_gaps,
    protocol_gaps,
    restore_state,
    saved_state,
    setting_of,
)

load_extensions(["conformance_ext"])  # the user's method, as `experiment.extensions` does

ALL = UNLEARNERS.names()
FEDERATED = [n for n in ALL if setting_of(UNLEARNERS.get(n)) == "federated"]
CENTRALIZED = [n for n in ALL if setting_of(UNLEARNERS.get(n)) == "centralized"]
CFG = ["data.num_clients=5", "training.rounds=4", "training.local_epochs=3",
       "training.learning_rate=0.2", "training.momentum=0.5", "history.retention_interval=1",
       "data.server_fraction=0.1", "backdoor.clients=[1]", "backdoor.fraction=0.5"]
TARGET = 1


class Spy:
    """A federation that records which clients were asked to work, and delegates."""

    def __init__(self, inner: InProcessFederation) -> None:
        self.inner = inner
        self.num_clients = inner.num_clients
        self.trained: list[int] = []
        self.asked: list[tuple[str, list[int]]] = []  # tasks other than training (PGA's ascent)
        self.evaluated: list[int] = []  # federated evaluation (PGA's and NoT's recovery)

    @property
    def messages_sent(self) -> int:
        return self.inner.messages_sent

    @property
    def bytes_exchanged(self) -> int:
        return self.inner.bytes_exchanged

    def fedavg(self, initial, *, exclude=frozenset(), listener=None, variant=0, stream=0,
               start=None, removed_through=0):
        self.trained += [k for k in range(self.num_clients) if k not in exclude]
        return self.inner.fedavg(initial, exclude=exclude, listener=listener, variant=variant,
                                 stream=stream, start=start, removed_through=removed_through)

    def train_clients(self, model, clients: Sequence[int], **kw):
        task = kw.get("task", "train")
        if task == "train":
            self.trained += list(clients)
        else:
            self.asked.append((task, list(clients)))
        return self.inner.train_clients(model, clients, **kw)

    def evaluate_clients(self, model, clients: Sequence[int], **kw):
        self.evaluated += list(clients)
        return self.inner.evaluate_clients(model, clients, **kw)

    def __getattr__(self, name):  # any further port member a method uses
        return getattr(self.inner, name)


@pytest.fixture
def trained(trained_federation):
    """The session's trained federation (tests/conftest.py), whose config is :data:`CFG`."""
    assert trained_federation[0] == small_config(*CFG)
    return trained_federation


def _context(trained, targets: tuple[int, ...], federation=None) -> UnlearningContext:
    cfg, setup, fed, store, run = trained
    return UnlearningContext(cfg=cfg, targets=targets, removed=frozenset(targets),
                             model=run.final, initial=setup.initial, history=store,
                             federation=federation or fed, data=setup.data,
                             build_model=setup.build_model, seed=7)


def test_the_suite_covers_the_built_in_and_the_users_methods():
    assert {"retrain", "federaser", "fedaccum", "distillation",
            "user_scaled_subtraction"} <= set(FEDERATED)
    assert {"central_retrain", "sisa", "sisa_random", "newton"} <= set(CENTRALIZED)
    assert sorted(FEDERATED + CENTRALIZED) == ALL  # every method declares a known setting


@pytest.mark.parametrize("name", ALL)
def test_protocol_and_hyperparameters(name):
    factory = UNLEARNERS.get(name)
    assert not protocol_gaps(factory), f"'{name}' lacks {', '.join(protocol_gaps(factory))}"
    method = factory()  # every hyperparameter has a default
    assert not protocol_gaps(method), f"'{name}' lacks {', '.join(protocol_gaps(method))}"
    # the constructor only stores: each parameter is kept under its own name, unchanged
    for p in inspect.signature(factory).parameters.values():
        if p.name != "self":
            assert p.default is not inspect.Parameter.empty, f"'{name}': {p.name} needs a default"
            assert getattr(method, p.name) == p.default, f"'{name}' does not store {p.name}"
    method.check()  # the defaults are valid


@pytest.mark.parametrize("name", ALL)
def test_declared_capabilities_match_the_hooks(name, tmp_path):
    """Each method declares a Capabilities and implements exactly the hooks of what it
    declares; the declared hooks answer through the guarded calls the run makes."""
    factory = UNLEARNERS.get(name)
    assert isinstance(capabilities_of(factory), Capabilities)
    gaps = capability_gaps(factory)
    assert not gaps, f"'{name}': its capabilities and hooks disagree: {'; '.join(gaps)}"
    method = factory()
    declared = capabilities_of(method)
    cfg = small_config(*CFG, "unlearning.requests=[[1]]")
    call_check_config(method, cfg)  # the defaults fit the suite's config
    if declared.checks_model:
        call_check_model(method, prepare(cfg).build_model())
    assert can_resume(method) == (not declared.carries_state or declared.saves_state)
    state = saved_state(method)
    assert (state is None) == (not declared.saves_state)
    if state is not None:  # what it saves, a fresh instance restores and saves again
        fresh = factory()
        restore_state(fresh, state, store=str(tmp_path))
        again = saved_state(fresh)
        assert again is not None and again.meta == state.meta
        assert sorted(again.arrays) == sorted(state.arrays)


@pytest.mark.parametrize("name", [n for n in FEDERATED
                                  if "client" in capabilities_of(UNLEARNERS.get(n)).granularities])
def test_federated_method_serves_a_request(name, trained):
    _, setup, fed, store, run = trained
    before = {k: v.copy() for k, v in run.final.items()}
    files_before = sorted((p.name, p.stat().st_size) for p in store.path.rglob("*"))
    spy = Spy(fed)
    method = UNLEARNERS.get(name)()
    result = method.unlearn(_context(trained, (TARGET,), federation=spy))
    assert isinstance(result, UnlearningResult)
    assert result.model is not None and list(result.model) == list(run.final)
    for k, v in result.model.items():
        assert v.shape == run.final[k].shape and v.dtype == run.final[k].dtype
        assert np.all(np.isfinite(v))
    c = result.cost
    assert min(c.client_epochs, c.rounds, c.messages_sent, c.server_epochs) >= 0
    assert (c.messages_sent > 0) == (c.client_epochs > 0), c  # work is counted as messages
    # the trained run is untouched: model, stored files, and the store still verifies
    assert max_abs_diff(run.final, before) == 0.0
    assert sorted((p.name, p.stat().st_size) for p in store.path.rglob("*")) == files_before
    HistoryStore.open(store.path)
    # the target never trains; only a method declaring it needs the target may send it
    # another task (PGA's ascent on its own data), and that task goes to the targets only
    assert TARGET not in spy.trained, f"'{name}' had the client it forgets train"
    assert TARGET not in spy.evaluated, f"'{name}' had the client it forgets evaluate"
    if capabilities_of(method).needs_target_client:
        assert spy.asked and all(clients == [TARGET] for _, clients in spy.asked), spy.asked
    else:
        assert not spy.asked, f"'{name}' contacted the client it forgets"
    assert setup.evaluator()(result.model)["accuracy"] > 0.5


@pytest.mark.parametrize("name", CENTRALIZED)
def test_centralized_method_fits_and_serves_a_request(name, trained):
    _, setup, _, _, run = trained
    data = setup.data
    x_before = [d.x.copy() for d in data.clients]
    method = UNLEARNERS.get(name)()
    assert method.fit(_context(trained, ())) is method
    assert hasattr(method, "original_params_"), f"'{name}'.fit does not set original_params_"
    if method.original_params_ is not None:
        assert list(method.original_params_) == list(run.final)
    k = data.num_classes
    for proba_of in (method.predict_proba_original,):
        p = proba_of(data.test.x)
        assert p.shape == (len(data.test.x), k) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    result = method.unlearn(_context(trained, (TARGET,)))
    assert result.model is not None or result.predict_proba is not None
    predict = result.predict_proba or setup.predictor()(result.model)
    p = predict(data.test.x)
    assert p.shape == (len(data.test.x), k) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert float(np.mean(p.argmax(axis=1) == data.test.y)) > 0.5
    assert result.cost.messages_sent == 0 and result.cost.client_epochs == 0  # no federation
    assert all(np.array_equal(a, d.x) for a, d in zip(x_before, data.clients, strict=True))


# --- a method lacking part of the protocol is named, and refused before any work ------------

class _NoUnlearn:
    setting = "federated"

    def check(self) -> None: ...


class _NoCheck:
    setting = "federated"

    def unlearn(self, ctx): ...


class _CentralWithoutFit:
    setting = "centralized"
    exact = False

    def check(self) -> None: ...

    def unlearn(self, ctx): ...

    def predict_proba_original(self, x): ...


class _CentralOldStyleExact(_CentralWithoutFit):
    exact = True  # the old way to declare it: no longer read

    def fit(self, ctx):
        return self


class _NoSetting:
    def check(self) -> None: ...

    def unlearn(self, ctx): ...


class _UnknownSetting(_NoSetting):
    setting = "quantum"


class _Plain:
    setting = "federated"

    def check(self) -> None: ...

    def unlearn(self, ctx): ...


class _DeclaresChecksConfigWithoutHook(_Plain):
    capabilities = Capabilities(checks_config=True)


class _DeclaresChecksModelWithoutHook(_Plain):
    capabilities = Capabilities(checks_model=True)


class _DeclaresSavesStateWithoutHooks(_Plain):
    capabilities = Capabilities(carries_state=True, saves_state=True)


class _DeclaresSavesStateWithHalfTheHooks(_DeclaresSavesStateWithoutHooks):
    def state_arrays(self):
        return {}, {}


class _UndeclaredCheckConfig(_Plain):  # its hook would be silently ignored
    def check_config(self, cfg) -> None: ...


class _UndeclaredCheckModel(FederatedUnlearner):  # a subclass of the protocol, too
    setting = "federated"

    def check(self) -> None: ...

    def unlearn(self, ctx): ...

    def check_model(self, net) -> None: ...


class _UndeclaredStateHooks(_Plain):
    def state_arrays(self):
        return {}, {}

    def load_state(self, meta, arrays, *, store) -> None: ...


class _OldStyleAttribute(_Plain):  # the old way to declare it: no longer read
    needs_replayable_history = True


class _OldStyleAttributeOnASubclass(_UndeclaredCheckModel):
    capabilities = Capabilities(checks_model=True)
    keeps_state_across_requests = True


class _CapabilitiesNotACapabilities(_Plain):
    capabilities = ("exact",)  # not a Capabilities


BROKEN = [(_NoUnlearn, "unlearn(ctx)"), (_NoCheck, "check()"), (_UnknownSetting, "'setting'"),
          (_CentralWithoutFit, "fit(ctx)"), (_NoSetting, "'setting'")]
CAPABILITY_BROKEN = [
    (_DeclaresChecksConfigWithoutHook, "'checks_config'"),
    (_DeclaresChecksModelWithoutHook, "'checks_model'"),
    (_DeclaresSavesStateWithoutHooks, "'saves_state'"),
    (_DeclaresSavesStateWithHalfTheHooks, "'saves_state'"),
    (_UndeclaredCheckConfig, "'checks_config'"),
    (_UndeclaredCheckModel, "'checks_model'"),
    (_UndeclaredStateHooks, "'saves_state'"),
    (_OldStyleAttribute, "'needs_replayable_history'"),
    (_OldStyleAttributeOnASubclass, "'carries_state'"),
    (_CentralOldStyleExact, "'exact'"),
    (_CapabilitiesNotACapabilities, "'capabilities'")]


@pytest.mark.parametrize(("cls", "missing"), BROKEN + CAPABILITY_BROKEN,
                         ids=[c.__name__ for c, _ in BROKEN + CAPABILITY_BROKEN])
def test_a_method_lacking_part_of_the_protocol_is_named_and_refused(cls, missing, monkeypatch,
                                                                    tmp_path: Path):
    gaps = protocol_gaps(cls)
    assert len(gaps) == 1 and missing in gaps[0], gaps
    monkeypatch.setitem(UNLEARNERS._items, "broken_method", cls)
    cfg = small_config("unlearning.methods=[\"retrain\", \"broken_method\"]",
                       "unlearning.requests=[[0]]")
    with pytest.raises(ConfigError, match=r"'broken_method'.*lacks .*" + missing.replace(
            "(", r"\(").replace(")", r"\)")):
        build_methods(cfg)


@pytest.mark.parametrize(("cls", "capability"), CAPABILITY_BROKEN,
                         ids=[c.__name__ for c, _ in CAPABILITY_BROKEN])
def test_the_conformance_check_names_the_capability(cls, capability, monkeypatch, tmp_path):
    """The check the suite runs over every registered method
    (:func:`test_declared_capabilities_match_the_hooks`) fails for a registered method whose
    capabilities and hooks disagree, and its message names the capability."""
    monkeypatch.setitem(UNLEARNERS._items, "broken_method", cls)
    with pytest.raises(AssertionError, match=f"'broken_method'.*{capability}"):
        test_declared_capabilities_match_the_hooks("broken_method", tmp_path)


def test_capabilities_are_typed():
    with pytest.raises(ValueError, match=r"saves_state=True\) needs carries_state=True"):
        Capabilities(saves_state=True)
    with pytest.raises(TypeError, match="exact"):
        Capabilities(exact=1)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Capabilities().exact = True  # type: ignore[misc]
    assert set(HOOKS) <= {f.name for f in dataclasses.fields(Capabilities)}


def test_a_hook_runs_only_when_its_capability_is_declared():
    calls: list[str] = []

    class Declared(_Plain):
        capabilities = Capabilities(checks_config=True, checks_model=True)

        def check_config(self, cfg) -> None:
            calls.append("config")

        def check_model(self, net) -> None:
            calls.append("model")

    class Undeclared(Declared):
        capabilities = Capabilities()

    call_check_config(Undeclared(), None)
    call_check_model(Undeclared(), None)
    assert calls == [] and saved_state(Undeclared()) is None
    call_check_config(Declared(), None)
    call_check_model(Declared(), None)
    assert calls == ["config", "model"]
    carries = type("Carries", (_Plain,), {"capabilities": Capabilities(carries_state=True)})
    assert can_resume(_Plain()) and not can_resume(carries())
    with pytest.raises(ValueError, match="saves_state"):
        restore_state(_Plain(), ({}, {}), store="")


def test_a_new_method_file_registers_itself(tmp_path: Path, monkeypatch):
    """A built-in method is one file in federated/ or centralized/: importing the package
    imports it, and its decorator registers it (no list to edit)."""
    import fedunlearn.unlearning as package
    from fedunlearn.unlearning import federated

    (tmp_path / "zz_new_method.py").write_text(
        "from fedunlearn.unlearning.base import UNLEARNERS, FederatedUnlearner\n"
        "@UNLEARNERS.register('zz_new_method')\n"
        "class NewMethod(FederatedUnlearner):\n"
        "    setting = 'federated'\n"
        "    def check(self): ...\n"
        "    def unlearn(self, ctx): ...\n")
    monkeypatch.setattr(federated, "__path__", [*federated.__path__, str(tmp_path)])
    monkeypatch.setattr(UNLEARNERS, "_items", dict(UNLEARNERS._items))
    try:
        package._import_method_files()
        assert "zz_new_method" in UNLEARNERS
        assert not protocol_gaps(UNLEARNERS.get("zz_new_method"))
    finally:
        sys.modules.pop("fedunlearn.unlearning.federated.zz_new_method", None)


def test_the_built_in_methods_and_their_registration_order():
    built_in = [n for n in UNLEARNERS._items
                if UNLEARNERS.get(n).__module__.startswith("fedunlearn.unlearning.")]
    assert built_in == ["central_retrain", "newton", "sisa", "sisa_random", "class_pruning",
                        "distillation",
                        "fedaccum", "federaser", "fedrecover", "not", "pga", "retrain"]


def test_importing_the_methods_does_not_load_scipy():
    import subprocess

    code = "import fedunlearn.unlearning, sys; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_required_members_are_those_the_runner_calls():
    """The runner calls fit and predict_proba_original on centralized methods only."""
    assert set(REQUIRED["federated"]) == {"check", "unlearn"}
    assert set(REQUIRED["centralized"]) == {"check", "unlearn", "fit", "predict_proba_original"}


@pytest.mark.parametrize("name", ALL)
def test_a_bad_hyperparameter_is_refused_when_the_config_is_read(name):
    """Every numeric hyperparameter set to -1 (an out-of-range value for all of them, by
    design) is refused by ``check()``, before any work, unless -1 is documented as valid."""
    factory = UNLEARNERS.get(name)
    numeric = [p for p in inspect.signature(factory).parameters.values()
               if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)]
    for p in numeric:
        method = factory(**{p.name: -1})
        with pytest.raises(ValueError):
            method.check()


def test_base_doctests():
    import doctest

    from fedunlearn.unlearning import base
    failed, attempted = doctest.testmod(base)
    assert attempted >= 2 and failed == 0


@pytest.mark.parametrize("module", ["fedunlearn.run.serving", "fedunlearn.config.extensions",
                                    "fedunlearn.engine.faults",
                                    "fedunlearn.engine.messages", "fedunlearn.models.training",
                                    "fedunlearn.evaluation.shadow", "fedunlearn.config.tree",
                                    "fedunlearn.reporting.tables",
                                    "fedunlearn.unlearning.federated.finetune",
                                    "fedunlearn.unlearning.federated.negation"])
def test_doctests_of_the_protocol_checks(module):
    """The answer check (_misfit), describe_failure, Flower's error unwrapping, the 0-d round
    trip through a Flower record and the batch bounds, each against hand-written values."""
    import doctest
    import importlib

    failed, attempted = doctest.testmod(importlib.import_module(module))
    assert attempted >= 1 and failed == 0


def test_an_unlearn_that_returns_no_result_is_one_line(trained):
    from fedunlearn.evaluation.schema import Role
    from fedunlearn.run.checks import Method, RequestError
    from fedunlearn.run.serving import _serve

    class ReturnsNothing(_NoCheck):
        def check(self) -> None: ...

    with pytest.raises(RequestError, match="returned NoneType, not an UnlearningResult"):
        _serve(Method("nothing", ReturnsNothing(), Role.METHOD), _context(trained, (TARGET,)),
               0, {})


# --- every granularity a method declares, served -------------------------------------------

GRANULAR = [(name, g) for name in ALL
            for g in sorted(capabilities_of(UNLEARNERS.get(name)).granularities)
            if g != "client"]


@pytest.mark.parametrize(("name", "granularity"), GRANULAR)
def test_a_method_serves_every_granularity_it_declares(name, granularity, trained):
    """A sample request (the backdoored client's poisoned samples) or a class request, resolved
    against the data: the method answers with a usable model or predictor, and a federated
    method asks only the clients still in the federation for work."""
    import dataclasses

    from fedunlearn.data.removal import resolve

    _, setup, _, _, _ = trained
    request = {"samples": f'[{{client = {TARGET}, samples = "backdoor"}}]',
               "class": "[{label = 3}]"}[granularity]
    cfg = small_config(*CFG, f"unlearning.requests={request}")
    (step,) = resolve(cfg, setup.data)
    method = UNLEARNERS.get(name)()
    spy = Spy(InProcessFederation(cfg, setup.evaluator()))  # its clients know the request
    ctx = dataclasses.replace(_context(trained, step.targets, spy), cfg=cfg,
                              removed=step.gone, removal=step)
    if setting_of(type(method)) == "centralized":
        method.fit(dataclasses.replace(ctx, removal=None, targets=(), removed=frozenset()))
    result = method.unlearn(ctx)
    predict = result.predict_proba or setup.predictor()(result.model)
    p = predict(setup.data.test.x)
    assert p.shape == (len(setup.data.test.x), setup.data.num_classes)
    assert float(np.mean(p.argmax(axis=1) == setup.data.test.y)) > 0.5
    assert not set(spy.trained) & step.gone
