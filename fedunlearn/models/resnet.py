"""ResNet-20 for small images (He, Zhang, Ren and Sun, CVPR 2016, "Deep Residual Learning for
Image Recognition", section 4.2: the CIFAR-10 networks).

A 3x3 convolution with 16 filters, then three stages of ``n = 3`` basic blocks (two 3x3
convolutions each) with 16, 32 and 64 filters on maps of size ``H``, ``H/2`` and ``H/4`` (the
first block of stages 2 and 3 convolves with stride 2), global average pooling and a linear
layer: ``6n + 2 = 20`` weighted layers. Shortcuts are the paper's option A for CIFAR: identity,
and where a stage halves the map and doubles the filters, subsampling by 2 with zero-padded
extra channels, so they add no parameters (0.27 M in all, as the paper's Table 6 lists).

Normalisation, after every convolution as in the paper: **GroupNorm** by default (Wu and He,
ECCV 2018), which Hsieh, Phanishayee, Mutlu and Gibbons (ICML 2020, "The Non-IID Data Quagmire
of Decentralized Machine Learning") propose in place of BatchNorm for training on non-IID
partitions; ``groups = 2`` by default. It keeps no running statistics, so the model's state is
its parameters only. ``norm = "batch"`` gives the
paper's BatchNorm, whose running mean and variance are float buffers and
``num_batches_tracked`` an integer one; see docs/models.md, "BatchNorm buffers", for how the
history store, FedAvg and FedEraser treat them. GroupNorm and BatchNorm have the same number
of parameters (a scale and a shift per channel).

Parameters (``input_shape`` -> count, either norm): (3, 32, 32) -> 269,722; (1, 28, 28) ->
269,434; (1, 8, 8) -> 269,434. Weights start from PyTorch's default initialisation (so that
:func:`~fedunlearn.models.reinitialise` draws from the same distribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedunlearn.models.registry import MODELS, image_shape

NORMS = ("group", "batch")


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    return nn.GroupNorm(groups, channels) if kind == "group" else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with normalisation, plus an option-A shortcut (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, c_out, groups)
        self.stride = stride
        self.extra = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, or subsampling by ``stride`` with zero channels appended (option A)."""
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s (2016) CIFAR ResNet with ``6n + 2`` layers."""

    def __init__(self, c_in: int, num_classes: int, *, blocks: int, norm: str, groups: int,
                 width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.norm = _norm(norm, width, groups)
        layers: list[nn.Module] = []
        c = width
        for stage in range(3):
            c_out = width * 2 ** stage
            for b in range(blocks):
                layers.append(BasicBlock(c, c_out, 2 if stage > 0 and b == 0 else 1, norm,
                                         groups))
                c = c_out
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm(self.conv(x)))
        out = self.stages(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int, norm: str = "group",
             groups: int = 2) -> nn.Module:
    """ResNet-20 (He et al. 2016) for ``(C, H, W)`` images of at least 4x4.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Output units.
    norm : {"group", "batch"}, optional
        GroupNorm (default) or BatchNorm after every convolution.
    groups : int, optional
        GroupNorm's number of groups (default 2); it must divide 16. Ignored by BatchNorm.
    """
    c_in, height, width = image_shape("resnet20", input_shape)
    if min(height, width) < 4:
        raise ValueError(f"model 'resnet20' needs images of at least 4x4, got {height}x{width}")
    if norm not in NORMS:
        raise ValueError(f"resnet20: unknown norm {norm!r}; known: {', '.join(NORMS)}")
    if norm == "group" and (groups < 1 or 16 % groups):
        raise ValueError(f"resnet20: groups = {groups} must divide 16 (the first stage's "
                         "channels), e.g. 1, 2, 4, 8 or 16")
    return CifarResNet(c_in, num_classes, blocks=3, norm=norm, groups=groups)
