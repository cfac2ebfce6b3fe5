"""The Flower ``ClientApp`` of every fedunlearn run.

Three handlers: ``query`` (partition id and example count), ``train`` (local training from the
received model) and ``evaluate``. A client is identified by its ``partition-id``.

The engine ships the ClientApp object to a Ray actor with every message, so the app holds no
state; what is costly to rebuild (parsed config, data, a model instance) is cached per process
in :mod:`fedunlearn.engine.local`.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedunlearn.config.extensions import USER_ERRORS, describe_failure
from fedunlearn.engine.local import client_evaluate, client_work, runtime
from fedunlearn.engine.messages import (
    ARRAYS,
    CONFIG,
    EVAL_ACCURACY,
    EVAL_LOSS,
    JOB,
    METRICS,
    NUM_EXAMPLES,
    PARTITION,
    REMOVED_THROUGH,
    TASK,
    TASK_PREFIX,
    from_record,
    task_params_of,
    to_record,
)

app = ClientApp()


def _partition(context: Context) -> int:
    return int(context.node_config[PARTITION])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this client's partition id and number of training examples."""
    _, data = runtime(str(msg.content[CONFIG][JOB]))
    pid = _partition(context)
    metrics = MetricRecord({PARTITION: pid, NUM_EXAMPLES: len(data.clients[pid])})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the received model; reply with the new model and example count.

    Config keys: ``job`` (experiment JSON), ``server-round``; optional ``epochs`` (overrides
    ``training.local_epochs``, e.g. FedEraser's calibration), ``tag`` (seed purpose) and
    ``task`` with its ``task.<name>`` parameters (another client job than training, e.g.
    PGA's ``"ascent"``; its stats are replied as ``task.<stat>`` metrics), ``removed-through``
    (train without the samples the first that many removal requests removed).
    """
    t0 = time.perf_counter()
    config = msg.content[CONFIG]
    pid = _partition(context)
    epochs = float(config["epochs"]) if "epochs" in config else None
    task = str(config.get(TASK, "train"))
    try:
        params, n, stats = client_work(str(config[JOB]), from_record(msg.content[ARRAYS]), pid,
                                       server_round=int(config.get("server-round", 0)),
                                       tag=int(config.get("tag", 0)), epochs=epochs, task=task,
                                       task_params=task_params_of(config),
                                       removed_through=int(config.get(REMOVED_THROUGH, 0)))
    except USER_ERRORS as exc:  # Flower passes on only str(exc): keep the type and the place
        raise RuntimeError(describe_failure(exc)) from exc
    extra = {} if task == "train" else {TASK_PREFIX + k: float(v) for k, v in stats.items()}
    metrics = MetricRecord({PARTITION: pid, NUM_EXAMPLES: n, "train-loss": stats["loss"],
                            "train-steps": stats["steps"],
                            "train-seconds": time.perf_counter() - t0, **extra})
    return Message(RecordDict({ARRAYS: to_record(params), METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's training data."""
    pid = _partition(context)
    try:
        config = msg.content[CONFIG]
        n, res = client_evaluate(str(config[JOB]), from_record(msg.content[ARRAYS]), pid,
                                 removed_through=int(config.get(REMOVED_THROUGH, 0)))
    except USER_ERRORS as exc:  # a user's model or data: keep the type and the place
        raise RuntimeError(describe_failure(exc)) from exc
    metrics = MetricRecord({PARTITION: pid, NUM_EXAMPLES: n,
                            EVAL_LOSS: res["loss"], EVAL_ACCURACY: res["accuracy"]})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
