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
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

# Light at import: Flower, Ray and torch are imported by `main` (fedunlearn.run.commands), so a
# Ctrl-C during that import is caught by `entry`.

EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as a shell reports it."""


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


def _seed_list(text: str) -> str:
    """``"0,1,2"`` -> ``"0, 1, 2"``; anything but non-negative integers is a ConfigError."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--seeds expects non-negative integers separated by commas, e.g. "
                          f"--seeds 0,1,2; got '{text}'")
    return ", ".join(str(int(p)) for p in parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``fedunlearn`` command; return its exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command in ("run", "compare") and args.seeds is not None:
            args.seeds = _seed_list(args.seeds)
    except ValueError as exc:
        print(f"fedunlearn: error: {exc}", file=sys.stderr)
        return 2
    from fedunlearn.run import commands
    from fedunlearn.run.interrupt import EXIT_CODE, Interrupted

    try:
        if args.command == "run":
            return commands.cmd_run(args)
        if args.command == "compare":
            return commands.cmd_run(args, compare=True)
        if args.command == "resume":
            return commands.cmd_resume(args)
        if args.command == "report":
            return commands.cmd_report(args)
        if args.command == "lineage":
            return commands.cmd_lineage(args)
    except commands.USER_ERRORS as exc:
        message = str(exc)
        if (run_dir := _run_dir(args)) is not None:  # the library says RUN_DIR; name it
            message = message.replace("resume RUN_DIR", f"resume {run_dir}")
        print(f"fedunlearn: error: {message}", file=sys.stderr)
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


def _run_dir(args: argparse.Namespace) -> Path | None:
    """The run directory a ``run``, ``compare`` or ``resume`` command writes (None otherwise)."""
    if args.command in ("run", "compare"):
        return getattr(args, "out", None)
    return args.run_dir if args.command == "resume" else None


def _after_write_failure(args: argparse.Namespace) -> str:
    """What to do once a write failure is fixed: for a run, resume it in its directory
    (named); for ``report``, run the command again."""
    run_dir = _run_dir(args)
    if run_dir is None:
        return "run the command again"
    return f"continue with `fedunlearn resume {run_dir}` (what is stored is intact)"


def entry() -> NoReturn:
    """The ``fedunlearn`` console script and ``python -m fedunlearn.cli``: :func:`main`, then the
    process ends with its code. The one place in fedunlearn that ends the process.

    A Ctrl-C while Flower, Ray and torch are being imported (a second or two) is recorded and
    acted on once the import is done: raised inside torch's native initialisation, a
    KeyboardInterrupt aborted the process (exit -6). A Ctrl-C outside a run's rounds is one line.
    """
    pending: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    take = previous is not signal.SIG_IGN  # a background job (`cmd &`) ignores Ctrl-C: keep that
    if take:
        signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        try:
            import fedunlearn.run.commands  # noqa: F401  (the heavy import, guarded)
        finally:
            if take:
                signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt
        code = main()
    except KeyboardInterrupt:
        print("\nfedunlearn: interrupted (Ctrl-C) outside a run's rounds; run the command "
              "again, or continue a run it had started with `fedunlearn resume RUN_DIR`",
              file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    _leave(code)


def _leave(code: int) -> NoReturn:
    """End the process with ``code`` once logging and output are flushed. The run has shut its
    engine down and waited for its history store's deferred deletions before returning; the
    interpreter's teardown of torch and Ray, a fixed cost paid by every command for nothing
    (figures: docs/benchmarks.md, *Engine benchmark*; docs/engine.md), is skipped."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":  # python -m fedunlearn.cli
    entry()
