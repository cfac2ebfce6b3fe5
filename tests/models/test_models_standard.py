"""The standard models (LeNet-5, McMahan et al.'s CNN, ResNet-20): parameter counts against
hand-computed layer sums and the papers' figures, shapes on MNIST / CIFAR / digits inputs,
CPU and CUDA training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedunlearn.models import MODELS, build_model
from fedunlearn.models.params import buffer_names, get_params, running_stat_names
from fedunlearn.models.training import LocalTraining, evaluate, train

MNIST, CIFAR, DIGITS = (1, 28, 28), (3, 32, 32), (1, 8, 8)


def conv(c_in: int, c_out: int, k: int | tuple[int, int], bias: bool = True) -> int:
    kh, kw = (k, k) if isinstance(k, int) else k
    return c_out * (c_in * kh * kw + (1 if bias else 0))


def dense(n_in: int, n_out: int) -> int:
    return n_out * (n_in + 1)


def lenet5_count(c: int, c5_kernel: int) -> int:
    # C1 6@5x5, C3 16@5x5 (full), C5 120 over S4's maps, F6 84, output 10.
    return (conv(c, 6, 5) + conv(6, 16, 5) + conv(16, 120, c5_kernel) + dense(120, 84)
            + dense(84, 10))


def mcmahan_count(c: int, side_after_pools: int) -> int:
    return conv(c, 32, 5) + conv(32, 64, 5) + dense(64 * side_after_pools ** 2, 512) \
        + dense(512, 10)


def resnet20_count(c: int) -> int:
    # stem conv + norm, then 3 stages of 3 blocks with two bias-free 3x3 convs and two norms
    # (scale + shift per channel), option-A shortcuts (no parameters), then the linear layer.
    total = conv(c, 16, 3, bias=False) + 2 * 16
    c_prev = 16
    for width in (16, 32, 64):
        for _ in range(3):
            total += conv(c_prev, width, 3, bias=False) + conv(width, width, 3, bias=False)
            total += 2 * 2 * width
            c_prev = width
    return total + dense(64, 10)


EXPECTED = {
    ("lenet5", MNIST): lenet5_count(1, 5), ("lenet5", CIFAR): lenet5_count(3, 5),
    ("lenet5", DIGITS): lenet5_count(1, 2),
    ("mcmahan_cnn", MNIST): mcmahan_count(1, 7), ("mcmahan_cnn", CIFAR): mcmahan_count(3, 8),
    ("mcmahan_cnn", DIGITS): mcmahan_count(1, 2),
    ("resnet20", MNIST): resnet20_count(1), ("resnet20", CIFAR): resnet20_count(3),
    ("resnet20", DIGITS): resnet20_count(1),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "shape"), sorted(EXPECTED))
def test_parameter_counts_match_the_layer_sums(name, shape):
    model = build_model(name, shape, 10, seed=0)
    assert n_params(model) == EXPECTED[name, shape]
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


def test_parameter_counts_match_the_papers_and_the_readme():
    # McMahan et al. 2017: "1,663,370 total parameters"; He et al. 2016, Table 6: ResNet-20
    # has 0.27 M. docs/models.md lists these exact numbers.
    counts = {(n, s): n_params(build_model(n, s, 10, seed=0)) for n, s in EXPECTED}
    assert counts["mcmahan_cnn", MNIST] == 1_663_370
    assert counts["mcmahan_cnn", CIFAR] == 2_156_490
    assert counts["lenet5", MNIST] == 61_706 and counts["lenet5", CIFAR] == 62_006
    assert counts["resnet20", CIFAR] == 269_722 and counts["resnet20", MNIST] == 269_434
    assert n_params(build_model("resnet20", CIFAR, 10, seed=0, norm="batch")) == 269_722


def test_lenet5_keeps_the_papers_map_sizes_on_mnist_and_cifar():
    # C1 -> 28x28, S2 -> 14, C3 -> 10, S4 -> 5, C5 -> 1x1 (LeCun et al. 1998, section II.B).
    for shape in (MNIST, CIFAR):
        net = build_model("lenet5", shape, 10, seed=0)
        sizes, x = [], torch.zeros(1, *shape)
        for layer in net:
            x = layer(x)
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
                sizes.append(tuple(x.shape[1:]))
        assert sizes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120, 1, 1)]


def test_registry_names_and_bad_parameters():
    assert {"lenet5", "mcmahan_cnn", "resnet20"} <= set(MODELS.names())
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("lenet5", (30,), 10, seed=0)
    with pytest.raises(ValueError, match="unknown norm 'layer'; known: group, batch"):
        build_model("resnet20", CIFAR, 10, seed=0, norm="layer")
    with pytest.raises(ValueError, match="must divide 16"):
        build_model("resnet20", CIFAR, 10, seed=0, groups=3)
    with pytest.raises(ValueError, match="at least 4x4"):
        build_model("mcmahan_cnn", (1, 3, 3), 10, seed=0)


def test_norms_and_their_state():
    group = build_model("resnet20", CIFAR, 10, seed=0)
    batch = build_model("resnet20", CIFAR, 10, seed=0, norm="batch")
    assert sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 2
               for m in group.modules()) == 19
    assert not buffer_names(group)  # GroupNorm keeps no statistics
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in batch.modules()) == 19
    state = get_params(batch)
    floats = {k for k in buffer_names(batch) if np.issubdtype(state[k].dtype, np.floating)}
    assert len(floats) == 38 and running_stat_names(state) == floats
    assert {k for k in buffer_names(batch) if k not in floats} == \
        {k for k in state if k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", ["lenet5", "mcmahan_cnn", "resnet20"])
def test_models_train_on_cpu(name):
    rng = np.random.default_rng(0)
    x = 0.1 * rng.random((64, 1, 12, 12), dtype=np.float32)
    y = np.arange(64) % 2
    for i, label in enumerate(y):  # a bright 4x4 patch on the left (class 1) or right (0)
        col = 1 if label else 7
        x[i, :, 4:8, col:col + 4] += 1.0
    model = build_model(name, x.shape[1:], 2, seed=0)
    before = evaluate(model, x, y)["loss"]
    train(model, x, y, LocalTraining(epochs=5, batch_size=16, learning_rate=0.05,
                                     momentum=0.9), seed=0)
    assert evaluate(model, x, y)["loss"] < before
    again = build_model(name, x.shape[1:], 2, seed=0)
    train(again, x, y, LocalTraining(epochs=5, batch_size=16, learning_rate=0.05,
                                     momentum=0.9), seed=0)
    a, b = get_params(model), get_params(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same seed, same model


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA is not available (torch.cuda.is_available() is False); "
                           "this test runs on a machine with a GPU")
@pytest.mark.parametrize("name", ["lenet5", "mcmahan_cnn", "resnet20"])
def test_models_train_and_evaluate_on_cuda(name):
    rng = np.random.default_rng(0)
    x = rng.random((32, *CIFAR), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    model = build_model(name, CIFAR, 10, seed=0, **({"norm": "batch"} if name == "resnet20"
                                                     else {}))
    stats = train(model, x, y, LocalTraining(epochs=1, batch_size=8), seed=0, device="cuda")
    assert stats["steps"] == 4 and np.isfinite(stats["loss"])
    assert all(p.device.type == "cpu" for p in model.parameters())  # handed back on the CPU
    on_gpu = evaluate(model, x, y, device="cuda")
    on_cpu = evaluate(model, x, y, device="cpu")
    assert abs(on_gpu["loss"] - on_cpu["loss"]) < 1e-3


@pytest.mark.parametrize(("path", "model"), [("simulations/mnist5k_lenet5.toml", "lenet5"),
                                             ("simulations/mnist5k_mcmahan.toml", "mcmahan_cnn")])
def test_documented_mnist5k_configs_parse_and_name_their_model(path, model):
    from pathlib import Path

    from fedunlearn.config.tree import load_config

    cfg = load_config(Path(__file__).parents[2] / path, [])
    assert cfg.model.name == model and cfg.data.source == "mnist_5k"
    assert cfg.unlearning.requests == []
