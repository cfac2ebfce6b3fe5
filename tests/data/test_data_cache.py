"""The driver's copy of the federated data for client processes (fedunlearn.data.cache): what a
client loads is exactly what it would have built, and the client runtime uses it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.data import cache
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.federated import FederatedData, build_federated_data
from fedunlearn.engine import local
from fedunlearn.engine.messages import job_json

CFG = ["backdoor.clients=[1]", "backdoor.fraction=0.5", "data.server_fraction=0.1"]


def _same(a: FederatedData, b: FederatedData) -> None:
    assert (a.num_classes, a.input_shape, len(a.clients)) == \
        (b.num_classes, b.input_shape, len(b.clients))
    assert (a.triggered_test is None) == (b.triggered_test is None)
    pairs = [(a.test, b.test), (a.server, b.server), *zip(a.clients, b.clients, strict=True)]
    if a.triggered_test is not None:
        pairs.append((a.triggered_test, b.triggered_test))
    for x, y in pairs:
        assert x.name == y.name and x.num_classes == y.num_classes
        assert x.x.dtype == y.x.dtype and np.array_equal(x.x, y.x)
        assert x.y.dtype == y.y.dtype and np.array_equal(x.y, y.y)


def test_the_copy_is_the_data_a_client_would_build(tmp_path):
    cfg = small_config(*CFG)
    job = job_json(cfg)
    built = build_federated_data(cfg)
    path = cache.publish(built, job, tmp_path)
    assert path is not None and path.exists()
    _same(cache.load(job, tmp_path), build_federated_data(cfg))  # an independent rebuild
    other = job_json(small_config(*CFG, "experiment.seed=5"))
    assert cache.load(other, tmp_path) is None  # another config never reads it
    path.write_bytes(b"not a zip")
    assert cache.load(job, tmp_path) is None  # a damaged copy is ignored (the client builds)


def test_no_directory_means_no_copy(monkeypatch):
    monkeypatch.delenv(cache.ENV, raising=False)
    cfg = small_config()
    assert cache.publish(build_federated_data(cfg), job_json(cfg)) is None
    assert cache.load(job_json(cfg)) is None


def test_the_client_runtime_loads_the_drivers_copy(tmp_path, monkeypatch):
    cfg = small_config(*CFG, "experiment.seed=11")
    job = job_json(cfg)
    built = build_federated_data(cfg)
    # a copy that differs from what the client would build: client 0's labels shifted
    c0 = built.clients[0]
    marked = dataclasses.replace(built, clients=[
        ArrayDataset(c0.x, (c0.y + 1) % c0.num_classes, c0.num_classes, c0.name),
        *built.clients[1:]])
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    cache.publish(marked, job)
    local.runtime.cache_clear()
    try:
        _, data = local.runtime(job)
        assert np.array_equal(data.clients[0].y, marked.clients[0].y)
        monkeypatch.delenv(cache.ENV)
        local.runtime.cache_clear()
        _, rebuilt = local.runtime(job)
        assert np.array_equal(rebuilt.clients[0].y, c0.y)
    finally:
        local.runtime.cache_clear()


@pytest.mark.parametrize("triggered", [True, False])
def test_a_run_without_backdoor_round_trips_too(tmp_path, triggered):
    cfg = small_config(*(CFG if triggered else []))
    job = job_json(cfg)
    cache.publish(build_federated_data(cfg), job, tmp_path)
    loaded = cache.load(job, tmp_path)
    assert (loaded.triggered_test is not None) == triggered
    _same(loaded, build_federated_data(cfg))
