#!/usr/bin/env python
"""Scale benchmark (issue 11): 100 vs 1,000 clients side by side, the dispatch option, the
engine's overhead and FedEraser's speed-up, and the history store's commit cost. Usage::

    .venv/bin/python scripts/bench_scale.py [--repeats 3] [--out benchmarks/scale.json]

Parts, each in its own child process (so one engine per measurement, and the memory figure is
the whole process tree: driver, Ray's GCS and raylet, every Ray worker):

``scale``
    A whole ``fedunlearn run`` (train 10 rounds at 10 % per round, one removal request served
    by retraining, FedEraser and distillation, default verification) per case:
    ``synthetic-100`` and ``synthetic-1000`` (``simulations/scale_1000.toml``: the same
    128,000 samples, so each round trains on about the same number of samples and only the
    number of clients changes) and ``mnist_5k-100`` (the CNN on real 28×28 digits, about 35
    training images per client). ``mnist_5k`` is not run at 1,000 clients: 5,000 images leave
    about 3.5 training images per client, one mini-batch per epoch, a load test of the engine
    that ``synthetic-1000`` already is. Phases: Ray start, Flower's node registration and actor
    pool, node discovery (waiting for the nodes, then the query round trip, which also starts
    every actor's data), training (median round), each method, verification. Memory: peak of
    the summed PSS (and RSS, which counts Ray's shared object store once per process) of every
    process of the tree, sampled every 0.25 s. History: bytes of the store after training.
``dispatch``
    ``engine.fast_dispatch`` on and off: quickstart (seed 0) end to end through Flower against
    the same FedAvg in process (``--repeats`` engines each), and backdoor_digits training
    plus ``--repeats`` retrainings and FedEraser removals inside one engine per setting.
``history``
    ``HistoryStore.record_round`` at 1,000 clients, 100 participants per round, 200 rounds of
    the scale MLP's updates (float32 and float16): median commit of the first and last 10
    rounds (the manifest grows and is rewritten every round) against the Flower round time
    of ``synthetic-1000``; bytes per stored parameter.

Every figure is a median (``--repeats``) where the part is cheap enough to repeat; the machine's
load average is recorded before and after each part, because on a shared 2-core machine it
moves every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCALE = "simulations/scale_1000.toml"
CASES: dict[str, tuple[str, list[str]]] = {
    "synthetic-100": (SCALE, ["data.num_clients=100"]),
    "synthetic-1000": (SCALE, []),
    "mnist_5k-100": (SCALE, ['data.source="mnist_5k"', "data.source_params={}",
                             'model.name="cnn"', "training.learning_rate=0.05",
                             "training.momentum=0.9", "data.num_clients=100"]),
}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- process-tree memory
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _kib(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak summed PSS and RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak_pss = self.peak_rss = self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            self.peak_pss = max(self.peak_pss, sum(_kib(p, "smaps_rollup", "Pss:") for p in pids))
            self.peak_rss = max(self.peak_rss, sum(_kib(p, "status", "VmRSS:") for p in pids))
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict[str, float]:
        return {"peak_pss_gib": self.peak_pss / 2**20, "peak_rss_sum_gib": self.peak_rss / 2**20,
                "peak_processes": self.peak_procs}


def child(part: str, arg: str, repeats: int) -> dict[str, Any]:
    """Run ``--child PART ARG`` in a fresh interpreter, its whole tree's memory sampled."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", part, arg, "--repeats",
                             str(repeats), "--child-out", str(out)], cwd=ROOT, env=env)
    with TreeMemory(proc.pid) as mem:
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"bench_scale: child {part} {arg} failed with exit code {rc}")
    figures = json.loads(out.read_text())
    out.unlink()
    return {**figures, "memory": mem.figures(), "process_wall_s": time.perf_counter() - t0,
            "load_before": before, "load_after": load()}


# ---------------------------------------------------------------- children
class Marks:
    """Start-up timestamps, taken by wrapping (not editing) the engine's steps."""

    def __init__(self) -> None:
        from fedunlearn.engine import flower

        self.t: dict[str, float] = {}
        orig_start, orig_discover = flower.start_ray, flower.FlowerFederation._discover

        def start_ray(*a: Any, **k: Any) -> float:
            self.t.setdefault("ray_start", time.perf_counter())
            r = orig_start(*a, **k)
            self.t.setdefault("ray_up", time.perf_counter())
            return r

        def discover(fed: Any) -> None:
            self.t.setdefault("discover", time.perf_counter())
            orig_ex = fed._exchange

            def exchange(msgs: Any, timeout_s: Any = None) -> Any:
                self.t.setdefault("nodes_up", time.perf_counter())
                return orig_ex(msgs, timeout_s)
            fed._exchange = exchange
            orig_discover(fed)
            del fed._exchange
            self.t.setdefault("discovered", time.perf_counter())

        flower.start_ray = start_ray  # run_engine looks it up in the module
        flower.FlowerFederation._discover = discover  # type: ignore[method-assign]

    def startup(self) -> dict[str, float]:
        t = self.t
        return {"ray_init_s": t["ray_up"] - t["ray_start"],
                "flower_nodes_and_actors_s": t["discover"] - t["ray_up"],
                "discovery_wait_nodes_s": t["nodes_up"] - t["discover"],
                "discovery_query_s": t["discovered"] - t["nodes_up"],
                "engine_startup_s": t["discovered"] - t["ray_start"]}


def run_case(name: str) -> dict[str, Any]:
    from fedunlearn.config.tree import load_config
    from fedunlearn.models.seeding import sample_participants
    from fedunlearn.run.pipeline import run_experiment

    path, overrides = CASES[name]
    cfg = load_config(ROOT / path, overrides)
    # the client to forget: the first one sampled in round 2 (takes part, backdoored)
    target = sample_participants(cfg.seed, 2, cfg.data.num_clients,
                                 cfg.training.sample_fraction)[0]
    overrides = [*overrides, f"backdoor.clients=[{target}]", f"unlearning.requests=[[{target}]]"]
    cfg = load_config(ROOT / path, overrides)
    marks = Marks()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        results = run_experiment(cfg, Path(tmp) / "run", quiet=True)
        wall = time.perf_counter() - t0
    tr = results["training"]
    rows = [r for r in results["unlearning"] if r["role"] != "original"]
    params = sum(int(np.prod(s)) for s in _shapes(cfg))
    return {"config": cfg.to_dict(), "overrides": overrides, "target": target,
            "startup": marks.startup(), "training_s": tr["wall_s"],
            "round_s_median": statistics.median(r["wall_s"] for r in tr["rounds"]),
            "rounds": len(tr["rounds"]), "final_test_accuracy": tr["final_test_accuracy"],
            "methods_s": {r["method"]: r["wall_s"] for r in rows},
            "verification_s": results["verification"]["total_s"],
            "history_bytes": tr["history_bytes"], "parameters": params, "run_wall_s": wall}


def _shapes(cfg: Any) -> list[tuple[int, ...]]:
    from fedunlearn.data.federated import build_federated_data
    from fedunlearn.models import build_model

    data = build_federated_data(cfg)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, seed=0,
                        **cfg.model.params)
    return [tuple(v.shape) for v in model.state_dict().values()]


def run_quickstart(fast: str, repeats: int) -> dict[str, Any]:
    """One in-process FedAvg and one Flower FedAvg (engine started in this call), seed 0."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.flower import run_on_flower
    from fedunlearn.engine.inprocess import InProcessFederation
    from fedunlearn.models.seeding import seed_everything
    from fedunlearn.run.pipeline import prepare

    cfg = load_config(ROOT / "simulations/quickstart.toml",
                      ["experiment.seeds=[0]", f"engine.fast_dispatch={fast}"])
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    t0 = time.perf_counter()
    plain = InProcessFederation(cfg, setup.evaluator()).fedavg(setup.initial)
    plain_total = time.perf_counter() - t0
    marks = Marks()
    t1 = time.perf_counter()
    run = run_on_flower(cfg, lambda fed: fed.fedavg(setup.initial), setup.evaluator(), setup.data)
    total = time.perf_counter() - t1
    diff = max(float(np.max(np.abs(run.final[k] - plain.final[k]))) for k in plain.final)
    return {"flower_total_s": total, "flower_rounds_s": run.wall_s,
            "in_process_total_s": plain_total, "in_process_rounds_s": plain.wall_s,
            "startup": marks.startup(), "max_abs_model_difference": diff}


def run_backdoor(fast: str, repeats: int) -> dict[str, Any]:
    """Train backdoor_digits once, then time ``repeats`` retrainings and FedEraser removals of
    client 0, in one engine."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.flower import run_on_flower
    from fedunlearn.history.store import HistoryStore
    from fedunlearn.models.seeding import seed_everything
    from fedunlearn.run.pipeline import prepare, train_federation
    from fedunlearn.unlearning import UNLEARNERS, UnlearningContext

    cfg = load_config(ROOT / "simulations/backdoor_digits.toml",
                      [f"engine.fast_dispatch={fast}"])
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    marks = Marks()
    tmp = tempfile.TemporaryDirectory()

    def job(fed: Any) -> dict[str, Any]:
        store = HistoryStore.create(Path(tmp.name) / "h",
                                    retention_interval=cfg.history.retention_interval,
                                    update_dtype=cfg.history.dtype)
        run = train_federation(fed, setup, store, progress=False)
        walls: dict[str, list[float]] = {"retrain": [], "federaser": []}
        for _ in range(repeats):
            for name in ("retrain", "federaser"):
                method = UNLEARNERS.get(name)(**cfg.unlearning.params.get(name, {}))
                ctx = UnlearningContext(cfg=cfg, targets=(0,), removed=frozenset({0}),
                                        model=run.final, initial=setup.initial, history=store,
                                        federation=fed, data=setup.data,
                                        build_model=setup.build_model, seed=cfg.seed)
                t0 = time.perf_counter()
                method.unlearn(ctx)
                walls[name].append(time.perf_counter() - t0)
        return {"training_s": run.wall_s,
                "round_s_median": statistics.median(r.wall_s for r in run.rounds),
                "walls_s": walls}

    out = run_on_flower(cfg, job, setup.evaluator(), setup.data)
    tmp.cleanup()
    w = out["walls_s"]
    out.update(retrain_s=statistics.median(w["retrain"]),
               federaser_s=statistics.median(w["federaser"]),
               speedup=statistics.median(w["retrain"]) / statistics.median(w["federaser"]),
               startup=marks.startup())
    return out


def run_startup(arg: str, repeats: int) -> dict[str, Any]:
    """Engine start-up and 3 FedAvg rounds at ``N`` nodes (``arg`` = ``"N:true"`` or
    ``"N:false"``, the ``engine.fast_dispatch`` setting)."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.engine.flower import run_on_flower
    from fedunlearn.models.seeding import seed_everything
    from fedunlearn.run.pipeline import prepare

    n, fast = arg.split(":")
    cfg = load_config(ROOT / SCALE, [f"data.num_clients={n}", "training.rounds=3",
                                     "unlearning.requests=[]", f"engine.fast_dispatch={fast}"])
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    marks = Marks()
    t0 = time.perf_counter()
    run = run_on_flower(cfg, lambda fed: fed.fedavg(setup.initial), setup.evaluator(), setup.data)
    return {"clients": int(n), "fast_dispatch": fast == "true", "startup": marks.startup(),
            "round_s": [r.wall_s for r in run.rounds], "total_s": time.perf_counter() - t0}


def run_history(dtype: str, repeats: int, rounds: int = 200, clients: int = 1000,
                per_round: int = 100) -> dict[str, Any]:
    """Commit ``rounds`` rounds of random scale-MLP updates; time each ``record_round``."""
    from fedunlearn.config.tree import load_config
    from fedunlearn.history.store import HistoryStore

    shapes = _shapes(load_config(ROOT / SCALE, []))
    names = [f"p{i}" for i in range(len(shapes))]
    rng = np.random.default_rng(0)
    glob = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore.create(Path(tmp) / "h", update_dtype=dtype)
        for t in range(1, rounds + 1):
            who = sorted(rng.choice(clients, per_round, replace=False).tolist())
            w = [1.0 / per_round] * per_round
            upd = {c: {n: (0.01 * rng.standard_normal(s)).astype(np.float32)
                       for n, s in zip(names, shapes)} for c in who}
            t0 = time.perf_counter()
            store.record_round(t, global_model=glob, participants=who,
                               num_examples=[90] * per_round, weights=w, updates=upd)
            times.append(time.perf_counter() - t0)
            glob = {n: glob[n] + sum(np.float32(1.0 / per_round) * upd[c][n] for c in who)
                    for n in names}
        store.flush_deletions()
        # a round's updates share one file (history format 2): its bytes per client row
        update_files = list((Path(tmp) / "h").glob("rounds/*/updates*.npz"))
        params = sum(int(np.prod(s)) for s in shapes)
        per_update = (statistics.median(p.stat().st_size for p in update_files) / per_round
                      if update_files else float("nan"))
        total = store.bytes_used()
    return {"dtype": dtype, "rounds": rounds, "clients": clients, "per_round": per_round,
            "parameters": params, "commit_s_first10_median": statistics.median(times[:10]),
            "commit_s_last10_median": statistics.median(times[-10:]),
            "commit_s_max": max(times), "update_bytes_median": per_update,
            "bytes_per_stored_parameter": per_update / params,
            "store_bytes": total, "store_bytes_per_update_parameter":
                total / (rounds * per_round * params)}


CHILDREN = {"case": run_case, "quickstart": run_quickstart, "backdoor": run_backdoor,
            "history": run_history, "startup": run_startup}


# ---------------------------------------------------------------- parent
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("Usage::")[0].strip())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/scale.json")
    ap.add_argument("--parts", default="history,scale,startup,dispatch",
                    help="comma-separated; a subset updates those parts of an existing --out")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        part, arg = args.child
        result = (CHILDREN[part](arg) if part == "case"
                  else CHILDREN[part](arg, args.repeats))  # type: ignore[operator]
        args.child_out.write_text(json.dumps(result, default=float))
        return 0

    from fedunlearn.config.tree import load_config
    from fedunlearn.reporting import stamp

    parts = args.parts.split(",")
    out: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() and set(
        parts) != {"history", "scale", "startup", "dispatch"} else {}
    from fedunlearn.reporting.provenance import git_commit

    out.setdefault("parts_run", []).append({"parts": parts, "load_start": load(),
                                            "git_commit": git_commit()})
    out |= {**stamp(load_config(ROOT / SCALE, [])), "benchmark": "scale",
                           "repeats": args.repeats, "cpus": os.cpu_count(),
                           "load_start": load()}
    t_all = time.perf_counter()
    if "history" in parts:
        out["history"] = {d: child("history", d, args.repeats) for d in ("float32", "float16")}
        _save(args.out, out)
    if "scale" in parts:
        out["scale"] = {name: child("case", name, 1) for name in CASES}
        _save(args.out, out)
    if "startup" in parts:
        out["startup"] = {f"{n} nodes, fast_dispatch={f}": child("startup", f"{n}:{f}", 1)
                          for n in (10, 1000) for f in ("true", "false")}
        _save(args.out, out)
    if "dispatch" in parts:
        disp: dict[str, Any] = {}
        for fast in ("true", "false"):
            qs = [child("quickstart", fast, args.repeats) for _ in range(args.repeats)]
            disp[f"fast_dispatch={fast}"] = {
                "quickstart": qs, "backdoor_digits": child("backdoor", fast, args.repeats)}
        out["dispatch"] = disp
    out["parts_run"][-1]["wall_s"] = time.perf_counter() - t_all
    out["summary"] = summary(out)
    out["load_end"] = load()
    out["wall_s"] = time.perf_counter() - t_all
    _save(args.out, out)
    print(table(out))
    print(f"written to {args.out}")
    return 0


def _save(path: Path, out: dict[str, Any]) -> None:
    from fedunlearn.reporting import write_json

    write_json(path, out)


def summary(out: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    med = statistics.median
    for key, d in out.get("dispatch", {}).items():
        qs = d["quickstart"]
        s[key] = {
            "quickstart_rounds_flower_s": med(q["flower_rounds_s"] for q in qs),
            "quickstart_rounds_in_process_s": med(q["in_process_rounds_s"] for q in qs),
            "quickstart_total_flower_s": med(q["flower_total_s"] for q in qs),
            "quickstart_total_in_process_s": med(q["in_process_total_s"] for q in qs),
            "quickstart_end_to_end_ratio": med(q["flower_total_s"] / q["in_process_total_s"]
                                               for q in qs),
            "quickstart_rounds_ratio": med(q["flower_rounds_s"] / q["in_process_rounds_s"]
                                           for q in qs),
            "quickstart_engine_startup_s": med(q["startup"]["engine_startup_s"] for q in qs),
            "backdoor_round_s_median": d["backdoor_digits"]["round_s_median"],
            "backdoor_retrain_s": d["backdoor_digits"]["retrain_s"],
            "backdoor_federaser_s": d["backdoor_digits"]["federaser_s"],
            "federaser_speedup": d["backdoor_digits"]["speedup"]}
    if "history" in out and "scale" in out:
        round_s = out["scale"]["synthetic-1000"]["round_s_median"]
        h = out["history"]["float32"]
        s["history_commit_share_of_round"] = h["commit_s_last10_median"] / round_s
    return s


def table(out: dict[str, Any]) -> str:
    lines = []
    if "scale" in out:
        cases = out["scale"]
        lines.append("| phase | " + " | ".join(cases) + " |")
        lines.append("| --- |" + " ---: |" * len(cases))

        def row(label: str, get: Any, fmt: str = "{:.1f}") -> None:
            vals = []
            for c in cases.values():
                try:
                    vals.append(fmt.format(get(c)))
                except (KeyError, TypeError):
                    vals.append("–")
            lines.append(f"| {label} | " + " | ".join(vals) + " |")

        row("Ray start (s)", lambda c: c["startup"]["ray_init_s"])
        row("Flower nodes + actor pool (s)", lambda c: c["startup"]["flower_nodes_and_actors_s"])
        row("discovery: nodes up (s)", lambda c: c["startup"]["discovery_wait_nodes_s"])
        row("discovery: query round trip, actors start (s)",
            lambda c: c["startup"]["discovery_query_s"])
        row("**engine start-up** (s)", lambda c: c["startup"]["engine_startup_s"])
        row("training, median round (s)", lambda c: c["round_s_median"], "{:.2f}")
        row("training, 10 rounds (s)", lambda c: c["training_s"])
        for m in ("retrain", "retrain_seed2", "federaser", "distillation"):
            row(f"{m} (s)", lambda c, m=m: c["methods_s"][m])
        row("verification (s)", lambda c: c["verification_s"])
        row("whole run (s)", lambda c: c["run_wall_s"])
        row("peak PSS, process tree (GiB)", lambda c: c["memory"]["peak_pss_gib"], "{:.2f}")
        row("peak RSS sum, process tree (GiB)", lambda c: c["memory"]["peak_rss_sum_gib"],
            "{:.2f}")
        row("history after training (MB)", lambda c: c["history_bytes"] / 1e6)
        row("load average before/after",
            lambda c: f"{c['load_before'][0]:.1f}/{c['load_after'][0]:.1f}", "{}")
    if "startup" in out:
        lines.append("")
        lines.append("| start-up | Ray | discovery | engine start-up | rounds (s) | load |")
        lines.append("| --- | ---: | ---: | ---: | --- | --- |")
        for key, r in out["startup"].items():
            st = r["startup"]
            disc = st["discovery_wait_nodes_s"] + st["discovery_query_s"]
            lines.append(f"| {key} | {st['ray_init_s']:.1f} | {disc:.1f} | "
                         f"{st['engine_startup_s']:.1f} | "
                         f"{', '.join(f'{x:.2f}' for x in r['round_s'])} | "
                         f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f} |")
    if "history" in out:
        lines.append("")
        for d, h in out["history"].items():
            lines.append(f"history {d}: commit median first 10 {h['commit_s_first10_median']*1e3:.1f} ms,"
                         f" last 10 {h['commit_s_last10_median']*1e3:.1f} ms (max "
                         f"{h['commit_s_max']*1e3:.0f} ms); {h['bytes_per_stored_parameter']:.2f}"
                         f" B per stored parameter (update file), store "
                         f"{h['store_bytes_per_update_parameter']:.2f} B per update parameter")
    for key, v in out.get("summary", {}).items():
        lines.append(f"{key}: {json.dumps(v, default=float)}" if isinstance(v, dict)
                     else f"{key}: {v:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
