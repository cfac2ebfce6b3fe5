"""Bad input, tried as a new user would: one line on stderr, exit code 2, nothing written, and
no engine, Ray or training started (the run entry points are replaced by a tripwire)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedunlearn.cli import main
from fedunlearn.config.tree import ConfigError

BD = "simulations/backdoor_digits.toml"
QS = "simulations/quickstart.toml"
FC = "simulations/federated_vs_centralized.toml"

# (config, extra CLI arguments, a fragment the one-line message must contain)
CASES = [
    (QS, ["--set", "unlearning.methods=[\"retrain\", \"newton\"]", "--set",
          "unlearning.params.newton.features=\"penultimate\"", "--set", "model.name=\"cnn\""],
     "newton's features = 'penultimate' needs model.name = 'mlp', got 'cnn'"),
    (QS, ["--set", "unlearning.methods=[\"retrain\", \"sisa\"]", "--set",
          "unlearning.params.sisa.shards=20"], "20 shards by client need at least as many"),
    (QS, ["--set", "unlearning.methods=[\"retrain\", \"sisa_random\"]", "--set",
          "unlearning.params.sisa_random.shard_by=\"client\""], "sisa_random shards at random"),
    (QS, ["--set", "training.strategy=\"fedprox\"", "--set",
          "training.strategy_params={proximal_mu=-1.0}"], "proximal_mu must be >= 0"),
    (QS, ["--set", "training.roundz=2"], "unknown config key 'training.roundz'"),
    (QS, ["--set", "trainig.rounds=2"], "unknown config section '[trainig]'"),
    (QS, ["--set", "training.rounds=\"many\""], "must be of type int"),
    (QS, ["--set", "training.rounds=0"], "training.rounds"),
    (QS, ["--set", "data.num_clients=1"], "would remove every client"),
    (QS, ["--set", "data.partition=\"zipf\""], "not one of: iid, dirichlet, pathological"),
    (QS, ["--set", "training.sample_fraction=0"], "training.sample_fraction"),
    (QS, ["--set", "history.dtype=\"int8\""], "float32, float16"),
    (QS, ["--set", "backdoor.clients=[10]"], "use ids in 0..9"),
    (QS, ["--set", "model.name=\"resnet\""], "'model.name' = 'resnet' is unknown"),
    (QS, ["--set", "data.source=\"imagenet\""], "'data.source' = 'imagenet' is unknown"),
    (QS, ["--set", "training.strategy=\"fedfoo\""], "known: fedavg, fedavgm, fedprox"),
    (QS, ["--set", "training.step=\"nope\""], "'training.step'"),
    (QS, ["--set", "unlearning.methods=[\"federasr\"]"], "federasr"),
    (QS, ["--set", "unlearning.methods=[\"federaser:\"]"], "empty or unusual label"),
    (QS, ["--set", "unlearning.methods=[\"federaser\", \"federaser\"]"], "lists a method twice"),
    (QS, ["--set", "unlearning.requests=[[0, 0]]"], "names a client twice"),
    (QS, ["--set", "unlearning.requests=[[0], [0]]"], "already removed by request 0"),
    (QS, ["--set", "unlearning.requests=[[]]"], "entry 0 is empty"),
    (QS, ["--set", "unlearning.requests=[[42]]"], "unlearning.requests"),
    (QS, ["--set", "unlearning.requests=[[0, \"one\"]]"], "('one' is str, not int)"),
    (BD, ["--set", "unlearning.params.federaser.r=-1"], "calibration ratio r must be > 0"),
    (BD, ["--set", "unlearning.params.federaser.rr=1"], "unknown parameters ['rr']"),
    (BD, ["--set", "unlearning.params.nosuch.r=1"], "'nosuch'"),
    (BD, ["--set", "unlearning.params.pga=5"], "'unlearning.params.pga' must be a table"),
    (BD, ["--set", "unlearning.methods=[\"retrain\"]", "--set", "unlearning.params.not.layers=[9]"],
     "'unlearning.params.not'"),
    (BD, ["--set", "unlearning.params.fedrecover=[[\"warmup_rounds\", 2]]"],
     "'unlearning.params.fedrecover' must be a table"),
    # parameters of a method not run this time are still checked
    (BD, ["--set", "unlearning.methods=[\"distillation\"]",
          "--set", "unlearning.params.federaser.r=0"], "calibration ratio r must be > 0"),
    (BD, ["--set", "unlearning.params.distillation.temperature=0"], "temperature > 0"),
    (FC, ["--set", "unlearning.params.sisa.shards=0"], "unlearning.params.sisa"),
    (FC, ["--set", "unlearning.params.newton.delta=2"], "delta must be in (0, 1)"),
    (BD, ["--set", "unlearning.methods=[\"not\"]", "--set", "unlearning.params.not.layers=[99]"],
     "do not fit a model with"),
    (BD, ["--set", "unlearning.methods=[\"not\"]", "--set", "unlearning.params.not.layers=[0, -3]"],
     "name a layer twice"),
    (BD, ["--set", "unlearning.params.pga.epochs=inf"],
     "'unlearning.params.pga.epochs' = inf is not a finite number"),
    (BD, ["--set", "unlearning.params.pga.radius_fraction=\"x\""], "must be a number"),
    (BD, ["--set", "unlearning.params.fedrecover.track_accuracy=\"no\""], "true or false"),
    (QS, ["--set", "verification.mia_shadows=1"], "verification.mia_shadows"),
    (QS, ["--set", "verification.shadow_budget=0"], "'verification.shadow_budget' must be > 0"),
    (QS, ["--set", "verification.shadow_budget=nan"],
     "'verification.shadow_budget' = nan is not a number"),
    (QS, ["--set", "verification.shadow_epochs=inf"],
     "'verification.shadow_epochs' = inf is not a finite number"),
    (QS, ["--set", "model.name=\"mcmahan_cnn\"", "--set", "model.params={channels=[0, 64]}"],
     "does not fit the data"),
    (BD, ["--set", "training.strategy_params={bogus=1}"], "unexpected keyword argument 'bogus'"),
    (BD, ["--set", "training.strategy=\"fedavgm\""], "fedavgm"),
    (QS, ["--seeds", "0,x"], "--seeds expects non-negative integers"),
    (QS, ["--seeds", ""], "--seeds expects non-negative integers"),
    (QS, ["--seeds", "1,1"], "lists a seed twice"),
    (QS, ["--set", "experiment.extensions=[\"no_such_module_xyz\"]"], "no_such_module_xyz"),
    (QS, ["--set", "nonsense"], "--set"),
    (QS, ["--set", "experiment.name=\"../../x\""], "must be one path component"),
    (QS, ["--set", "experiment.name=\"\""], "must be one path component"),
    (QS, ["--set", "engine.num_cpus=4096"], "asks more CPUs per client than this machine has"),
    (QS, ["--set", "engine.num_gpus=1"], "no GPU"),
    (QS, ["--set", "engine.ray_num_cpus=-1"], "engine.ray_num_cpus"),
    (QS, ["--set", "engine.ray_num_cpus=1", "--set", "engine.num_cpus=2"],
     "must be at least engine.num_cpus"),
    (QS, ["--set", "engine.ray_num_cpus=1", "--set", "engine.address=\"auto\""],
     "applies to a local Ray only"),
    (QS, ["--set", "engine.shutdown_grace_s=0"], "engine.shutdown_grace_s"),
    (QS, ["--set", "unlearning.params.federaser.r=1",
          "--set", "unlearning.params.federaser.delta_t=0"], "federaser"),
    ("no/such/config.toml", [], "no/such/config.toml"),
]
FILE_OUT = "__file__"  # --out below a regular file: cannot be created


@pytest.mark.parametrize("where", ["/proc/fedunlearn-run", FILE_OUT])
def test_unwritable_out_is_refused_before_work(where, tmp_path, capsys, tripwire):
    if where == FILE_OUT:
        blocker = tmp_path / "a-file"
        blocker.write_text("keep me")
        where = str(blocker / "run")
    code = main(["run", QS, "--out", where])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot be written" in err[0], err
    if where.endswith("a-file/run"):
        assert (tmp_path / "a-file").read_text() == "keep me"


def test_probe_of_out_leaves_nothing_behind(tmp_path, capsys, tripwire):
    """A valid --out that a later check refuses: no directory is left behind."""
    out = tmp_path / "deep" / "er" / "run"
    code = main(["run", BD, "--set", "unlearning.params.federaser.r=-1", "--out", str(out)])
    assert code == 2
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("command", ["run", "compare"])
def test_a_directory_given_as_the_config_is_named_as_a_directory(command, tmp_path, capsys,
                                                                 tripwire):
    code = main([command, str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"'{tmp_path}' is a directory, not a config file" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "args", "needle"), CASES,
                         ids=[" ".join(a) for _, a, _ in CASES])
def test_bad_run_input_is_one_line_exit_2_nothing_written(config, args, needle, tmp_path,
                                                         capsys, tripwire):
    out = tmp_path / "run"
    code = main(["run", config, *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("fedunlearn: error: ")
    assert needle in err[0], err[0]
    assert not out.exists()


def test_params_of_an_unlisted_method_are_accepted(tmp_path, monkeypatch):
    """The extension example of docs/extending.md sets parameters for a method the run may not list."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.run.checks import build_methods

    cfg = load_config(BD, ["unlearning.methods=[\"distillation\"]",
                           "unlearning.params.federaser.r=1"])
    assert [m.name for m in build_methods(cfg) if m.role == "method"] == ["distillation"]


def _lineage_run(tmp_path, seeds=(0, 1)):
    from fedunlearn.history.lineage import LineageLog

    for s in seeds:
        log = LineageLog(tmp_path / f"seed-{s}")
        log.append("round", round=1, participants=[0, 1], model_hash="a" * 64,
                   updates={"0": "b" * 64, "1": "c" * 64})
    return tmp_path


def test_lineage_of_a_multi_seed_run_answers_per_seed(tmp_path, capsys):
    run = _lineage_run(tmp_path)
    assert main(["lineage", str(run), "--client", "0"]) == 0
    out = capsys.readouterr().out
    assert "[seed 0]" in out and "[seed 1]" in out
    assert main(["lineage", str(run), "--client", "0", "--seed", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == [1]
    assert main(["lineage", str(run), "--client", "0", "--seed", "7"]) == 2
    assert "seeds there: 0, 1" in capsys.readouterr().err


def test_lineage_skips_a_truncated_last_line_and_names_damage_elsewhere(tmp_path, capsys):
    run = _lineage_run(tmp_path, seeds=(0,))
    path = run / "seed-0" / "lineage.jsonl"
    with open(path, "a") as fh:
        fh.write('{"event": "rou')  # a crash mid-append
    assert main(["lineage", str(run), "--client", "0"]) == 0
    assert "cut short" in capsys.readouterr().out
    path.write_text('{"event": "rou\n' + path.read_text())
    assert main(["lineage", str(run), "--client", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1 is damaged" in err[0]


def test_lineage_refuses_a_client_the_run_never_had(tmp_path, capsys):
    """A client id outside the run's ``data.num_clients`` (from ``run.json``) is refused with
    one line instead of answering "took part in rounds: none"; so is a negative id, also when
    the question names a seed's own directory."""
    from fedunlearn.run.resume import write_run_file

    run = _lineage_run(tmp_path)
    write_run_file(run, {"data": {"num_clients": 2}}, "run")
    for client, where in (("2", run), ("99", run), ("-1", run), ("5", run / "seed-0")):
        assert main(["lineage", str(where), "--client", client]) == 2, client
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"client {client} is not a client" in err[0], err
        assert "0 to 1" in err[0] or client == "-1", err
    assert main(["lineage", str(run / "seed-0"), "--client", "1"]) == 0
    assert "took part in rounds: [1]" in capsys.readouterr().out
    assert main(["lineage", str(run / "seed-0"), "--client", "1", "--seed", "5"]) == 2
    assert "holds one seed's lineage log" in capsys.readouterr().err


EXT_HEAD = '''
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from fedunlearn.data import ArrayDataset, register_source
from fedunlearn.engine.strategy import STRATEGIES
from fedunlearn.models import MODELS
from fedunlearn.models.training import TRAIN_STEPS
from flwr.serverapp.strategy import FedAvg
'''

# (the body of the user's module ``ext_bad``, the run's --set values, what the line must say)
EXT_CASES = [
    ("def broken(:\n", [], "'ext_bad' failed while being imported: SyntaxError"),
    ("raise RuntimeError('no licence')\n", [],
     "'ext_bad' failed while being imported: RuntimeError: no licence (at ext_bad.py:11"),
    ("@TRAIN_STEPS.register('cross_entropy')\ndef s(model, x, y, ctx):\n    return 0\n", [],
     "train step 'cross_entropy' is already registered"),
    ("@register_source('src')\ndef src(seed=0):\n    raise FileNotFoundError('/data/x.csv')\n",
     ["data.source=\"src\""], "source 'src' failed: FileNotFoundError: /data/x.csv (at ext_bad.py"),
    ("@register_source('src')\ndef src(seed=0):\n    return np.zeros((99, 4)), np.zeros(99)\n",
     ["data.source=\"src\""], "returned tuple; a source must return fedunlearn.data.ArrayDataset"),
    (("@register_source('src')\ndef src(seed=0):\n    x = np.random.default_rng(0).random((300, 4))"
     "\n    x[5, 1] = np.nan\n    return ArrayDataset(x=x, y=np.arange(300) % 3, num_classes=3)\n"),
     ["data.source=\"src\"", "backdoor.clients=[]"], "NaN or Inf features in 1 of its 300"),
    ("@MODELS.register('m')\ndef m(input_shape, num_classes, seed=0):\n    raise OSError('no GPU')\n",
     ["model.name=\"m\""],
     ("config [model] (m, params {}) could not be built: OSError: no GPU "
      "(at ext_bad.py:13 in m)")),
    ("@MODELS.register('m')\ndef m(input_shape, num_classes, seed=0):\n    return 'a model'\n",
     ["model.name=\"m\""], "builder returned str, not a torch.nn.Module"),
    ("@MODELS.register('m')\ndef m(input_shape, num_classes, seed=0):\n    return nn.Flatten()\n",
     ["model.name=\"m\""], "it has no trainable parameters"),
    (("@MODELS.register('m')\ndef m(input_shape, num_classes, seed=0):\n"
     "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"),
     ["model.name=\"m\""], "not to (2, 10): one score per class"),
    ("@TRAIN_STEPS.register('s')\ndef s(model, x):\n    return F.cross_entropy(model(x), x)\n",
     ["training.step=\"s\""], "train step 's' is called as step(model, x, y, ctx, **training."),
    ("@TRAIN_STEPS.register('s')\ndef s(model, x, y, ctx):\n    return 0.5\n",
     ["training.step=\"s\""], "train step 's' returned float; it must return the batch's loss"),
    (("@TRAIN_STEPS.register('s')\ndef s(model, x, y, ctx):\n"
     "    return F.cross_entropy(model(x), y, reduction='none')\n"),
     ["training.step=\"s\""],
     "fails on one batch before any round: TypeError: train step 's' returned a tensor of shape"),
    ("@TRAIN_STEPS.register('s')\ndef s(model, x, y, ctx):\n    raise KeyError('w')\n",
     ["training.step=\"s\""], "KeyError: 'w' (at ext_bad.py:13 in s)"),
    ("", ["training.step_params={mu=0.1}"],
     "does not fit train step 'cross_entropy' (got an unexpected keyword argument 'mu')"),
    ("", ["training.step=\"proximal\"", "training.step_params={mu=-1.0}"],
     "ValueError: the proximal step needs mu >= 0"),
    (("@register_source('src')\ndef src(seed=0):\n"
     "    x = np.random.default_rng(0).random((300, 4))\n"
     "    return ArrayDataset(x=x, y=np.arange(300) % 3 + 0.7, num_classes=4)\n"),
     ["data.source=\"src\"", "backdoor.clients=[]"], "non-integral values such as 0.7"),
    (("@register_source('src')\ndef src(seed=0):\n"
     "    x = np.random.default_rng(0).random((300, 4))\n"
     "    return ArrayDataset(x=x, y=np.array(['cat', 'dog', 'eel'] * 100), num_classes=3)\n"),
     ["data.source=\"src\"", "backdoor.clients=[]"],
     ("source 'src' failed: ValueError: labels y must be class indices 0, 1, ...; got <U3 "
      "values such as np.str_('cat') (map names to indices, e.g. names, y = np.unique(y, "
      "return_inverse=True)) (at ext_bad.py:")),
    (("@TRAIN_STEPS.register('s')\ndef s(model, x, y, ctx):\n"
     "    return F.cross_entropy(model(x), y).detach()\n"),
     ["training.step=\"s\""], "returned a loss that does not depend on the model's parameters"),
    (("@STRATEGIES.register('st')\ndef st(evaluate_fraction=0.0, *, damping, **params):\n"
     "    if not 0 <= damping <= 1:\n        raise ValueError('damping must lie in [0, 1]')\n"
     "    return FedAvg()\n"),
     ["training.strategy=\"st\"", "training.strategy_params={damping=2.0}"],
     "{'damping': 2.0}: ValueError: damping must lie in [0, 1] (at ext_bad.py:14 in st)"),
    ("@STRATEGIES.register('st')\ndef st(evaluate_fraction=0.0, **params):\n    return None\n",
     ["training.strategy=\"st\""], "returned NoneType, not a flwr.serverapp.strategy.Strategy"),
    ("@STRATEGIES.register('st')\ndef st():\n    return FedAvg()\n", ["training.strategy=\"st\""],
     "its factory is called as factory(evaluate_fraction=..., **training.strategy_params)"),
    (("@STRATEGIES.register('st')\ndef st(evaluate_fraction=0.0, **params):\n"
     "    raise OSError('no config file')\n"), ["training.strategy=\"st\""],
     "strategy 'st' could not be built: OSError: no config file (at ext_bad.py:13 in st)"),
    (("@STRATEGIES.register('st')\ndef st(evaluate_fraction=0.0, **params):\n"
     "    return FedAvg(fraction_train=0.5)\n"), ["training.strategy=\"st\""],
     "strategy 'st' has fraction_train = 0.5"),
    # sys.exit() in the user's code: one line naming it, not a silent end of the process
    ("import sys\nsys.exit('bye')\n", [],
     "'ext_bad' failed while being imported: SystemExit: bye (at ext_bad.py:12"),
    ("@register_source('src')\ndef src(seed=0):\n    import sys\n    sys.exit(0)\n",
     ["data.source=\"src\""], "source 'src' failed: SystemExit: 0 (at ext_bad.py:14 in src)"),
    (("from fedunlearn.unlearning import UNLEARNERS\n@UNLEARNERS.register('quits')\n"
      "class Quits:\n    setting = 'federated'\n    def check(self):\n"
      "        import sys\n        sys.exit(3)\n    def unlearn(self, ctx):\n        pass\n"),
     ["unlearning.methods=[\"retrain\", \"quits\"]"],
     "unlearning method 'quits': its check() failed: SystemExit: 3 (at ext_bad.py:17 in check)"),
]


@pytest.mark.parametrize(("body", "sets", "needle"), EXT_CASES,
                         ids=[n[:40] for _, _, n in EXT_CASES])
def test_a_broken_extension_is_one_line_before_any_round(body, sets, needle, tmp_path,
                                                         monkeypatch, capsys):
    """A user's source, model, train step or strategy that fails, or does not fit the
    protocol, stops the run in one line naming it (and where in the user's file), before the
    engine starts and with nothing written; one batch of local training is part of the check."""
    from fedunlearn.run import pipeline as runner

    def no_engine(*args, **kwargs):
        pytest.fail("the run must stop before the engine starts")

    monkeypatch.setattr(runner, "run_engine", no_engine)
    (tmp_path / "ext_bad.py").write_text(EXT_HEAD + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    args = [a for s in ["experiment.extensions=[\"ext_bad\"]", *sets] for a in ("--set", s)]
    code = main(["run", QS, *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("fedunlearn: error: ") and needle in err[0], err[0]
    assert not out.exists()


def test_resume_imports_the_runs_extensions_before_checking_its_strategy(tmp_path, monkeypatch,
                                                                         capsys):
    """A run trained with a strategy from the user's module: `resume` must know that name (it
    was a KeyError traceback: the strategy check ran before the extensions were imported)."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.strategy import STRATEGIES
    from fedunlearn.run import pipeline as runner
    from fedunlearn.run.resume import write_run_file

    (tmp_path / "ext_strategy.py").write_text(EXT_HEAD + (
        "@STRATEGIES.register('mine')\ndef mine(evaluate_fraction=0.0, **params):\n"
        "    return FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    monkeypatch.setattr(runner, "run_experiment", lambda cfg, out, **kw: seen.append(cfg))
    cfg = load_config(QS, ["experiment.extensions=[\"ext_strategy\"]",
                           "training.strategy=\"mine\""])
    out = tmp_path / "run"
    out.mkdir()
    write_run_file(out, cfg.to_dict(), "run")
    assert "mine" not in STRATEGIES  # as in a new process: the module is not imported yet
    code = main(["resume", str(out)])
    assert code == 0, capsys.readouterr().err
    assert [c.training.strategy for c in seen] == ["mine"]


PICKY = """
class Picky(nn.Module):
    \"\"\"Fails on training batches of fewer than 3 samples.\"\"\"

    def __init__(self, d, c):
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, x):
        if self.training and len(x) < 3:
            raise ValueError(f'needs 3 samples, got {len(x)}')
        return self.fc(x.flatten(1))


@MODELS.register('picky')
def picky(input_shape, num_classes, seed=0):
    return Picky(int(np.prod(input_shape)), num_classes)
"""


def test_a_model_that_cannot_train_on_a_clients_last_batch_is_refused_before_any_round(
        tmp_path, monkeypatch):
    """A model that fails on small batches stops the run in prepare, naming the client whose
    last batch it is and the batch size (it failed in round 1, inside the clients). BatchNorm,
    which cannot train on one sample, gets a last batch of one folded into the batch before
    (training.batch_bounds): the same batch size passes, and trains."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.models.training import local_training, train
    from fedunlearn.run.pipeline import prepare

    (tmp_path / "ext_small.py").write_text(EXT_HEAD + PICKY + (
        "@MODELS.register('bn')\ndef bn(input_shape, num_classes, seed=0):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16),\n"
        "                         nn.ReLU(), nn.Linear(16, num_classes))\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["experiment.extensions=[\"ext_small\"]", "data.num_clients=4",
            "data.partition=\"iid\""]
    sizes = [len(d) for d in prepare(load_config(QS, base)).data.clients]
    k = int(np.argmin(sizes))
    one_left = f"training.batch_size={sizes[k] - 1}"  # client k's last batch holds one sample
    with pytest.raises(ConfigError, match=rf"fails on a batch of 1 sample \(client {k} holds "
                                          rf"{sizes[k]}, training.batch_size is {sizes[k] - 1}\)"
                                          r": ValueError: needs 3 samples, got 1 \(at ext_small"):
        prepare(load_config(QS, [*base, "model.name=\"picky\"", one_left]))
    setup = prepare(load_config(QS, [*base, "model.name=\"bn\"", one_left]))
    client = setup.data.clients[k]
    stats = train(setup.build_model(), client.x, client.y,
                  local_training(setup.cfg, 1.0), seed=0)
    assert stats["steps"] == len(client) // (sizes[k] - 1)  # the one sample joined a batch


def test_unusual_but_valid_extensions_pass_the_checks(tmp_path, monkeypatch):
    """What the checks must not refuse: a step whose parameter is required (given in
    step_params), a strategy whose parameter is required, a model that fails on small
    batches that half an epoch never reaches."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.run.pipeline import prepare

    (tmp_path / "ext_ok.py").write_text(EXT_HEAD + (
        "@TRAIN_STEPS.register('req')\ndef req(model, x, y, ctx, *, mu):\n"
        "    return F.cross_entropy(model(x), y) * (1 + mu)\n"
        "@STRATEGIES.register('damped')\ndef damped(evaluate_fraction=0.0, *, damping, **p):\n"
        "    return FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)\n"
        ) + PICKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["experiment.extensions=[\"ext_ok\"]", "data.num_clients=4", "data.partition=\"iid\""]
    prepare(load_config(QS, [*base, "training.step=\"req\"", "training.step_params={mu=0.1}",
                             "training.strategy=\"damped\"",
                             "training.strategy_params={damping=0.5}"]))
    sizes = [len(d) for d in prepare(load_config(QS, base)).data.clients]
    one_left = f"training.batch_size={min(sizes) - 1}"
    with pytest.raises(ConfigError, match="fails on a batch of 1 sample"):
        prepare(load_config(QS, [*base, "model.name=\"picky\"", one_left]))
    prepare(load_config(QS, [*base, "model.name=\"picky\"", one_left,
                             "training.local_epochs=0.5"]))  # never takes the last batch


# ------------------------------------------------------------------------------ messages


@pytest.mark.parametrize("command", ["run", "resume", "report"])
def test_a_write_failure_names_the_run_directory_not_a_placeholder(command, tmp_path, capsys,
                                                                   monkeypatch):
    import errno

    from fedunlearn.run import commands

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npz"))

    out = tmp_path / "my-run"
    monkeypatch.setattr(commands, f"cmd_{command}", full_disk)
    args = ["run", QS, "--out", str(out)] if command == "run" else [command, str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "RUN_DIR" not in err[0]
    if command == "report":  # nothing to resume: the report is written again
        assert err[0].endswith("then run the command again"), err
    else:
        assert f"continue with `fedunlearn resume {out}`" in err[0], err


def test_long_client_lists_in_messages_are_a_count_and_the_first_few():
    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.faults import ClientFailure, FaultPolicy
    from fedunlearn.run.checks import _check_requests_against_sampling

    with pytest.raises(ClientFailure) as err:
        FaultPolicy(on_failure="drop").settle({c: "timeout" for c in range(100_000)}, [],
                                               server_round=4)
    assert "every client of round 4 failed: 100000 clients (0, 1, 2, 3, 4, ...) (timeout)" \
        in str(err.value) and len(str(err.value)) < 400
    few = FaultPolicy(on_failure="drop")  # a short list is spelled out, as before
    with pytest.raises(ClientFailure, match=r"failed: client 0 \(timeout\), client 1 "):
        few.settle({0: "timeout", 1: "non-finite"}, [], server_round=1)
    cfg = load_config(None, ["data.num_clients=1000", "training.rounds=1",
                             "training.sample_fraction=0.001",
                             f"unlearning.requests=[{list(range(1, 999))}]"])
    with pytest.raises(ConfigError, match=r"names 99[78] clients \(\d+, \d+, \d+, \d+, \d+, "
                                          r"\.\.\.\), which are never sampled") as err:
        _check_requests_against_sampling(cfg)
    assert len(str(err.value)) < 300
    with pytest.raises(ConfigError, match=r"lists 5000 ids \(1000, 1001, 1002, 1003, 1004, "):
        load_config(None, ["data.num_clients=1000",
                           f"backdoor.clients=[{', '.join(map(str, range(1000, 6000)))}]"])


class _Grid:
    """A grid whose nodes answer the messages in ``answer`` (node ids) at once and the others
    only when :meth:`late` is called."""

    def __init__(self, answer: set[int]) -> None:
        self.answer = answer
        self.replies: list[object] = []
        self.count = 0

    def push_messages(self, messages):

        ids = []
        for m in messages:
            self.count += 1
            m.metadata.message_id = f"m{self.count}"
            ids.append(m.metadata.message_id)
            if m.metadata.dst_node_id in self.answer:
                self.late(m)
        return ids

    def late(self, m):
        from types import SimpleNamespace

        self.replies.append(SimpleNamespace(metadata=SimpleNamespace(
            reply_to_message_id=m.metadata.message_id)))

    def pull_messages(self, ids):
        got = [r for r in self.replies if r.metadata.reply_to_message_id in set(ids)]
        self.replies = [r for r in self.replies if r not in got]
        return got


def test_the_engine_remembers_requests_given_up_on_until_they_answer():
    from types import SimpleNamespace

    from fedunlearn.engine.flower import PacedGrid

    grid = _Grid(answer={10})
    paced = PacedGrid(grid, pull_interval=0.01)
    sent = [SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=n))
            for n in (10, 11, 12)]
    replies = paced.send_and_receive(sent, timeout=0.05)
    assert len(replies) == 1 and paced.still_running() == {11, 12}
    grid.late(sent[1])  # node 11's client finally answers
    assert paced.still_running() == {12}


def test_a_timeout_behind_a_client_still_stalled_from_training_is_blamed_on_that_client():
    """Client 2 stalled in round 3 of training and was dropped after its timeout, but its
    request still runs on the engine; the retraining's clients queued behind it time out. The
    message names the retraining and the stalled request, not only "raise client_timeout_s"."""
    import dataclasses

    from fedunlearn.engine.faults import ClientFailure, FaultPolicy, fedavg_phase

    running = {2}
    training = FaultPolicy(on_failure="drop", timeout_s=3, still_running=lambda: running)
    assert [f.client for f in training.settle({2: "timeout"}, [0, 1, 3], server_round=3)] == [2]
    retraining = dataclasses.replace(training, phase=fedavg_phase({1}))
    with pytest.raises(ClientFailure) as err:
        retraining.settle({0: "timeout", 2: "timeout", 3: "timeout"}, [], server_round=1)
    msg = str(err.value)
    assert msg == (
        "every client of round 1 of retraining without clients [1] failed: client 0 (timeout), "
        "client 2 (timeout), client 3 (timeout), while an earlier request given up on after a "
        "timeout was still unanswered on the engine, holding the client processes the later "
        "ones waited for (client 2's request of round 3 (training)); nothing can be aggregated "
        "- find what stalls clients [2] (rerun with --set engine.verbose=true), or raise "
        "engine.client_timeout_s above its stall, or give the engine more client processes "
        "(engine.ray_num_cpus)"), msg
    running.clear()  # once it has answered, a timeout is the timed-out client's own
    abort = dataclasses.replace(retraining, on_failure="abort")
    with pytest.raises(ClientFailure) as err:
        abort.settle({0: "timeout"}, [3], server_round=2)
    assert str(err.value).startswith("client 0 sent no reply within engine.client_timeout_s "
                                     "= 3 s in round 2 (retraining without clients [1]); raise "
                                     "engine.client_timeout_s"), str(err.value)


NAN_EXT = '''
import torch
import torch.nn.functional as F
from fedunlearn.models.training import TRAIN_STEPS


@TRAIN_STEPS.register("nan_for")
def nan_for(model, x, y, ctx, marks=()):
    loss = F.cross_entropy(model(x), y)
    rows = x.reshape(len(x), -1)
    hit = any(bool(torch.all(rows == torch.tensor(m, dtype=rows.dtype), dim=1).any())
              for m in marks)
    return loss * float("nan") if hit else loss
'''


def test_clients_dropped_from_a_methods_client_work_are_recorded(tmp_path, monkeypatch):
    """Under "drop", the clients a retraining (any method's client work) went on without are
    collected (the serving code puts them in the method's row, details["client_failures"])."""
    import dataclasses

    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.faults import recording_failures
    from fedunlearn.engine.inprocess import InProcessFederation
    from fedunlearn.history.store import HistoryStore
    from fedunlearn.run.pipeline import prepare
    from fedunlearn.unlearning.base import UnlearningContext
    from fedunlearn.unlearning.federated.retrain import Retrain

    (tmp_path / "nan_ext.py").write_text(NAN_EXT)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["data.num_clients=4", "training.rounds=3", "data.partition=\"iid\"",
                             "experiment.extensions=[\"nan_ext\"]", "training.step=\"nan_for\"",
                             "engine.on_client_failure=\"drop\""])
    setup = prepare(cfg)
    mark = setup.data.clients[2].x[0].reshape(-1).tolist()
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training,
                                                                step_params={"marks": [mark]}))
    fed = InProcessFederation(cfg, setup.evaluator())
    ctx = UnlearningContext(cfg=cfg, targets=(0,), removed=frozenset({0}), model=setup.initial,
                            initial=setup.initial, history=HistoryStore.create(tmp_path / "h"),
                            federation=fed, data=setup.data, build_model=setup.build_model,
                            seed=1)
    with recording_failures() as dropped:
        Retrain().unlearn(ctx)
    assert [(f.round, f.client, f.reason, f.stage) for f in dropped] == [
        (t, 2, "non-finite", "train") for t in (1, 2, 3)]
    with recording_failures() as none:  # outside the block nothing is collected
        pass
    Retrain().unlearn(ctx)
    assert none == [] and len(dropped) == 3


STALL_EXT = '''
import os
import sys
import time

import torch
import torch.nn.functional as F
from fedunlearn.models.training import TRAIN_STEPS


@TRAIN_STEPS.register("stall_once")
def stall_once(model, x, y, ctx, marks=(), go="", once="", stall_s=0.0):
    """Once ``go`` exists, the client holding a marked sample stalls once (Ray workers only)."""
    loss = F.cross_entropy(model(x), y)
    rows = x.reshape(len(x), -1)
    if "worker" in " ".join(sys.argv) and os.path.exists(go) and any(
            bool(torch.all(rows == torch.tensor(m, dtype=rows.dtype), dim=1).any())
            for m in marks):
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return loss
        time.sleep(stall_s)
    return loss
'''


@pytest.mark.flower
def test_on_flower_a_retraining_behind_a_stalled_client_names_it(tmp_path, monkeypatch):
    """On the engine (one client process, client_timeout_s = 2, "drop"): client 2 stalls 8 s
    in a method's client training and is given up on; the retraining that follows queues
    behind it and every client times out. The line names the retraining and client 2's
    stalled request (deterministic: client 2 is alone in the stalled exchange)."""
    import dataclasses

    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.faults import ClientFailure
    from fedunlearn.engine.flower import run_on_flower
    from fedunlearn.run.pipeline import prepare

    (tmp_path / "stall_once_ext.py").write_text(STALL_EXT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(tmp_path), os.environ.get("PYTHONPATH")])))
    cfg = load_config(None, ["data.num_clients=4", "training.rounds=2", "data.partition=\"iid\"",
                             "engine.ray_num_cpus=1", "engine.client_timeout_s=2",
                             "engine.on_client_failure=\"drop\"",
                             "experiment.extensions=[\"stall_once_ext\"]",
                             "training.step=\"stall_once\""])
    setup = prepare(cfg)
    go = tmp_path / "go"
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, step_params={
        "marks": [setup.data.clients[2].x[0].reshape(-1).tolist()], "go": str(go),
        "once": str(tmp_path / "once"), "stall_s": 8.0}))

    def job(fed):
        fed.fedavg(setup.initial)  # trains normally: no go yet
        go.touch()
        said = []
        for work in (lambda: fed.train_clients(setup.initial, [2], epochs=1.0, server_round=3,
                                               tag=9),
                     lambda: fed.fedavg(setup.initial, exclude=frozenset({1}))):
            try:
                work()
            except ClientFailure as exc:
                said.append(str(exc))
        return said

    said = run_on_flower(cfg, job, setup.evaluator(), setup.data)
    assert (tmp_path / "once").exists(), "the stall never happened"
    assert len(said) == 2, said
    assert said[0].startswith("every client of round 3 of an unlearning method's client "
                              "training failed: client 2 (timeout); "), said[0]
    assert said[1].startswith("every client of round 1 of retraining without clients [1] "
                              "failed: client 0 (timeout), client 2 (timeout), client 3 "
                              "(timeout), while an earlier request given up on after a timeout "
                              "was still unanswered on the engine"), said[1]
    assert "(client 2's request of round 3 (an unlearning method's client training))" in said[1]
    assert "find what stalls clients [2] " in said[1] and "\n" not in said[1]


def test_a_users_method_failing_names_the_run_directory_to_resume(tmp_path, capsys, monkeypatch):
    """The library's hint says ``fedunlearn resume RUN_DIR``; the command line names the run's
    directory instead of the placeholder."""
    from fedunlearn.run import commands
    from fedunlearn.run.checks import RequestError

    def failing(args, **kwargs):
        args.out = tmp_path / "the-run"
        raise RequestError("unlearning method 'x' failed on request 1: ValueError: no; fix it "
                           "(the requests answered before are kept: `fedunlearn resume RUN_DIR` "
                           "goes on from this one), or leave it out")

    monkeypatch.setattr(commands, "cmd_run", failing)
    assert main(["run", QS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"`fedunlearn resume {tmp_path / 'the-run'}`" in err[0], err
