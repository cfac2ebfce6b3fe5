"""scripts/compare_results.py: identical runs pass; any changed hash, metric or cost is named."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compare_results.py"

RESULTS = {
    "config": {"engine": {"client_timeout_s": 120.0}},
    "created": "2026-12-07T00:00:00Z", "git_commit": "a" * 40,
    "training": {"wall_s": 2.1, "final_test_accuracy": 0.9},
    "unlearning": [
        {"seed": 0, "request": [0], "method": "retrain", "setting": "federated",
         "role": "reference", "wall_s": 1.0, "speedup_vs_retrain": 1.0, "client_epochs": 36.0,
         "model_hash": "h1", "metrics": {"test_accuracy": 0.5, "kl_forget": 0.0}},
        {"seed": 0, "request": [0], "method": "federaser", "setting": "federated",
         "role": "method", "wall_s": 0.5, "speedup_vs_retrain": 2.0, "client_epochs": 17.0,
         "model_hash": "h2", "metrics": {"test_accuracy": 0.4, "kl_forget": 0.25}},
    ],
}


def _run(tmp_path: Path, b: dict) -> subprocess.CompletedProcess:
    for name, results in (("a", RESULTS), ("b", b)):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "b")],
                          check=False, capture_output=True, text=True, timeout=60)


def test_identical_results_pass_whatever_the_clocks_say(tmp_path: Path) -> None:
    b = copy.deepcopy(RESULTS)
    b["created"], b["git_commit"], b["training"]["wall_s"] = "later", "b" * 40, 9.9
    b["unlearning"].reverse()  # rows are matched by key, not by position
    b["unlearning"][0]["wall_s"], b["unlearning"][0]["speedup_vs_retrain"] = 7.0, 0.1
    done = _run(tmp_path, b)
    assert done.returncode == 0, done.stdout
    assert "identical: 2 rows, 2 model hashes, 4 metric values" in done.stdout


def test_a_changed_hash_metric_cost_or_config_is_named(tmp_path: Path) -> None:
    b = copy.deepcopy(RESULTS)
    b["unlearning"][1]["model_hash"] = "h3"
    b["unlearning"][1]["metrics"]["kl_forget"] = 0.25000000000000006  # one last bit
    b["unlearning"][0]["client_epochs"] = 35.0
    b["config"]["engine"]["client_timeout_s"] = 60.0  # a config's "_s" key is not a clock
    done = _run(tmp_path, b)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert any("method=federaser" in line and "model_hash: 'h2' != 'h3'" in line for line in lines)
    assert any("metrics.kl_forget" in line for line in lines)
    assert any("method=retrain" in line and "client_epochs: 36.0 != 35.0" in line
               for line in lines)
    assert any("config.engine.client_timeout_s" in line for line in lines)
    assert lines[-1].startswith("DIFFERENT: 4 difference(s)")


def test_a_missing_row_is_named_and_an_unreadable_run_is_exit_2(tmp_path: Path) -> None:
    b = copy.deepcopy(RESULTS)
    del b["unlearning"][1]
    done = _run(tmp_path, b)
    assert done.returncode == 1 and "method=federaser" in done.stdout and "only in A" in done.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"),
                              str(tmp_path / "nowhere")], check=False, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
