"""The config boundary: typed parsing, overrides, and one-line errors before any work."""

from __future__ import annotations

import pytest

from fedunlearn.cli import main
from fedunlearn.config.tree import ConfigError, load_config, parse_override
from fedunlearn.run.pipeline import prepare


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[training]\nrounds = 7\n[data]\nsource = "digits"\n')
    cfg = load_config(path, ["training.rounds=3", "model.params={hidden=[32]}",
                             "training.learning_rate=1"])
    assert cfg.training.rounds == 3
    assert cfg.model.params == {"hidden": [32]}
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.to_dict()["training"]["rounds"] == 3


def test_parse_override_types():
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=hello") == (["a", "b"], "hello")


@pytest.mark.parametrize(("override", "needle"), [
    ("training.roundz=3", "unknown config key 'training.roundz'"),
    ("trainig.rounds=3", "unknown config section '[trainig]'"),
    ("training.rounds=\"many\"", "'training.rounds' must be of type int"),
    ("data.partition=\"zipf\"", "not one of: iid, dirichlet, pathological"),
    ("training.sample_fraction=0", "'training.sample_fraction'"),
    ("history.dtype=\"int8\"", "float32, float16"),
    ("backdoor.clients=[10]", "use ids in 0..9"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("override", "needle"), [
    ("model.name=\"resnet\"", "'model.name' = 'resnet' is unknown; known: cnn, lenet5, logistic, mcmahan_cnn, mlp, resnet20"),
    ("data.source=\"imagenet\"", "'data.source' = 'imagenet' is unknown"),
    ("training.strategy=\"fedfoo\"", "known: fedavg, fedavgm, fedprox"),
    ("training.step=\"nope\"", "'training.step'"),
    ("data.partition=\"pathological\"", "classes_per_client=12 exceeds the 10 classes"),
    ("experiment.extensions=[\"no_such_module_xyz\"]", "no_such_module_xyz"),
])
def test_impossible_names_and_values_fail_before_work(override, needle):
    extra = ["data.classes_per_client=12"] if "pathological" in override else []
    cfg = load_config(None, [override, *extra])
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    assert needle in str(err.value)


def test_cli_reports_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "simulations/quickstart.toml", "--set", "training.roundz=2",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fedunlearn: error: unknown config key 'training.roundz'")
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_a_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    code = main(["run", "simulations/quickstart.toml", "--out", str(tmp_path)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"


@pytest.mark.parametrize("override, message", [
    ("unlearning.params.federaser.r=-1", "calibration ratio r must be > 0"),
    ("training.strategy_params={bogus=1}", "unexpected keyword argument 'bogus'"),
])
def test_method_and_strategy_parameters_fail_before_any_work(
        override, message, tmp_path, capsys, monkeypatch):
    from fedunlearn.engine import local
    from fedunlearn.run import pipeline as runner

    def no_work(*args, **kwargs):
        pytest.fail("validation must stop the run before any engine or training start")

    monkeypatch.setattr(runner, "run_engine", no_work)
    monkeypatch.setattr(local, "warm_up", no_work)
    out = tmp_path / "run"
    code = main(["run", "simulations/backdoor_digits.toml", "--set", override, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("written", "expected"), [(None, float("inf")), (0.5, 0.5)])
def test_resume_keeps_the_behaviour_a_run_began_with_for_keys_added_since(
        tmp_path, monkeypatch, written, expected):
    """A run written before ``verification.shadow_budget`` existed trained its shadows for
    ``shadow_epochs`` whatever the cost; resumed, it must go on that way (inf), not with
    today's default (1.0). A run that recorded the key keeps its value."""
    import json

    from fedunlearn.run import pipeline as runner
    from fedunlearn.run.checks import check_engine  # noqa: F401 - patched below

    config = load_config("simulations/quickstart.toml", []).to_dict()
    if written is None:
        del config["verification"]["shadow_budget"]
    else:
        config["verification"]["shadow_budget"] = written
    (tmp_path / "run.json").write_text(json.dumps({"config": config, "command": ["run"],
                                                   "resumed": []}))
    seen = {}
    monkeypatch.setattr(runner, "run_experiment",
                        lambda cfg, out, **kw: seen.setdefault("cfg", cfg))
    monkeypatch.setattr("fedunlearn.run.checks.check_engine", lambda cfg: None)
    assert main(["resume", str(tmp_path)]) == 0
    assert seen["cfg"].verification.shadow_budget == expected
