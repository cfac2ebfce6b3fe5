"""Command line.

``fedunlearn run CONFIG.toml [--set section.key=value ...] [--seeds 0,1,2] [--out DIR]``
    train on Flower + Ray, keep the history, serve the configured removal requests; with
    ``--seeds`` (or ``experiment.seeds``) once per seed, with a summary and verdicts;
``fedunlearn compare CONFIG.toml [--set ...] [--out DIR]``
    the same, with the centralized methods (``central_retrain``, ``sisa``, ``sisa_random``,
    ``newton``) added on the same clients' pooled data: one table for both settings;
``fedunlearn report RUN_DIR``
    regenerate ``report.md``, ``metrics.csv`` and the plots from ``RUN_DIR/results.json``
    (nothing is retrained);
``fedunlearn lineage RUN_DIR --client K``
    which models were trained with client K's data, and when it was removed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedunlearn.config import ConfigError, load_config
from fedunlearn.history import HistoryError
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
                     help="run once per seed (sets experiment.seeds), e.g. 0,1,2")
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/NAME-TIME)")
    cmp_ = sub.add_parser("compare", help="federated vs centralized removal on the same data")
    cmp_.add_argument("config", help="experiment TOML with [unlearning] requests")
    cmp_.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    cmp_.add_argument("--seeds", default=None, metavar="S1,S2,...",
                      help="run once per seed (sets experiment.seeds), e.g. 0,1,2")
    cmp_.add_argument("--out", type=Path, default=None,
                      help="run directory (default runs/NAME-TIME)")
    rep = sub.add_parser("report", help="write report.md, metrics.csv and plots of a run")
    rep.add_argument("run_dir", type=Path)
    lin = sub.add_parser("lineage", help="which models saw a client's data; when was it removed")
    lin.add_argument("run_dir", type=Path)
    lin.add_argument("--client", type=int, required=True)
    lin.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def cmd_lineage(args: argparse.Namespace) -> int:
    import json

    from fedunlearn.lineage import LineageLog, client_lineage, format_client_lineage

    log = LineageLog(args.run_dir)
    if not log.path.exists():
        raise ConfigError(f"no lineage log at '{log.path}'; pass a run directory written by "
                          "`fedunlearn run`")
    info = client_lineage(log.read(), args.client)
    print(json.dumps(info, indent=2) if args.json else format_client_lineage(info))
    return 0


def cmd_run(args: argparse.Namespace, *, compare: bool = False) -> int:
    from fedunlearn.experiment import check_out_dir, default_out_dir, with_centralized
    from fedunlearn.runner import run_experiment

    overrides = list(args.overrides)
    if args.seeds is not None:
        overrides.append(f"experiment.seeds=[{_seed_list(args.seeds)}]")
    cfg = load_config(args.config, overrides)
    if compare:
        cfg = with_centralized(cfg)
    out = args.out or default_out_dir(cfg)
    check_out_dir(out)
    run_experiment(cfg, out)
    return 0


def _seed_list(text: str) -> str:
    """``"0,1,2"`` -> ``"0, 1, 2"``; anything but non-negative integers is a ConfigError."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--seeds expects non-negative integers separated by commas, e.g. "
                          f"--seeds 0,1,2; got '{text}'")
    return ", ".join(str(int(p)) for p in parts)


def cmd_report(args: argparse.Namespace) -> int:
    from fedunlearn.reporting import comparison_table, read_results, write_report

    results = read_results(args.run_dir)
    written = write_report(args.run_dir, results)
    if "unlearning" in results:
        print(comparison_table(results["unlearning"]))
    for name, path in written.items():
        print(f"{name:<15}{path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedunlearn`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "compare":
            return cmd_run(args, compare=True)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "lineage":
            return cmd_lineage(args)
    except (ConfigError, HistoryError, RequestError, HistoryNotReplayable) as exc:
        print(f"fedunlearn: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
