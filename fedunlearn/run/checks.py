"""Checks, before any work, that the pieces a config names fit the protocol and each other:
the train step and its parameters, the strategy its factory builds, the network against the
data, and one step of local training on the batches the clients will take. What a user's
extension gets wrong is one line naming the piece and, for an exception raised in the user's
code, where (:func:`fedunlearn.config.extensions.describe_failure`)."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedunlearn.config.extensions import USER_ERRORS, describe_failure
from fedunlearn.config.tree import Config, ConfigError
from fedunlearn.data.federated import FederatedData
from fedunlearn.models import build_model
from fedunlearn.models.training import (
    TRAIN_STEPS,
    batch_bounds,
    device_for,
    has_batchnorm,
    local_training,
    train,
)


def check_step_params(cfg: Config) -> None:
    """``training.step_params`` must be keywords the train step takes (its first four
    positional parameters are ``model, x, y, ctx``)."""
    step, name = TRAIN_STEPS.get(cfg.training.step), cfg.training.step
    try:
        signature = inspect.signature(step)
    except ValueError:  # no signature to read (a builtin): the warm-up batch will tell
        return
    try:
        signature.bind_partial(None, None, None, None)  # (the params may be required ones)
    except TypeError as exc:
        raise ConfigError(f"train step '{name}' is called as step(model, x, y, ctx, "
                          f"**training.step_params) and does not take that ({exc}); fix its "
                          "signature") from None
    try:
        signature.bind(None, None, None, None, **cfg.training.step_params)
    except TypeError as exc:
        raise ConfigError(f"config key 'training.step_params' = {dict(cfg.training.step_params)} "
                          f"does not fit train step '{name}' ({exc})") from None


def _strategy_misfit(name: str, params: Mapping[str, Any], exc: Exception) -> str:
    """What a strategy factory's ``TypeError``/``ValueError`` says: its signature does not take
    the call, the parameters do not fit it, or it refused them itself."""
    from fedunlearn.engine.strategy import STRATEGIES

    try:
        signature = inspect.signature(STRATEGIES.get(name))
    except ValueError:  # no signature to read
        return f"config key 'training.strategy_params': {exc}"
    try:
        signature.bind_partial(evaluate_fraction=0.0)
    except TypeError:
        return (f"strategy '{name}': its factory is called as factory(evaluate_fraction=..., "
                "**training.strategy_params) and does not take that; define it as "
                "def factory(evaluate_fraction=0.0, **params)")
    try:
        signature.bind(evaluate_fraction=0.0, **params)
    except TypeError as bad:
        return f"config key 'training.strategy_params' = {dict(params)}: {bad}"
    return f"config key 'training.strategy_params' = {dict(params)}: {describe_failure(exc)}"


def check_strategy(cfg: Config) -> None:
    """Build the strategy once, so a bad factory or bad strategy_params stop before any work;
    it must be a Flower ``Strategy`` that trains every node it is offered (fedunlearn samples
    each round's participants itself)."""
    from flwr.serverapp.strategy import Strategy

    from fedunlearn.engine.strategy import STRATEGIES

    name = cfg.training.strategy
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's construction warnings belong to the run
    try:
        strategy = STRATEGIES.get(name)(evaluate_fraction=cfg.training.evaluate_fraction,
                                        **cfg.training.strategy_params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_strategy_misfit(name, cfg.training.strategy_params, exc)) from None
    except USER_ERRORS as exc:  # a user's factory: its error, in one line
        raise ConfigError(f"strategy '{name}' could not be built: {describe_failure(exc)}; "
                          "fix its factory") from None
    finally:
        flwr_log.setLevel(level)
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy '{name}': its factory returned {type(strategy).__name__}, "
                          "not a flwr.serverapp.strategy.Strategy; return one (e.g. FedAvg)")
    fraction = getattr(strategy, "fraction_train", 1.0)
    if fraction != 1.0:
        raise ConfigError(f"strategy '{name}' has fraction_train = {fraction}: fedunlearn "
                          "samples each round's participants itself (training.sample_fraction), "
                          "so the strategy must train every node offered; set "
                          "fraction_train=1.0 in its factory")


def checked_model(cfg: Config, data: FederatedData) -> torch.nn.Module:
    """The experiment's initial network, checked against the data: a ``torch.nn.Module`` with
    trainable parameters that maps a batch to one score per class."""
    about = f"config [model] ({cfg.model.name}, params {dict(cfg.model.params)})"
    try:
        model = build_model(cfg.model.name, data.input_shape, data.num_classes, seed=cfg.seed,
                            **cfg.model.params)
    except ConfigError:
        raise
    except USER_ERRORS as exc:  # the builder itself failing, in one line
        raise ConfigError(f"{about} could not be built: {describe_failure(exc)}") from None
    try:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"its builder returned {type(model).__name__}, not a "
                            "torch.nn.Module")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("it has no trainable parameters")
        sample = next(d.x[:2] for d in data.clients if len(d))
        with torch.no_grad():  # the model must take the data (shapes, channel counts)
            out = model.eval()(torch.from_numpy(np.asarray(sample, np.float32)))
        shape = tuple(getattr(out, "shape", ()))
        if shape != (len(sample), data.num_classes):
            raise ValueError(f"it maps {len(sample)} samples to "
                             f"{shape or type(out).__name__}, not to "
                             f"({len(sample)}, {data.num_classes}): one score per class of the "
                             f"data's {data.num_classes}")
    except USER_ERRORS as exc:  # a forward pass failing, in one line
        raise ConfigError(f"{about} does not fit the data: {describe_failure(exc)}") from None
    return model


def _reached(bounds: list[tuple[int, int]], epochs: float) -> list[tuple[int, int]]:
    """The batches of an epoch that ``epochs`` epochs of local training reach (0.5 epochs of
    three batches take the first two of a shuffle, never the partial third)."""
    return bounds[:max(1, min(len(bounds), round(epochs * len(bounds))))]


def check_local_training(cfg: Config, data: FederatedData, network: torch.nn.Module) -> None:
    """One training step on one batch, as every client takes them (train step, optimizer,
    model), before any work; it also pays torch's one-off start-up in this process.
    ``network`` (the experiment's, :func:`checked_model`) is left as it is."""
    from fedunlearn.engine.local import warm_up

    t = cfg.training
    try:
        warm_up(cfg, data)
    except USER_ERRORS as exc:  # a user's step or optimizer, in one line
        raise ConfigError(f"config [training] (step '{t.step}', optimizer '{t.optimizer}', "
                          f"model '{cfg.model.name}') fails on one batch before any round: "
                          f"{describe_failure(exc)}") from None
    # the smallest batch a client will take (a client's last, partial one), if smaller (the
    # warm-up's samples, cut to that size): a model may fail on it (BatchNorm on a client of one
    # sample; a last batch of one joins the one before, training.batch_bounds)
    fold = has_batchnorm(network)
    size, k = min((b - a, k) for k, d in enumerate(data.clients)
                  for a, b in _reached(batch_bounds(len(d), t.batch_size, fold_single=fold),
                                       t.local_epochs))
    local = next(d for d in data.clients if len(d))
    if size < min(t.batch_size, len(local)):
        try:
            train(copy.deepcopy(network), local.x[:size], local.y[:size],
                  local_training(cfg, 1.0), seed=0, device=device_for(cfg))
        except USER_ERRORS as exc:  # in one line, with the batch that fails
            raise ConfigError(
                f"config [training] (step '{t.step}', model '{cfg.model.name}') fails on a "
                f"batch of {size} sample{'s' if size > 1 else ''} (client {k} holds "
                f"{len(data.clients[k])}, training.batch_size is {t.batch_size}): "
                f"{describe_failure(exc)}; change training.batch_size or "
                "data.num_clients") from None
