"""Tests of the on-disk history store: completeness of updates and sums, retention, dtypes,
reopening, corruption detection, refusal to overwrite, purging, and input validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedunlearn.history.store import HistoryCorruptError, HistoryError, HistoryStore, _npz_bytes

NUM_CLIENTS = 4
NUM_ROUNDS = 5
# The integer counter sits between float arrays on purpose: key order must survive the store.
SHAPES = {"conv.weight": (128, 64), "conv.bias": (128,), "fc.weight": (10, 128)}


def make_run(seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray]]:
    """A FedAvg run with random updates: per-round record_round kwargs, and the final model."""
    rng = np.random.default_rng(seed)
    model = {
        "conv.weight": rng.normal(size=SHAPES["conv.weight"]).astype(np.float32),
        "bn.num_batches_tracked": np.array(0, dtype=np.int64),
        "conv.bias": rng.normal(size=SHAPES["conv.bias"]).astype(np.float32),
        "fc.weight": rng.normal(size=SHAPES["fc.weight"]).astype(np.float32),
    }
    rounds = []
    for t in range(1, NUM_ROUNDS + 1):
        if t == 1:  # everyone takes part once, so every client has a history
            ids = list(range(NUM_CLIENTS))
        else:
            size = int(rng.integers(1, NUM_CLIENTS + 1))
            ids = sorted(int(k) for k in rng.choice(NUM_CLIENTS, size=size, replace=False))
        n = [int(x) for x in rng.integers(10, 100, size=len(ids))]
        w = [x / sum(n) for x in n]
        updates = {k: {key: rng.normal(scale=0.1, size=s).astype(np.float32)
                       for key, s in SHAPES.items()} for k in ids}
        rounds.append({"round": t, "global_model": {k: v.copy() for k, v in model.items()},
                       "participants": ids, "num_examples": n, "weights": w,
                       "updates": updates})
        new = {key: model[key].astype(np.float64)
               + sum(wk * updates[k][key].astype(np.float64) for k, wk in zip(ids, w))
               for key in SHAPES}
        model = {**model, **{key: v.astype(np.float32) for key, v in new.items()}}
        model["bn.num_batches_tracked"] = model["bn.num_batches_tracked"] + 1
    return rounds, model


def build(path: Path, retention: int = 1, dtype: str = "float32", seed: int = 0) -> HistoryStore:
    rounds, final = make_run(seed)
    store = HistoryStore.create(path, retention_interval=retention, update_dtype=dtype)
    for kwargs in rounds:
        store.record_round(kwargs.pop("round"), **kwargs)
    store.record_final(final)
    return store


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert list(a) == list(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def floats(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in params.items() if k in SHAPES}


def update_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("rounds/*/updates*.npz"))


def row_bytes(store: HistoryStore, t: int, k: int) -> list[bytes]:
    """The raw bytes of client ``k``'s stored update in round ``t``, one string per array."""
    ids, rows = store._round_updates(t)
    return [np.ascontiguousarray(v[ids.index(k)]).tobytes() for v in rows.values()]


def test_updates_and_running_sums_rebuild_the_final_model(tmp_path: Path) -> None:
    store = build(tmp_path / "h")
    initial, final = store.global_model(1), store.final_model()
    assert list(final) == ["conv.weight", "bn.num_batches_tracked", "conv.bias", "fc.weight"]
    assert final["bn.num_batches_tracked"].dtype == np.int64
    assert int(final["bn.num_batches_tracked"]) == NUM_ROUNDS
    assert int(initial["bn.num_batches_tracked"]) == 0

    replay = floats(initial)
    for t in store.rounds():
        record = store.round_record(t)
        assert abs(sum(record.weights) - 1.0) < 1e-12
        for k, w in zip(record.participants, record.weights):
            upd = store.update(t, k)
            assert set(upd) == set(SHAPES) and all(v.dtype == np.float32 for v in upd.values())
            for key in replay:
                replay[key] += w * upd[key]
    assert max_diff(replay, floats(final)) <= 1e-5

    from_sums = floats(initial)
    for k in store.clients():
        for key, s in store.running_sum(k).items():
            assert s.dtype == np.float32
            from_sums[key] += s
    assert store.clients() == list(range(NUM_CLIENTS))
    assert max_diff(from_sums, floats(final)) <= 1e-5
    # each global model is the previous one plus that round's weighted updates
    for t in store.rounds()[:-1]:
        nxt = floats(store.global_model(t))
        record = store.round_record(t)
        for k, w in zip(record.participants, record.weights):
            for key, u in store.update(t, k).items():
                nxt[key] += w * u
        assert max_diff(nxt, floats(store.global_model(t + 1))) <= 1e-5


def test_retention_interval_keeps_every_second_round_but_complete_sums(tmp_path: Path) -> None:
    full = build(tmp_path / "full", retention=1)
    sparse = build(tmp_path / "sparse", retention=2)
    assert [t for t in sparse.rounds() if sparse.round_record(t).updates_retained] == [1, 3, 5]
    assert [t for t in sparse.rounds() if sparse.retains_updates(t)] == [1, 3, 5]
    for t in sparse.rounds():
        files = sorted(p.name for p in (sparse.path / f"rounds/{t:05d}").glob("*.npz"))
        assert files == (["global.npz", "updates.npz"] if t % 2 else ["global.npz"])
        if t % 2:
            assert sparse._round_updates(t)[0] == list(sparse.participants(t))
    k = sparse.participants(2)[0]
    with pytest.raises(HistoryError, match="kept no updates"):
        sparse.update(2, k)
    assert max_diff(sparse.update(3, k), full.update(3, k)) == 0.0
    for k in full.clients():
        assert max_diff(sparse.running_sum(k), full.running_sum(k)) == 0.0
    assert update_bytes(sparse.path) < update_bytes(full.path)


def test_float16_halves_update_bytes_and_stays_close(tmp_path: Path) -> None:
    f32 = build(tmp_path / "f32", dtype="float32")
    f16 = build(tmp_path / "f16", dtype="float16")
    assert update_bytes(f16.path) < 0.6 * update_bytes(f32.path)
    assert f16.bytes_used() < f32.bytes_used()
    for t in f32.rounds():
        for k in f32.participants(t):
            upd = f16.update(t, k)
            assert all(v.dtype == np.float32 for v in upd.values())
            assert max_diff(upd, f32.update(t, k)) <= 1e-3
    for k in f32.clients():  # sums are accumulated from the exact updates either way
        assert max_diff(f16.running_sum(k), f32.running_sum(k)) == 0.0


def test_float16_refuses_an_update_it_cannot_hold_and_names_the_client(tmp_path: Path) -> None:
    rounds, _ = make_run()
    kwargs = {k: v for k, v in rounds[0].items() if k != "round"}
    k = kwargs["participants"][1]
    kwargs["updates"][k]["conv.bias"][0] = 1e5  # float16 tops out at 65504
    store = HistoryStore.create(tmp_path / "h", update_dtype="float16")
    with pytest.raises(HistoryError, match=f"update of client {k} in round 1: 'conv.bias' "
                                           "overflows float16; use update_dtype float32"):
        store.record_round(1, **kwargs)
    assert store.rounds() == [] and HistoryStore.open(store.path).rounds() == []


def test_open_returns_what_was_recorded_and_can_continue(tmp_path: Path) -> None:
    store = build(tmp_path / "h", retention=2, dtype="float16")
    again = HistoryStore.open(tmp_path / "h")
    assert (again.retention_interval, again.update_dtype) == (2, "float16")
    assert again.rounds() == store.rounds() == list(range(1, NUM_ROUNDS + 1))
    assert again.clients() == store.clients()
    assert again.bytes_used() == store.bytes_used() == sum(map(len, snapshot(store.path).values()))
    for t in store.rounds():
        assert again.round_record(t) == store.round_record(t)
        assert max_diff(again.global_model(t), store.global_model(t)) == 0.0
        if store.retains_updates(t):
            for k in store.participants(t):
                assert max_diff(again.update(t, k), store.update(t, k)) == 0.0
    assert max_diff(again.final_model(), store.final_model()) == 0.0
    for k in store.clients():
        assert max_diff(again.running_sum(k), store.running_sum(k)) == 0.0

    # a reopened, unfinished store picks up where it stopped
    rounds, final = make_run()
    part = HistoryStore.create(tmp_path / "part")
    for kwargs in rounds[:2]:
        part.record_round(kwargs.pop("round"), **kwargs)
    part = HistoryStore.open(tmp_path / "part")
    with pytest.raises(HistoryError, match="next is 3"):
        part.record_round(4, **{k: v for k, v in rounds[3].items() if k != "round"})
    for kwargs in rounds[2:]:
        part.record_round(kwargs.pop("round"), **kwargs)
    part.record_final(final)
    full = build(tmp_path / "full")
    for k in full.clients():  # bit for bit: a resumed run's later methods see the same sums
        assert max_diff(part.running_sum(k), full.running_sum(k)) == 0.0
    # every file the same; the manifest differs only where the reopened store could not
    # check round 2's identity (its successor came after the reopening)
    assert {k: v for k, v in snapshot(part.path).items() if k != "manifest.json"} \
        == {k: v for k, v in snapshot(full.path).items() if k != "manifest.json"}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_open_names_a_damaged_file(tmp_path: Path, damage: str) -> None:
    store = build(tmp_path / "h")
    k = store.participants(2)[-1]
    rel = "rounds/00002/updates.npz"
    file = store.path / rel
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    elif damage == "truncate":
        file.write_bytes(bytes(data[:-10]))
    else:
        file.unlink()
    with pytest.raises(HistoryCorruptError, match=rel) as err:
        HistoryStore.open(store.path)
    assert "\n" not in str(err.value)
    with pytest.raises(HistoryCorruptError, match=rel):  # reads re-check too
        store.update(2, k)


def _rewrite(store: HistoryStore, rel: str, arrays: dict[str, np.ndarray]) -> None:
    """Replace a listed file and fix its manifest entry, as an editor who knows the format."""
    data = _npz_bytes(arrays)
    (store.path / rel).write_bytes(data)
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (store.path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit", ["drop a row", "drop an array", "change a shape", "ints"])
def test_an_updates_file_whose_rows_do_not_fit_is_refused(tmp_path: Path, edit: str) -> None:
    store = build(tmp_path / "h")
    rel = "rounds/00001/updates.npz"
    arrays = store._load(rel)
    ids = arrays["#clients"]
    if edit == "drop a row":  # the ids still name every client: rows would shift silently
        arrays["fc.weight"] = arrays["fc.weight"][1:]
    elif edit == "drop an array":
        del arrays["conv.bias"]
    elif edit == "change a shape":
        arrays["conv.weight"] = arrays["conv.weight"][..., :1]
    else:
        arrays["conv.bias"] = arrays["conv.bias"].astype(np.int64)
    _rewrite(store, rel, arrays)
    again = HistoryStore.open(store.path)
    with pytest.raises(HistoryCorruptError, match=f"{rel} .* does not hold one float row per "
                                                  "client") as err:
        again.update(1, int(ids[-1]))
    assert "\n" not in str(err.value)


def test_a_model_array_may_not_take_the_name_of_the_client_ids(tmp_path: Path) -> None:
    rounds, _ = make_run()
    kwargs = {k: v for k, v in rounds[0].items() if k != "round"}
    kwargs["global_model"] = {**kwargs["global_model"], "#clients": np.zeros(2, np.float32)}
    store = HistoryStore.create(tmp_path / "h")
    with pytest.raises(HistoryError, match="array named '#clients', which the store reserves"):
        store.record_round(1, **kwargs)


def test_open_needs_a_readable_manifest(tmp_path: Path) -> None:
    store = build(tmp_path / "h")
    manifest = store.path / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(HistoryCorruptError, match="manifest.json"):
        HistoryStore.open(store.path)
    manifest.unlink()
    with pytest.raises(HistoryCorruptError, match="manifest.json"):
        HistoryStore.open(store.path)
    with pytest.raises(HistoryError, match="does not exist"):
        HistoryStore.open(tmp_path / "nowhere")


def test_opening_what_is_not_a_store_says_what_to_open(tmp_path: Path) -> None:
    """A run directory is not a store: the line names the store(s) inside it, one per seed;
    a file or a directory that never held a store is said to be one, not a damaged history."""
    for seed in (0, 1):
        build(tmp_path / "run" / f"seed-{seed}" / "history")
    with pytest.raises(HistoryError, match=r"run is not a history store; the stores in it: "
                                           r"\S*seed-0/history, \S*seed-1/history$"):
        HistoryStore.open(tmp_path / "run")
    build(tmp_path / "single" / "history")
    with pytest.raises(HistoryError, match=r"the stores in it: \S*single/history$"):
        HistoryStore.open(tmp_path / "single")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    for path, what in (("empty", "is not a history store"), ("afile", "is a file")):
        with pytest.raises(HistoryError, match=f"{what}.*RUN_DIR/history") as info:
            HistoryStore.open(tmp_path / path)
        assert not isinstance(info.value, HistoryCorruptError)


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    store = build(tmp_path / "h")
    before = snapshot(store.path)
    with pytest.raises(HistoryError, match="already holds a history; choose another --out"):
        HistoryStore.create(store.path)
    assert snapshot(store.path) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(HistoryError, match="choose another --out"):
        HistoryStore.create(other)
    assert snapshot(other) == {"notes.txt": b"keep me"}
    (tmp_path / "empty").mkdir()
    assert HistoryStore.create(tmp_path / "empty").rounds() == []
    with pytest.raises(HistoryError, match="float32, float16"):
        HistoryStore.create(tmp_path / "a", update_dtype="bfloat16")
    with pytest.raises(HistoryError, match=">= 1"):
        HistoryStore.create(tmp_path / "b", retention_interval=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_purge_removes_every_trace_of_the_client_data(tmp_path: Path) -> None:
    store = build(tmp_path / "h")
    keep = {t: {k: store.update(t, k) for k in store.participants(t) if k != 2}
            for t in store.rounds()}
    sums = {k: store.running_sum(k) for k in store.clients() if k != 2}
    rounds_of_2 = [t for t in store.rounds() if 2 in store.participants(t)]
    rows_of_2 = [b for t in rounds_of_2 for b in row_bytes(store, t, 2)]
    assert list(store.path.rglob("*client_00002*"))  # present before the purge
    assert any(b in data for b in rows_of_2 for data in snapshot(store.path).values())
    used = store.bytes_used()

    freed = store.purge_clients([2])
    # "*00002*" would also match the round directory rounds/00002, so glob for the client name
    assert list(store.path.rglob("*client_00002*")) == []
    assert not [rel for rel, data in snapshot(store.path).items()  # nor any of its rows
                if any(b in data for b in rows_of_2)]
    assert freed > 0 and freed == used - store.bytes_used()
    assert store.bytes_used() == sum(map(len, snapshot(store.path).values()))
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert not [rel for rel in manifest["files"] if "client_00002" in rel]
    assert "2" not in manifest["sums"] and manifest["purged"] == [2]

    for again in (store, HistoryStore.open(store.path)):  # the purged store verifies cleanly
        assert again.clients() == [0, 1, 3]
        for t in rounds_of_2:
            assert 2 in again.participants(t)  # lineage stays
            with pytest.raises(HistoryError, match="client 2 was purged"):
                again.update(t, 2)
        with pytest.raises(HistoryError, match="purged"):
            again.running_sum(2)
        for t, ups in keep.items():
            for k, upd in ups.items():
                assert max_diff(again.update(t, k), upd) == 0.0
        for k, s in sums.items():
            assert max_diff(again.running_sum(k), s) == 0.0
    meta = json.loads((store.path / manifest["round_meta"]["1"]).read_text())
    assert meta["purged"] == [2] and meta["participants"] == [0, 1, 2, 3]

    before = snapshot(store.path)
    for bad in ([9], [1, 9]):
        with pytest.raises(HistoryError, match="cannot purge clients \\[9\\]: they never"):
            store.purge_clients(bad)
        assert snapshot(store.path) == before
    with pytest.raises(HistoryError, match="purge level must be one of strict, updates"):
        store.purge_clients([1], level="everything")
    assert store.purge_clients([2]) == 0  # purging again is a no-op
    assert snapshot(store.path) == before
    assert store.clients() == [0, 1, 3]


def test_record_round_rejects_bad_input(tmp_path: Path) -> None:
    rounds, _ = make_run()
    store = HistoryStore.create(tmp_path / "h")
    before = snapshot(store.path)
    args = {k: v for k, v in rounds[0].items() if k != "round"}

    def bad(round: int = 1, **changes: object) -> pytest.ExceptionInfo[HistoryError]:
        with pytest.raises(HistoryError) as err:
            store.record_round(round, **{**args, **changes})
        assert "\n" not in str(err.value)
        return err

    assert "next is 1" in str(bad(round=2).value)
    updates = {k: dict(u) for k, u in args["updates"].items()}
    del updates[1]["conv.bias"]
    assert "'conv.bias'" in str(bad(updates=updates).value)
    updates = {k: dict(u) for k, u in args["updates"].items()}
    updates[3]["fc.weight"] = np.zeros((3, 3), np.float32)
    assert "'fc.weight'" in str(bad(updates=updates).value)
    updates = {k: dict(u) for k, u in args["updates"].items()}
    updates[0]["bn.num_batches_tracked"] = np.array(1, np.int64)
    assert "'bn.num_batches_tracked'" in str(bad(updates=updates).value)
    bad(participants=[0, 1, 1, 3])
    bad(weights=[0.5, 0.5, 0.5, 0.5])
    bad(updates={k: u for k, u in args["updates"].items() if k != 0})
    assert store.rounds() == [] and snapshot(store.path) == before

    store.record_round(1, **args)
    later = {k: v for k, v in rounds[1].items() if k != "round"}
    with pytest.raises(HistoryError, match="'conv.bias'"):
        store.record_round(2, **{**later, "global_model": {
            **later["global_model"], "conv.bias": np.zeros(7, np.float32)}})
    with pytest.raises(HistoryError, match="next is 2"):
        store.record_round(1, **args)
    assert store.rounds() == [1]


def test_crash_before_the_manifest_leaves_the_previous_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rounds, _ = make_run()
    store = HistoryStore.create(tmp_path / "h")
    for kwargs in rounds[:2]:
        store.record_round(kwargs.pop("round"), **kwargs)
    sums = {k: store.running_sum(k) for k in store.clients()}

    def crash(self: HistoryStore, manifest: dict) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(HistoryStore, "_commit", crash)
    with pytest.raises(OSError, match="power cut"):
        store.record_round(3, **{k: v for k, v in rounds[2].items() if k != "round"})
    monkeypatch.undo()
    store.flush_deletions()  # round 2's deferred deletions (else a race under load: 7 files)
    # global.npz, meta.json, updates.npz and three running sums
    with pytest.warns(UserWarning, match="6 file\\(s\\) not listed in manifest.json"):
        again = HistoryStore.open(store.path)  # new files were written, under fresh names
    assert again.rounds() == store.rounds() == [1, 2]
    for k, s in sums.items():
        assert max_diff(again.running_sum(k), s) == 0.0
        assert max_diff(store.running_sum(k), s) == 0.0


# ------------------------------------------------------------------ the history identity
def with_server_step(rounds: list[dict], *, lr: float = 1.0, momentum: float = 0.0,
                     noise: float = 0.0, seed: int = 1) -> tuple[list[dict], dict]:
    """``make_run``'s rounds with the global models recomputed by a FedAvgM-like server:
    ``v = momentum * v + sum_k w_k U_k``, ``M_{t+1} = M_t + lr * v`` (plus relative ``noise``)."""
    rng = np.random.default_rng(seed)
    model = {k: v.copy() for k, v in rounds[0]["global_model"].items()}
    velocity: dict[str, np.ndarray] = {}
    out = []
    for kwargs in rounds:
        out.append({**kwargs, "global_model": {k: v.copy() for k, v in model.items()}})
        step = {key: sum(w * kwargs["updates"][k][key].astype(np.float64)
                         for k, w in zip(kwargs["participants"], kwargs["weights"]))
                for key in SHAPES}
        velocity = {key: momentum * velocity.get(key, 0.0) + s for key, s in step.items()}
        for key in SHAPES:
            new = model[key] + lr * velocity[key]
            new = new + noise * np.max(np.abs(new)) * rng.uniform(-1, 1, size=new.shape)
            model[key] = new.astype(np.float32)
    return out, model


def record(path: Path, rounds: list[dict], final: dict | None) -> HistoryStore:
    store = HistoryStore.create(path)
    for kwargs in rounds:
        store.record_round(**kwargs)
    if final is not None:
        store.record_final(final)
    return store


def test_fedavg_history_keeps_the_identity_and_the_flags_persist(tmp_path: Path) -> None:
    store = build(tmp_path / "h")
    assert store.replayable() and store.identity_violations() == []
    assert all(0 <= store.identity_deviation(t) <= 1e-6 for t in store.rounds())
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert sorted(manifest["identity"], key=int) == ["1", "2", "3", "4", "5"]
    assert all(e["holds"] is True for e in manifest["identity"].values())
    store.purge_clients([2])
    again = HistoryStore.open(store.path)
    assert again.replayable() and again.identity_deviation(5) == store.identity_deviation(5)


def test_server_momentum_is_flagged_round_by_round(tmp_path: Path) -> None:
    rounds, _ = make_run()
    moved, final = with_server_step(rounds, momentum=0.9)
    store = record(tmp_path / "m", moved, final)
    # the first step has no velocity yet, so round 1 still holds; every later one breaks
    assert store.identity_violations() == [2, 3, 4, 5] and not store.replayable()
    assert store.identity_deviation(1) <= 1e-6 and store.identity_deviation(2) > 1e-2
    assert HistoryStore.open(store.path).identity_violations() == [2, 3, 4, 5]
    lr, final = with_server_step(rounds, lr=0.5)  # a server learning rate breaks it everywhere
    assert record(tmp_path / "lr", lr, final).identity_violations() == [1, 2, 3, 4, 5]


def test_identity_tolerance_separates_float32_noise_from_a_real_breach(tmp_path: Path) -> None:
    rounds, _ = make_run()
    quiet, final = with_server_step(rounds, noise=1e-6)
    assert record(tmp_path / "quiet", quiet, final).replayable()
    loud, final = with_server_step(rounds, noise=1e-3)
    assert record(tmp_path / "loud", loud, final).identity_violations() == [1, 2, 3, 4, 5]


def test_unchecked_rounds_are_not_violations(tmp_path: Path) -> None:
    rounds, _ = make_run()
    moved, _ = with_server_step(rounds, momentum=0.9)
    store = record(tmp_path / "h", moved[:2], None)  # round 2's successor never arrived
    assert store.identity_deviation(1) <= 1e-6 and store.identity_deviation(2) is None
    assert store.replayable()
    reopened = HistoryStore.open(store.path)  # a reopened store cannot check its last round
    reopened.record_round(**moved[2])
    assert reopened.identity_deviation(2) is None and reopened.replayable()
    with pytest.raises(HistoryError, match="round 9 is not recorded"):
        store.identity_deviation(9)


def test_identity_deviation_doctest() -> None:
    import doctest

    from fedunlearn.history import store as history

    failed, attempted = doctest.testmod(history)
    assert attempted >= 1 and failed == 0


FSIZE_SCRIPT = '''
import resource, sys
import numpy as np
from fedunlearn.history.store import HistoryStore
store = HistoryStore.create(sys.argv[1], retention_interval=1)
small = {"w": np.zeros(4, np.float32)}
store.record_round(1, global_model=small, participants=[0], num_examples=[1], weights=[1.0],
                   updates={0: {"w": np.ones(4, np.float32)}})
resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024,) * 2)  # a file-size limit, as `ulimit -f`
big = {"w": np.zeros(4, np.float32) + 1}
try:
    store.record_round(2, global_model=big, participants=[0], num_examples=[1], weights=[1.0],
                       updates={0: {"w": np.random.default_rng(0).random(4).astype(np.float32)
                                    + np.zeros(4, np.float32)}})
    wide = {"w": np.zeros(20_000, np.float32)}
    store2 = HistoryStore.create(sys.argv[1] + "-wide", retention_interval=1)
    store2.record_round(1, global_model=wide, participants=[0], num_examples=[1],
                        weights=[1.0], updates={0: {"w": np.ones(20_000, np.float32)}})
    print("NO ERROR")
except OSError as exc:
    print("OSERROR", exc.errno, exc.filename)
'''


def test_a_file_size_limit_names_the_file_and_keeps_the_store(tmp_path):
    """A write past the file-size limit (or a full disk) raises OSError naming the file; the
    round is not committed and what was stored still verifies."""
    import errno
    import subprocess
    import sys

    path = tmp_path / "h"
    run = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    out = run.stdout.strip().splitlines()
    assert out and out[-1].startswith(f"OSERROR {errno.EFBIG} "), (out, run.stderr[-2000:])
    assert out[-1].endswith(".npz"), out  # the file it could not write
    store = HistoryStore.open(path)  # verifies every listed file
    assert store.rounds() == [1, 2]
    wide = HistoryStore.open(str(path) + "-wide")
    assert wide.rounds() == [] and not wide.unlisted_files()


def test_the_cli_reports_a_write_failure_in_one_line(monkeypatch, capsys, tmp_path):
    import errno

    from fedunlearn import cli

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npz"))

    from fedunlearn.run import commands

    monkeypatch.setattr(commands, "cmd_run", full_disk)
    code = cli.main(["run", "simulations/quickstart.toml", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"cannot write '{tmp_path / 'x.npz'}' (No space left on device)" in err[0]
    assert "fedunlearn resume" in err[0]


def test_a_second_store_object_refuses_to_serve_what_another_one_purged(tmp_path: Path) -> None:
    """Two objects open on one directory: after one purges client 2, the other (which had
    read client 2's update and running sum, so holds them in memory) refuses every read and
    write with one line instead of answering from its stale view or committing over the
    purge; opened again, it sees the purge."""
    store = build(tmp_path / "h")
    t = next(t for t in store.rounds() if 2 in store.participants(t))
    other = HistoryStore.open(store.path)
    assert other.update(t, 2) is not None and other.running_sum(2) is not None  # cached
    store.purge_clients([2], level="updates")
    last = store.rounds()[-1]
    reads = (lambda: other.update(t, 2), lambda: other.running_sum(2),
             lambda: other.global_model(t), lambda: other.final_model(),
             lambda: other.purge_clients([1], level="updates"))
    for read in reads:
        with pytest.raises(HistoryError, match="changed by another store object"):
            read()
    before = snapshot(store.path)
    with pytest.raises(HistoryError, match="open it again"):
        other.record_round(last + 1, global_model=store.final_model(), participants=[0],
                           num_examples=[1], weights=[1.0], updates={0: store.update(t, 0)})
    assert snapshot(store.path) == before  # nothing written over the purge
    again = HistoryStore.open(store.path)
    assert again.purged() == [2]
    with pytest.raises(HistoryError, match="purged"):
        again.update(t, 2)
    assert store.update(t, next(k for k in store.participants(t) if k != 2)) is not None
