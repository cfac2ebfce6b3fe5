"""Purging a client from the history store: what each level leaves to an attacker, crash safety
of the journaled purge, the manifest's consistency checks, and later requests after a strict
purge.

The reconstruction attack is the one of issue 10: from what the store still holds, solve the
purged client's round updates as ``(M_{t+1} - M_t - sum_{k!=u} w_k U_k^t) / w_u`` and its
running sum as ``M_F - M_1 - sum_{k!=u} S_k``; the truth is read from the store before the
purge.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.config.tree import ConfigError
from fedunlearn.engine.inprocess import InProcessFederation
from fedunlearn.history import store as history_module
from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import (
    JOURNAL,
    HistoryCorruptError,
    HistoryError,
    HistoryPurgedError,
    HistoryStore,
)
from fedunlearn.run.pipeline import prepare, train_federation
from fedunlearn.run.serving import serve_requests

TRAIN = ["data.num_clients=4", "training.rounds=5", "training.sample_fraction=0.5",
         "data.server_fraction=0.1"]
Params = dict[str, np.ndarray]


class Trained:
    """A tiny federation trained in-process, its store kept as a template to copy."""

    def __init__(self, root: Path) -> None:
        self.cfg = small_config(*TRAIN)
        self.setup = prepare(self.cfg)
        self.fed = InProcessFederation(self.cfg, self.setup.evaluator())
        self.template = root / "template"
        store = HistoryStore.create(self.template, retention_interval=1)
        self.run = train_federation(self.fed, self.setup, store, progress=False)
        # the target: the client that joined last (so some global models stay after a strict
        # purge and the attack has the most to work with), among those taking part twice or more
        rounds_of = {k: [t for t in store.rounds() if k in store.participants(t)]
                     for k in store.clients()}
        self.target = max((k for k, r in rounds_of.items() if len(r) >= 2),
                          key=lambda k: (rounds_of[k][0], k))
        self.first = rounds_of[self.target][0]

    def copy(self, path: Path) -> HistoryStore:
        shutil.copytree(self.template, path)
        return HistoryStore.open(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return Trained(tmp_path_factory.mktemp("purge"))


# ------------------------------------------------------------------ the reconstruction attack
def _try(get: Callable[[], Params]) -> Params | None:
    try:
        return get()
    except HistoryError:
        return None


def _floats(p: Params, keys: list[str]) -> Params:
    return {k: np.asarray(p[k], np.float64) for k in keys}


def attack(store: HistoryStore, u: int, zeros: Params) -> tuple[list[list[Params]],
                                                                list[Params]]:
    """Candidate estimates of ``u``'s round updates (per round, a list of candidates) and of its
    running sum, from what ``store`` holds. Zeros are always a candidate; a missing global model
    is replaced by the latest one still stored before it (a guess an attacker could make)."""
    keys = list(zeros)
    rounds = store.rounds()
    stored = {t: _try(lambda t=t: store.global_model(t)) for t in rounds}
    stored[len(rounds) + 1] = _try(store.final_model)

    def guesses(t: int) -> list[Params]:
        """The stored M_t, or else the latest stored model before t (if any)."""
        if stored[t] is not None:
            return [_floats(stored[t], keys)]
        earlier = [s for r, s in stored.items() if r < t and s is not None]
        return [_floats(earlier[-1], keys)] if earlier else []

    per_round = []
    for t in rounds:
        record = store.round_record(t)
        if u not in record.participants:
            continue
        cands = [zeros]
        others = [(k, w) for k, w in zip(record.participants, record.weights, strict=True)
                  if k != u]
        ups = {k: _try(lambda k=k, t=t: store.update(t, k)) for k, _ in others}
        w_u = record.weights[record.participants.index(u)]
        if all(v is not None for v in ups.values()):
            rest = {key: sum((w * np.asarray(ups[k][key], np.float64) for k, w in others),
                             np.zeros_like(zeros[key])) for key in keys}
            for m_t in guesses(t):
                for m_next in guesses(t + 1):
                    cands.append({key: (m_next[key] - m_t[key] - rest[key]) / w_u
                                  for key in keys})
        per_round.append(cands)

    sums = [_floats(store.running_sum(k), keys) for k in store.clients() if k != u]
    rest = {key: sum((s[key] for s in sums), np.zeros_like(zeros[key])) for key in keys}
    sum_cands = [zeros]
    for m_f in guesses(len(rounds) + 1):
        for m_1 in guesses(1):
            sum_cands.append({key: m_f[key] - m_1[key] - rest[key] for key in keys})
    return per_round, sum_cands


def _vec(ps: list[Params], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.ravel(p[k]) for p in ps for k in keys])


def best_errors(store: HistoryStore, u: int, true_rounds: list[Params], true_sum: Params,
                keys: list[str]) -> tuple[float, float]:
    """The attack's smallest relative error ``‖est − true‖ / ‖true‖`` over its candidates (the
    round updates' error per round, combined over rounds), for the rounds and the sum."""
    per_round, sum_cands = attack(store, u, {k: np.zeros_like(v) for k, v in true_sum.items()})
    assert len(per_round) == len(true_rounds)
    sq = 0.0
    for cands, true in zip(per_round, true_rounds, strict=True):
        t = _vec([true], keys)
        sq += min(float(np.sum((_vec([c], keys) - t) ** 2)) for c in cands)
    rounds_err = np.sqrt(sq) / np.linalg.norm(_vec(true_rounds, keys))
    s = _vec([true_sum], keys)
    sum_err = min(float(np.linalg.norm(_vec([c], keys) - s)) for c in sum_cands) \
        / float(np.linalg.norm(s))
    return float(rounds_err), sum_err


def truth(store: HistoryStore, u: int, keys: list[str]) -> tuple[list[Params], Params]:
    rounds = [t for t in store.rounds() if u in store.participants(t)]
    return ([_floats(store.update(t, u), keys) for t in rounds],
            _floats(store.running_sum(u), keys))


@pytest.mark.parametrize("level", ["strict", "updates"])
def test_reconstruction_attack_after_a_purge(trained: Trained, tmp_path: Path,
                                             level: str) -> None:
    store = trained.copy(tmp_path / "h")
    u = trained.target
    keys = sorted(store.running_sum(u))
    true_rounds, true_sum = truth(store, u, keys)
    # the attack works on the full store (this is issue 10's measurement)
    assert max(best_errors(store, u, true_rounds, true_sum, keys)) <= 1e-3

    store.purge_clients([u], level=level)
    for s in (store, HistoryStore.open(store.path)):
        rounds_err, sum_err = best_errors(s, u, true_rounds, true_sum, keys)
        print(f"{level}: round updates rel. error {rounds_err:.3g}, running sum {sum_err:.3g}")
        if level == "strict":
            assert rounds_err >= 0.5 and sum_err >= 0.5
        else:  # the weaker level is documented as re-solvable
            assert rounds_err <= 1e-3 and sum_err <= 1e-3


def test_strict_purge_deletes_the_models_from_the_first_round_on(trained: Trained,
                                                                 tmp_path: Path) -> None:
    store = trained.copy(tmp_path / "h")
    u, first = trained.target, trained.first
    assert first > 1  # the target joined late, so earlier global models must stay
    kept = {t: store.global_model(t) for t in range(1, first)}
    others = {(t, k): store.update(t, k) for t in store.rounds()
              for k in store.participants(t) if k != u}
    store.purge_clients([u])  # strict is the default
    for s in (store, HistoryStore.open(store.path)):
        assert s.globals_deleted_from() == first and s.purged() == [u]
        for t, model in kept.items():
            assert all(np.array_equal(model[k], v) for k, v in s.global_model(t).items())
        for t in range(first, len(s.rounds()) + 1):
            with pytest.raises(HistoryPurgedError, match=f"round {t} was deleted by a strict "
                               f"purge of clients \\[{u}\\]") as err:
                s.global_model(t)
            assert "\n" not in str(err.value)
            assert not (s.path / f"rounds/{t:05d}/global.npz").exists()
        with pytest.raises(HistoryPurgedError, match="the final model was deleted"):
            s.final_model()
        assert not (s.path / "final.npz").exists()
        for (t, k), upd in others.items():  # what the history methods need stays
            assert all(np.array_equal(upd[key], v) for key, v in s.update(t, k).items())
    with pytest.raises(HistoryError, match="cannot record round 6: a strict purge"):
        store.record_round(6, global_model=kept[1], participants=[0], num_examples=[1],
                           weights=[1.0], updates={0: {}})


def test_later_requests_after_a_strict_purge_are_served_as_before(trained: Trained,
                                                                  tmp_path: Path) -> None:
    """No method reads a stored global model: after a strict purge the next request gives the
    same models as after an ``updates`` purge, which keeps them."""
    others = [k for k in range(trained.cfg.data.num_clients) if k != trained.target]
    requests = f"unlearning.requests=[[{trained.target}], [{others[0]}]]"
    rows = {}
    for level in ("strict", "updates"):
        cfg = small_config(*TRAIN, requests, f'history.purge="{level}"',
                           'unlearning.methods=["retrain", "federaser", "fedaccum", '
                           '"distillation"]', "verification.noise_floor=false",
                           "verification.mia_shadows=0")
        store = trained.copy(tmp_path / level / "history")
        served = serve_requests(cfg, data=trained.setup.data, trained=trained.run.final,
                                initial=trained.setup.initial, store=store,
                                federation=trained.fed, lineage=LineageLog(tmp_path / level),
                                build_model=trained.setup.build_model,
                                predictor=trained.setup.predictor(), stream=None)
        rows[level] = {(tuple(r.request), r.method): r.model_hash for r in served.rows}
        assert [p["level"] for p in served.purges] == [level, level]
        cut = min(trained.first, min(t for t in store.rounds()
                                     if others[0] in store.participants(t)))
        assert served.purges[-1]["globals_deleted_from"] == (cut if level == "strict" else None)
        purges = [e for e in LineageLog(tmp_path / level).read() if e["event"] == "purge"]
        assert [e["level"] for e in purges] == [level, level]
    assert rows["strict"] == rows["updates"]
    assert len(rows["strict"]) == 2 * 5  # original + 4 methods, per request


def test_purge_level_is_validated_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'history.purge' = 'all' is not one "
                                          r"of: strict, updates$"):
        small_config('history.purge="all"')
    assert small_config().history.purge == "strict"


# ------------------------------------------------------------------ crash safety
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def forbidden(store: HistoryStore, u: int, level: str) -> tuple[set[str], list[bytes]]:
    """sha256 of every file holding the target's contribution that ``level`` must delete, and
    raw byte strings (its largest arrays) that must not appear in any file left."""
    rounds = [t for t in store.rounds() if u in store.participants(t)]
    rels = [rel for t in rounds if (rel := store._updates_rel(t))] + [store._m["sums"][str(u)]]
    if level == "strict":
        first = min(t for t in store.rounds() if u in store.participants(t))
        rels += [f"rounds/{t:05d}/global.npz" for t in store.rounds() if t >= first]
        rels.append("final.npz")
    blobs = []
    for t in rounds:  # the target's own rows of the rounds' updates files
        if store._updates_rel(t):
            ids, rows = store._round_updates(t)
            big = max(rows.values(), key=lambda a: a.nbytes)
            blobs.append(np.ascontiguousarray(big[ids.index(u)]).tobytes()[:256])
    for rel in rels[len(blobs):]:
        big = max(store._load(rel).values(), key=lambda a: a.nbytes)
        blobs.append(np.ascontiguousarray(big).tobytes()[:256])
    return {_sha((store.path / rel).read_bytes()) for rel in rels}, blobs


def assert_clean(path: Path, u: int, shas: set[str], blobs: list[bytes]) -> None:
    """Nothing of ``u`` on disk, the store opens without warning, and lists exactly its files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = HistoryStore.open(path)
    assert u in store.purged()
    assert not (path / JOURNAL).exists()
    files = {p.relative_to(path).as_posix(): p.read_bytes()
             for p in path.rglob("*") if p.is_file()}
    assert set(files) == set(store._m["files"]) | {"manifest.json"}
    for rel, data in files.items():
        assert f"client_{u:05d}" not in rel.rsplit("/", 1)[-1], rel
        assert _sha(data) not in shas, rel
        assert not any(blob in data for blob in blobs), rel


class Crash(Exception):
    pass


def inject(monkeypatch: pytest.MonkeyPatch, k: int, *, after: bool) -> list[str]:
    """Make the k-th write or deletion of the store raise (before or after it took effect)."""
    calls: list[str] = []
    real_write, real_remove = history_module._atomic_write, history_module._remove

    def step(real: Callable, path: Path, *args: object, **kw: object) -> None:
        calls.append(f"{real.__name__} {path.name}")
        if len(calls) == k and not after:
            raise Crash(calls[-1])
        real(path, *args, **kw)
        if len(calls) == k:
            raise Crash(calls[-1])

    monkeypatch.setattr(history_module, "_atomic_write",
                        lambda path, data, **kw: step(real_write, path, data, **kw))
    monkeypatch.setattr(history_module, "_remove", lambda path: step(real_remove, path))
    return calls


@pytest.mark.parametrize("level", ["strict", "updates"])
def test_a_crash_anywhere_in_a_purge_leaves_nothing_of_the_client(
        trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    u = trained.target
    probe = trained.copy(tmp_path / "probe")
    shas, blobs = forbidden(probe, u, level)
    calls = inject(monkeypatch, 0, after=False)
    probe.purge_clients([u], level=level)
    monkeypatch.undo()
    assert_clean(probe.path, u, shas, blobs)
    steps = list(calls)
    assert steps[0] == f"_atomic_write {JOURNAL}" and f"_remove {JOURNAL}" in steps
    assert "_atomic_write manifest.json" in steps

    for k in range(1, len(steps) + 1):
        for after in (False, True):
            for retry in ("reopen", "same object"):
                path = tmp_path / f"k{k}-{after}-{retry}"
                store = trained.copy(path)
                inject(monkeypatch, k, after=after)
                with pytest.raises(Crash):
                    store.purge_clients([u], level=level)
                monkeypatch.undo()
                if retry == "reopen":  # the process died; a new one opens the store
                    again = HistoryStore.open(path)
                    if u in again.clients():  # the journal never reached the disk
                        assert k == 1 and not after
                    again.purge_clients([u], level=level)  # completes, or a no-op
                else:  # the caller retries on the object that saw the exception
                    store.purge_clients([u], level=level)
                assert_clean(path, u, shas, blobs)


def test_open_sweeps_leftovers_of_a_purged_client_and_reports_other_files(
        trained: Trained, tmp_path: Path) -> None:
    u = trained.target
    store = trained.copy(tmp_path / "h")
    t = trained.first
    leaked = (store.path / f"rounds/{t:05d}/updates.npz").read_bytes()
    leaked_global = (store.path / f"rounds/{t:05d}/global.npz").read_bytes()
    store.purge_clients([u])
    # what the old purge left behind after a crash: the files, unlisted
    (store.path / f"rounds/{t:05d}/updates.npz").write_bytes(leaked)
    # and the temp file of a write that a kill cut short before its rename
    (store.path / f"rounds/{t:05d}/.updates.npz.x1y2.tmp").write_bytes(leaked)
    (store.path / f"rounds/{t:05d}/global.npz").write_bytes(leaked_global)
    (store.path / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="1 file\\(s\\) not listed in manifest.json, e.g. "
                                         "notes.txt"):
        again = HistoryStore.open(store.path)
    assert not (store.path / f"rounds/{t:05d}/updates.npz").exists()
    assert not (store.path / f"rounds/{t:05d}/.updates.npz.x1y2.tmp").exists()
    assert not (store.path / f"rounds/{t:05d}/global.npz").exists()
    assert (store.path / "notes.txt").exists() and again.unlisted_files() == ["notes.txt"]


def test_an_unreadable_journal_is_one_line(trained: Trained, tmp_path: Path) -> None:
    store = trained.copy(tmp_path / "h")
    (store.path / JOURNAL).write_text("{not json")
    with pytest.raises(HistoryCorruptError, match=f"^{JOURNAL} in .* is unreadable") as err:
        HistoryStore.open(store.path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ manifest consistency
def _edit_manifest(path: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=1))


def _drop_round(m: dict, t: int) -> None:
    m["rounds"].remove(t)


def _drop_last_round(m: dict) -> None:
    t = m["rounds"].pop()
    del m["round_meta"][str(t)]


def _mark_purged(m: dict, u: int) -> None:
    m["purged"] = [u]


def _change_weight(path: Path, m: dict) -> None:
    rel = m["round_meta"]["2"]
    meta = json.loads((path / rel).read_text())
    meta["weights"][0] += 0.05
    data = json.dumps(meta, indent=1).encode()
    (path / rel).write_bytes(data)
    m["files"][rel] = {"sha256": _sha(data), "bytes": len(data)}


def _keep_sum_after_purge(m: dict, u: int) -> None:
    m["purged"] = []  # un-purge by hand: the round metas still say purged


EDITS = {
    "drop a round": (lambda p, m, u: _drop_round(m, 2),
                     r"lists rounds \[1, 3, 4, 5\], not 1..n \(round 2 is missing\)"),
    "drop the last round": (lambda p, m, u: _drop_last_round(m),
                            r"(lists|should be) .*0000?5"),
    "mark a client purged, files kept": (
        lambda p, m, u: _mark_purged(m, u),
        r"marks client {u} purged but lists its file sums/client_0000{u}\.r\d+\.npz"),
    "change a weight": (lambda p, m, u: _change_weight(p, m),
                        r"rounds/00002/meta.json: weights \[.*\] sum to 1.05, not 1"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_manifest_edited_into_valid_json_is_refused_in_one_line(
        trained: Trained, tmp_path: Path, edit: str) -> None:
    store = trained.copy(tmp_path / "h")
    change, pattern = EDITS[edit]
    u = trained.target
    _edit_manifest(store.path, lambda m: change(store.path, m, u))
    with pytest.raises(HistoryCorruptError, match=pattern.format(u=u)) as err:
        HistoryStore.open(store.path)
    assert "\n" not in str(err.value)
    assert "record the run again" in str(err.value)


def test_unpurging_by_hand_is_refused(trained: Trained, tmp_path: Path) -> None:
    store = trained.copy(tmp_path / "h")
    u = trained.target
    store.purge_clients([u], level="updates")
    _edit_manifest(store.path, lambda m: _keep_sum_after_purge(m, u))
    with pytest.raises(HistoryCorruptError, match=f"(lists purged clients|running sum of "
                                                  f"client {u})") as err:
        HistoryStore.open(store.path)
    assert "\n" not in str(err.value)
