#!/usr/bin/env python
"""Centralized removal benchmark: SISA and the Newton step against centralized retraining.

On the data of a config (default ``simulations/federated_vs_centralized.toml``: 10 clients on
embedded digits), every repeat fits fresh instances of ``central_retrain``, ``sisa`` (by
client), ``sisa_random`` and ``newton`` on the pooled data (not timed), then times each one's
removal of the same request, side by side in one process. Single removals of a few tens of
milliseconds are noisy on a shared machine, so the figures are medians over ``--repeats``.
With ``--samples 1,10,100`` the request is instead, per case, that many samples of client 0
(positions drawn with the config's seed; a sample-level request, ``{client = 0, samples =
[...]}``), and the figures are written per case with Newton's certificate check (its
data-dependent bound against its budget, and whether it fell back to retraining). Usage::

    .venv/bin/python scripts/bench_removal.py [--config ...] [--set section.key=value ...]
        [--repeats 5] [--samples 1,10,100] [--out benchmarks/removal.json]

Figures written (per method): ``wall_s`` (every repeat), ``median_s``, ``speedup`` (median
retraining time over the method's median), and for ``newton`` the Newton step alone
(``step_median_s``, ``step_speedup``, without the budget retraining), for SISA the shards
retrained and sample-epochs against retraining's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedunlearn.config.tree import load_config
from fedunlearn.data.removal import resolve
from fedunlearn.models.seeding import seed_everything
from fedunlearn.reporting import stamp, write_json
from fedunlearn.run.pipeline import prepare
from fedunlearn.unlearning import UNLEARNERS, UnlearningContext

METHODS = ("central_retrain", "sisa", "sisa_random", "newton")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="simulations/federated_vs_centralized.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", default="",
                    help="comma-separated sample counts of client 0 to remove, one case each")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/removal.json"))
    args = ap.parse_args()
    if not args.samples:
        cfg = load_config(args.config, args.overrides)
        return _write(args, cfg, [_case(args, cfg, None)])
    base = load_config(args.config, args.overrides)
    client = prepare(base).data.clients[0]
    order = np.random.default_rng(base.seed).permutation(len(client))
    cases = []
    for n in (int(v) for v in args.samples.split(",")):
        if not 0 < n <= len(client):
            raise SystemExit(f"--samples {n}: client 0 holds {len(client)} samples")
        positions = ", ".join(str(int(p)) for p in sorted(order[:n]))
        cfg = load_config(args.config, [*args.overrides, 'unlearning.methods=["retrain"]',
                                        (f"unlearning.requests=[{{client = 0, samples = "
                                         f"[{positions}]}}]")])
        cases.append(_case(args, cfg, n))
    return _write(args, base, cases)


def _case(args: argparse.Namespace, cfg: Any, n: int | None) -> dict[str, Any]:
    """One request's figures: every method's removal timed side by side, ``args.repeats``
    times; ``n`` removed samples of client 0 (None: the config's first client request)."""
    seed_everything(cfg.seed)
    setup = prepare(cfg)
    step = resolve(cfg, setup.data)[0] if n is not None else None
    targets = step.targets if step is not None else (
        tuple(cfg.unlearning.requests[0]) if cfg.unlearning.requests else (0,))

    def ctx(t: tuple[int, ...]) -> UnlearningContext:
        return UnlearningContext(cfg=cfg, targets=t, removed=step.gone if step and t else
                                 frozenset(t), model=setup.initial,
                                 initial=setup.initial, history=None, federation=None,  # type: ignore[arg-type]
                                 data=setup.data, build_model=setup.build_model, seed=cfg.seed,
                                 removal=step if t else None)

    walls: dict[str, list[float]] = {m: [] for m in METHODS}
    extra: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for name in METHODS:
            method = UNLEARNERS.get(name)(**cfg.unlearning.params.get(name, {}))
            method.fit(ctx(()))
            t0 = time.perf_counter()
            result = method.unlearn(ctx(targets))
            walls[name].append(time.perf_counter() - t0)
            extra[name].append({**result.details, "sample_epochs": result.cost.sample_epochs})

    ref = statistics.median(walls["central_retrain"])
    figures: dict[str, Any] = {}
    for name in METHODS:
        med = statistics.median(walls[name])
        figures[name] = {"wall_s": walls[name], "median_s": med, "speedup": ref / med,
                         "sample_epochs": extra[name][0]["sample_epochs"]}
        if name.startswith("sisa"):
            figures[name]["shards_retrained"] = extra[name][0]["shards_retrained"]
    steps = [e["newton_step_s"] for e in extra["newton"]]
    figures["newton"].update(step_median_s=statistics.median(steps),
                             step_speedup=ref / statistics.median(steps),
                             retrained=extra["newton"][0]["retrained"],
                             data_dependent_bound=extra["newton"][0]["data_dependent_bound"],
                             budget=extra["newton"][0]["budget"])
    pooled = sum(len(d) for d in setup.data.clients)
    return {"request": list(targets), "removed_samples": n, "pooled_samples": pooled,
            "removed_fraction": None if n is None else n / pooled, "methods": figures}


def _write(args: argparse.Namespace, cfg: Any, cases: list[dict[str, Any]]) -> int:
    body: dict[str, Any] = {**stamp(cfg), "repeats": args.repeats}
    body.update(cases[0] if len(cases) == 1 and cases[0]["removed_samples"] is None
                else {"cases": cases})
    write_json(args.out, body)
    for case in cases:
        if case["removed_samples"] is not None:
            print(f"-- {case['removed_samples']} samples of client 0 "
                  f"({100 * case['removed_fraction']:.2f} % of {case['pooled_samples']})")
        for name in METHODS:
            f = case["methods"][name]
            print(f"{name:<16} median {f['median_s']:8.4f}s  speed-up {f['speedup']:6.1f}x"
                  + (f"  (Newton step alone {f['step_median_s']:.4f}s, "
                     f"{f['step_speedup']:.0f}x; bound {f['data_dependent_bound']:.3g} of "
                     f"budget {f['budget']:.3g}, retrained {f['retrained']})"
                     if name == "newton" else ""))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
