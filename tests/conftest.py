"""Shared fixtures: small configs that run in seconds on CPU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fedunlearn.config.tree import Config, load_config
from fedunlearn.data.sources import SOURCES
from fedunlearn.engine.strategy import STRATEGIES
from fedunlearn.models.registry import MODELS
from fedunlearn.models.training import OPTIMIZERS, TRAIN_STEPS
from fedunlearn.unlearning.base import UNLEARNERS

SMALL = ["data.num_clients=4", "training.rounds=3", "training.local_epochs=1",
         "training.learning_rate=0.1", "data.partition=\"iid\"",
         # Flower runs of these tiny federations use one client process: a second one (two
         # pytest workers, each with its engine, on two cores) costs about 4 s per engine start
         # in imports for rounds of milliseconds. Tests of stalls and clusters set it back.
         "engine.ray_num_cpus=1"]


@pytest.fixture(autouse=True)
def _no_registration_outlives_its_test(tmp_path_factory: pytest.TempPathFactory):
    """A test's extension modules register names process-wide: drop what they added (and the
    modules, so a later test importing a module of the same name gets its own), so that no
    test sees another's names, whatever the order pytest or its workers run them in."""
    tables = [SOURCES, *(r._items for r in (STRATEGIES, MODELS, OPTIMIZERS, TRAIN_STEPS,
                                            UNLEARNERS))]
    before = [set(t) for t in tables]
    modules = set(sys.modules)
    yield
    for table, names in zip(tables, before):
        for name in set(table) - names:
            if not getattr(table[name], "__module__", "").startswith("fedunlearn."):
                del table[name]
    temp = str(tmp_path_factory.getbasetemp())
    for name in set(sys.modules) - modules:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(temp):
            del sys.modules[name]


@pytest.fixture
def tripwire(monkeypatch):
    """Fail the test if a refused command gets as far as starting an engine or training."""
    from fedunlearn.engine import local
    from fedunlearn.run import pipeline as runner

    def no_work(*args, **kwargs):
        pytest.fail("a refused command must stop before any engine or training start")

    monkeypatch.setattr(runner, "run_engine", no_work)
    monkeypatch.setattr(local, "warm_up", no_work)


def small_config(*extra: str) -> Config:
    """Four IID clients on digits, three rounds: a federation in a second or two."""
    return load_config(None, [*SMALL, *extra])


@pytest.fixture
def small_cfg() -> Config:
    return small_config()


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest absolute difference between two parameter mappings with the same keys."""
    assert list(a) == list(b)
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


DURATIONS = Path(__file__).with_name("durations.json")
"""Seconds per test (set-up, call and tear-down) of an earlier run, used only to order the
tests; refresh with ``FEDUNLEARN_TEST_DURATIONS=tests/durations.json ./scripts/test.sh``."""
UNKNOWN_S = 1.0  # a test not in the file (new): ordered as a slowish one


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Modules longest first, each kept whole. ``scripts/test.sh`` runs pytest-xdist's
    ``loadfile`` scheduling in this order: each idle worker takes the next module (longest
    processing time first: a long module started last sets the wall time), and a module's
    fixtures are built once. Order within a module is kept."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    cost: dict[str, float] = {}
    for item in items:
        cost[item.path] = cost.get(item.path, 0.0) + known.get(item.nodeid, UNKNOWN_S)
    items.sort(key=lambda item: -cost[item.path])  # stable: a module's order is kept


_SPENT: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _SPENT[report.nodeid] = _SPENT.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With ``FEDUNLEARN_TEST_DURATIONS=FILE``, write each test's seconds to FILE (in the
    controlling process, which sees every worker's reports)."""
    path = os.environ.get("FEDUNLEARN_TEST_DURATIONS")
    if path and not hasattr(session.config, "workerinput") and _SPENT:
        Path(path).write_text(json.dumps({k: round(v, 2) for k, v in sorted(_SPENT.items())},
                                         indent=0) + "\n")


TRAINED_CFG = ["data.num_clients=5", "training.rounds=4", "training.local_epochs=3",
               "training.learning_rate=0.2", "training.momentum=0.5",
               "history.retention_interval=1", "data.server_fraction=0.1", "backdoor.clients=[1]",
               "backdoor.fraction=0.5"]
"""The session's trained federation: five clients on digits, client 1 backdoored, four rounds
with every round's updates kept (in process, a couple of seconds)."""


@pytest.fixture(scope="session")
def trained_federation(tmp_path_factory):
    """One federation trained once per session (per pytest worker) for the tests that only read
    it: ``(cfg, setup, federation, store, run)``. A test that purges or writes makes its own."""
    from fedunlearn.engine.inprocess import InProcessFederation
    from fedunlearn.history.store import HistoryStore
    from fedunlearn.run.pipeline import prepare, train_federation

    cfg = small_config(*TRAINED_CFG)
    setup = prepare(cfg)
    fed = InProcessFederation(cfg, setup.evaluator())
    store = HistoryStore.create(tmp_path_factory.mktemp("session") / "history",
                                retention_interval=1)
    run = train_federation(fed, setup, store, progress=False)
    return cfg, setup, fed, store, run

