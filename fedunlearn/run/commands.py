"""What each ``fedunlearn`` command does, called by :mod:`fedunlearn.cli` (which parses the
arguments and is the only place that ends the process). Every function returns an exit code or
raises one of :data:`USER_ERRORS`, which the command line prints as one line."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from fedunlearn.config.tree import ConfigError, load_config
from fedunlearn.engine.faults import ClientFailure
from fedunlearn.engine.flower import EngineStartError
from fedunlearn.evaluation.shadow import ShadowDiverged
from fedunlearn.history.lineage import LineageError
from fedunlearn.history.store import HistoryError
from fedunlearn.run.checks import RequestError
from fedunlearn.run.lock import RunDirLocked
from fedunlearn.run.resume import ResumeError
from fedunlearn.unlearning.base import HistoryNotReplayable

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, HistoryError, LineageError, RequestError, ResumeError, ShadowDiverged,
    HistoryNotReplayable, ClientFailure, EngineStartError, RunDirLocked)
"""Errors the user can act on: the command line prints them as one line (exit code 2)."""


def _lineage_dirs(run_dir: Path, seed: int | None) -> list[tuple[int | None, Path]]:
    """The run directories holding a lineage log: RUN_DIR itself, or its ``seed-S/``."""
    from fedunlearn.history.lineage import FILENAME

    if (run_dir / FILENAME).exists():
        if seed is None:
            return [(None, run_dir)]
        raise ConfigError(f"'{run_dir}' holds one seed's lineage log ('{FILENAME}'): a "
                          "single-seed run or one seed's directory; leave out --seed")
    seeds = sorted((int(d.name[5:]), d) for d in run_dir.glob("seed-*")
                   if d.name[5:].isdigit() and (d / FILENAME).exists())
    if seed is not None:
        chosen = [(s, d) for s, d in seeds if s == seed]
        if not chosen:
            have = ", ".join(str(s) for s, _ in seeds) or "none"
            raise ConfigError(f"no lineage log for seed {seed} under '{run_dir}' (seeds there: "
                              f"{have})")
        return chosen
    if not seeds:
        raise ConfigError(f"no lineage log at '{run_dir / FILENAME}'; pass a run directory "
                          "written by `fedunlearn run`")
    return seeds


def _check_client_id(run_dir: Path, client: int) -> None:
    """Refuse a client id the run never had (its ``run.json`` gives ``data.num_clients``; a
    run directory from before ``run.json`` existed is not checked)."""
    from fedunlearn.run.resume import RUN_FILE, read_json

    # a seed's directory (RUN_DIR/seed-S) has its run's run.json one level up
    path = next((d / RUN_FILE for d in (run_dir, run_dir.parent) if (d / RUN_FILE).exists()),
                None)
    try:
        n = int(read_json(path)["config"]["data"]["num_clients"]) if path else None
    except (ValueError, KeyError, TypeError):
        n = None  # a damaged run.json does not stop a lineage question; the log answers
    if client < 0 or (n is not None and client >= n):
        have = f"0 to {n - 1}" if n is not None else "numbered from 0"
        raise ConfigError(f"client {client} is not a client of the run in '{run_dir}' (its "
                          f"clients are {have}); pass one of them to --client")


def cmd_lineage(args: argparse.Namespace) -> int:
    import json

    from fedunlearn.history.lineage import LineageLog, client_lineage, format_client_lineage

    _check_client_id(args.run_dir, args.client)
    answers = []
    for seed, run_dir in _lineage_dirs(args.run_dir, args.seed):
        log = LineageLog(run_dir)
        info = client_lineage(log.read(), args.client)
        if log.truncated_tail is not None:
            info["warning"] = ("the last line of the log was cut short by an interrupted write "
                               "and was skipped")
        answers.append((seed, info))
    if args.json:
        out = answers[0][1] if len(answers) == 1 else {f"seed-{s}": i for s, i in answers}
        print(json.dumps(out, indent=2))
        return 0
    for seed, info in answers:
        if seed is not None:
            print(f"[seed {seed}]")
        print(format_client_lineage(info))
        if "warning" in info:
            print(f"warning: {info['warning']}")
    return 0


def cmd_run(args: argparse.Namespace, *, compare: bool = False) -> int:
    from fedunlearn.run.checks import preflight, writer_lock
    from fedunlearn.run.pipeline import default_out_dir, run_experiment, with_centralized

    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"experiment.seeds=[{args.seeds}]")
    cfg = load_config(args.config, overrides)
    out = args.out = args.out or default_out_dir(cfg)  # (the messages of main name it)
    command = "compare" if compare else "run"
    with writer_lock(out, command):  # a live run in --out is refused before anything else
        preflight(cfg, out)  # the machine and --out, before any extension module is imported
        if compare:
            cfg = with_centralized(cfg)
        run_experiment(cfg, out, command=command)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from fedunlearn.config.tree import from_run_dict
    from fedunlearn.engine.strategy import keeps_history_identity
    from fedunlearn.run.checks import check_engine, validate_names, writer_lock
    from fedunlearn.run.pipeline import run_experiment
    from fedunlearn.run.resume import read_run_file

    out = args.run_dir
    # a live run is refused before anything is read or written (a missing directory is
    # named by read_run_file below)
    with writer_lock(out, "resume") if out.is_dir() else contextlib.nullcontext():
        if (out / "results.json").exists():
            raise ConfigError(f"'{out}' already holds results.json: that run finished, there "
                              "is nothing to resume")
        run = read_run_file(out)
        cfg = from_run_dict(run["config"])  # keys added since the run began keep its behaviour
        validate_names(cfg)  # imports the run's extensions (its strategy may be one of them)
        t = cfg.training
        if keeps_history_identity(t.strategy, t.strategy_params) is False:
            raise ConfigError(f"strategy '{t.strategy}' keeps server state between rounds that "
                              "is not checkpointed; such a run cannot be resumed")
        check_engine(cfg)
        run_experiment(cfg, out, command=run["command"], resume=True)  # notes the resumption
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedunlearn.reporting import comparison_table, read_results, verdict_table, write_report

    results = read_results(args.run_dir)
    written = write_report(args.run_dir, results)
    if "unlearning" in results:
        print(comparison_table(results["unlearning"], results.get("summary")))
        if results.get("summary"):
            print(verdict_table(results["summary"]))
    for name, path in written.items():
        print(f"{name:<15} {path}")
    return 0


