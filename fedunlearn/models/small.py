"""The framework's small networks: an MLP, a two-block CNN and multinomial logistic regression."""

from __future__ import annotations

import math

from torch import nn

from fedunlearn.models.registry import MODELS, image_shape


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (64, 64)) -> nn.Module:
    """Multi-layer perceptron with ReLU; the last hidden layer gives the penultimate features."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (16, 32)) -> nn.Module:
    """Two 3x3 conv blocks (the second pooled when the image allows), global pooling, a linear head.

    Works on 8x8 (digits) as well as 28x28 (MNIST) and 32x32 (CIFAR-10) inputs.
    """
    c_in, height, _ = image_shape("cnn", input_shape)
    c1, c2 = channels
    pool_first = height >= 16
    return nn.Sequential(
        nn.Conv2d(c_in, c1, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2) if pool_first else nn.Identity(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(c2 * 4, num_classes),
    )


@MODELS.register("logistic")
def logistic(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (one linear layer on flattened inputs)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
