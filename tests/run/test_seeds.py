"""A multi-seed run through Flower: one engine for every seed, every seed's rows, the summary,
and each seed's models equal to an independent in-process run of that seed alone."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import flwr.simulation
import pytest
from conftest import small_config

from fedunlearn.cli import main
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history.lineage import params_hash
from fedunlearn.run import interrupt
from fedunlearn.run.pipeline import prepare, run_experiment

EXTRA = ["backdoor.clients=[0]", "backdoor.fraction=0.8", "unlearning.requests=[[0]]",
         "training.rounds=3", "data.num_clients=4", "training.local_epochs=1",
         "unlearning.methods=[\"retrain\", \"distillation\"]", "verification.mia_shadows=0",
         "unlearning.params.distillation.epochs=2"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, int, set[int]]:
    starts = []
    seen: set[int] = set()  # every process below this one while the engine runs (Ray's)
    real = flwr.simulation.run_simulation

    def counting(*args: Any, **kwargs: Any) -> Any:
        starts.append(1)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                seen.update(interrupt.descendants())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            return real(*args, **kwargs)
        finally:
            done.set()
            sampler.join()

    flwr.simulation.run_simulation = counting
    try:
        cfg = small_config(*EXTRA, "experiment.seeds=[3, 5]")
        out = tmp_path_factory.mktemp("seeds") / "run"
        results = run_experiment(cfg, out, quiet=True)
    finally:
        flwr.simulation.run_simulation = real
    return cfg, (out, results), len(starts), seen


def _alive(pid: int) -> bool:
    """Running (a killed process stays a zombie until reaped: it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.flower
def test_the_engine_leaves_no_ray_process_behind(two_seeds: Any) -> None:
    """The engine stops the Ray processes it recorded itself (fedunlearn/engine/processes.py):
    raylet, GCS, their agents and the client actors must all be gone, not orphaned."""
    *_, seen = two_seeds
    assert len(seen) >= 4, seen  # GCS, raylet, agents, actors were seen while it ran
    deadline = time.monotonic() + 5.0
    while (left := [p for p in seen if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left if _alive(p)]


@pytest.mark.flower
def test_one_engine_serves_every_seed(two_seeds: Any) -> None:
    _, (out, results), starts, _ = two_seeds
    assert starts == 1
    assert results["seeds"] == [3, 5]
    assert [p["seed"] for p in results["per_seed"]] == [3, 5]
    for s in (3, 5):
        assert (out / f"seed-{s}" / "history" / "manifest.json").exists()
        assert (out / f"seed-{s}" / "lineage.jsonl").exists()
    methods = {(r["seed"], r["method"]) for r in results["unlearning"]}
    assert methods == {(s, m) for s in (3, 5)
                       for m in ("original", "retrain", "retrain_seed2", "distillation")}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(results["summary"]))


@pytest.mark.flower
def test_each_seed_equals_an_independent_run_of_that_seed(two_seeds: Any) -> None:
    """Oracle: the trained and the retrained model of each seed equal, bit for bit, FedAvg of
    that seed alone in the in-process engine (with and without client 0)."""
    cfg, (_, results), *_ = two_seeds
    rows = {(r["seed"], r["method"]): r for r in results["unlearning"]}
    for s in (3, 5):
        one = cfg.with_seed(s)
        setup = prepare(one)
        fed = InProcessFederation(one, setup.evaluator())
        trained = fed.fedavg(setup.initial).final
        retrained = fed.fedavg(setup.initial, exclude=frozenset({0})).final
        assert rows[(s, "original")]["model_hash"] == params_hash(trained)
        assert rows[(s, "retrain")]["model_hash"] == params_hash(retrained)
    assert rows[(3, "retrain")]["model_hash"] != rows[(5, "retrain")]["model_hash"]


@pytest.mark.flower
def test_summary_describes_every_seed(two_seeds: Any) -> None:
    _, (_, results), *_ = two_seeds
    entry = next(e for e in results["summary"] if e["method"] == "distillation")
    values = [r["metrics"]["test_accuracy"] for r in results["unlearning"]
              if r["method"] == "distillation"]
    d = entry["metrics"]["test_accuracy"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(sum(values) / 2)
    assert d["ci"][0] <= d["mean"] <= d["ci"][1]
    assert set(entry["verdicts"]) == {"test", "retain", "forget", "asr", "mia", "kl"}
    assert entry["verdicts"]["test"]["n"] == 2


def test_seeds_flag_is_checked_before_work(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Any) -> None:
    assert main(["run", "simulations/quickstart.toml", "--seeds", "0,x",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds expects non-negative integers" in err[0]
    assert not (tmp_path / "r").exists()
    assert main(["run", "simulations/quickstart.toml", "--set", "experiment.seeds=[1, 1]",
                 "--out", str(tmp_path / "r")]) == 2
    assert "lists a seed twice" in capsys.readouterr().err
