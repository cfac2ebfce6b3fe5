"""Command line.

``fedunlearn run CONFIG.toml [--set section.key=value ...] [--seeds 0,1,2] [--out DIR]``
    train on Flower + Ray, keep the history, serve the configured removal requests; with
    ``--seeds`` (or ``experiment.seeds``) once per seed, with a summary and verdicts;
``fedunlearn compare CONFIG.toml [--set ...] [--seeds 0,1,2] [--out DIR]``
    the same, with the centralized methods (``central_retrain``, ``sisa``, ``sisa_random``,
    ``newton``) added on the same clients' pooled data: one table for both settings;
``fedunlearn resume RUN_DIR``
    continue a run stopped by Ctrl-C, SIGTERM or a crash from its last committed round (the
    final model is bit-identical to an uninterrupted run's; answered requests are not redone);
``fedunlearn report RUN_DIR``
    regenerate ``report.md``, ``metrics.csv`` and the plots from ``RUN_DIR/results.json``
    (nothing is retrained);
``fedunlearn lineage RUN_DIR --client K [--seed S]``
    which models were trained with client K's data, and when it was removed (in a multi-seed
    run, every seed's answer, or seed S's).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from fedunlearn.checkpoint import ResumeError
from fedunlearn.config import ConfigError, load_config
from fedunlearn.evaluation.shadow import ShadowDiverged
from fedunlearn.federation.faults import ClientFailure
from fedunlearn.federation.flower import EngineStartError
from fedunlearn.history import HistoryError
from fedunlearn.interrupt import EXIT_CODE, Interrupted
from fedunlearn.lineage import LineageError
from fedunlearn.rundir_lock import RunDirLocked
from fedunlearn.unlearning.base import HistoryNotReplayable
from fedunlearn.unlearning.service import RequestError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedunlearn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a federation on Flower + Ray and keep its history")
    run.add_argument("config", help="experiment TOML (see simulations/)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    run.add_argument("--seeds", default=None, metavar="S1,S2,...",
                     help="run once per seed, e.g. 0,1,2 (sets experiment.seeds; replaces experiment.seed)")
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/NAME-TIME)")
    cmp_ = sub.add_parser("compare", help="federated vs centralized removal on the same data")
    cmp_.add_argument("config", help="experiment TOML with [unlearning] requests")
    cmp_.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    cmp_.add_argument("--seeds", default=None, metavar="S1,S2,...",
                      help="run once per seed, e.g. 0,1,2 (sets experiment.seeds; replaces experiment.seed)")
    cmp_.add_argument("--out", type=Path, default=None,
                      help="run directory (default runs/NAME-TIME)")
    res = sub.add_parser("resume", help="continue an interrupted or killed run where it stopped")
    res.add_argument("run_dir", type=Path)
    rep = sub.add_parser("report", help="write report.md, metrics.csv and plots of a run")
    rep.add_argument("run_dir", type=Path)
    lin = sub.add_parser("lineage", help="which models saw a client's data; when was it removed")
    lin.add_argument("run_dir", type=Path)
    lin.add_argument("--client", type=int, required=True)
    lin.add_argument("--seed", type=int, default=None,
                     help="in a multi-seed run, the seed's lineage (default: every seed)")
    lin.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def _lineage_dirs(run_dir: Path, seed: int | None) -> list[tuple[int | None, Path]]:
    """The run directories holding a lineage log: RUN_DIR itself, or its ``seed-S/``."""
    from fedunlearn.lineage import FILENAME

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
    from fedunlearn.checkpoint import RUN_FILE, read_json

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

    from fedunlearn.lineage import LineageLog, client_lineage, format_client_lineage

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
    from fedunlearn.experiment import default_out_dir, with_centralized
    from fedunlearn.preflight import preflight, writer_lock
    from fedunlearn.runner import run_experiment

    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"experiment.seeds=[{_seed_list(args.seeds)}]")
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
    from fedunlearn.checkpoint import read_run_file
    from fedunlearn.config import from_run_dict
    from fedunlearn.experiment import validate_names
    from fedunlearn.federation.strategy import keeps_history_identity
    from fedunlearn.preflight import check_engine, writer_lock
    from fedunlearn.runner import run_experiment

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


def _seed_list(text: str) -> str:
    """``"0,1,2"`` -> ``"0, 1, 2"``; anything but non-negative integers is a ConfigError."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--seeds expects non-negative integers separated by commas, e.g. "
                          f"--seeds 0,1,2; got '{text}'")
    return ", ".join(str(int(p)) for p in parts)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``fedunlearn`` command; return its exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "compare":
            return cmd_run(args, compare=True)
        if args.command == "resume":
            return cmd_resume(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "lineage":
            return cmd_lineage(args)
    except (ConfigError, HistoryError, LineageError, RequestError, ResumeError, ShadowDiverged,
            HistoryNotReplayable, ClientFailure, EngineStartError, RunDirLocked) as exc:
        print(f"fedunlearn: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted:  # the run printed where it stopped and how to resume it
        return EXIT_CODE
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a full disk, a file-size limit, a directory gone read-only
        where = f"'{exc.filename}'" if exc.filename else "a file"
        print(f"fedunlearn: error: cannot write {where} ({exc.strerror or exc}); free space or "
              f"lift the limit, then {_after_write_failure(args)}", file=sys.stderr)
        return 2
    return 1


def _after_write_failure(args: argparse.Namespace) -> str:
    """What to do once a write failure is fixed: for a run, resume it in its directory
    (named); for ``report``, run the command again."""
    run_dir = args.out if args.command in ("run", "compare") else (
        args.run_dir if args.command == "resume" else None)
    if run_dir is None:
        return "run the command again"
    return f"continue with `fedunlearn resume {run_dir}` (what is stored is intact)"


if __name__ == "__main__":
    sys.exit(main())
