"""The federation port in one process: the same client work as Flower, without the engine.

Used as a cross-check (a test proves it gives the same model as Flower) and as the plain
PyTorch baseline of ``scripts/bench_engine.py``. Aggregation reproduces Flower's FedAvg
arithmetic (weights ``n_k / sum n``, float32 accumulation in partition order). Client faults
follow the same policy (:mod:`fedunlearn.engine.faults`): a client raising an exception
counts as an error reply, a model with NaN/Inf as a non-finite one (there are no timeouts).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedunlearn.config.extensions import USER_ERRORS, describe_failure
from fedunlearn.config.tree import Config
from fedunlearn.engine.aggregation import fedavg_weights, keep_non_float
from fedunlearn.engine.faults import (
    Failure,
    FaultPolicy,
    error_reason,
    nonfinite,
    with_retries,
)
from fedunlearn.engine.local import client_evaluate, client_work, runtime
from fedunlearn.engine.messages import job_json
from fedunlearn.engine.port import (
    ClientEvaluation,
    ClientResult,
    RoundListener,
    RoundReport,
    TrainingRun,
)
from fedunlearn.engine.tracking import Evaluator, FedAvgTracker
from fedunlearn.models.params import Params, num_bytes
from fedunlearn.models.seeding import run_seed, sample_participants, variant_tag
from fedunlearn.run import interrupt

if TYPE_CHECKING:
    from fedunlearn.run.resume import Checkpoint



def flower_average(models: Sequence[Mapping[str, np.ndarray]], counts: Sequence[int]) -> Params:
    """FedAvg exactly as Flower's ``aggregate_arrayrecords`` computes it."""
    out: dict[str, np.ndarray] = {}
    for model, w in zip(models, fedavg_weights(counts), strict=True):
        for k, v in model.items():
            if k in out:
                out[k] += v * w
            else:
                out[k] = v * w
    return {k: np.asarray(v) for k, v in out.items()}


class InProcessFederation:
    """The port without Flower: clients train one after another in this process."""

    def __init__(self, cfg: Config, evaluate: Evaluator) -> None:
        self.cfg = cfg
        self.evaluate = evaluate
        self.job = job_json(cfg)
        self.num_clients = cfg.data.num_clients
        self.messages_sent = 0
        self.bytes_exchanged = 0
        self.reached: Counter[int] = Counter()  # client -> training requests it received
        self.policy = FaultPolicy.of(cfg.engine)
        runtime(self.job)

    def fedavg(self, initial: Params, *, exclude: frozenset[int] = frozenset(),
               listener: RoundListener | None = None, variant: int = 0, stream: int = 0,
               start: Checkpoint | None = None, removed_through: int = 0) -> TrainingRun:
        """The configured FedAvg (``training.strategy`` must be ``fedavg``)."""
        t = self.cfg.training
        if t.strategy != "fedavg":
            raise ValueError("the in-process federation only runs strategy 'fedavg'")
        tracker = FedAvgTracker(self.evaluate, listener, t.local_epochs, start)
        first = start.round if start is not None else 0
        model = dict(start.model) if start is not None else dict(initial)
        tracker.evaluated(first, model)
        sent = 0
        exchanged = 0
        for r in range(first + 1, t.rounds + 1):
            pids = sample_participants(run_seed(self.cfg.seed, variant), r, self.num_clients,
                                       t.sample_fraction, set(exclude))
            if pids:
                before = self.bytes_exchanged
                sent_before = self.messages_sent
                results, failures = self._train(model, pids, epochs=t.local_epochs,
                                                server_round=r, tag=variant_tag(variant, stream),
                                                removed_through=removed_through)
                exchanged += self.bytes_exchanged - before
                sent += self.messages_sent - sent_before
                tracker.failed(failures)
                done = [p for p in pids if p in results]
                counts = tuple(results[p].num_examples for p in done)
                tracker.aggregated(RoundReport(
                    server_round=r, global_model=model, participants=tuple(done),
                    num_examples=counts, weights=tuple(fedavg_weights(counts)),
                    client_models={p: results[p].model for p in done}))
                model = keep_non_float(flower_average([results[p].model for p in done],
                                                      counts), model)
            tracker.evaluated(r, model)
        run = tracker.finish(model, sent)
        run.bytes_exchanged = exchanged
        self.reached.update(p for summary in run.rounds for p in summary.participants)
        return run

    def train_clients(self, model: Params, clients: Sequence[int], *, epochs: float,
                      server_round: int, tag: int, task: str = "train",
                      task_params: Mapping[str, float] | None = None,
                      removed_through: int = 0) -> dict[int, ClientResult]:
        """Run ``task`` on each client in turn (failed clients are missing under ``"drop"``);
        a requested stop (Ctrl-C) is honoured first, as by the Flower federation."""
        interrupt.check()
        self.reached.update(clients)
        return self._train(model, clients, epochs=epochs, server_round=server_round,
                           tag=tag, task=task, task_params=task_params,
                           removed_through=removed_through)[0]

    def evaluate_clients(self, model: Params, clients: Sequence[int], *, server_round: int,
                         removed_through: int = 0) -> dict[int, ClientEvaluation]:
        """Each client evaluates ``model`` on its own data in turn (failed clients are
        missing under ``"drop"``); a requested stop (Ctrl-C) is honoured first."""
        interrupt.check()

        def attempt(cs: list[int]) -> tuple[dict[int, ClientEvaluation], dict[int, str]]:
            self.messages_sent += len(cs)
            ok: dict[int, ClientEvaluation] = {}
            failed: dict[int, str] = {}
            for c in cs:
                try:
                    n, res = client_evaluate(self.job, model, c,
                                             removed_through=removed_through)
                except USER_ERRORS as exc:  # a client error, as Flower reports it
                    failed[c] = error_reason(describe_failure(exc))
                    continue
                self.bytes_exchanged += num_bytes(model)
                ok[c] = ClientEvaluation(num_examples=n, loss=res["loss"],
                                         accuracy=res["accuracy"])
            return ok, failed

        ok, failed = with_retries(attempt, clients, self.policy.retries)
        self.policy.settle(failed, ok, server_round=server_round, stage="evaluate")
        return ok

    def _train(self, model: Params, clients: Sequence[int], *, epochs: float,
               server_round: int, tag: int, task: str = "train",
               task_params: Mapping[str, float] | None = None, removed_through: int = 0
               ) -> tuple[dict[int, ClientResult], list[Failure]]:
        """Train ``clients`` with retries, then apply the fault policy."""

        def attempt(cs: list[int]) -> tuple[dict[int, ClientResult], dict[int, str]]:
            self.messages_sent += len(cs)
            ok: dict[int, ClientResult] = {}
            failed: dict[int, str] = {}
            for c in cs:
                try:
                    params, n, stats = client_work(self.job, model, c,
                                                   server_round=server_round, tag=tag,
                                                   epochs=epochs, task=task,
                                                   task_params=task_params,
                                                   removed_through=removed_through)
                except USER_ERRORS as exc:  # a client error, as Flower reports it
                    failed[c] = error_reason(describe_failure(exc))
                    continue
                self.bytes_exchanged += num_bytes(model) + num_bytes(params)
                if nonfinite(params):
                    failed[c] = "non-finite"
                else:
                    ok[c] = ClientResult(model=params, num_examples=n,
                                         stats=stats if task != "train" else {})
            return ok, failed

        ok, failed = with_retries(attempt, clients, self.policy.retries)
        return ok, self.policy.settle(failed, ok, server_round=server_round, stage=task)
