"""Bad values refused before any work, in bounded time, in one line (exit code 2, ``--out``
never created): values with no upper bound, NaN and infinities in every float key, an empty
seed list, a byte-order mark; and saved state that does not fit the run's network."""

from __future__ import annotations

import dataclasses
import io
import time
import typing

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.cli import main
from fedunlearn.config.tree import (
    INFINITY_ALLOWED,
    MAX_ROUNDS,
    MAX_SEEDS,
    Config,
    ConfigError,
    load_config,
)

QS = "simulations/quickstart.toml"


def refused(capsys, tmp_path, *sets: str, config: str = QS) -> str:
    """Run ``fedunlearn run`` with ``sets``; assert exit 2, one stderr line, no --out, a loose
    time bound; return the line."""
    out = tmp_path / "out"
    args = ["run", config, *[a for s in sets for a in ("--set", s)], "--out", str(out)]
    t0 = time.monotonic()
    code = main(args)
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith("fedunlearn: error: "), err
    assert not out.exists()
    assert took < 30, took  # loose: bounded, not proportional to the value
    return err[0]


CASES = [  # (--set values, what the line must say)
    (["training.rounds=1000000000000"], ("'training.rounds' = 1000000000000 must be from 1 to "
                                        "1,000,000")),
    (["training.learning_rate=inf"], "'training.learning_rate' = inf is not a finite number"),
    (["training.learning_rate=-inf"], "'training.learning_rate' = -inf is not a finite number"),
    (["training.momentum=nan"], "'training.momentum' = nan is not a number"),
    (["verification.shadow_budget=nan"], "'verification.shadow_budget' = nan is not a number"),
    (["unlearning.params.federaser.r=inf"], "'unlearning.params.federaser.r' = inf is not"),
    (["unlearning.params.pga.epochs=nan"], "'unlearning.params.pga.epochs' = nan"),
    (["training.strategy=\"fedavgm\"", "training.strategy_params={server_learning_rate=nan}"],
     "'training.strategy_params.server_learning_rate' = nan"),
    (["model.params={widths=[64.0, inf]}"], "'model.params.widths[1]' = inf"),
    (["experiment.seeds=[]"], ("'experiment.seeds' lists no seed; leave it out to run "
                              "experiment.seed alone")),
    ([f"experiment.seeds=[{', '.join(map(str, range(MAX_SEEDS + 1)))}]"],
     f"'experiment.seeds' lists {MAX_SEEDS + 1} seeds"),
    (["engine.client_timeout_s=1e10"], "'engine.client_timeout_s' = 1e+10 s is above the limit"),
    (["engine.startup_timeout_s=inf"], "'engine.startup_timeout_s' = inf is not a finite"),
]


@pytest.mark.parametrize(("sets", "needle"), CASES, ids=[" ".join(s)[:60] for s, _ in CASES])
def test_a_bad_value_is_one_line_before_any_work(sets, needle, tmp_path, capsys, tripwire):
    assert needle in refused(capsys, tmp_path, *sets)


def _float_keys() -> list[str]:
    """Every float key of the config tree, as ``section.key``."""
    out = []
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.type if isinstance(section.type, type)
                                      else typing.get_type_hints(Config)[section.name])
        out += [f"{section.name}.{k}" for k, t in hints.items() if t is float]
    return out


FLOAT_KEYS = _float_keys()


def test_the_float_keys_are_found():
    assert {"training.learning_rate", "data.alpha", "engine.client_timeout_s",
            "verification.shadow_budget", "verification.verdict_alpha"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_and_infinity(key):
    """Whatever the key's own range check (a NaN fails no ``<`` comparison, so ``not x > 0``
    style checks let it through), a NaN is refused, and ``inf`` unless the key gives it a
    meaning (``verification.shadow_budget``: no bound)."""
    with pytest.raises(ConfigError, match=f"'{key}' = nan is not a number"):
        load_config(None, [f"{key}=nan"])
    for inf in ("inf", "-inf"):
        if key in INFINITY_ALLOWED and inf == "inf":
            assert load_config(None, [f"{key}={inf}"]) is not None
        else:
            with pytest.raises(ConfigError, match=f"'{key}' = {inf} is not a finite number"):
                load_config(None, [f"{key}={inf}"])


def test_an_empty_seed_list_written_in_the_file_is_refused_too(tmp_path, capsys, tripwire):
    toml = tmp_path / "c.toml"
    toml.write_text("[experiment]\nseeds = []\n[data]\nnum_clients = 4\n")
    line = refused(capsys, tmp_path, config=str(toml))
    assert "'experiment.seeds' lists no seed" in line
    # the resolved config of a one-seed run (run.json) lists no seeds: that is not refused
    from fedunlearn.config.tree import from_run_dict

    assert from_run_dict(small_config().to_dict()).seeds == [0]


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    text = "[training]\nrounds = 7\n[data]\nnum_clients = 4\n"
    plain, marked = tmp_path / "plain.toml", tmp_path / "bom.toml"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(marked) == load_config(plain)
    assert load_config(marked).training.rounds == 7


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys, tripwire):
    toml = tmp_path / "latin.toml"
    toml.write_bytes(b"[experiment]\nname = \"caf\xe9\"\n")
    assert "is not UTF-8 text" in refused(capsys, tmp_path, config=str(toml))


def _never_sampled_slow(cfg: Config) -> list[int]:
    """The obvious check: draw every round, then compare."""
    from fedunlearn.models.seeding import sample_participants

    t = cfg.training
    seen = {c for r in range(1, t.rounds + 1)
            for c in sample_participants(cfg.seed, r, cfg.data.num_clients, t.sample_fraction)}
    return sorted({c for r in cfg.unlearning.requests for c in r} - seen)


@pytest.mark.parametrize("seed", range(6))
def test_the_sampling_check_agrees_with_drawing_every_round(seed):
    """The check stops drawing rounds once every requested client was seen; it must refuse
    exactly the configs the full draw refuses (some of these do, some do not)."""
    from fedunlearn.run.checks import _check_requests_against_sampling

    rng = np.random.default_rng(seed)
    for _ in range(20):
        k = int(rng.integers(4, 40))
        cfg = load_config(None, [
            f"experiment.seed={int(rng.integers(0, 1000))}", f"data.num_clients={k}",
            f"training.rounds={int(rng.integers(1, 6))}",
            f"training.sample_fraction={float(rng.choice([0.05, 0.1, 0.3, 1.0]))}",
            f"unlearning.requests={[[int(c)] for c in rng.choice(k - 1, 3, replace=False)]}"])
        never = _never_sampled_slow(cfg)
        if never:
            with pytest.raises(ConfigError, match="never sampled") as err:
                _check_requests_against_sampling(cfg)
            assert str(never)[1:-1] in str(err.value)
        else:
            _check_requests_against_sampling(cfg)


def test_the_sampling_check_is_fast_at_the_round_limit():
    from fedunlearn.run.checks import _check_requests_against_sampling

    cfg = load_config(None, [f"training.rounds={MAX_ROUNDS}", "data.num_clients=100",
                             "training.sample_fraction=0.1", "unlearning.requests=[[3], [7]]"])
    t0 = time.monotonic()
    _check_requests_against_sampling(cfg)
    assert time.monotonic() - t0 < 10  # loose; drawing every round took minutes


# ------------------------------------------------------------------------------ saved state


def _training_setup():
    from fedunlearn.engine.inprocess import InProcessFederation
    from fedunlearn.run.pipeline import prepare

    cfg = small_config("unlearning.requests=[]")
    setup = prepare(cfg)
    return setup, InProcessFederation(cfg, setup.evaluator())


@pytest.mark.parametrize("damage", ["shape", "dtype", "names", "nan"])
def test_a_checkpoint_model_that_does_not_fit_the_network_is_one_line(damage, tmp_path):
    """A ``checkpoint.npz`` whose checksum matches (it was rewritten with its checksum) but
    whose model is not the network's: one ResumeError line, nothing trained."""
    from fedunlearn.history.store import HistoryStore
    from fedunlearn.run.checks import check_saved_model
    from fedunlearn.run.pipeline import train_federation
    from fedunlearn.run.resume import Checkpoint, ResumeError

    setup, fed = _training_setup()
    model = {k: v.copy() for k, v in setup.initial.items()}
    first = next(iter(model))
    if damage == "shape":
        model[first] = np.zeros((2, 2), np.float32)
    elif damage == "dtype":
        model[first] = model[first].astype(np.float64)
    elif damage == "names":
        model = {f"x{k}": v for k, v in model.items()}
    else:
        model[first][0] = np.nan
    store = HistoryStore.create(tmp_path / "history")
    with pytest.raises(ResumeError) as err:
        train_federation(fed, setup, store, progress=False, checkpoints=tmp_path,
                         start=Checkpoint(round=1, model=model))
    message = str(err.value)
    assert "\n" not in message and f"'{tmp_path / 'checkpoint.json'}'" in message
    assert "does not fit the run's network" in message and "new --out" in message
    assert store.rounds() == []
    # the same model undamaged is accepted
    check_saved_model({k: v.copy() for k, v in setup.initial.items()}, setup.initial,
                      tmp_path / "checkpoint.npz", "")


def _npz_with_corrupt_header(arrays: dict[str, np.ndarray]) -> bytes:
    """A deflated npz whose first member's header is damaged: numpy's header parser raises
    tokenize.TokenError, which is none of the usual ValueError/OSError/BadZipFile."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, a in enumerate(arrays.values()):
            raw = io.BytesIO()
            np.save(raw, a)
            zf.writestr(f"a{i}.npy", raw.getvalue())
    data = bytearray(out.getvalue())
    data[100] ^= 0xFF
    return bytes(data)


def test_a_checkpoint_npz_numpy_cannot_parse_is_one_line(tmp_path):
    import hashlib
    import json

    from fedunlearn.run.resume import CHECKPOINT_META, ResumeError, load_checkpoint

    data = _npz_with_corrupt_header({"w": np.ones(3000, np.float32)})
    (tmp_path / "checkpoint.npz").write_bytes(data)
    (tmp_path / CHECKPOINT_META).write_text(json.dumps({
        "round": 1, "names": ["w"], "sha256": hashlib.sha256(data).hexdigest(), "rounds": []}))
    with pytest.raises(ResumeError, match="checkpoint.npz' is damaged"):
        load_checkpoint(tmp_path)
