"""Pure FedAvg and update arithmetic on ``{name: array}`` parameter mappings.

FedAvg (McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): ``M_{t+1} = M_t + sum_k w_k U_k`` with ``w_k = n_k / sum_j n_j``.
Only floating arrays carry updates; integer buffers (e.g. BatchNorm's ``num_batches_tracked``)
are left as they are in the base model, explicitly: :func:`keep_non_float` puts them back after an
aggregation that averaged them (Flower's ``FedAvg`` averages every array it is given).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedunlearn.models.params import Params, is_float


def fedavg_weights(num_examples: Sequence[int]) -> list[float]:
    """FedAvg weights ``n_k / sum_j n_j``.

    >>> fedavg_weights([1, 3])
    [0.25, 0.75]
    """
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("FedAvg needs at least one training example among the participants")
    return [n / total for n in num_examples]


def difference(after: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray]) -> Params:
    """The update ``after - before`` over the floating arrays of ``before`` (float32)."""
    return {k: (np.asarray(after[k], np.float32) - b).astype(np.float32)
            for k, b in before.items() if is_float(b)}


def weighted_sum(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Params:
    """``sum_i weights[i] * updates[i]`` accumulated in float64, returned as float32."""
    if len(updates) != len(weights) or not updates:
        raise ValueError("weighted_sum needs as many weights as updates, and at least one")
    out = {k: np.zeros(v.shape, np.float64) for k, v in updates[0].items()}
    for update, w in zip(updates, weights, strict=True):
        for k in out:
            out[k] += float(w) * np.asarray(update[k], np.float64)
    return {k: v.astype(np.float32) for k, v in out.items()}


def apply_update(base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
                 scale: float = 1.0) -> Params:
    """``base + scale * update`` on floating arrays; non-float arrays are copied from ``base``."""
    out: Params = {}
    for k, v in base.items():
        if is_float(v) and k in update:
            out[k] = (v + np.float32(scale) * np.asarray(update[k], np.float32)).astype(v.dtype)
        else:
            out[k] = v.copy()
    return out


def keep_non_float(aggregated: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Params:
    """``aggregated`` with every non-float array of ``base`` copied back from ``base``.

    Flower's ``FedAvg`` averages every array of the replies, so an integer buffer (BatchNorm's
    ``num_batches_tracked``) comes back as the float64 mean of the clients' counters, and the
    next global model would change dtype. fedunlearn keeps integer buffers out of aggregation:
    the new global model takes them, value and dtype, from the model the round started from, so
    ``M_{t+1} = M_t + sum_k w_k U_k`` holds for every entry (integer entries have ``U = 0``).
    Float arrays, BatchNorm's running means and variances included, are averaged.

    >>> out = keep_non_float({"w": np.array([0.5]), "n": np.array(3.5)},
    ...                      {"w": np.array([0.0]), "n": np.array(2)})
    >>> out["w"].tolist(), int(out["n"]), out["n"].dtype.kind
    ([0.5], 2, 'i')
    """
    return {k: base[k].copy() if k in base and not is_float(np.asarray(base[k])) else v
            for k, v in aggregated.items()}


def l2_norm(params: Mapping[str, np.ndarray]) -> float:
    """Euclidean norm over all floating arrays taken together."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64)))
                             for v in params.values() if is_float(v))))
