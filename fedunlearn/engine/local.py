"""What one client does, independent of the engine that delivers the request.

Both the Flower ClientApp and the in-process federation call :func:`client_work` (local
training, :func:`client_train`, or another task of :data:`TASKS`), so the two engines do
bit-for-bit the same work.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedunlearn.config.extensions import load_extensions
from fedunlearn.config.tree import Config, from_dict
from fedunlearn.data import cache as data_cache
from fedunlearn.data.backdoor import clean_samples
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.federated import FederatedData, build_federated_data
from fedunlearn.data.removal import Step, resolve, retained_mask
from fedunlearn.models import build_model
from fedunlearn.models.params import Params, get_params, set_params
from fedunlearn.models.seeding import derive_seed
from fedunlearn.models.training import device_for, evaluate, local_training, train
from fedunlearn.unlearning.federated.pga_ascent import ASCENT_FORGET, Ascent, projected_ascent


@functools.lru_cache(maxsize=4)
def runtime(job: str) -> tuple[Config, FederatedData]:
    """Parse a job (config JSON) and build its data once per process (or load the copy the
    driver published for this machine's client processes, :mod:`fedunlearn.data.cache`)."""
    cfg = from_dict(json.loads(job))
    load_extensions(cfg.experiment.extensions)
    torch.set_num_threads(max(1, int(cfg.engine.num_cpus)))
    data = data_cache.load(job) or build_federated_data(cfg)  # the driver's copy, if any
    warm_up(cfg, data)
    return cfg, data


def warm_up(cfg: Config, data: FederatedData) -> None:
    """One throw-away training step, so torch's one-off start-up cost (autograd engine, kernels,
    thread pools; about a second) is paid when the process starts, not in the first round."""
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, seed=0,
                        **cfg.model.params)
    local = next(d for d in data.clients if len(d))
    n = min(len(local), cfg.training.batch_size)
    train(model, local.x[:n], local.y[:n], local_training(cfg, 1.0), seed=0, device=device_for(cfg))


_MODELS: dict[str, nn.Module] = {}


def model_for(job: str, cfg: Config, data: FederatedData) -> nn.Module:
    """A model instance reused across messages of the same job (weights are overwritten)."""
    if job not in _MODELS:
        _MODELS.clear()
        _MODELS[job] = build_model(cfg.model.name, data.input_shape, data.num_classes,
                                   seed=cfg.seed, **cfg.model.params)
    return _MODELS[job]


@functools.lru_cache(maxsize=4)
def _steps(job: str) -> tuple[Step, ...]:
    cfg, data = runtime(job)
    return resolve(cfg, data)


def client_data(job: str, client: int, removed_through: int = 0) -> ArrayDataset:
    """Client ``client``'s training data without what the first ``removed_through`` removal
    requests removed from it (:mod:`fedunlearn.data.removal`, resolved from the job alone):
    the data as built when ``removed_through`` is 0 or the requests left the client whole."""
    _, data = runtime(job)
    local = data.clients[client]
    if removed_through <= 0:
        return local
    steps = _steps(job)
    if removed_through > len(steps):
        raise ValueError(f"asked to leave out what {removed_through} removal requests removed, "
                         f"but the job's config has {len(steps)} (unlearning.requests)")
    keep = retained_mask(steps, client, removed_through, len(local))
    return local if keep is None else local.subset(np.flatnonzero(keep))


def client_train(job: str, params: Params, client: int, *, server_round: int, tag: int = 0,
                 epochs: float | None = None, removed_through: int = 0
                 ) -> tuple[Params, int, dict[str, float]]:
    """Client ``client`` trains from ``params`` on the data it keeps after the first
    ``removed_through`` removal requests; returns (new params, #examples, stats)."""
    cfg, data = runtime(job)
    model = model_for(job, cfg, data)
    set_params(model, params)
    local = client_data(job, client, removed_through)
    seed = derive_seed(cfg.seed, server_round, client, tag)
    stats = train(model, local.x, local.y, local_training(cfg, epochs), seed=seed,
                  device=device_for(cfg))
    return get_params(model), len(local), stats


def client_evaluate(job: str, params: Params, client: int, *, removed_through: int = 0
                    ) -> tuple[int, dict[str, float]]:
    """Client ``client`` evaluates ``params`` on the training data it keeps after the first
    ``removed_through`` removal requests; returns (#examples, ``{"loss", "accuracy"}``), the
    figures of Flower's federated evaluation."""
    cfg, data = runtime(job)
    model = model_for(job, cfg, data)
    set_params(model, params)
    local = client_data(job, client, removed_through)
    return len(local), evaluate(model, local.x, local.y, device=device_for(cfg))


TASKS = ("train", "ascent", "activations")
"""Client jobs a training request may carry: ``"train"`` (local training, the default),
``"ascent"`` (projected gradient ascent, the client side of PGA unlearning) and
``"activations"`` (per-class mean channel activations, the client side of class-discriminative
pruning; the model comes back unchanged)."""

ASCENT_PARAMS = ("radius", "threshold", "learning_rate", "momentum", "clip_norm")
"""The ``task_params`` of ``"ascent"`` (floats, the fields of :class:`~fedunlearn.unlearning.federated.pga_ascent.Ascent`
but the epochs and batch size); its epochs are the request's ``epochs``."""


def client_ascent(job: str, params: Params, client: int, *, server_round: int, tag: int,
                  epochs: float, radius: float, threshold: float, learning_rate: float,
                  momentum: float, clip_norm: float, forget_of: int = 0
                  ) -> tuple[Params, int, dict[str, float]]:
    """Client ``client`` runs :func:`~fedunlearn.unlearning.federated.pga_ascent.projected_ascent` on its own data from
    ``params`` (the ball's centre), ``τ`` judged on its clean samples (:func:`clean_samples`),
    or with ``forget_of`` on the samples request ``forget_of - 1`` removes from it, ``τ`` judged
    on them; returns (new params, #examples, stats)."""
    cfg, data = runtime(job)
    model = model_for(job, cfg, data)
    set_params(model, params)
    local = data.clients[client]
    judged = clean_samples(cfg, data, client)
    if forget_of > 0:  # a sample or class request: ascend on (and judge) what it removes
        local = local.subset(_steps(job)[forget_of - 1].forget[client])
        judged = np.ones(len(local), dtype=bool)
    spec = Ascent(epochs=epochs, batch_size=cfg.training.batch_size,
                  learning_rate=learning_rate, momentum=momentum, clip_norm=clip_norm,
                  radius=radius, threshold=threshold)
    stats = projected_ascent(model, local.x, local.y, spec,
                             seed=derive_seed(cfg.seed, server_round, client, tag),
                             device=device_for(cfg), judged=judged)
    return get_params(model), len(local), stats


def client_activations(job: str, params: Params, client: int, *, removed_through: int = 0
                       ) -> tuple[Params, int, dict[str, float]]:
    """Client ``client``'s per-class mean channel activations of ``params`` on the data it
    keeps after the first ``removed_through`` requests
    (:func:`~fedunlearn.unlearning.federated.class_pruning.class_activations`); returns
    (``params`` unchanged, #examples, the activations as stats)."""
    from fedunlearn.unlearning.federated.class_pruning import class_activations

    cfg, data = runtime(job)
    model = model_for(job, cfg, data)
    set_params(model, params)
    local = client_data(job, client, removed_through)
    stats = class_activations(model, local.x, local.y, data.num_classes, device=device_for(cfg))
    return dict(params), len(local), {"loss": 0.0, "steps": 0.0, **stats}


def client_work(job: str, params: Params, client: int, *, server_round: int, tag: int = 0,
                epochs: float | None = None, task: str = "train",
                task_params: Mapping[str, float] | None = None, removed_through: int = 0
                ) -> tuple[Params, int, dict[str, float]]:
    """Run ``task`` (one of :data:`TASKS`) for ``client``; returns (params, #examples, stats).
    Training uses the data the client keeps after the first ``removed_through`` requests.

    Raises
    ------
    ValueError
        For an unknown task, or ``task_params`` that do not fit it.
    """
    given = dict(task_params or {})
    if task == "train":
        if given:
            raise ValueError(f"task 'train' takes no task_params, got {sorted(given)}")
        return client_train(job, params, client, server_round=server_round, tag=tag,
                            epochs=epochs, removed_through=removed_through)
    if task == "activations":
        if set(given) - {"through"}:
            raise ValueError(f"task 'activations' takes task_params 'through' only, got "
                             f"{sorted(given)}")
        return client_activations(job, params, client,
                                  removed_through=int(given.get("through", 0)))
    if task == "ascent":
        forget_of = int(given.pop(ASCENT_FORGET, 0))
        if sorted(given) != sorted(ASCENT_PARAMS) or epochs is None:
            raise ValueError(f"task 'ascent' needs epochs and task_params "
                             f"{', '.join(ASCENT_PARAMS)}; got epochs={epochs}, "
                             f"task_params {sorted(given)}")
        return client_ascent(job, params, client, server_round=server_round, tag=tag,
                             epochs=float(epochs), forget_of=forget_of,
                             **{k: float(v) for k, v in given.items()})
    raise ValueError(f"unknown client task {task!r}; known: {', '.join(TASKS)}")
