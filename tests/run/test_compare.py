"""`fedunlearn compare`: federated and centralized removal of the same clients in one table."""

from __future__ import annotations

import json

import pytest

from fedunlearn.cli import main
from fedunlearn.evaluation.verify import MIA_KEYS, PAIRED_ASR_KEYS

ALL_METRICS = {"test_accuracy", "retain_accuracy", "forget_accuracy", "backdoor_asr",
               "backdoor_p_value", "backdoor_trigger_active", "mia_loss_auc",
               "mia_loss_tpr_at_1fpr", "mia_lira_auc", "mia_lira_tpr_at_1fpr", "acc_err",
               "acc_dis", "param_distance", "kl_forget", "kl_test", "pred_diff_forget",
               "pred_diff_test"} | set(MIA_KEYS) | set(PAIRED_ASR_KEYS)

SMALL = ["data.num_clients=6", "training.rounds=3", "training.local_epochs=1",
         "training.learning_rate=0.1", "data.partition=\"iid\"", "backdoor.clients=[0]",
         "unlearning.requests=[[0]]", "verification.mia_shadows=2",
         "verification.shadow_epochs=3", "engine.ray_num_cpus=1"]
PARAMS = ("unlearning.params={distillation={epochs=2}, central_retrain={epochs=4}, "
          "sisa={shards=3, slices=2, epochs=4}, "
          "sisa_random={shards=3, slices=2, epochs=4}, newton={lam=0.001}}")
METHODS = ("unlearning.methods=[\"retrain\", \"distillation\", \"sisa\", \"sisa_random\", "
           "\"newton\"]")


@pytest.mark.flower
def test_compare_puts_both_settings_on_one_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "simulations/backdoor_digits.toml", "--out", str(out)]
    for item in [*SMALL, METHODS, PARAMS]:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["setting"], r["method"]): r for r in results["unlearning"]}
    assert set(rows) == {("federated", m) for m in ("original", "retrain", "retrain_seed2",
                                                    "distillation")} | {
        ("centralized", m) for m in ("original", "central_retrain", "central_retrain_seed2",
                                     "sisa", "sisa_random", "newton")}
    for key, row in rows.items():
        assert set(row["metrics"]) == ALL_METRICS, key
    # each setting is measured against its own retraining
    assert rows[("centralized", "central_retrain")]["metrics"]["kl_forget"] == 0.0
    assert rows[("centralized", "central_retrain")]["speedup_vs_retrain"] == pytest.approx(1.0)
    # sharded by client, client 0 lives in one shard: one shard retrained; at random, all three
    assert rows[("centralized", "sisa")]["details"]["shards_retrained"] == 1
    assert rows[("centralized", "sisa_random")]["details"]["shards_retrained"] == 3
    newton = rows[("centralized", "newton")]["details"]
    assert {"data_dependent_bound", "worst_case_bound", "true_residual", "retrained"} <= set(newton)
    assert "centralized" in (out / "report.md").read_text()
    assert "sisa_random" in capsys.readouterr().out


def test_report_and_compare_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results.json" in err
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    assert main(["compare", "simulations/quickstart.toml", "--set", "unlearning.requests=[]",
                 "--out", str(tmp_path / "x")]) == 2
    assert "compare needs removal requests" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
