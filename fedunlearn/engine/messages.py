"""How parameters and jobs travel in Flower messages.

Parameters go as an ``ArrayRecord`` keyed by state-dict names; the experiment config goes as a
JSON string in the ``ConfigRecord`` so every ClientApp process rebuilds the same data and model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedunlearn.config.tree import Config
from fedunlearn.models.params import Params

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
JOB = "job"
PARTITION = "partition-id"
NUM_EXAMPLES = "num-examples"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
TASK = "task"
REMOVED_THROUGH = "removed-through"
"""Train or evaluate without the samples the first N removal requests removed
(:func:`fedunlearn.engine.local.client_data`); absent means 0."""
TASK_PREFIX = "task."
"""A client task's parameters travel as ``task.<name>`` config entries, its stats as
``task.<stat>`` metrics."""


def to_record(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack parameters into an ``ArrayRecord`` (order and shapes preserved: a 0-d array, such
    as BatchNorm's ``num_batches_tracked``, stays 0-d, which ``np.ascontiguousarray`` would
    make 1-d).

    >>> from_record(to_record({"n": np.array(3, np.int64)}))["n"].shape
    ()
    """
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in params.items()})


def from_record(record: ArrayRecord) -> Params:
    """Unpack an ``ArrayRecord`` into ``{name: array}``."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (the model), not counting configs or overhead."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for rec in content.array_records.values() for a in rec.values())


def job_json(cfg: Config) -> str:
    """The config as compact JSON, the job description every client receives."""
    return json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))


def task_params_of(config: Mapping[str, object]) -> dict[str, float]:
    """The ``task.<name>`` entries of a train message's config, as ``{name: float}``."""
    return {k[len(TASK_PREFIX):]: float(v)  # type: ignore[arg-type]
            for k, v in config.items() if k.startswith(TASK_PREFIX)}


def task_stats(metrics: Mapping[str, object]) -> dict[str, float]:
    """The ``task.<stat>`` entries of a train reply's metrics, as ``{stat: float}``."""
    return {k[len(TASK_PREFIX):]: float(v)  # type: ignore[arg-type]
            for k, v in metrics.items() if k.startswith(TASK_PREFIX)}
