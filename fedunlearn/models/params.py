"""Model parameters as ordered ``{name: numpy array}`` mappings, and their torch round trip.

Every piece of the framework outside the training loops (history, aggregation, unlearning math,
messages) handles parameters in this form, so it stays free of torch and of Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

Params = dict[str, np.ndarray]


def get_params(model: nn.Module) -> Params:
    """Copy a module's full state (parameters and buffers) to NumPy, in state-dict order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def buffer_names(model: nn.Module) -> frozenset[str]:
    """State-dict names of ``model``'s buffers (e.g. BatchNorm's running statistics), as
    opposed to its trainable parameters."""
    params = {name for name, _ in model.named_parameters()}
    return frozenset(k for k in model.state_dict() if k not in params)


RUNNING_STATS = ("running_mean", "running_var")
"""Last name component of the running statistics of torch's normalisation layers (BatchNorm,
and InstanceNorm with ``track_running_stats``): float buffers measured, not trained."""


def running_stat_names(params: Mapping[str, np.ndarray]) -> frozenset[str]:
    """Names of the entries of ``params`` that are normalisation running statistics.

    >>> sorted(running_stat_names({"bn.weight": 0, "bn.running_mean": 0, "bn.running_var": 0}))
    ['bn.running_mean', 'bn.running_var']
    """
    return frozenset(k for k in params if k.rsplit(".", 1)[-1] in RUNNING_STATS)


def set_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Load ``params`` into ``model`` (strict: names and shapes must match)."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    model.load_state_dict(state, strict=True)


def is_float(array: np.ndarray) -> bool:
    """True for floating arrays: the ones that carry updates (integer buffers do not)."""
    return bool(np.issubdtype(array.dtype, np.floating))


def float_keys(params: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating arrays, in order."""
    return [k for k, v in params.items() if is_float(v)]


def num_bytes(params: Mapping[str, np.ndarray]) -> int:
    """Bytes held by the arrays."""
    return int(sum(v.nbytes for v in params.values()))
