"""The Hugging Face Hub sources (mnist, fashion_mnist, cifar10) without a network.

Each test builds a small ``datasets.DatasetDict`` shaped like the Hub set (an image column of
PIL images with the Hub's column name and mode, a ``ClassLabel`` label, train and test splits)
and replaces :func:`fedunlearn.data.sources.fetch_hub`, the only step that downloads; the rest
of the path (decoding, scaling, pooling the splits, splitting, partitioning with flwr-datasets)
is the one real runs take. Every pixel is known: ``(i + 3h + 5w + 40c) mod 256`` for sample
``i``, label ``3i mod 10``, so each sample can be traced back to where it came from.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from fedunlearn.config.tree import load_config
from fedunlearn.data import load_source, sources
from fedunlearn.data.federated import build_federated_data

# name -> (Hub id, image column, PIL mode, side, channels)
HUB = {"mnist": ("ylecun/mnist", "image", "L", 28, 1),
       "fashion_mnist": ("zalando-datasets/fashion_mnist", "image", "L", 28, 1),
       "cifar10": ("uoft-cs/cifar10", "img", "RGB", 32, 3)}
N_TRAIN, N_TEST = 80, 20


def known_pixels(i: int, side: int, channels: int) -> np.ndarray:
    """Sample ``i`` as ``(C, H, W)`` uint8."""
    c, h, w = np.meshgrid(np.arange(channels), np.arange(side), np.arange(side), indexing="ij")
    return ((i + 3 * h + 5 * w + 40 * c) % 256).astype(np.uint8)


def label_of(i: int) -> int:
    return 3 * i % 10


def fake_hub(name: str) -> datasets.DatasetDict:
    _, column, mode, side, channels = HUB[name]

    def split(indices: range) -> datasets.Dataset:
        images = []
        for i in indices:
            chw = known_pixels(i, side, channels)
            hwc = chw[0] if channels == 1 else chw.transpose(1, 2, 0)
            images.append(Image.fromarray(hwc, mode=mode))
        features = datasets.Features({column: datasets.Image(),
                                      "label": datasets.ClassLabel(num_classes=10)})
        return datasets.Dataset.from_dict(
            {column: images, "label": [label_of(i) for i in indices]}, features=features)

    return datasets.DatasetDict({"train": split(range(N_TRAIN)),
                                 "test": split(range(N_TRAIN, N_TRAIN + N_TEST))})


@pytest.fixture
def offline_hub(monkeypatch):
    """Serve the fake sets in place of the Hub; records which ids were asked for."""
    asked: list[str] = []
    by_id = {hub_id: name for name, (hub_id, *_rest) in HUB.items()}

    def fetch(hub_id: str) -> datasets.DatasetDict:
        asked.append(hub_id)
        return fake_hub(by_id[hub_id])

    monkeypatch.setattr(sources, "fetch_hub", fetch)
    return asked


def index_of(x: np.ndarray) -> np.ndarray:
    """The sample index each image encodes (its top-left pixel of channel 0)."""
    return np.rint(x[:, 0, 0, 0] * 255).astype(np.int64)


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_source_decodes_scales_and_pools_the_splits(name, offline_hub):
    hub_id, _, _, side, channels = HUB[name]
    ds = load_source(name)
    assert offline_hub == [hub_id]
    n = N_TRAIN + N_TEST
    assert ds.name == name and ds.num_classes == 10
    assert ds.x.dtype == np.float32 and ds.x.shape == (n, channels, side, side)
    assert ds.y.dtype == np.int64
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    expected = np.stack([known_pixels(i, side, channels) for i in range(n)])  # train, then test
    assert np.array_equal(np.rint(ds.x * 255).astype(np.uint8), expected)
    assert np.allclose(ds.x * 255, expected, atol=1e-4)  # divided by 255, nothing else
    assert ds.y.tolist() == [label_of(i) for i in range(n)]


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_hub_source_through_splits_and_partitioning(name, offline_hub):
    _, _, _, side, channels = HUB[name]
    cfg = load_config(None, [f'data.source="{name}"', "data.num_clients=4",
                             'data.partition="iid"', "data.test_fraction=0.2",
                             "data.server_fraction=0.1"])
    fed = build_federated_data(cfg)
    n = N_TRAIN + N_TEST
    assert fed.input_shape == (channels, side, side) and fed.num_classes == 10
    assert len(fed.test) == 20 and len(fed.server) == 10
    sizes = [len(c) for c in fed.clients]
    assert sum(sizes) == n - 30 and max(sizes) - min(sizes) <= 1  # iid shards
    seen = []
    for part in [*fed.clients, fed.test, fed.server]:
        idx = index_of(part.x)
        seen += idx.tolist()
        assert part.y.tolist() == [label_of(i) for i in idx]  # labels travel with images
        expected = np.stack([known_pixels(i, side, channels) for i in idx])
        assert np.array_equal(np.rint(part.x * 255).astype(np.uint8), expected)
    assert sorted(seen) == list(range(n))  # every sample exactly once


def test_hub_labels_reach_the_pathological_partitioner(offline_hub):
    cfg = load_config(None, ['data.source="fashion_mnist"', "data.num_clients=5",
                             'data.partition="pathological"', "data.classes_per_client=2"])
    fed = build_federated_data(cfg)
    for part in fed.clients:
        assert len(part) and len(set(part.y.tolist())) == 2
        assert part.y.tolist() == [label_of(i) for i in index_of(part.x)]


def test_hub_failure_is_one_line_naming_the_source(monkeypatch):
    def offline(hub_id: str) -> datasets.DatasetDict:
        raise ConnectionError("no route to huggingface.co\nsecond line")

    monkeypatch.setattr(sources, "fetch_hub", offline)
    with pytest.raises(RuntimeError, match=r"dataset 'cifar10' \(uoft-cs/cifar10\) could not "
                                           r"be loaded .* \[ConnectionError: no route to "
                                           r"huggingface.co\]$"):
        load_source("cifar10")
