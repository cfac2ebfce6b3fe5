"""Checks a run passes before anything is started or written: the machine and the output.

The config's own checks (types, ranges, names) live with the config and the registries; what
is here needs the machine: the engine's resources against its cores and GPUs, an output
directory that can be written, and no other live writer in it (:func:`writer_lock`). Each
failure is one line saying what to do.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.run.lock import LOCK_FILE, refuse_if_live, run_dir_lock


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gpu_count() -> int:
    """CUDA devices PyTorch can see (0 on a CPU build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_engine(cfg: Config) -> None:
    """A local engine cannot reserve more per client than the machine has: Ray would wait
    forever for a client slot. On a cluster (``engine.address``) Ray's nodes decide."""
    e = cfg.engine
    if e.address:
        return
    cpus = available_cpus()
    if e.num_cpus > cpus:
        raise ConfigError(f"config key 'engine.num_cpus' = {e.num_cpus:g} asks more CPUs per "
                          f"client than this machine has ({cpus}); use at most {cpus}, or attach "
                          "to a cluster with engine.address")
    if e.num_gpus > 0:
        gpus = gpu_count()
        if gpus == 0:
            raise ConfigError(f"config key 'engine.num_gpus' = {e.num_gpus:g} but PyTorch sees "
                              "no GPU on this machine; set engine.num_gpus = 0 (or attach to a "
                              "cluster with GPUs via engine.address)")
        if e.num_gpus > gpus:
            raise ConfigError(f"config key 'engine.num_gpus' = {e.num_gpus:g} asks more GPUs "
                              f"per client than this machine has ({gpus})")


def check_out_dir(out: Path) -> None:
    """``out`` must be new or empty (but for this run's lock file), and writable: create it
    (and its parents) if needed, write and remove a probe file, and leave nothing behind that
    was not there before."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise ConfigError(f"output directory '{out}' is not empty; nothing was overwritten - "
                          "choose another --out")
    created = []
    parent = out
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    probe = out / f".probe-{uuid.uuid4().hex}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"fedunlearn")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"output directory '{out}' cannot be written ({reason}); choose "
                          "another --out") from None
    finally:
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                pass


def preflight(cfg: Config, out: Path) -> None:
    """Every check that needs the machine, in the order a user would fix them."""
    check_engine(cfg)
    check_out_dir(out)


@contextlib.contextmanager
def writer_lock(out: Path, command: str) -> Iterator[None]:
    """Hold ``out``'s writer lock (:mod:`fedunlearn.run.lock`; a ``run`` creates a new
    ``out``, removed again if the run is refused before writing into it). Another live writer
    raises :class:`~fedunlearn.run.lock.RunDirLocked`; an ``out`` that cannot be created or
    locked is a :class:`ConfigError`, and so is a non-empty ``out`` of a ``run`` or
    ``compare`` that no live process holds (refused as it is found: a dead run's lock file is
    not taken over)."""
    if command != "resume" and Path(out).is_dir() and \
            any(p.name != LOCK_FILE for p in Path(out).iterdir()):
        refuse_if_live(Path(out), command)  # a live run is named; else --out is not empty:
        check_out_dir(out)  # refused without taking over a dead run's lock
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(run_dir_lock(Path(out), command=command,
                                         create=command != "resume"))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        what = "resumed" if command == "resume" else "written"
        raise ConfigError(f"run directory '{out}' cannot be {what} ({reason})"
                          + ("" if command == "resume" else "; choose another --out")) from None
    with stack:
        yield
