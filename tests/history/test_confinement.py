"""A shared run directory cannot be turned against the person who opens it: paths read from a
manifest, a purge journal, a checkpoint or a run file that leave the directory (absolute,
``..``, through a symbolic link) are refused with one line before any file is read, written
or deleted outside (docs/history.md, "Threat model")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_history import build, snapshot

from fedunlearn.history.lineage import LineageLog
from fedunlearn.history.store import JOURNAL, HistoryStore, UnsafePathError, confined
from fedunlearn.run.resume import ResumeError, load_checkpoint, read_json


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    build(tmp_path / "run" / "history")
    return tmp_path / "run" / "history"


def _edit_manifest(store: Path, **changes: object) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.update(changes)
    (store / "manifest.json").write_text(json.dumps(manifest))


def _journal(store: Path, delete: list[str]) -> None:
    (store / JOURNAL).write_text(json.dumps({"clients": [], "level": "updates",
                                             "delete": delete, "write": []}))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "not a store file"])
def test_a_crafted_purge_journal_deletes_nothing_outside(store: Path, victim: Path,
                                                         kind: str) -> None:
    rel = {"absolute": str(victim),
           "dotdot": os.path.relpath(victim, store),
           "not a store file": "rounds/00001/../../../outside/victim.txt"}[kind]
    _journal(store, [rel])
    before = snapshot(store)
    with pytest.raises(UnsafePathError) as err:
        HistoryStore.open(store)
    assert len(str(err.value).splitlines()) == 1 and "purge-journal.json" in str(err.value)
    assert victim.read_text() == "precious"
    assert snapshot(store) == before  # nothing inside was finished or swept either


def test_a_manifest_naming_an_outside_final_model_is_refused_before_reading(
        store: Path, victim: Path) -> None:
    """The issue's attack: ``final`` pointing outside with its checksum updated; a strict
    purge then used to delete the outside file."""
    data = victim.read_bytes()
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["files"].pop(manifest["final"])
    manifest["final"] = str(victim)
    manifest["files"][str(victim)] = {"sha256": hashlib.sha256(data).hexdigest(),
                                      "bytes": len(data)}
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError, match="not a relative path inside"):
        HistoryStore.open(store)
    assert victim.read_text() == "precious"


def test_a_sums_entry_climbing_out_is_refused(store: Path) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    rel = "../../../../../../etc/passwd"
    manifest["sums"]["0"] = rel
    manifest["files"][rel] = {"sha256": "0" * 64, "bytes": 1}
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError, match="etc/passwd"):
        HistoryStore.open(store)


@pytest.mark.parametrize("which", ["updates file", "rounds folder", "manifest"])
def test_a_symlink_inside_the_store_is_refused(store: Path, victim: Path, which: str) -> None:
    if which == "updates file":
        target = store / "rounds" / "00002" / "updates.npz"
        target.unlink()
        target.symlink_to(victim)
    elif which == "rounds folder":
        real = store.parent / "elsewhere"
        (store / "rounds").rename(real)
        (store / "rounds").symlink_to(real, target_is_directory=True)
    else:
        (store / "manifest.json").rename(victim.parent / "m.json")
        (store / "manifest.json").symlink_to(victim.parent / "m.json")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        HistoryStore.open(store)
    assert victim.read_text() == "precious"


def test_confined_accepts_only_plain_relative_paths(tmp_path: Path) -> None:
    for bad in ["", "/etc/passwd", "a/../b", "./a", "a//b", "a\\b", 7, None]:
        with pytest.raises(UnsafePathError):
            confined(tmp_path, bad, "test")
    assert confined(tmp_path, "a/b.npz", "test") == tmp_path / "a" / "b.npz"


def test_run_files_are_never_read_or_appended_through_a_symlink(tmp_path: Path,
                                                                victim: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.json").symlink_to(victim)
    with pytest.raises(ResumeError, match="symbolic link"):
        load_checkpoint(run)
    (run / "run.json").symlink_to(victim)
    with pytest.raises(ResumeError, match="symbolic link"):
        read_json(run / "run.json")
    (run / "lineage.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        LineageLog(run).append("resume")
    assert victim.read_text() == "precious"


def test_report_writes_no_file_through_a_symlinked_folder(tmp_path: Path) -> None:
    from fedunlearn.reporting.files import _write_text

    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "plots").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match="symbolic link"):
        _write_text(run / "plots" / "x.png", "data")
    assert list(outside.iterdir()) == []
    # a symlink at the file itself is replaced, its target untouched
    target = outside / "t.txt"
    target.write_text("precious")
    (run / "report.md").symlink_to(target)
    _write_text(run / "report.md", "report")
    assert target.read_text() == "precious" and (run / "report.md").read_text() == "report"
    assert not (run / "report.md").is_symlink()


def test_a_purge_counts_what_it_deleted_and_what_it_wrote_anew(store: Path) -> None:
    """Round metas and updates files of the client's rounds are written anew without it (the
    old ones deleted), its running sum is deleted: counted apart, not as a net figure."""
    opened = HistoryStore.open(store)
    rounds = [t for t in opened.rounds() if 0 in opened.participants(t)]
    alone = [t for t in rounds if opened.participants(t) == (0,)]
    opened.purge_clients([0], level="updates")
    written = len(rounds) + len(rounds) - len(alone)  # metas, updates files with others left
    assert opened.last_purge == {"written": written, "deleted": 2 * len(rounds) + 1}
