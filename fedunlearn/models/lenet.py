"""LeNet-5 (LeCun, Bottou, Bengio and Haffner, 1998, "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 86(11)), in its common modern form.

The paper's network reads a 32x32 image: C1 (6 maps, 5x5 conv) -> S2 (2x2 subsampling) -> C3 (16
maps, 5x5) -> S4 (2x2) -> C5 (120 maps, a 5x5 conv over S4's 5x5 maps, i.e. a full connection)
-> F6 (84 units) -> 10 outputs. Here:

* **28x28 (MNIST)**: C1 is zero-padded by 2, which is the paper's own set-up (the 28x28 digits
  sit in a 32x32 field); every later size is the paper's. **32x32 (CIFAR-10)**: no padding,
  exactly the paper's sizes.
* **Smaller images (8x8 digits)**: C1 and C3 are both padded by 2 ("same"), so the maps go
  8 -> 8 -> 4 -> 4 -> 2; C5 keeps its role as a full connection, its kernel being the size of
  S4's maps (2x2 here, 5x5 on 28x28 and 32x32).
* Departures from the paper, as usual today: C3 connects to all 6 maps of S2 (not the paper's
  sparse table), subsampling is max pooling and the activation ReLU by default
  (``pool = "avg"`` and ``activation = "tanh"``, the paper's scaled ``1.7159 tanh(2x/3)``, are
  closer to the original), and the output is a linear layer trained with cross-entropy
  (softmax) instead of the paper's Euclidean RBF units.

Parameters (``input_shape`` -> count): (1, 28, 28) -> 61,706; (3, 32, 32) -> 62,006;
(1, 8, 8) -> 21,386.
"""

from __future__ import annotations

import torch
from torch import nn

from fedunlearn.models.registry import MODELS, image_shape

ACTIVATIONS = ("relu", "tanh")
POOLS = ("max", "avg")


class ScaledTanh(nn.Module):
    """LeCun et al.'s squashing function ``1.7159 * tanh(2x / 3)`` (1998, appendix A)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int, activation: str = "relu",
           pool: str = "max") -> nn.Module:
    """LeNet-5 for ``(C, H, W)`` images of at least 4x4 (see the module docstring).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Output units.
    activation : {"relu", "tanh"}, optional
        ReLU (default) or the paper's scaled tanh.
    pool : {"max", "avg"}, optional
        Max pooling (default) or average pooling (the paper's subsampling, without its
        trainable coefficient and bias).
    """
    c_in, height, width = image_shape("lenet5", input_shape)
    if min(height, width) < 4:
        raise ValueError(f"model 'lenet5' needs images of at least 4x4, got {height}x{width}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"lenet5: unknown activation {activation!r}; known: "
                         f"{', '.join(ACTIVATIONS)}")
    if pool not in POOLS:
        raise ValueError(f"lenet5: unknown pool {pool!r}; known: {', '.join(POOLS)}")

    def act() -> nn.Module:
        return nn.ReLU() if activation == "relu" else ScaledTanh()

    def subsample() -> nn.Module:
        return nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)

    pad1 = 2 if min(height, width) < 32 else 0          # 28x28 -> the paper's 32x32 field
    h2, w2 = (height + 2 * pad1 - 4) // 2, (width + 2 * pad1 - 4) // 2   # after C1 and S2
    pad3 = 2 if min(h2, w2) < 14 else 0                  # small images: keep C3 "same"
    h4, w4 = (h2 + 2 * pad3 - 4) // 2, (w2 + 2 * pad3 - 4) // 2          # after C3 and S4
    return nn.Sequential(
        nn.Conv2d(c_in, 6, 5, padding=pad1), act(), subsample(),       # C1, S2
        nn.Conv2d(6, 16, 5, padding=pad3), act(), subsample(),         # C3, S4
        nn.Conv2d(16, 120, (h4, w4)), act(), nn.Flatten(),              # C5: a full connection
        nn.Linear(120, 84), act(),                                      # F6
        nn.Linear(84, num_classes),                                     # output (softmax in the loss)
    )
