"""The model registry, and building a registered model with seeded initial weights.

Every builder takes ``input_shape`` (without the batch axis) and ``num_classes`` and returns an
``torch.nn.Module``. Users add their own with ``MODELS.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedunlearn.config.registry import Registry

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int,
                **params: object) -> nn.Module:
    """Build a registered model with deterministic initial weights drawn from ``seed``."""
    builder = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(tuple(input_shape), num_classes, **params)


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Draw fresh initial weights for ``model`` in place from ``seed`` (``reset_parameters`` of
    every submodule that has one), leaving the global torch generator untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


def image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input, or a one-line error naming the model."""
    if len(input_shape) != 3:
        raise ValueError(f"model '{name}' needs image inputs (C, H, W), got shape {input_shape}; "
                         "use model.name = 'mlp' or 'logistic' for tabular data")
    c, h, w = (int(d) for d in input_shape)
    return c, h, w
