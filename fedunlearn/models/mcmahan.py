"""The CNN of McMahan, Moore, Ramage, Hampson and Agüera y Arcas (AISTATS 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data"), the model of their
MNIST FedAvg experiments.

"A CNN with two 5x5 convolution layers (the first with 32 channels, the second with 64, each
followed with 2x2 max pooling), a fully connected layer with 512 units and ReLu activation, and a
final softmax output layer (1,663,370 total parameters)." That total pins the padding down: only
"same" convolutions (padding 2) leave a 7x7x64 map before the 512-unit layer on 28x28 inputs,
``832 + 51,264 + 1,606,144 + 5,130 = 1,663,370``. The convolutions use ReLU as well; softmax is
in the cross-entropy loss.

Parameters (``input_shape`` -> count): (1, 28, 28) -> 1,663,370; (3, 32, 32) -> 2,156,490;
(1, 8, 8) -> 188,810.
"""

from __future__ import annotations

from torch import nn

from fedunlearn.models.registry import MODELS, image_shape


@MODELS.register("mcmahan_cnn")
def mcmahan_cnn(input_shape: tuple[int, ...], num_classes: int,
                channels: tuple[int, int] = (32, 64), hidden: int = 512) -> nn.Module:
    """McMahan et al.'s (2017) MNIST CNN for ``(C, H, W)`` images of at least 4x4.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Output units.
    channels : tuple of int, optional
        Channels of the two convolutions (default ``(32, 64)``, the paper's).
    hidden : int, optional
        Units of the fully connected layer (default 512, the paper's).
    """
    c_in, height, width = image_shape("mcmahan_cnn", input_shape)
    if min(height, width) < 4:
        raise ValueError(f"model 'mcmahan_cnn' needs images of at least 4x4, "
                         f"got {height}x{width}")
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(c_in, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (height // 4) * (width // 4), hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
